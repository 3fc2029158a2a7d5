"""Settings of the daemon and the parsed SecretProviderClass of one Mount.

Everything a Mount request carries is validated here, and every error names the
parameter (and the object) to fix. Raw JSON and YAML stop at this module: the rest of
the provider sees frozen dataclasses.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import yaml

from provider import gojson, gotemplate, goyaml
from provider.address import MAX_ADDRESS_LENGTH, Target, safe_describe
from provider.errors import ConfigError, quote, truncate
from provider.flavour import VAULT, Flavour
from provider.lru import WeightedLRU

# The Mount attributes hold a whole SecretProviderClass; Kubernetes objects are capped
# near 1.5 MiB by etcd, so 2 MiB of attributes is more than any real class.
MAX_ATTRIBUTES_BYTES = 2 * 1024 * 1024
# Parameters of one class, the driver's pod attributes included: real classes have a
# dozen or two. Bounds what decoding the attributes may cost.
MAX_PARAMETERS = 256
# The objects YAML is one parameter of that class.
MAX_OBJECTS_YAML_BYTES = 1024 * 1024
# A Vault namespace path; longer is a mistake or an attack, refused before it is kept.
MAX_NAMESPACE_LENGTH = 256
# Kubernetes names are at most 253 characters.
MAX_NAME_LENGTH = 253
# Far more objects than any real class mounts; bounds the work one request can cause.
MAX_OBJECTS = 1000
# The files of one Mount at most, in bytes (-max-response-bytes): the driver's gRPC limit.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Values (scalars, list items, map entries) in one object's secretArgs after aliases are
# expanded: a request body for Vault, not a data set.
MAX_SECRET_ARGS_VALUES = 10_000
# What one class's objects may make their requests of, in all, aliases expanded: query
# parameters in their secretPath queries (?version=2 is one), secretPath characters, and
# the JSON bodies of their secretArgs.
MAX_QUERY_VALUES = 10_000
MAX_CLASS_PATH_CHARS = 256 * 1024
MAX_CLASS_BODY_BYTES = 1024 * 1024
# Distinct objects lists whose parse (or error) is kept: a node's classes, with room to
# spare; and the total size of the texts whose parse is kept (a parse costs a few times
# its text in memory, so this bounds the cache to a few tens of MiB at worst).
OBJECTS_CACHE_SIZE = 1024
OBJECTS_CACHE_BYTES = 4 * 1024 * 1024
# What one objects list may keep beside it (keep_shared), at most: one per endpoint, and a
# class names one; the same objects text under other addresses works out the rest again.
SHARED_PER_OBJECTS = 4
# The largest file mode a File may carry (0777).
MAX_MODE = 0o777
ENCODINGS = ("utf-8", "base64", "hex")
# Vault's verbs for reading; DELETE would let a class destroy what it mounts.
METHODS = ("GET", "POST", "PUT", "LIST")

POD_NAME = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_UID = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT_NAME = "csi.storage.k8s.io/serviceAccount.name"
SERVICE_ACCOUNT_TOKENS = "csi.storage.k8s.io/serviceAccount.tokens"
_POD_ATTRIBUTE_PREFIX = "csi.storage.k8s.io/"


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """How to reach Vault over TLS; empty strings mean "not set"."""

    ca_cert: str = ""
    ca_directory: str = ""
    server_name: str = ""
    client_cert: str = ""
    client_key: str = ""
    skip_verify: bool = False
    # Computed once: a class's settings are shared by its Mounts, which look them up in
    # several maps (endpoints, pools, TLS contexts).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = (self.ca_cert, self.ca_directory, self.server_name, self.client_cert, self.client_key)
        object.__setattr__(self, "_hash", hash((*fields, self.skip_verify)))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, kw_only=True)
class VaultSettings:
    """Defaults for every Mount, from the environment and flags."""

    address: str = "https://127.0.0.1:8200"
    auth_mount: str = "kubernetes"
    namespace: str = ""
    tls: TLSConfig = field(default_factory=TLSConfig)
    # -allowed-vault-addresses: when set, a class's vaultAddress must be one of these (or
    # the default address); the provider is otherwise an egress path around NetworkPolicy.
    allowed_addresses: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The daemon's configuration: flags over environment over defaults."""

    endpoint: str = "/tmp/vault.sock"
    # More sockets (-endpoint given again); each speaks the contract its file name says
    # (flavour.py: openbao.sock is OpenBao's).
    extra_endpoints: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "text"
    health_addr: str = ":8080"
    hmac_secret_name: str = "vault-csi-provider-hmac-key"
    hmac_key_ttl: float = 60.0
    cache_size: int = 1000
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    lease_cache_size: int = 5000
    lease_cache_namespace_share: float = 0.25
    lease_renew_fraction: float = 2 / 3
    revoke_deleted_pods: bool = False
    revocation_interval: float = 60.0
    vault: VaultSettings = field(default_factory=VaultSettings)
    # The defaults of classes on an openbao.sock: -openbao-* flags, BAO_* then VAULT_* env.
    openbao: VaultSettings = field(default_factory=VaultSettings)
    openbao_hmac_secret_name: str = "openbao-csi-provider-hmac-key"

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.endpoint, *self.extra_endpoints)

    def defaults_for(self, flavour: Flavour) -> VaultSettings:
        return self.openbao if flavour.name == "openbao" else self.vault

    def hmac_secret_for(self, flavour: Flavour) -> str:
        return self.openbao_hmac_secret_name if flavour.name == "openbao" else self.hmac_secret_name


