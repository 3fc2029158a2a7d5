"""How Vault replies become files: the one place file bytes are made.

An object that uses only the reference's fields gets the reference's bytes, byte for
byte (tests/test_files_pin.py pins them). The shaping fields choose differently:
``secretKeyPath`` (a JSON Pointer where secretKey would look), ``expandKeys`` (a file per
key), ``format`` (json, pem-bundle, pem-chain) and ``template`` (gotemplate over the
class's objects). A reply that is not JSON (PEM from pki/ca_chain) is passed through.
"""

from __future__ import annotations

import binascii
import functools
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from provider import gojson, gotemplate, replymemory
from provider.config import SecretObject, check_name_length, check_object_name, json_pointer, key_filter
from provider.errors import ConfigError, ProviderError, ResponseTooLarge, VaultBadResponse, VaultNotFound, quote

# What all the templates of one Mount may cost together, on top of each one's own limits:
# a class of many templates must not hold a thread (and the GIL) for long.
MOUNT_TEMPLATE_STEPS = 100_000
MOUNT_TEMPLATE_SECONDS = 1.0
# A template stopped by its limits fails fast for this long: its class then costs the node
# one over-limit render per interval, not one per Mount (remounts come every minute per pod).
OVER_LIMIT_SECONDS = 300.0
# Steps a template may take before it must wait for its namespace's turn. Real templates
# finish far below (a .pgpass takes ~20, an .env of 100 keys ~600); past it, renders of one
# namespace run one at a time, so a namespace's heavy templates cost the node at most one
# thread of CPU (and of the GIL), while other namespaces never wait.
LIGHT_STEPS = 5_000

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


@dataclass(frozen=True, kw_only=True)
class ObjectData:
    """One object's reply, as its files and the class's templates see it."""

    path: str  # the request path, for messages
    body: Mapping[str, Any] = field(repr=False)
    raw: bytes | None = field(default=None, repr=False)  # a reply that is not JSON

    def values(self) -> Any:
        """What secretKey looks into: data.data when that is a map (KV v2), else data."""
        data = self.body.get("data")
        if not isinstance(data, Mapping):
            raise VaultNotFound(f"Vault returned no data at {self.path}")
        nested = data.get("data")
        return nested if isinstance(nested, Mapping) else data

    @functools.cached_property
    def view(self) -> Mapping[str, Any]:
        """.Secrets, .Metadata and .Lease for templates (computed once per reply)."""
        if self.raw is not None:
            secrets: Any = self.raw.decode("utf-8", "replace")
            metadata: Any = {}
        else:
            data = self.body.get("data")
            nested = data.get("data") if isinstance(data, Mapping) else None
            secrets = nested if isinstance(nested, Mapping) else (data if data is not None else {})
            found = data.get("metadata") if isinstance(nested, Mapping) and isinstance(data, Mapping) else None
            metadata = found if isinstance(found, Mapping) else {}
        duration = self.body.get("lease_duration")
        lease = {
            "ID": self.body.get("lease_id") or "",
            "Duration": duration if duration is not None else 0,
            "Renewable": self.body.get("renewable") is True,
        }
        return {"Secrets": secrets, "Metadata": metadata, "Lease": lease}


@dataclass(frozen=True, kw_only=True)
class RenderedFile:
    """A file to write: its path under the volume and what its version is computed from."""

    obj: SecretObject
    path: str
    contents: bytes = field(repr=False)
    version_input: bytes = field(repr=False)


