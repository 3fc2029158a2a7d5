"""Object versions: HMAC-SHA256 over the object's configuration and its contents.

The input is what the reference provider hashes (Go's json.Marshal of its object
struct, whose fields carry no JSON tags, then the file bytes), so a cluster that swaps
providers keeps its versions. The key is secret and per cluster: a version says
whether a file changed and nothing about its value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import weakref

from provider import gojson
from provider.config import SecretObject

# Each parsed object's JSON, computed once and dropped with the object (the parse cache
# decides how long objects live; a strong cache here would keep evicted ones, templates
# and all, alive).
_OBJECT_JSON: weakref.WeakKeyDictionary[SecretObject, bytes] = weakref.WeakKeyDictionary()


def object_json(obj: SecretObject) -> bytes:
    """Go's json.Marshal of the reference's config.Secret for this object."""
    cached = _OBJECT_JSON.get(obj)
    if cached is None:
        cached = _OBJECT_JSON[obj] = _object_json(obj)
    return cached


def _object_json(obj: SecretObject) -> bytes:
    fields: tuple[tuple[str, str], ...] = (
        ("ObjectName", gojson.encode_string(obj.object_name)),
        ("SecretPath", gojson.encode_string(obj.secret_path)),
        ("SecretKey", gojson.encode_string(obj.secret_key)),
        ("Method", gojson.encode_string(obj.method)),
        ("SecretArgs", gojson.dumps(obj.secret_args).decode() if obj.secret_args is not None else "null"),
        ("FilePermission", str(obj.file_permission)),
        ("Encoding", gojson.encode_string(obj.encoding)),
    )
    if obj.shaped:  # fields the reference lacks, only when used: unshaped versions stay the reference's
        fields += tuple(
            (name, gojson.dumps(value).decode())
            for name, value in (
                ("SecretKeyPath", obj.secret_key_path),
                ("ExpandKeys", obj.expand_keys),
                ("IncludeKeys", obj.include_keys),
                ("ExcludeKeys", obj.exclude_keys),
                ("Format", obj.format),
                ("Template", obj.template),
                ("WriteFile", obj.write_file),
            )
        )
    return ("{" + ",".join(f'"{name}":{value}' for name, value in fields) + "}").encode()


def object_version(key: bytes, obj: SecretObject, contents: bytes) -> str:
    """URL-safe base64 (padded) of HMAC-SHA256(key, object JSON + contents)."""
    digest = _keyed_hmac(key).copy()
    digest.update(object_json(obj))
    digest.update(contents)
    return base64.urlsafe_b64encode(digest.digest()).decode()


# The HMAC keyed once per key and copied for each file: hmac.digest keys it again for
# every file, which under OpenSSL 3 costs more than the hashing itself.
_keyed: tuple[bytes, hmac.HMAC] | None = None  # the last key, and its HMAC before any message


def _keyed_hmac(key: bytes) -> hmac.HMAC:
    global _keyed
    keyed = _keyed
    if keyed is None or keyed[0] != key:
        keyed = _keyed = (key, hmac.new(key, digestmod=hashlib.sha256))
    return keyed[1]
