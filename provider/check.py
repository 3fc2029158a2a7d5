"""`vault-csi-provider check`: lint a SecretProviderClass offline, or dry-run its Mount.

    vault-csi-provider check spc.yaml
    vault-csi-provider check spc.yaml --mount --vault-addr=https://vault:8200 \\
        --jwt-file=token.jwt --namespace=app --service-account=app [--show-values]

Offline it reports every error a Mount would give for each SecretProviderClass in the
file, plus what the driver would refuse when syncing ``secretObjects`` into Kubernetes
Secrets. With ``--mount`` it logs in and reads through the same code as a Mount and
prints the files and the Secrets the driver would create. Exit status 1 on any error.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import difflib
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from provider import goyaml
from provider import kube as kube_module
from provider.cache import HmacKeySource, TokenCache
from provider.config import (
    MountConfig,
    Settings,
    TLSConfig,
    VaultSettings,
    parse_mount,
)
from provider.errors import ConfigError, ProviderError, quote
from provider.flavour import FLAVOURS, OPENBAO, VAULT, Flavour
from provider.metrics import Metrics
from provider.mount import MountedFile, Mounter, MountRequest
from provider.vault import Endpoint, Login, VaultClient

# A Kubernetes Secret's data may total at most 1 MiB.
SECRET_SIZE_LIMIT = 1024 * 1024
# Values a checked file may hold (all its documents, an alias counting as what it repeats):
# thousands of classes' worth.
MAX_FILE_NODES = 200_000
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MANAGED_LABEL = "secrets-store.csi.k8s.io/managed"
# What the API server demands of each Secret type's keys.
_TYPE_RULES: dict[str, tuple[str, Any]] = {
    "kubernetes.io/tls": ("exactly", {"tls.crt", "tls.key"}),
    "kubernetes.io/basic-auth": ("one of", {"username", "password"}),
    "kubernetes.io/ssh-auth": ("requires", {"ssh-privatekey"}),
    "kubernetes.io/dockerconfigjson": ("requires", {".dockerconfigjson"}),
    "kubernetes.io/dockercfg": ("requires", {".dockercfg"}),
}


@dataclass(kw_only=True)
class ClassReport:
    name: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    config: MountConfig | None = None
    secret_objects: list[Mapping[str, Any]] = field(default_factory=list)
    flavour: Flavour = VAULT


def _text(value: Any, otherwise: str) -> str:
    """A field that should be a string, as written; anything else is not printed (a list of
    aliases can print as gigabytes)."""
    return value if isinstance(value, str) else otherwise


def check_class(document: Mapping[str, Any], defaults: VaultSettings) -> ClassReport:
    """Every problem a Mount or the driver's Secret sync would meet, found offline."""
    metadata = document.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        metadata = {}
    report = ClassReport(name=f"{_text(metadata.get('namespace'), 'default')}/{_text(metadata.get('name'), '?')}")
    spec = document.get("spec")
    if not isinstance(spec, Mapping):
        report.errors.append("spec is missing")
        return report
    provider = spec.get("provider")
    flavour = FLAVOURS.get(_text(provider, ""))
    if flavour is None:
        report.errors.append(
            f"spec.provider is {quote(_text(provider, '(missing, or not a string)'))}; this provider answers "
            "'vault' (vault.sock) "
            "and 'openbao' (openbao.sock)"
        )
        flavour = VAULT
    report.flavour = flavour
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        report.errors.append("spec.parameters must be a map of strings")
        parameters = {}
    for key, value in parameters.items():
        if not isinstance(value, str):
            report.errors.append(f"spec.parameters.{key} must be a string (quote it in YAML)")
    report.parameters = {str(k): v for k, v in parameters.items() if isinstance(v, str)}
    try:
        report.config = parse_mount(
            attributes=json.dumps(report.parameters),
            target_path="/check",
            permission="420",
            defaults=defaults,
            flavour=flavour,
        )
    except ConfigError as e:
        report.errors.append(str(e))
    report.warnings.extend(lint_parameters(report.parameters, flavour))
    names = _files_of_config(report.config) if report.config else _object_names(report.parameters)
    raw_objects = spec.get("secretObjects") or []
    if not isinstance(raw_objects, list):
        report.errors.append("spec.secretObjects must be a list")
        raw_objects = []
    report.secret_objects = [o for o in raw_objects if isinstance(o, Mapping)]
    for index, secret_object in enumerate(raw_objects):
        report.errors.extend(_check_secret_object(index, secret_object, names))
    return report


