"""The objects the benches mount: KV keys of the seeded secrets, and a PKI certificate."""

from __future__ import annotations

from typing import Any


def kv_objects(count: int) -> list[dict[str, Any]]:
    """One object per seeded KV v2 secret secret/data/app/<i> (key password)."""
    return [
        {"objectName": f"p{i}", "secretPath": f"secret/data/app/{i}", "secretKey": "password"} for i in range(count)
    ]


def pki_object(ttl: str) -> dict[str, Any]:
    """A certificate for a.example.com from the seeded PKI role."""
    return {
        "objectName": "crt",
        "secretPath": "pki/issue/web",
        "method": "PUT",
        "secretKey": "certificate",
        "secretArgs": {"common_name": "a.example.com", "ttl": ttl},
    }