@dataclass(frozen=True, kw_only=True)
class PodInfo:
    """The pod a Mount is for, as the driver describes it."""

    name: str = ""
    namespace: str = ""
    uid: str = ""
    service_account: str = ""
    token: str = field(default="", repr=False)

    def describe(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, kw_only=True, eq=False)
class SecretObject:
    """One entry of the class's ``objects`` list, with the fields as written.

    Compared and hashed by identity: parsed lists are cached and shared, so the same
    object of the same class is the same instance on every Mount.
    """

    object_name: str
    secret_path: str = ""  # empty only for a template that reads other objects
    secret_key: str = ""
    method: str = ""
    secret_args: Mapping[str, Any] | None = None
    file_permission: int = 0
    encoding: str = ""
    # Shaping the files (none of these exist in the reference; unset, they change nothing).
    secret_key_path: str = ""  # an RFC 6901 JSON Pointer where secretKey would look
    expand_keys: bool = False  # one file per top-level key, under objectName/
    include_keys: str = ""  # with expandKeys: only keys this RE2 expression matches
    exclude_keys: str = ""  # with expandKeys: not keys this RE2 expression matches
    format: str = ""  # json, pem-bundle or pem-chain
    template: str = ""  # Go text/template over this class's objects
    write_file: bool = True  # false: only input for templates
    parsed_template: gotemplate.Template | None = field(default=None, repr=False)

    @functools.cached_property
    def template_digest(self) -> bytes:
        """What identifies the template's text (for what is remembered about it)."""
        return hashlib.blake2b(self.template.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    @property
    def fetches(self) -> bool:
        """Whether the object reads Vault (a template alone does not)."""
        return bool(self.secret_path)

    @property
    def shaped(self) -> bool:
        """Whether the object uses any field the reference does not have."""
        return bool(
            self.secret_key_path
            or self.expand_keys
            or self.include_keys
            or self.exclude_keys
            or self.format
            or self.template
            or not self.write_file
        )

    @property
    def http_method(self) -> str:
        return (self.method or "GET").upper()

    @functools.cached_property
    def request_body(self) -> bytes | None:
        """secretArgs as the JSON body Vault gets: encoded once per parsed class, not per
        Mount (a class's args may be large; its parse is cached and shared)."""
        return gojson.dumps(self.secret_args) if self.secret_args is not None else None

    @property
    def normalized_encoding(self) -> str:
        return (self.encoding or "utf-8").lower()


@dataclass(frozen=True, kw_only=True)
class MountConfig:
    """A validated Mount: the class parameters merged over the daemon's settings."""

    role_name: str
    vault_address: str
    vault_namespace: str
    auth_mount: str
    audience: str
    tls: TLSConfig
    objects: tuple[SecretObject, ...]
    pod: PodInfo
    target_path: str
    permission: int
    flavour: Flavour = VAULT


def parse_mount(
    *,
    attributes: str,
    target_path: str,
    permission: str,
    defaults: VaultSettings,
    gate: Callable[[], AbstractContextManager[object]] | None = None,
    decoded: Any = None,
    flavour: Flavour = VAULT,
) -> MountConfig:
    """Validate a Mount request's fields; raise ConfigError naming what to fix. `gate`
    bounds concurrent parses of objects lists not yet cached (see parse_objects).
    `flavour` says how the class names its parameters (flavour.py); messages name the
    parameter as the class wrote it."""
    params, written = flavour.canonical(_parse_attributes(attributes, decoded))

    def name(parameter: str) -> str:
        return written.get(parameter, parameter)

    problems: list[str] = []
    if not target_path:
        problems.append("missing target path")
    mode = _parse_permission(permission)
    role = params.get("roleName", "")
    if not role:
        problems.append("missing 'roleName' in SecretProviderClass parameters")
    if "vaultKubernetesMountPath" in params and "vaultAuthMountPath" in params:
        problems.append(
            f"set only one of {name('vaultKubernetesMountPath')!r} and {name('vaultAuthMountPath')!r} in "
            "SecretProviderClass parameters (both name the auth mount)"
        )
    auth_mount = params.get("vaultAuthMountPath") or params.get("vaultKubernetesMountPath") or ""
    tls = defaults.tls
    try:
        tls = _merge_tls(defaults.tls, params, name)
    except ConfigError as e:
        problems.append(str(e))
    objects: tuple[SecretObject, ...] = ()
    try:
        objects = parse_objects(params.get("objects", ""), gate=gate)
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    audience = params.get("audience", "")
    pod = PodInfo(
        name=params.get(POD_NAME, ""),
        namespace=params.get(POD_NAMESPACE, ""),
        uid=params.get(POD_UID, ""),
        service_account=params.get(SERVICE_ACCOUNT_NAME, ""),
        token=_token_for_audience(params.get(SERVICE_ACCOUNT_TOKENS, ""), audience or flavour.default_audience),
    )
    vault_address, vault_namespace = vault_target(params, defaults)
    try:
        Target.parse(vault_address)
    except ValueError as e:
        flag = f"-{flavour.name}-addr"
        source = f"{name('vaultAddress')!r} in SecretProviderClass parameters" if params.get("vaultAddress") else flag
        raise ConfigError(f"{source} is not a valid {flavour.product} address: {e}") from None
    if len(vault_namespace) > MAX_NAMESPACE_LENGTH:
        raise ConfigError(f"{name('vaultNamespace')!r} is longer than {MAX_NAMESPACE_LENGTH} characters")
    if not (vault_namespace.isascii() and vault_namespace.isprintable()):  # it travels as an HTTP header
        raise ConfigError(f"{name('vaultNamespace')!r} must be printable ASCII")
    if defaults.allowed_addresses and not address_allowed(vault_address, defaults):
        allowed = ", ".join(safe_describe(a) for a in defaults.allowed_addresses)
        raise ConfigError(
            f"{name('vaultAddress')} {quote(safe_describe(vault_address))} is not allowed on this node: the provider "
            f"only reaches the addresses in its -allowed-vault-addresses ({allowed}) and its default address"
        )
    return MountConfig(
        role_name=role,
        vault_address=vault_address,
        vault_namespace=vault_namespace,
        auth_mount=(auth_mount or defaults.auth_mount).strip("/"),
        audience=audience,
        tls=tls,
        objects=objects,
        pod=pod,
        target_path=target_path,
        permission=mode,
        flavour=flavour,
    )


def address_allowed(address: str, defaults: VaultSettings) -> bool:
    """Whether address is the default or one of the allowed ones, compared in canonical
    form (scheme, host, port and path; credentials and a trailing slash aside)."""
    wanted = _canonical(address)
    return wanted is not None and wanted in {_canonical(a) for a in (defaults.address, *defaults.allowed_addresses)}


def _canonical(address: str) -> str | None:
    try:
        return Target.parse(address).key()
    except ValueError:
        return None


def vault_target(params: Mapping[str, str], defaults: VaultSettings) -> tuple[str, str]:
    """The Vault address and namespace a class's Mounts go to."""
    return params.get("vaultAddress") or defaults.address, params.get("vaultNamespace") or defaults.namespace


@dataclass(frozen=True, kw_only=True)
class Route:
    """What admission needs before a Mount is parsed: who asks, for which class, to which Vault."""

    pod: str  # namespace/name, for the log line
    role: str
    vault_address: str
    vault_namespace: str
    tenant: tuple[str, int]  # the pod's namespace and a digest of its class's parameters
    # The attributes as decoded here, handed to parse_mount so they are decoded once per
    # Mount (None when they did not decode: the parse then says why).
    decoded: Any = field(default=None, repr=False, compare=False)

    def undecoded(self) -> Route:
        """The same route without its decoded attributes (a kept one holds none)."""
        return Route(
            pod=self.pod,
            role=self.role,
            vault_address=self.vault_address,
            vault_namespace=self.vault_namespace,
            tenant=self.tenant,
        )


def peek_route(attributes: str, defaults: VaultSettings, flavour: Flavour = VAULT) -> Route:
    """The Route of a Mount request, read cheaply; a request too broken to read gets an
    empty one (its parse, later, says what is wrong). Raises ConfigError for attributes
    too costly to read at all."""
    check_attributes_cost(attributes)  # before the loop spends anything on them
    decoded: Any = None
    try:
        decoded = json.loads(attributes)
    except (ValueError, RecursionError):
        decoded = None
    params = decoded
    if not isinstance(params, dict) or not _all_strings(params):
        params = {}
    params = flavour.canonical(params)[0]
    address, namespace = vault_target(params, defaults)
    if len(address) > MAX_ADDRESS_LENGTH or len(namespace) > MAX_NAMESPACE_LENGTH:
        address, namespace = "", ""  # refused by the parse; nothing of it is kept meanwhile
    pod_namespace = params.get(POD_NAMESPACE, "")[:MAX_NAME_LENGTH]
    # The class is not named in a Mount: its parameters, less the pod's own, stand for it.
    class_params = frozenset((k, v) for k, v in params.items() if not k.startswith(_POD_ATTRIBUTE_PREFIX))
    return Route(
        pod=f"{pod_namespace}/{params.get(POD_NAME, '')[:MAX_NAME_LENGTH]}",
        role=params.get("roleName", "")[:MAX_NAME_LENGTH],
        vault_address=address,
        vault_namespace=namespace,
        tenant=(pod_namespace, hash(class_params)),
        decoded=decoded,
    )


def check_attributes_cost(attributes: str) -> None:
    """Refuse, before decoding, attributes that would cost too much to decode: decoding
    holds the GIL, and 2 MiB of tiny keys is a quarter of a second of it. Top-level keys
    are the quotes followed by a colon that are not escaped (those inside the embedded
    objects YAML or token JSON are); counting them costs a millisecond at most."""
    if len(attributes) > MAX_ATTRIBUTES_BYTES:
        raise ConfigError(f"attributes are larger than {MAX_ATTRIBUTES_BYTES} bytes")
    keys = attributes.count('":') - attributes.count('\\":')
    if keys > MAX_PARAMETERS:
        raise ConfigError(
            f"attributes hold about {keys} parameters; a SecretProviderClass has at most {MAX_PARAMETERS}"
        )


def _parse_attributes(attributes: str, decoded: Any = None) -> dict[str, str]:
    # ASCII without a \u escape (as the driver writes them, mostly): one byte per
    # character, and no value can hold a lone surrogate; else each is checked.
    plain = attributes.isascii() and "\\u" not in attributes
    if (len(attributes) if plain else len(attributes.encode("utf-8", "surrogatepass"))) > MAX_ATTRIBUTES_BYTES:
        raise ConfigError(f"attributes are larger than {MAX_ATTRIBUTES_BYTES} bytes")
    if decoded is not None:  # already decoded by peek_route, after check_attributes_cost
        params = decoded
    else:
        check_attributes_cost(attributes)
        try:
            params = json.loads(attributes) if attributes else {}
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"attributes are not valid JSON: {truncate(str(e))}") from None
    if not isinstance(params, dict):
        raise ConfigError("attributes must be a JSON object of strings")
    wrong = [] if _all_strings(params) else sorted(k for k, v in params.items() if not isinstance(v, str))
    unencodable = [] if plain else sorted(k for k, v in params.items() if isinstance(v, str) and not _is_utf8(k + v))
    if unencodable:
        raise ConfigError(
            "attributes must be valid UTF-8; invalid escapes (lone surrogates) in: "
            + ", ".join(quote(truncate(_printable(k), 80)) for k in unencodable[:10])
        )
    if wrong:
        raise ConfigError(
            "attributes must be a JSON object of strings; not a string: "
            + ", ".join(repr(truncate(k, 80)) for k in wrong[:10])
        )
    return params