# What a class may set, as the reference reads it; anything else is ignored by a Mount,
# which is how a typo ("secretkey") silently writes a whole JSON reply instead of a key.
KNOWN_PARAMETERS = (
    "roleName",
    "vaultAddress",
    "vaultNamespace",
    "vaultKubernetesMountPath",
    "vaultAuthMountPath",
    "audience",
    "vaultSkipTLSVerify",
    "vaultCACertPath",
    "vaultCADirectory",
    "vaultTLSServerName",
    "vaultTLSClientCertPath",
    "vaultTLSClientKeyPath",
    "objects",
)
KNOWN_OBJECT_KEYS = (
    "objectName",
    "secretPath",
    "secretKey",
    "method",
    "secretArgs",
    "filePermission",
    "encoding",
    # Ours (the reference ignores them): shaping the files.
    "secretKeyPath",
    "expandKeys",
    "includeKeys",
    "excludeKeys",
    "format",
    "template",
    "writeFile",
)
# What users of the reference write that it never read, and what to write instead.
_HINTS = {
    "vaultCAPem": "the CA must be a file on the provider's node: use vaultCACertPath (or -vault-tls-ca-cert)",
    "array": "that is the pre-0.1 'objects' format; list the objects directly (- objectName: …, secretPath: …)",
    "objectPath": "that is the pre-0.1 format; use secretPath (and secretKey for one key)",
}


@dataclass(frozen=True, kw_only=True)
class FileNames:
    """The files a class's Mount writes, as far as they are known offline."""

    exact: frozenset[str]  # objects that write one file under their name
    expanded: frozenset[str]  # expandKeys objects: they write NAME/<key> for each key
    unwritten: frozenset[str]  # writeFile: false

    def problem(self, name: str) -> str:
        """Why no file of that name will exist; '' when it will (or may)."""
        if name in self.exact or any(name.startswith(f"{prefix}/") for prefix in self.expanded):
            return ""
        if name in self.unwritten:
            return "is an object with writeFile: false, which writes no file"
        if name in self.expanded:
            return f"is an expandKeys object, which writes one file per key: name one, e.g. {name}/<key>"
        return "names no object in 'objects'"


def _files_of_config(config: MountConfig) -> FileNames:
    objects = config.objects
    return FileNames(
        exact=frozenset(o.object_name for o in objects if o.write_file and not o.expand_keys),
        expanded=frozenset(o.object_name for o in objects if o.write_file and o.expand_keys),
        unwritten=frozenset(o.object_name for o in objects if not o.write_file),
    )


def _object_names(parameters: Mapping[str, str]) -> FileNames | None:
    """The files a class writes, read leniently when the class has errors, so that
    secretObjects are still checked against them; None when they cannot be read at all."""
    entries = _load_objects(parameters.get("objects", ""))
    if not isinstance(entries, list):
        return None
    named = [e for e in entries if isinstance(e, Mapping) and e.get("objectName") is not None]
    return FileNames(
        exact=frozenset(str(e["objectName"]) for e in named if e.get("writeFile") is not False),
        expanded=frozenset(str(e["objectName"]) for e in named if e.get("expandKeys") is True),
        unwritten=frozenset(str(e["objectName"]) for e in named if e.get("writeFile") is False),
    )


def _load_objects(text: str) -> Any:
    if not text or len(text) > 1024 * 1024:
        return None
    try:
        goyaml.compose(text)  # the same cost bounds as a Mount's parse, before building values
        return yaml.load(text, Loader=goyaml.GoLoader)  # GoLoader is a safe loader
    except (yaml.YAMLError, RecursionError, ValueError):
        return None


def did_you_mean(key: str, known: Sequence[str]) -> str:
    """' (did you mean "x"?)' for a near miss of a known key, else ''."""
    by_case = {k.lower(): k for k in known}
    match = by_case.get(key.lower()) or next(iter(difflib.get_close_matches(key, known, n=1, cutoff=0.75)), None)
    return f" (did you mean {quote(match)}?)" if match else ""


def known_parameters(flavour: Flavour) -> tuple[str, ...]:
    """The parameter names a class of this contract may use."""
    if flavour is VAULT:
        return KNOWN_PARAMETERS
    return (*sorted(flavour.aliases), "audience", "objects")