class _Turns:
    """One heavy render at a time per namespace (locks live while someone holds or waits)."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
        self._guard = threading.Lock()

    def lock(self, namespace: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(namespace)
            if lock is None:
                lock = self._locks[namespace] = threading.Lock()
            return lock


_TURNS = _Turns()


class TemplateBudget:
    """What the templates of one Mount have left to spend, together, and the namespace
    whose turn a heavy one waits for (until `wait_until`, the Mount's deadline)."""

    def __init__(self, namespace: str = "", wait_until: float = float("inf"), tenant: Hashable = None) -> None:
        self.tenant = tenant  # whose over-limit failures are remembered together
        self.steps = MOUNT_TEMPLATE_STEPS
        self.seconds = MOUNT_TEMPLATE_SECONDS
        self._namespace = namespace
        self._turn: threading.Lock | None = None  # looked up by the first heavy render only
        self._wait_until = wait_until
        self._holding = False

    def limits(self) -> gotemplate.Limits:
        if self.steps <= 0 or self.seconds <= 0:
            raise ConfigError(
                f"the class's templates together take more than {MOUNT_TEMPLATE_STEPS} steps or "
                f"{MOUNT_TEMPLATE_SECONDS:g} s per Mount; simplify them"
            )
        default = gotemplate.Limits()
        return gotemplate.Limits(
            steps=min(default.steps, self.steps),
            seconds=min(default.seconds, self.seconds),
            light_steps=LIGHT_STEPS,
            on_heavy=self._take_turn,
        )

    def _take_turn(self) -> None:
        if self._holding:
            return
        if self._turn is None:
            self._turn = _TURNS.lock(self._namespace)
        wait = min(self._wait_until - time.monotonic(), 30.0)
        if wait <= 0 or not self._turn.acquire(timeout=wait):
            raise gotemplate.TemplateError(
                "the template is heavy and its namespace's other heavy templates took the time until the deadline"
            )
        self._holding = True

    def release(self) -> None:
        if self._holding and self._turn is not None:
            self._holding = False
            self._turn.release()


# What one file may hold before it is built (the response limit of -max-response-bytes
# applies to all files together, after).
MAX_FILE_BYTES = 8 * 1024 * 1024
# Room for the protobuf framing around the file bytes in a MountResponse.
RESPONSE_OVERHEAD_PER_FILE = 512
# Files a too-large response's error names, the largest first.
FILES_NAMED = 10


def object_files(
    obj: SecretObject,
    data: ObjectData | None,
    objects: Mapping[str, ObjectData],
    *,
    budget: TemplateBudget | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> list[RenderedFile]:
    """The files of one object (none with writeFile: false). `data` is its own reply (None
    for a template without a secretPath); `objects` holds every object's reply by name.
    A JSON file larger than `max_bytes` is refused before it is built."""
    try:
        return _object_files(obj, data, objects, budget or TemplateBudget(), max_bytes)
    except RecursionError:
        path = data.path if data is not None else obj.object_name
        raise VaultBadResponse(f"Vault's reply at {path} is nested too deeply to write as a file") from None


def _object_files(
    obj: SecretObject,
    data: ObjectData | None,
    objects: Mapping[str, ObjectData],
    budget: TemplateBudget,
    max_bytes: int,
) -> list[RenderedFile]:
    if not obj.write_file:
        return []
    if obj.parsed_template is not None:
        contents = _template(obj, data, objects, budget)
        return [RenderedFile(obj=obj, path=obj.object_name, contents=contents, version_input=contents)]
    assert data is not None  # the parse requires a secretPath without a template
    if data.raw is not None:
        contents = _passed_through(obj, data)
        return [RenderedFile(obj=obj, path=obj.object_name, contents=contents, version_input=contents)]
    if obj.expand_keys:
        return _expanded(obj, data, max_bytes)
    if obj.secret_key_path:
        contents = decode(_text_of(_pointed(data, obj.secret_key_path), max_bytes, data.path), obj)
    elif obj.format == "json":
        contents = _json_file(data.body.get("data"), max_bytes, data.path)
    elif obj.format:
        contents = _pem(obj, data)
    elif not obj.secret_key:
        _json_file_size(data.body, max_bytes, data.path)
        return [
            RenderedFile(
                obj=obj,
                path=obj.object_name,
                contents=whole_response(data.body),
                # The version leaves out the per-request request_id: an unchanged secret keeps it.
                version_input=whole_response(data.body, request_id=False),
            )
        ]
    else:
        contents = decode(key_value(data.body.get("data"), obj.secret_key, data.path, max_bytes), obj)
    return [RenderedFile(obj=obj, path=obj.object_name, contents=contents, version_input=contents)]


def writes_whole_reply(obj: SecretObject) -> bool:
    """Whether the object's file is its whole reply as JSON (no secretKey nor shape): the
    file then holds what differs in every reply, such as its request_id."""
    return (
        obj.write_file
        and obj.parsed_template is None
        and not obj.expand_keys
        and not obj.secret_key_path
        and not obj.format
        and not obj.secret_key
    )


def key_value(data: Any, key: str, path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The value at key: under data.data when that is a map (KV v2), else data."""
    if not isinstance(data, dict):  # a decoded reply: JSON's maps are dicts (and an ABC's check is slow)
        raise VaultNotFound(f"Vault returned no data at {path}")
    nested = data.get("data")
    values = nested if isinstance(nested, dict) else data
    if key not in values:
        raise VaultNotFound(f"key {quote(key)} does not exist at {path}")
    return _text_of(values[key], max_bytes, path)


def _text_of(value: Any, max_bytes: int, path: str) -> bytes:
    """A value as file bytes: a string as itself (UTF-8), anything else as Go's JSON."""
    if isinstance(value, str):
        return value.encode("utf-8")
    return _json_file(value, max_bytes, path)


def _json_file(value: Any, max_bytes: int, path: str) -> bytes:
    _json_file_size(value, max_bytes, path)
    return gojson.dumps(value)


def _json_file_size(value: Any, max_bytes: int, path: str) -> None:
    """Refuse, before building it, JSON larger than max_bytes (escapes make a reply's
    JSON up to six times its size)."""
    if gojson.encoded_size(value, max_bytes) > max_bytes:
        raise ResponseTooLarge(f"the JSON of the reply at {path} would be larger than {max_bytes} bytes")


def _pointed(data: ObjectData, pointer: str) -> Any:
    value = data.values()
    walked = ""
    for token in json_pointer("secretKeyPath", pointer):
        if isinstance(value, Mapping):
            if token not in value:
                raise VaultNotFound(
                    f"secretKeyPath {quote(pointer)} does not exist at {data.path}: no key {quote(token)} "
                    f"under {quote(walked or '/')}"
                )
            value = value[token]
        elif isinstance(value, list | tuple):
            if not token.isdigit() or (len(token) > 1 and token.startswith("0")) or int(token) >= len(value):
                raise VaultNotFound(
                    f"secretKeyPath {quote(pointer)} does not exist at {data.path}: {quote(walked)} is a list of "
                    f"{len(value)} items, not {quote(token)}"
                )
            value = value[int(token)]
        else:
            raise VaultNotFound(
                f"secretKeyPath {quote(pointer)} does not exist at {data.path}: {quote(walked or '/')} is not a map "
                "or list"
            )
        walked += "/" + token.replace("~", "~0").replace("/", "~1")
    return value


def _expanded(obj: SecretObject, data: ObjectData, max_bytes: int) -> list[RenderedFile]:
    values = data.values()
    where = f"expandKeys at {data.path}"
    include = key_filter(where, "includeKeys", obj.include_keys) if obj.include_keys else None
    exclude = key_filter(where, "excludeKeys", obj.exclude_keys) if obj.exclude_keys else None
    files: list[RenderedFile] = []
    size = 0  # what the files would take in the response: refused once past max_bytes, not built on
    for key in sorted(values):
        if (include is not None and not include.search(key)) or (exclude is not None and exclude.search(key)):
            continue
        path = f"{obj.object_name}/{key}"
        if "/" in key or "\\" in key:
            raise ConfigError(f"expandKeys: key {quote(key)} at {data.path} is not a safe file name (it holds a slash)")
        # The key alone, and the whole path's length: the objectName was checked when the
        # class was parsed (checking it again per key cost seconds for a deep name).
        check_object_name(key, f"expandKeys: key {quote(key)} at {data.path}")
        check_name_length(path, f"expandKeys: key {quote(key)} at {data.path}")
        contents = decode(_text_of(values[key], max_bytes, data.path), obj, key)
        files.append(
            RenderedFile(obj=obj, path=path, contents=contents, version_input=path.encode() + b"\0" + contents)
        )
        size += response_size(path, contents)
        if size > max_bytes:
            raise too_large(files, size, max_bytes, built_all=False)
    if not files:
        filtered = " after includeKeys/excludeKeys" if include is not None or exclude is not None else ""
        raise ConfigError(f"expandKeys: no keys left at {data.path}{filtered}; nothing to write")
    return files


class FileLike(Protocol):
    """A file's path and bytes (a RenderedFile, a mount.MountedFile)."""

    @property
    def path(self) -> str: ...

    @property
    def contents(self) -> bytes: ...


def response_size(path: str, contents: bytes) -> int:
    """What a file takes in a MountResponse, its framing counted."""
    return len(contents) + len(path) + RESPONSE_OVERHEAD_PER_FILE


def too_large(files: Sequence[FileLike], size: int, max_bytes: int, *, built_all: bool = True) -> ResponseTooLarge:
    """The error of a response over max_bytes, naming its largest files (it goes to the
    pod's events: kept short). Once files are past the limit no more are built:
    `built_all` False says so."""
    largest = sorted(files, key=lambda f: -len(f.contents))
    sizes = ", ".join(f"{quote(f.path)} ({len(f.contents)} bytes)" for f in largest[:FILES_NAMED])
    if len(largest) > FILES_NAMED:
        sizes += f" and {len(largest) - FILES_NAMED} more"
    total = f"{size} bytes" if built_all else f"{size} bytes by the first {len(files)} (the rest were not built)"
    return ResponseTooLarge(
        f"the files total {total}, over the {max_bytes}-byte response limit (-max-response-bytes); objects: {sizes}"
    )


def _passed_through(obj: SecretObject, data: ObjectData) -> bytes:
    """A reply that is not JSON (PEM from pki/ca_chain): its bytes, when nothing asks for keys."""
    chosen = [
        name
        for name, used in (
            ("secretKey", obj.secret_key),
            ("secretKeyPath", obj.secret_key_path),
            ("expandKeys", obj.expand_keys),
            ("format: json", obj.format == "json"),
        )
        if used
    ]
    if chosen:
        raise ConfigError(
            f"Vault's reply at {data.path} is not JSON (e.g. PEM), so {chosen[0]} cannot select from it; "
            "leave it out to write the reply as it is"
        )
    assert data.raw is not None
    return data.raw


# The fields of a PKI issue/sign reply, in the order a bundle lists them.
_CERTIFICATE, _CHAIN, _ISSUING_CA, _PRIVATE_KEY = "certificate", "ca_chain", "issuing_ca", "private_key"


def _pem(obj: SecretObject, data: ObjectData) -> bytes:
    """pem-chain: the certificate, then its chain (ca_chain, else issuing_ca); pem-bundle:
    the same followed by the private key. Each block once, each ending in a newline."""
    values = data.values()
    certificate = values.get(_CERTIFICATE)
    if not isinstance(certificate, str) or not certificate.strip():
        raise VaultNotFound(
            f"format {obj.format} needs a PEM {quote(_CERTIFICATE)} in the reply at {data.path} "
            "(a PKI issue or sign reply, or a secret with that key)"
        )
    chain = values.get(_CHAIN)
    if isinstance(chain, str):
        chain = [chain]
    if not isinstance(chain, list | tuple) or not chain:
        issuing = values.get(_ISSUING_CA)
        chain = [issuing] if isinstance(issuing, str) else []
    blocks = [certificate.strip()]
    for block in chain:
        if isinstance(block, str) and block.strip() and block.strip() not in blocks:
            blocks.append(block.strip())
    if obj.format == "pem-bundle":
        key = values.get(_PRIVATE_KEY)
        if not isinstance(key, str) or not key.strip():
            raise VaultNotFound(
                f"format pem-bundle needs a {quote(_PRIVATE_KEY)} in the reply at {data.path}; "
                "use pem-chain for the certificates alone"
            )
        blocks.append(key.strip())
    return ("\n".join(blocks) + "\n").encode("utf-8")


def _template(
    obj: SecretObject, data: ObjectData | None, objects: Mapping[str, ObjectData], budget: TemplateBudget
) -> bytes:
    assert obj.parsed_template is not None
    root: dict[str, Any] = {"Objects": {name: reply.view for name, reply in objects.items()}}
    if data is not None:
        root.update(data.view)
    _OVER_LIMIT.check(obj, budget.tenant)
    spent = [0]
    limits = budget.limits()
    started = time.thread_time()
    try:
        text = obj.parsed_template.render(root, limits=limits, spent=spent)
    except gotemplate.TemplateError as e:
        if e.over_limit:  # steps or sizes: the same data fails the same way; CPU time may not
            _OVER_LIMIT.remember(obj, budget.tenant, str(e))
        raise ConfigError(f"template {e}") from None
    finally:
        budget.release()
        budget.steps -= spent[0]
        budget.seconds -= time.thread_time() - started
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ConfigError("template: the rendered text is not valid UTF-8") from None


class _OverLimit:
    """Templates that ran out of their limits recently, by template text and tenant (the
    pod's namespace, Vault and role: two classes with the same template share nothing,
    and a class too large for the parse cache is still recognised). Bounded."""

    # Entries kept: far more than a node's failing templates at any one time.
    ENTRIES = 4096

    def __init__(self) -> None:
        self._failed: OrderedDict[tuple[bytes, Hashable], tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, obj: SecretObject, tenant: Hashable) -> None:
        key = (obj.template_digest, tenant)
        with self._lock:
            failed = self._failed.get(key)
        if failed is None:
            return
        since, message = failed
        waited = time.monotonic() - since
        if waited >= OVER_LIMIT_SECONDS:
            with self._lock:
                self._failed.pop(key, None)
            return
        raise ConfigError(
            f"template {message} (not rendered again for {OVER_LIMIT_SECONDS - waited:.0f} s: it ran out of its "
            "limits; a changed template is rendered at once)"
        )

    def remember(self, obj: SecretObject, tenant: Hashable, message: str) -> None:
        with self._lock:
            self._failed[(obj.template_digest, tenant)] = (time.monotonic(), message)
            self._failed.move_to_end((obj.template_digest, tenant))
            while len(self._failed) > self.ENTRIES:
                self._failed.popitem(last=False)


_OVER_LIMIT = _OverLimit()


def decode(value: bytes, obj: SecretObject, key: str = "") -> bytes:
    """Decode a key's value per the object's encoding, as Go's decoders do."""
    encoding = obj.normalized_encoding
    try:
        if encoding == "base64":
            # Go's StdEncoding skips line breaks and requires padding.
            return binascii.a2b_base64(value.replace(b"\r", b"").replace(b"\n", b""), strict_mode=True)
        if encoding == "hex":
            return binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        selected = key or obj.secret_key or obj.secret_key_path
        raise ConfigError(
            f"the value of key {quote(selected)} at {obj.secret_path} is not valid {encoding} "
            f"(encoding: {obj.encoding})"
        ) from None
    return value


def mount_files(
    objects: Sequence[SecretObject],
    replies: Mapping[SecretObject, ObjectData],
    *,
    namespace: str = "",
    deadline: float = float("inf"),
    tenant: Hashable = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> tuple[list[RenderedFile], list[tuple[str, ProviderError]]]:
    """Every object's files, and each object that failed with its error. `replies` holds
    the reply of each object that has a secretPath; `namespace` is the pod's, `tenant`
    who mounts (see _OverLimit)."""
    by_name = {obj.object_name: replies[obj] for obj in objects if obj in replies}
    budget = TemplateBudget(namespace, deadline, tenant)
    files_max = min(max_bytes, MAX_FILE_BYTES)
    files: list[RenderedFile] = []
    failures: list[tuple[str, ProviderError]] = []
    size = 0  # what the files would take in the response: no object is built once it is past max_bytes
    for obj in objects:
        try:
            made = object_files(obj, replies.get(obj), by_name, budget=budget, max_bytes=files_max)
        except ProviderError as e:
            failures.append((obj.object_name, e))
            continue
        files += made
        made_size = sum(response_size(file.path, file.contents) for file in made)
        replymemory.count(made_size)  # held by the Mount until it ends, as its replies are
        size += made_size
        if size > max_bytes:
            raise too_large(files, size, max_bytes, built_all=obj is objects[-1])
    paths: dict[str, str] = {}
    for file in files:
        earlier = paths.setdefault(file.path, file.obj.object_name)
        if earlier != file.obj.object_name:
            failures.append(
                (file.obj.object_name, ConfigError(f"writes {quote(file.path)}, which object {quote(earlier)} writes"))
            )
    directories: set[str] = set()  # checked: no file is written there (an expandKeys object's files share theirs)
    for file in files:  # a file where another's directory must be: the driver could write neither
        directory = file.path
        while "/" in directory:
            directory = directory.rpartition("/")[0]
            if directory in directories:
                break
            directories.add(directory)
            owner = paths.get(directory)
            if owner is not None:
                failures.append(
                    (
                        file.obj.object_name,
                        ConfigError(
                            f"writes {quote(file.path)} inside {quote(directory)}, which object {quote(owner)} "
                            "writes as a file"
                        ),
                    )
                )
                break
    return files, failures


__all__ = [
    "ObjectData",
    "RenderedFile",
    "TemplateBudget",
    "decode",
    "key_value",
    "mount_files",
    "object_files",
    "response_size",
    "too_large",
    "whole_response",
    "writes_whole_reply",
]