def _all_strings(params: dict[str, Any]) -> bool:
    """Whether every value is a str (as json.loads makes them), checked in C."""
    return set(map(type, params.values())) <= {str}


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _parse_permission(permission: str) -> int:
    plain_digits = len(permission) <= 3 and permission.isascii() and permission.isdigit()
    if plain_digits and permission[0] != "0":  # what JSON reads them as, read quicker
        mode: Any = int(permission)
    else:
        try:
            mode = json.loads(permission)
        except ValueError:
            mode = None
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= MAX_MODE:
        raise ConfigError(
            f"permission must be a decimal file mode from 0 to {MAX_MODE} (0777), got {truncate(permission, 40)!r}"
        )
    return mode


def parse_bool(name: str, text: str) -> bool:
    """A boolean as Go's strconv.ParseBool reads it."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ConfigError(f"{name} must be a boolean (true or false), got {truncate(text, 40)!r}")


# A TLS server name: a DNS name (labels of letters, digits, '-' and '_') or an IP address.
_SERVER_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,253}")


def _merge_tls(base: TLSConfig, params: Mapping[str, str], name: Callable[[str], str] = str) -> TLSConfig:
    overrides: dict[str, Any] = {}
    for key, attr in (
        ("vaultCACertPath", "ca_cert"),
        ("vaultCADirectory", "ca_directory"),
        ("vaultTLSServerName", "server_name"),
        ("vaultTLSClientCertPath", "client_cert"),
        ("vaultTLSClientKeyPath", "client_key"),
    ):
        if params.get(key):
            overrides[attr] = params[key]
    server_name = overrides.get("server_name", "")
    if server_name and not _SERVER_NAME.fullmatch(server_name):
        raise ConfigError(
            f"{name('vaultTLSServerName')!r} must be a DNS name or an IP address (letters, digits, '-', '.', ':')"
        )
    if "vaultSkipTLSVerify" in params:
        overrides["skip_verify"] = parse_bool(
            f"{name('vaultSkipTLSVerify')!r} in SecretProviderClass parameters", params["vaultSkipTLSVerify"]
        )
    return replace(base, **overrides) if overrides else base


def _token_for_audience(tokens_json: str, audience: str) -> str:
    if not tokens_json:
        return ""
    try:
        tokens = json.loads(tokens_json)
    except (ValueError, RecursionError):
        raise ConfigError(f"{SERVICE_ACCOUNT_TOKENS} is not valid JSON") from None
    if not isinstance(tokens, dict) or not all(isinstance(entry, dict) for entry in tokens.values()):
        raise ConfigError(f"{SERVICE_ACCOUNT_TOKENS} must be a JSON object of audience -> {{token, ...}}")
    token = tokens.get(audience, {}).get("token", "")
    if not isinstance(token, str):
        raise ConfigError(f"{SERVICE_ACCOUNT_TOKENS}: the token for audience {quote(audience)} is not a string")
    return token


# Parsed objects lists by the digest of their text, failures included (they weigh nothing):
# a class is parsed once however often it is mounted, and a broken one too. A parse weighs
# its text and its templates' trees; one over a quarter of the bound is parsed again each time.
_PARSED: WeightedLRU[bytes, tuple[SecretObject, ...] | ConfigError] = WeightedLRU(
    entries=OBJECTS_CACHE_SIZE,
    total_weight=OBJECTS_CACHE_BYTES,
    max_weight=OBJECTS_CACHE_BYTES // 4,
    on_drop=lambda dropped: _forget_shared(dropped),
)


def parse_objects(
    text: str, *, gate: Callable[[], AbstractContextManager[object]] | None = None
) -> tuple[SecretObject, ...]:
    """Parse the ``objects`` parameter: a YAML list of secret objects.

    The same class is mounted again and again, so results (and errors) are cached by
    the text's digest; the objects are immutable and safe to share. A parse that is not
    cached runs inside `gate`, which bounds how many run at once (parsing holds the GIL).
    """
    encoded = text.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(encoded, digest_size=16).digest()
    cached = _PARSED.get(digest)
    if cached is None:
        with gate() if gate is not None else contextlib.nullcontext():
            try:
                cached = ObjectList(_parse_objects(text, len(encoded)), digest)
            except ConfigError as e:
                cached = e
        _PARSED.put(digest, cached, 0 if isinstance(cached, ConfigError) else len(encoded) + template_weight(cached))
    if isinstance(cached, ConfigError):
        raise ConfigError(str(cached))
    return cached


# A parsed template's tree costs a few hundred bytes per token (measured: 3-5 MB for a
# 64 KiB template of 9,000 actions): what the parse cache counts for it.
TEMPLATE_BYTES_PER_TOKEN = 400


def template_weight(objects: tuple[SecretObject, ...]) -> int:
    """What the parsed templates of objects cost to keep, in bytes."""
    return sum(
        TEMPLATE_BYTES_PER_TOKEN * obj.parsed_template.tokens for obj in objects if obj.parsed_template is not None
    )


def _parse_objects(text: str, size: int) -> tuple[SecretObject, ...]:
    if size > MAX_OBJECTS_YAML_BYTES:
        raise ConfigError(f"'objects' is larger than {MAX_OBJECTS_YAML_BYTES} bytes")
    try:
        loader, root = goyaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"'objects' is not valid YAML: {truncate(str(e))}") from None
    except RecursionError:
        raise ConfigError("'objects' is nested too deeply") from None
    if root is None or (isinstance(root, goyaml.ScalarNode) and root.tag.endswith(":null")):
        raise ConfigError("no objects: 'objects' in SecretProviderClass parameters lists no secrets")
    if not isinstance(root, goyaml.SequenceNode):
        raise ConfigError("'objects' must be a YAML list of objects (each with objectName and secretPath)")
    if len(root.value) > MAX_OBJECTS:
        raise ConfigError(f"'objects' lists {len(root.value)} objects; at most {MAX_OBJECTS} are allowed")
    if not root.value:
        raise ConfigError("no objects: 'objects' in SecretProviderClass parameters lists no secrets")
    template_tokens = [gotemplate.MAX_CLASS_TOKENS]  # shared by the class's templates
    objects = tuple(_parse_object(loader, index, node, template_tokens) for index, node in enumerate(root.value))
    seen: dict[str, int] = {}
    for obj in objects:
        seen[obj.object_name] = seen.get(obj.object_name, 0) + 1
    duplicates = [name for name, count in seen.items() if count > 1]
    if duplicates:
        raise ConfigError(
            "each objectName must be unique within a SecretProviderClass; used more than once: "
            + ", ".join(quote(name) for name in duplicates)
        )
    for obj in objects:
        if obj.parsed_template is not None:
            check_template_references(obj, objects)
    _check_requests_cost(objects)
    return objects


def _check_requests_cost(objects: tuple[SecretObject, ...]) -> None:
    """Refuse a class whose requests would cost far more than its text: each object makes
    its own from its secretPath and secretArgs, and an alias repeats a large one in up to
    64 objects (one aliased path of 200,000 query parameters in ten objects held 124 MiB
    and 7 s of CPU with the GIL; an aliased megabyte of secretArgs, 65 MiB). Bounded in all,
    aliases expanded, each error naming the object that holds the most."""
    paths = {obj.object_name: len(obj.secret_path) for obj in objects}
    if sum(paths.values()) > MAX_CLASS_PATH_CHARS:
        raise ConfigError(
            f"the objects' secretPath values hold {sum(paths.values())} characters in all (an alias repeats one); "
            f"at most {MAX_CLASS_PATH_CHARS} are allowed: shorten the longest, in object {_largest(paths)}"
        )
    queries = {
        obj.object_name: obj.secret_path.partition("?")[2].count("&") + 1 for obj in objects if "?" in obj.secret_path
    }
    if sum(queries.values()) > MAX_QUERY_VALUES:
        raise ConfigError(
            f"the objects' secretPath queries hold {sum(queries.values())} parameters in all; at most "
            f"{MAX_QUERY_VALUES} are allowed (a query selects what to read, as ?version=2 does): the most are in "
            f"object {_largest(queries)}"
        )
    left = MAX_CLASS_BODY_BYTES
    for obj in objects:
        if obj.secret_args is not None:
            left -= gojson.encoded_size(obj.secret_args, left)  # stops counting once past what is left
            if left < 0:
                raise ConfigError(
                    f"the objects' secretArgs make request bodies of more than {MAX_CLASS_BODY_BYTES} bytes in all "
                    f"(an alias repeats one), past that at object {quote(obj.object_name)}"
                )


def _largest(sizes: dict[str, int]) -> str:
    return quote(max(sizes, key=lambda name: sizes[name]))


class ObjectList(tuple[SecretObject, ...]):
    """A parsed objects list, which every Mount of its class shares (parse_objects keeps
    it), with what those Mounts work out from the objects alone (keep_shared)."""

    shared: dict[object, Any]
    digest: bytes  # its key in the objects cache

    def __new__(cls, objects: tuple[SecretObject, ...], digest: bytes) -> ObjectList:
        made = super().__new__(cls, objects)
        made.shared = {}
        made.digest = digest
        return made


def keep_shared(objects: tuple[SecretObject, ...], key: object, value: object, weight: int) -> None:
    """Keep with a cached objects list, under key (an endpoint, say), what Mounts work out
    from the list alone (mount.MountPlan), for as long as the cache keeps the list: weighed
    with it there, so what a class makes us keep stays within that cache's bound, and
    dropped with it (_forget_shared), though kept parses still hold the list."""
    if not isinstance(objects, ObjectList) or len(objects.shared) >= SHARED_PER_OBJECTS:
        return
    # Kept under the cache's lock, as it is weighed: a list dropped meanwhile keeps nothing.
    _PARSED.add_weight(objects.digest, weight, value=objects, then=lambda: objects.shared.__setitem__(key, value))


def _forget_shared(dropped: tuple[SecretObject, ...] | ConfigError) -> None:
    """The objects cache dropped a list: what was kept beside it goes too."""
    if isinstance(dropped, ObjectList):
        dropped.shared.clear()


# What a template's root holds: .Objects always; the rest with a secretPath of its own.
TEMPLATE_ROOT_KEYS = ("Objects", "Secrets", "Metadata", "Lease")


def check_template_references(obj: SecretObject, objects: tuple[SecretObject, ...]) -> None:
    """Refuse, at parse time, a template that names an object the class does not read or
    root data it does not have; what only rendering can know is checked then."""
    assert obj.parsed_template is not None
    readable = [other.object_name for other in objects if other.fetches]
    where = f"object {quote(obj.object_name)}: template"
    for path in obj.parsed_template.field_paths():
        if not path:
            continue
        if path[0] not in TEMPLATE_ROOT_KEYS:
            raise ConfigError(
                f"{where} reads .{path[0]}, which templates do not have; the root holds "
                + ", ".join(f".{key}" for key in TEMPLATE_ROOT_KEYS)
            )
        if path[0] != "Objects" and not obj.fetches:
            raise ConfigError(
                f"{where} reads .{path[0]}, which needs a secretPath of its own; read another object's "
                f"as .Objects.NAME.{path[0]}"
            )
        if path[0] == "Objects" and len(path) > 1 and path[1] not in readable:
            known = ", ".join(quote(name) for name in readable) or "none"
            raise ConfigError(
                f"{where} reads .Objects.{path[1]}, which is not an object of this class with a secretPath "
                f"(objects it can read: {known})"
            )


_STRING_FIELDS = {
    "objectName": "object_name",
    "secretPath": "secret_path",
    "secretKey": "secret_key",
    "method": "method",
    "encoding": "encoding",
    "secretKeyPath": "secret_key_path",
    "includeKeys": "include_keys",
    "excludeKeys": "exclude_keys",
    "format": "format",
    "template": "template",
}
_BOOL_FIELDS = {"expandKeys": "expand_keys", "writeFile": "write_file"}
FORMATS = ("json", "pem-bundle", "pem-chain")
# A key filter is a short expression, not a program.
MAX_KEY_FILTER_LENGTH = 256


def _parse_object(loader: goyaml.GoLoader, index: int, node: goyaml.Node, template_tokens: list[int]) -> SecretObject:
    where = f"objects[{index}]"
    if not isinstance(node, goyaml.MappingNode):
        raise ConfigError(f"{where} must be a map with objectName and secretPath")
    explicit = [k.value for k, _ in node.value if isinstance(k, goyaml.ScalarNode) and k.value != "<<"]
    repeated = sorted({key for key in explicit if explicit.count(key) > 1})
    if repeated:
        raise ConfigError(f"{where}: {', '.join(map(repr, repeated))} is set more than once")
    try:
        loader.flatten_mapping(node)  # merged keys first, explicit ones after: the last wins
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {truncate(str(e))}") from None
    for key_node, value_node in node.value:  # name the object in every error below, if it has a name
        if key_node.value == "objectName" and isinstance(value_node, goyaml.ScalarNode) and value_node.value:
            where = f"object {quote(truncate(str(value_node.value), MAX_NAME_LENGTH))}"
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, goyaml.ScalarNode) else None
        if key in _STRING_FIELDS:
            values[_STRING_FIELDS[key]] = _scalar_text(where, key, value_node)
        elif key in _BOOL_FIELDS:
            values[_BOOL_FIELDS[key]] = _bool_field(loader, where, key, value_node)
        elif key == "filePermission":
            values["file_permission"] = _file_permission(loader, where, value_node)
        elif key == "secretArgs":
            values["secret_args"] = _secret_args(loader, where, value_node)
    name = values.get("object_name", "")
    if name:
        where = f"object {quote(name)}"
        check_object_name(name, where)
    if not name:
        raise ConfigError(f"{where}: objectName is required (the file name to write)")
    if not values.get("secret_path") and not values.get("template"):
        raise ConfigError(f"{where}: secretPath is required (or a template)")
    _check_shape(where, values, template_tokens)
    encoding = values.get("encoding", "")
    # Without secretKey the whole reply is written and encoding is unused: the reference
    # ignores it then, so a class that worked there works here.
    selects = values.get("secret_key") or values.get("secret_key_path") or values.get("expand_keys")
    if encoding and selects and encoding.lower() not in ENCODINGS:
        raise ConfigError(f"{where}: encoding {truncate(encoding, 40)!r} is not supported; use utf-8, base64 or hex")
    method = values.get("method", "")
    if method and method.upper() not in METHODS:
        raise ConfigError(f"{where}: method {truncate(method, 40)!r} is not supported; use GET, POST, PUT or LIST")
    return SecretObject(**values)


# Fields that choose what a file holds; an object may use one of them.
_SHAPES = (
    ("template", "template"),
    ("secret_key", "secretKey"),
    ("secret_key_path", "secretKeyPath"),
    ("expand_keys", "expandKeys"),
    ("format", "format"),
)


def _check_shape(where: str, values: dict[str, Any], template_tokens: list[int]) -> None:
    """The file-shaping fields: at most one way to choose the contents, each well formed."""
    chosen = [name for attr, name in _SHAPES if values.get(attr)]
    if len(chosen) > 1:
        raise ConfigError(
            f"{where}: set only one of {', '.join(chosen)}: each chooses what the file holds "
            "(a template can read any key itself)"
        )
    if values.get("template") and values.get("encoding"):
        raise ConfigError(f"{where}: encoding does not apply to a template; decode in it with b64dec")
    for attr, name in (("include_keys", "includeKeys"), ("exclude_keys", "excludeKeys")):
        if values.get(attr) and not values.get("expand_keys"):
            raise ConfigError(f"{where}: {name} filters the files of expandKeys; set expandKeys: true")
        if values.get(attr):
            key_filter(where, name, values[attr])
    pointer = values.get("secret_key_path")
    if pointer:
        json_pointer(where, pointer)
    shape = values.get("format", "")
    if shape and shape not in FORMATS:
        raise ConfigError(f"{where}: format {truncate(shape, 40)!r} is not supported; use {', '.join(FORMATS)}")
    if values.get("template"):
        if template_tokens[0] <= 0:
            raise ConfigError(
                f"{where}: the class's templates together have more than {gotemplate.MAX_CLASS_TOKENS} tokens"
            )
        try:
            parsed = gotemplate.parse(values["template"], max_tokens=template_tokens[0])
        except gotemplate.TemplateError as e:
            raise ConfigError(f"{where}: template {e}") from None
        template_tokens[0] -= parsed.tokens
        values["parsed_template"] = parsed


def json_pointer(where: str, pointer: str) -> tuple[str, ...]:
    """The reference tokens of an RFC 6901 JSON Pointer ("/a/b~1c" -> ("a", "b/c"))."""
    if not pointer.startswith("/"):
        raise ConfigError(
            f"{where}: secretKeyPath {truncate(pointer, 60)!r} must be a JSON Pointer starting with '/' "
            "(e.g. /db/host; secretKey names one top-level key)"
        )
    tokens = pointer[1:].split("/")
    for token in tokens:
        if "~" in token.replace("~0", "").replace("~1", ""):
            raise ConfigError(f"{where}: secretKeyPath {truncate(pointer, 60)!r}: '~' must be written ~0 ('/' is ~1)")
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in tokens)


@functools.lru_cache(maxsize=256)
def _compiled_filter(expression: str) -> Any:
    import re2  # type: ignore[import-untyped]  # google-re2: linear time, no backtracking; imported when used

    options = re2.Options()
    options.log_errors = False  # a tenant's bad pattern is their ConfigError, not our stderr
    return re2.compile(expression, options)


def key_filter(where: str, name: str, expression: str) -> Any:
    """A compiled RE2 expression (linear time: a tenant's pattern cannot stall the node)."""
    if len(expression) > MAX_KEY_FILTER_LENGTH:
        raise ConfigError(f"{where}: {name} is longer than {MAX_KEY_FILTER_LENGTH} characters")
    try:
        return _compiled_filter(expression)
    except Exception as e:  # re2.error; its hierarchy is not typed
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ConfigError(f"{where}: {name} is not a valid RE2 regular expression: {truncate(reason)}") from None


def _bool_field(loader: goyaml.GoLoader, where: str, key: str, node: goyaml.Node) -> bool:
    if isinstance(node, goyaml.ScalarNode) and node.tag.endswith(":bool"):
        return bool(loader.construct_object(node))
    text = node.value if isinstance(node, goyaml.ScalarNode) else "a collection"
    raise ConfigError(f"{where}: {key} must be true or false, got {truncate(str(text), 40)!r}")


def _scalar_text(where: str, key: str, node: goyaml.Node) -> str:
    # yaml.v3 sets a string field from any scalar's text; null leaves it empty.
    if not isinstance(node, goyaml.ScalarNode):
        raise ConfigError(f"{where}: {key} must be a string")
    if node.tag.endswith(":null"):
        return ""
    return str(node.value)


def _file_permission(loader: goyaml.GoLoader, where: str, node: goyaml.Node) -> int:
    value = None
    if isinstance(node, goyaml.ScalarNode) and node.tag.endswith((":int", ":null")):
        try:
            value = loader.construct_object(node) or 0
        except (ValueError, OverflowError, yaml.YAMLError):  # "0x_", 5,000 digits: not a mode
            value = None
    if not isinstance(value, int) or not 0 <= value <= MAX_MODE:
        text = node.value if isinstance(node, goyaml.ScalarNode) else "a collection"
        raise ConfigError(
            f"{where}: filePermission must be a file mode from 0 to 0777 (e.g. 0640), got {truncate(str(text), 40)!r}"
        )
    return value


def _secret_args(loader: goyaml.GoLoader, where: str, node: goyaml.Node) -> Mapping[str, Any] | None:
    if isinstance(node, goyaml.ScalarNode) and node.tag.endswith(":null"):
        return None
    if not isinstance(node, goyaml.MappingNode):
        raise ConfigError(f"{where}: secretArgs must be a map of request arguments")
    try:
        value = loader.construct_object(node, deep=True)
    except (yaml.YAMLError, TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{where}: secretArgs cannot be read: {truncate(str(e))}") from None
    _check_args(where, value, [MAX_SECRET_ARGS_VALUES])
    return _frozen(value)  # type: ignore[no-any-return]


def _frozen(value: Any) -> Any:
    """Read-only views of maps, tuples for lists: parsed objects are shared between Mounts."""
    if isinstance(value, dict):
        return MappingProxyType({key: _frozen(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    return value


def _check_args(where: str, value: Any, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{where}: secretArgs holds more than {MAX_SECRET_ARGS_VALUES} values")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: secretArgs keys must be strings, got {truncate(repr(key), 40)}")
            _check_args(where, item, budget)
    elif isinstance(value, list):
        for item in value:
            _check_args(where, item, budget)
    elif (isinstance(value, float) and value != value) or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: secretArgs cannot hold .inf or .nan (not valid JSON)")
    elif not isinstance(value, str | int | float | bool | type(None)):
        raise ConfigError(f"{where}: secretArgs cannot hold a {type(value).__name__}")


def check_object_name(name: str, where: str) -> None:
    """Refuse names that would escape the volume or hide what they are."""
    if name.startswith("/"):
        raise ConfigError(f"{where}: objectName must be a relative path, not absolute")
    parts = name.split("/")
    if ".." in parts:
        raise ConfigError(f"{where}: objectName must not contain '..'")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for ch in name):
        raise ConfigError(f"{where}: objectName must not contain control or invisible characters")
    if "" in parts or "." in parts:
        raise ConfigError(f"{where}: objectName must not contain empty or '.' path segments")
    if any(len(p.encode()) > 255 for p in parts):
        raise ConfigError(f"{where}: objectName is too long for a file name")
    check_name_length(name, where)


def check_name_length(name: str, where: str) -> None:
    """Refuse a path longer than a file's path may be (255 bytes a segment, four segments)."""
    if len(name.encode("utf-8", "surrogatepass")) > 255 * 4:
        raise ConfigError(f"{where}: objectName is too long for a file name")