def lint_parameters(parameters: Mapping[str, str], flavour: Flavour = VAULT) -> list[str]:
    """Warnings for keys a Mount would ignore, and for what users commonly get wrong."""
    warnings = []
    known = known_parameters(flavour)
    for key in parameters:
        if key in known or key.startswith("csi.storage.k8s.io/"):
            continue
        hint = f": {_HINTS[key]}" if key in _HINTS else did_you_mean(key, known)
        if flavour is VAULT and key in known_parameters(OPENBAO) and not key.startswith("vault"):
            suffix = key.split("bao", 1)[1]
            vault_name = "roleName" if suffix == "RoleName" else f"vault{suffix}"
            hint = f": that is the OpenBao provider's name; set spec.provider: openbao, or write {vault_name}"
        warnings.append(f"unknown parameter {quote(key)} is ignored{hint}")
    parameters = flavour.canonical(parameters)[0]
    mount = parameters.get("vaultAuthMountPath") or parameters.get("vaultKubernetesMountPath") or ""
    if mount.strip("/").startswith("auth/"):
        warnings.append(
            f"the auth mount {quote(mount)} starts with auth/: give the mount's path without it "
            f"({quote(mount.strip('/')[5:])}); logins go to auth/<mount>/login"
        )
    audience = parameters.get("audience", "")
    if audience and audience != flavour.default_audience:
        warnings.append(
            f"audience {quote(audience)}: the CSI driver's tokenRequests must list it (driver-values.yaml), else "
            "Mounts fall back to requesting a token themselves (RBAC: serviceaccounts/token create)"
        )
    entries = _load_objects(parameters.get("objects", ""))  # unreadable: the Mount's own error says why
    if isinstance(entries, Mapping) and "array" in entries:
        warnings.append(f"'objects': {_HINTS['array']}")
    listed = [entry for entry in entries if isinstance(entry, Mapping)] if isinstance(entries, list) else []
    has_template = any(entry.get("template") for entry in listed)
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, Mapping):
            continue
        where = f"object {quote(str(entry.get('objectName') or index))}"
        for key in entry:
            if str(key) not in KNOWN_OBJECT_KEYS:
                hint = f": {_HINTS[str(key)]}" if str(key) in _HINTS else did_you_mean(str(key), KNOWN_OBJECT_KEYS)
                warnings.append(f"{where}: unknown key {quote(str(key))} is ignored{hint}")
        path = str(entry.get("secretPath") or "")
        segments = path.strip("/").split("/")
        if segments[0] == "secret" and len(segments) > 1 and segments[1] not in ("data", "metadata"):
            warnings.append(
                f"{where}: if secret/ is KV version 2 (the default mount in most installs), read "
                f"{quote('secret/data/' + '/'.join(segments[1:]))}; {quote(path)} answers 404 there"
            )
        if entry.get("secretArgs") and str(entry.get("method") or "GET").upper() == "GET":
            warnings.append(
                f"{where}: secretArgs are sent only with method PUT or POST (e.g. method: PUT for {quote(path)})"
            )
        elif "/issue/" in path and str(entry.get("method") or "GET").upper() == "GET":
            warnings.append(f"{where}: {quote(path)} issues certificates on PUT or POST; add method: PUT")
        if entry.get("writeFile") is False and not has_template:
            warnings.append(f"{where}: writeFile: false and no template in this class reads it: it is read for nothing")
    return warnings


def _check_secret_object(index: int, secret_object: Any, names: FileNames | None) -> list[str]:
    where = f"spec.secretObjects[{index}]"
    if not isinstance(secret_object, Mapping):
        return [f"{where} must be a map"]
    errors = []
    secret_name = secret_object.get("secretName")
    if not secret_name:
        errors.append(f"{where}.secretName is required")
    elif not isinstance(secret_name, str) or len(secret_name) > 253 or not _DNS_SUBDOMAIN.match(secret_name):
        errors.append(f"{where}.secretName {quote(str(secret_name))} is not a valid Secret name (DNS subdomain)")
    else:
        where = f"secret {quote(secret_name)}"
    secret_type = secret_object.get("type")
    if not secret_type:
        errors.append(f"{where}: type is required (e.g. Opaque, kubernetes.io/tls)")
    data = secret_object.get("data") or []
    if not isinstance(data, list) or not data:
        return [*errors, f"{where}: data must list at least one objectName and key"]
    keys: list[str] = []
    for position, item in enumerate(data):
        if not isinstance(item, Mapping):
            errors.append(f"{where}: data[{position}] must be a map with objectName and key")
            continue
        object_name, key = item.get("objectName"), item.get("key")
        if not object_name:
            errors.append(f"{where}: data[{position}].objectName is required")
        elif names is not None and names.problem(str(object_name)):
            errors.append(
                f"{where}: data[{position}].objectName {quote(str(object_name))} {names.problem(str(object_name))}"
            )
        if not key:
            errors.append(f"{where}: data[{position}].key is required")
            continue
        key = str(key)
        if len(key) > 253 or not _SECRET_KEY.match(key):
            errors.append(f"{where}: key {quote(key)} is not a valid Secret key ([-._a-zA-Z0-9]+)")
        keys.append(key)
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        errors.append(f"{where}: keys used more than once: {', '.join(map(quote, repeated))}")
    rule = _TYPE_RULES.get(str(secret_type))
    if rule is not None:
        kind, required = rule
        present = set(keys)
        if (
            (kind == "exactly" and present != required)
            or (kind == "one of" and not present & required)
            or (kind == "requires" and not required <= present)
        ):
            wanted = {"exactly": "exactly the keys", "one of": "one of the keys", "requires": "the keys"}[kind]
            errors.append(
                f"{where}: a {secret_type} Secret needs {wanted} "
                f"{', '.join(map(quote, sorted(required)))}; it has {', '.join(map(quote, keys)) or 'none'}"
            )
    return errors


