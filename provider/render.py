"""How a Vault reply becomes a file's bytes, matching the reference byte for byte.

Kept apart from the Mount flow so later renderers (templates of several keys, all keys
as files, nested key selection) have one place to live.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any

from provider import gojson
from provider.config import SecretObject
from provider.errors import ConfigError, VaultNotFound, quote

# The reference's vault/api Secret struct, in field order; the last ones are omitempty.
_SECRET_FIELDS: tuple[tuple[str, Any], ...] = (
    ("request_id", ""),
    ("lease_id", ""),
    ("lease_duration", 0),
    ("renewable", False),
    ("data", None),
    ("warnings", None),
)
_OMITEMPTY_FIELDS = ("auth", "wrap_info", "mount_type")
_AUTH_FIELDS: tuple[tuple[str, Any], ...] = (
    ("client_token", ""),
    ("accessor", ""),
    ("policies", None),
    ("token_policies", None),
    ("identity_policies", None),
    ("metadata", None),
    ("orphan", False),
    ("entity_id", ""),
    ("lease_duration", 0),
    ("renewable", False),
    ("mfa_requirement", None),
)
_WRAP_INFO_FIELDS: tuple[tuple[str, Any], ...] = (
    ("token", ""),
    ("accessor", ""),
    ("ttl", 0),
    ("creation_time", "0001-01-01T00:00:00Z"),
    ("creation_path", ""),
    ("wrapped_accessor", ""),
)


def whole_response(body: Mapping[str, Any], *, request_id: bool = True) -> bytes:
    """The reply as the reference writes it: Go's json.Marshal of vault/api.Secret."""
    fields = dict(body)
    if not request_id:
        fields["request_id"] = ""
    parts = [_struct(fields, _SECRET_FIELDS)[1:-1]]
    for name in _OMITEMPTY_FIELDS:
        value = fields.get(name)
        if not value:
            continue
        if name == "auth" and isinstance(value, Mapping):
            encoded = _struct(value, _AUTH_FIELDS)
        elif name == "wrap_info" and isinstance(value, Mapping):
            encoded = _struct(value, _WRAP_INFO_FIELDS)
        else:
            encoded = gojson.dumps(value).decode()
        parts.append(f'"{name}":{encoded}')
    return ("{" + ",".join(parts) + "}").encode()


def _struct(values: Mapping[str, Any], fields: tuple[tuple[str, Any], ...]) -> str:
    return (
        "{" + ",".join(f'"{name}":{gojson.dumps(values.get(name, default)).decode()}' for name, default in fields) + "}"
    )


def key_value(data: Any, key: str, path: str) -> bytes:
    """The value at key: under data.data when that is a map (KV v2), else data."""
    if not isinstance(data, Mapping):
        raise VaultNotFound(f"Vault returned no data at {path}")
    nested = data.get("data")
    values = nested if isinstance(nested, Mapping) else data
    if key not in values:
        raise VaultNotFound(f"key {quote(key)} does not exist at {path}")
    value = values[key]
    if isinstance(value, str):
        return value.encode("utf-8")
    return gojson.dumps(value)


def decode(value: bytes, obj: SecretObject) -> bytes:
    """Decode a key's value per the object's encoding, as Go's decoders do."""
    encoding = obj.normalized_encoding
    try:
        if encoding == "base64":
            # Go's StdEncoding skips line breaks and requires padding.
            return binascii.a2b_base64(value.replace(b"\r", b"").replace(b"\n", b""), strict_mode=True)
        if encoding == "hex":
            return binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"the value of key {quote(obj.secret_key)} at {obj.secret_path} is not valid {encoding} "
            f"(encoding: {obj.encoding})"
        ) from None
    return value


def file_contents(body: Mapping[str, Any], obj: SecretObject, path: str) -> tuple[bytes, bytes]:
    """The file's bytes and the bytes its version is computed from.

    They differ only for a whole-response object, whose version leaves out the
    per-request request_id so an unchanged secret keeps its version.
    """
    if not obj.secret_key:
        return whole_response(body), whole_response(body, request_id=False)
    contents = decode(key_value(body.get("data"), obj.secret_key, path), obj)
    return contents, contents


__all__ = ["decode", "file_contents", "key_value", "whole_response"]
