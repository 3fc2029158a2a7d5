"""Pins the bytes and versions of objects that use none of the file-shaping fields.

tests/golden/files-pin.json was recorded from the code before templates, secretKeyPath,
expandKeys and format existed (commit b4ec918 + the vault-setup fix); those features must
not change one byte or one version of a class that does not use them (the reference's
bytes and versions, which a cluster swapping providers keeps).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from provider import gojson, render
from provider.config import parse_objects
from provider.errors import ProviderError
from provider.versions import object_version

KEY = b"pinned-hmac-key-of-thirty-two-by"

_KV2 = (
    '{"request_id":"5a1f","lease_id":"","renewable":false,"lease_duration":0,'
    '"data":{"data":{"username":"app","password":"s3cr\\u00e9t","port":5432,"ratio":1.50,"big":12345678901234567890,'
    '"nested":{"b":1,"a":[true,null,"x<y>&"]},"b64":"aGVsbG8=","hex":"68656c6c6f"},'
    '"metadata":{"created_time":"2026-01-01T00:00:00Z","version":3,"destroyed":false}},'
    '"wrap_info":null,"warnings":null,"auth":null,"mount_type":"kv"}'
)
_KV1 = (
    '{"request_id":"77aa","lease_id":"","renewable":false,"lease_duration":2764800,'
    '"data":{"api-key":"k-123","multi":"line1\\nline2\\n","empty":"","num":7,"data":"not-kv2"},'
    '"wrap_info":null,"warnings":null,"auth":null}'
)
_DB = (
    '{"request_id":"d1","lease_id":"database/creds/app/AbC","renewable":true,"lease_duration":3600,'
    '"data":{"username":"v-app-xyz","password":"A1a-pass"},"wrap_info":null,"warnings":null,"auth":null}'
)
_PKI = (
    '{"request_id":"p1","lease_id":"pki/issue/app/Q","renewable":false,"lease_duration":259199,'
    '"data":{"certificate":"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----",'
    '"issuing_ca":"-----BEGIN CERTIFICATE-----\\nMIIC\\n-----END CERTIFICATE-----",'
    '"ca_chain":["-----BEGIN CERTIFICATE-----\\nMIIC\\n-----END CERTIFICATE-----"],'
    '"private_key":"-----BEGIN RSA PRIVATE KEY-----\\nMIIE\\n-----END RSA PRIVATE KEY-----",'
    '"private_key_type":"rsa","serial_number":"1a:2b","expiration":1700000000},'
    '"warnings":["a warning"],"auth":null,"wrap_info":null}'
)
_BARE = '{"keys":[{"kid":"1","n":"abc"}],"other":"x"}'

CASES: list[tuple[str, str, str]] = [
    (
        "kv2",
        _KV2,
        """
- {objectName: whole, secretPath: secret/data/app}
- {objectName: user, secretPath: secret/data/app, secretKey: username}
- {objectName: pass, secretPath: secret/data/app, secretKey: password, filePermission: 0600}
- {objectName: port, secretPath: secret/data/app, secretKey: port}
- {objectName: ratio, secretPath: secret/data/app, secretKey: ratio}
- {objectName: big, secretPath: secret/data/app, secretKey: big}
- {objectName: nested, secretPath: secret/data/app, secretKey: nested}
- {objectName: b64, secretPath: secret/data/app, secretKey: b64, encoding: base64}
- {objectName: hex, secretPath: secret/data/app, secretKey: hex, encoding: HEX}
- {objectName: dotted, secretPath: secret/data/app, secretKey: a.b}
- {objectName: enc-ignored, secretPath: secret/data/app, encoding: base64}
- {objectName: dir/sub, secretPath: /v1/secret/data/app?version=3, secretKey: username}
""",
    ),
    (
        "kv1",
        _KV1,
        """
- {objectName: whole, secretPath: kv/app}
- {objectName: key, secretPath: kv/app, secretKey: api-key}
- {objectName: multi, secretPath: kv/app, secretKey: multi}
- {objectName: empty, secretPath: kv/app, secretKey: empty}
- {objectName: num, secretPath: kv/app, secretKey: num}
- {objectName: data, secretPath: kv/app, secretKey: data}
""",
    ),
    (
        "database",
        _DB,
        """
- {objectName: creds, secretPath: database/creds/app}
- {objectName: user, secretPath: database/creds/app, secretKey: username}
- {objectName: pw, secretPath: database/creds/app, secretKey: password, filePermission: 0400}
""",
    ),
    (
        "pki",
        _PKI,
        """
- objectName: cert
  secretPath: pki/issue/app
  method: PUT
  secretArgs: {common_name: a.example.com, ttl: 72h, alt_names: [b.example.com]}
- objectName: key
  secretPath: pki/issue/app
  method: POST
  secretArgs: {common_name: a.example.com}
  secretKey: private_key
- {objectName: chain, secretPath: pki/issue/app, method: POST, secretKey: ca_chain}
""",
    ),
    (
        "bare",
        _BARE,
        """
- {objectName: keys, secretPath: identity/oidc/.well-known/keys, secretKey: keys}
""",
    ),
]


def _enveloped(text: str) -> dict[str, object]:
    body = gojson.loads(text)
    return body if "request_id" in body else {"data": body}


def rendered() -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for case, reply, objects_yaml in CASES:
        body = _enveloped(reply)
        for obj in parse_objects(objects_yaml):
            entry = {"case": case, "object": obj.object_name}
            data = render.ObjectData(path=obj.secret_path, body=body)
            try:
                (file,) = render.object_files(obj, data, {})
                entry["contents"] = base64.b64encode(file.contents).decode()
                entry["version"] = object_version(KEY, obj, file.version_input)
            except ProviderError as e:
                entry["error"] = str(e)
            out.append(entry)
    return out


def test_objects_without_the_new_fields_keep_their_bytes_and_versions() -> None:
    golden = json.loads((Path(__file__).parent / "golden" / "files-pin.json").read_text())
    assert rendered() == golden


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_the_pin_covers_each_kind_of_reply(case: str) -> None:
    golden = json.loads((Path(__file__).parent / "golden" / "files-pin.json").read_text())
    assert any(entry["case"] == case and "version" in entry for entry in golden)