def synced_secrets(report: ClassReport, files: Sequence[MountedFile], namespace: str) -> list[dict[str, Any]]:
    """The Secrets the driver would create from secretObjects, built the way it builds them."""
    by_name = {f.path: f.contents for f in files}
    result = []
    for secret_object in report.secret_objects:
        labels = {**(secret_object.get("labels") or {}), MANAGED_LABEL: "true"}
        metadata: dict[str, Any] = {"name": secret_object.get("secretName"), "namespace": namespace, "labels": labels}
        if secret_object.get("annotations"):
            metadata["annotations"] = dict(secret_object["annotations"])
        data = {
            str(item["key"]): base64.b64encode(by_name.get(str(item["objectName"]), b"")).decode()
            for item in secret_object.get("data") or []
        }
        result.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": metadata,
                "type": secret_object.get("type"),
                "data": data,
            }
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vault-csi-provider check", description=__doc__.split("\n\n")[0])

    def flag(name: str, **kwargs: Any) -> None:  # Go-style -flag as well as --flag, like the daemon
        parser.add_argument(f"--{name}", f"-{name}", **kwargs)

    parser.add_argument("file", help="SecretProviderClass manifest (several documents allowed); - for stdin")
    flag("mount", action="store_true", help="log in and read for real, through the Mount code")
    flag("strict", action="store_true", help="warnings (unknown keys, likely mistakes) fail too: for CI")
    flag("vault-addr", default=os.environ.get("VAULT_ADDR", "https://127.0.0.1:8200"))
    flag("vault-namespace", default=os.environ.get("VAULT_NAMESPACE", ""))
    flag("vault-mount", default="kubernetes", help="default auth mount")
    flag("vault-ca-cert", default=os.environ.get("VAULT_CACERT", ""))
    flag("vault-skip-verify", action="store_true")
    bao = {name: os.environ.get(f"BAO_{name}") or os.environ.get(f"VAULT_{name}", "") for name in ("ADDR", "NAMESPACE")}
    flag("openbao-addr", default=bao["ADDR"] or "https://127.0.0.1:8200", help="for provider: openbao classes")
    flag("openbao-namespace", default=bao["NAMESPACE"], help="for provider: openbao classes")
    flag("jwt-file", help="the pod's service-account token (e.g. from `kubectl create token`)")
    flag("namespace", default="default", help="the pod's namespace")
    flag("service-account", default="default", help="the pod's service account")
    flag("pod-name", default="check", help="the pod's name (for messages)")
    flag("show-values", action="store_true", help="print secret values (careful)")
    return parser


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    defaults = VaultSettings(
        address=args.vault_addr,
        namespace=args.vault_namespace,
        auth_mount=args.vault_mount.strip("/"),
        tls=TLSConfig(ca_cert=args.vault_ca_cert, skip_verify=args.vault_skip_verify),
    )
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        # Bounded before anything is built: a 683-byte file of nested aliases is billions of values.
        goyaml.check_cost(text, max_nodes=MAX_FILE_NODES)
        documents = [d for d in yaml.safe_load_all(text) if d]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        print(f"error: cannot read {args.file}: {e}", file=out)
        return 1
    classes = [d for d in documents if isinstance(d, Mapping) and d.get("kind") == "SecretProviderClass"]
    if not classes:
        print(f"error: {args.file} holds no SecretProviderClass", file=out)
        return 1
    openbao_defaults = dataclasses.replace(defaults, address=args.openbao_addr, namespace=args.openbao_namespace)
    failed = False
    for document in classes:
        spec = document.get("spec")
        is_openbao = isinstance(spec, Mapping) and spec.get("provider") == OPENBAO.name
        report = check_class(document, openbao_defaults if is_openbao else defaults)
        for message in report.errors:
            print(f"error: {report.name}: {message}", file=out)
        for message in report.warnings:
            print(f"{'error' if args.strict else 'warning'}: {report.name}: {message}", file=out)
        if report.errors or (args.strict and report.warnings):
            failed = True
            continue
        assert report.config is not None
        print(
            f"ok: {report.name}: {len(report.config.objects)} object(s), {len(report.secret_objects)} synced Secret(s)",
            file=out,
        )
        if args.mount and not _dry_run(report, args, openbao_defaults if is_openbao else defaults, out):
            failed = True
    return 1 if failed else 0


