"""Object versions use the reference's HMAC input, so a swap keeps versions."""

from __future__ import annotations

import base64
import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from provider.config import SecretObject
from provider.versions import object_json, object_version

KEY = bytes(range(32))


def test_object_json_is_gos_marshal_of_the_reference_struct() -> None:
    obj = SecretObject(object_name="secret-1", secret_path="secret/data/kv1", secret_key="bar1", file_permission=0o624)
    assert object_json(obj) == (
        b'{"ObjectName":"secret-1","SecretPath":"secret/data/kv1","SecretKey":"bar1","Method":"",'
        b'"SecretArgs":null,"FilePermission":404,"Encoding":""}'
    )


def test_secret_args_are_sorted_and_fields_kept_as_written() -> None:
    obj = SecretObject(
        object_name="cert",
        secret_path="pki/issue/x",
        method="put",
        secret_args={"ttl": "1h", "common_name": "a<b"},
        encoding="BASE64",
    )
    assert object_json(obj) == (
        b'{"ObjectName":"cert","SecretPath":"pki/issue/x","SecretKey":"","Method":"put",'
        b'"SecretArgs":{"common_name":"a\\u003cb","ttl":"1h"},"FilePermission":0,"Encoding":"BASE64"}'
    )


def test_version_is_padded_urlsafe_hmac_of_config_and_contents() -> None:
    obj = SecretObject(object_name="secret-1", secret_path="secret/data/kv1", secret_key="bar1", file_permission=0o624)
    expected = base64.urlsafe_b64encode(
        hmac.new(
            KEY,
            b'{"ObjectName":"secret-1","SecretPath":"secret/data/kv1","SecretKey":"bar1","Method":"",'
            b'"SecretArgs":null,"FilePermission":404,"Encoding":""}' + b"value",
            hashlib.sha256,
        ).digest()
    ).decode()
    assert object_version(KEY, obj, b"value") == expected
    assert expected.endswith("=")


def test_equal_contents_in_two_objects_get_different_versions() -> None:
    a = SecretObject(object_name="a", secret_path="p", secret_key="k")
    b = SecretObject(object_name="b", secret_path="p", secret_key="k")
    assert object_version(KEY, a, b"same") != object_version(KEY, b, b"same")
    assert object_version(KEY, a, b"same") != object_version(bytes(32), a, b"same")


@given(key=st.binary(max_size=200), name=st.text(max_size=20), contents=st.binary(max_size=300))
def test_the_version_is_hmac_sha256_for_any_key_and_contents(key: bytes, name: str, contents: bytes) -> None:
    """Keys of any length (longer than SHA-256's block is hashed first), and a change of
    key between calls (the kept keyed hashes are remade)."""
    obj = SecretObject(object_name=name or "o", secret_path="p", secret_key="k")
    for used in (key, KEY, key):
        expected = hmac.new(used, object_json(obj) + contents, hashlib.sha256).digest()
        assert object_version(used, obj, contents) == base64.urlsafe_b64encode(expected).decode()