class _DryRunVault(VaultClient):
    """The dry run's Vault client: it remembers the tokens it logs in with, and revokes
    them when the run ends, and with them the leases they issued (a database user, a
    certificate's lease): a dry run leaves nothing alive behind it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._logins: list[tuple[Endpoint, str]] = []

    def login(self, endpoint: Endpoint, **kwargs: Any) -> Login:
        login = super().login(endpoint, **kwargs)
        self._logins.append((endpoint, login.token))
        return login

    def revoke_logins(self, out: TextIO) -> None:
        for endpoint, token in self._logins:
            try:
                self.revoke_self(endpoint, token=token, deadline=time.monotonic() + 10)
            except ProviderError as e:
                print(f"warning: could not revoke the dry run's Vault token (it expires on its own): {e}", file=out)
            else:
                print("revoked the dry run's Vault token, and the leases it issued", file=out)
        self._logins.clear()


def _dry_run(report: ClassReport, args: argparse.Namespace, defaults: VaultSettings, out: TextIO) -> bool:
    if not args.jwt_file:
        print("error: --mount needs --jwt-file (e.g. kubectl create token SA --audience vault)", file=out)
        return False
    with open(args.jwt_file, encoding="utf-8") as jwt_file:
        jwt = jwt_file.read().strip()
    assert report.config is not None
    audience = report.config.audience or report.flavour.default_audience
    attributes = {
        **report.parameters,
        "csi.storage.k8s.io/pod.name": args.pod_name,
        "csi.storage.k8s.io/pod.namespace": args.namespace,
        "csi.storage.k8s.io/serviceAccount.name": args.service_account,
        "csi.storage.k8s.io/serviceAccount.tokens": json.dumps({audience: {"token": jwt}}),
    }
    metrics = Metrics()
    vault = _DryRunVault(metrics=metrics)
    # Versions use a throwaway key: the cluster's key stays in its Secret, untouched.
    key = secrets.token_bytes(kube_module.HMAC_KEY_BYTES)
    mounter = Mounter(
        settings=Settings(vault=defaults),
        vault=vault,
        kube=kube_module.KubeClient(None),
        tokens=TokenCache(0),
        hmac_keys=HmacKeySource(lambda: key, ttl=float("inf")),
        metrics=metrics,
        flavour=report.flavour,
    )
    try:
        result = mounter.mount(
            MountRequest(attributes=json.dumps(attributes), target_path="/check", permission="420"),
            deadline=time.monotonic() + 60,
        )
    except ProviderError as e:
        print(f"error: {report.name}: mount failed: {e}", file=out)
        return False
    finally:
        vault.revoke_logins(out)
        vault.close()
    print(f"files of {report.name} (versions use a throwaway HMAC key):", file=out)
    for mounted in result.files:
        size = len(mounted.contents)
        print(f"  {mounted.path}  mode {mounted.mode:04o}  {size} bytes  version {mounted.version}", file=out)
        if args.show_values:  # only on the operator's explicit request, to stdout, never to a log
            print(f"    {mounted.contents.decode('utf-8', 'replace')}", file=out)
    ok = True
    for secret in synced_secrets(report, result.files, args.namespace):
        size = sum(len(base64.b64decode(v)) for v in secret["data"].values())
        if size > SECRET_SIZE_LIMIT:
            print(
                f"error: secret {quote(secret['metadata']['name'])}: {size} bytes of data, over the 1 MiB "
                "Secret limit: the driver's sync will fail",
                file=out,
            )
            ok = False
        if not args.show_values:
            secret["data"] = {k: f"<{len(base64.b64decode(v))} bytes>" for k, v in secret["data"].items()}
        print("---", file=out)
        print(yaml.safe_dump(secret, sort_keys=False).rstrip(), file=out)
    return ok
