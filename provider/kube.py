"""The Kubernetes API: the only module that talks to it.

Three calls: a TokenRequest for a pod's service account (used only when the driver
sent no token), the HMAC key Secret (read, else created immutable), and a Pod lookup
(for the optional lease-revocation sweep). Failures leave as KubernetesError.

They go through the same transport as Vault's requests (provider.transport):
three REST calls do not need a client library, and lightkube with httpx cost 9 MiB of
resident memory here, a tenth of the DaemonSet's budget.

Where the API is: in a pod, the service account's token (re-read every minute: the
kubelet rotates it), CA and KUBERNETES_SERVICE_HOST/PORT; else a kubeconfig (KUBECONFIG
or ~/.kube/config) whose user has a token, a token file or a client certificate.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from provider.address import Target
from provider.config import TLSConfig
from provider.errors import KubernetesError, truncate
from provider.transport import Transport, TransportError

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
HMAC_KEY_FIELD = "key"
# 32 bytes: the HMAC-SHA256 block-size-appropriate key length the reference uses.
HMAC_KEY_BYTES = 32
# TokenRequest expiry for the fallback path: long enough for one login, short enough
# that a leaked token is soon useless (the API server's minimum is 10 minutes).
TOKEN_EXPIRATION_SECONDS = 15 * 60
# Calls to the API server are small and answered in milliseconds; a slow one must not
# hold a Mount past the driver's deadline.
API_TIMEOUT_SECONDS = 3.0
# A token file is read again after this long, as client-go does: the kubelet rotates it.
TOKEN_FILE_SECONDS = 60.0
# Largest API reply read: a Secret holds at most 1 MiB; a Pod far less.
MAX_REPLY_BYTES = 4 * 1024 * 1024


class KubeConfigError(Exception):
    """A Kubernetes configuration that exists but cannot be used; says why."""


@dataclass(frozen=True, kw_only=True)
class KubeConfig:
    """Where the API server is and how the provider authenticates to it."""

    server: str
    namespace: str = ""  # the kubeconfig context's, if any
    token: str = field(default="", repr=False)
    token_file: str = ""
    tls: TLSConfig = field(default_factory=TLSConfig)

    @classmethod
    def in_cluster(cls, directory: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig | None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port or not (directory / "token").exists():
            return None
        host = f"[{host}]" if ":" in host else host
        return cls(
            server=f"https://{host}:{port}",
            token_file=str(directory / "token"),
            tls=TLSConfig(ca_cert=str(directory / "ca.crt")),
        )

    @classmethod
    def from_file(cls, path: Path) -> KubeConfig:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise KubeConfigError(f"cannot read kubeconfig {path}: {e}") from None
        return cls.from_dict(data, base_dir=path.parent)

    @classmethod
    def from_dict(cls, data: Any, *, base_dir: Path | None = None) -> KubeConfig:
        """The current context of a kubeconfig: its cluster, user and namespace."""
        if not isinstance(data, dict):
            raise KubeConfigError("the kubeconfig is not a map")
        context = _named(data, "contexts", data.get("current-context"), "context")
        cluster = _named(data, "clusters", context.get("cluster"), "cluster")
        user = _named(data, "users", context.get("user"), "user")
        if "exec" in user or "auth-provider" in user:
            raise KubeConfigError(
                "the kubeconfig's user authenticates with an exec plugin or auth provider; the provider supports "
                "a token, a token file or a client certificate"
            )
        files = _Files(base_dir)
        server = str(cluster.get("server") or "")
        if not server.startswith(("https://", "http://")):
            raise KubeConfigError("the kubeconfig's cluster has no https:// or http:// server")
        return cls(
            server=server,
            namespace=str(context.get("namespace") or ""),
            token=str(user.get("token") or ""),
            token_file=files.path(user.get("tokenFile")),
            tls=TLSConfig(
                ca_cert=files.path(cluster.get("certificate-authority"))
                or files.data(cluster.get("certificate-authority-data"), "ca.crt"),
                client_cert=files.path(user.get("client-certificate"))
                or files.data(user.get("client-certificate-data"), "client.crt"),
                client_key=files.path(user.get("client-key")) or files.data(user.get("client-key-data"), "client.key"),
                skip_verify=cluster.get("insecure-skip-tls-verify") is True,
            ),
        )


def load_config() -> KubeConfig | None:
    """In-cluster config, else KUBECONFIG or ~/.kube/config; None when there is none or
    it cannot be used (said in the log)."""
    found = KubeConfig.in_cluster()
    if found is not None:
        return found
    path = Path(os.environ.get("KUBECONFIG") or Path.home() / ".kube" / "config")
    if not path.is_file():
        return None
    try:
        return KubeConfig.from_file(path)
    except KubeConfigError as e:
        logger.error("no Kubernetes API: %s", e)
        return None


def own_namespace(config: KubeConfig | None) -> str:
    """The namespace the provider runs in: the SA file, POD_NAMESPACE, kubeconfig, default."""
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
    except OSError:
        pass
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if config is not None and config.namespace:
        return config.namespace
    return "default"


class KubeClient:
    """The few Kubernetes API calls the provider makes; thread-safe."""

    def __init__(self, config: KubeConfig | None, *, timeout: float = API_TIMEOUT_SECONDS) -> None:
        self._config = config
        self._timeout = timeout
        self._target = Target.parse(config.server) if config is not None else None
        self._transport = Transport(max_body_bytes=MAX_REPLY_BYTES, service="the Kubernetes API")
        self._token_lock = threading.Lock()
        self._file_token: tuple[str, float] = ("", 0.0)

    @property
    def configured(self) -> bool:
        return self._config is not None

    def close(self) -> None:
        self._transport.close()

    def create_token(self, *, namespace: str, service_account: str, audience: str, pod_name: str, pod_uid: str) -> str:
        """A pod-bound service-account token from the TokenRequest API."""
        what = f"create a token for service account {namespace}/{service_account}"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": service_account, "namespace": namespace},
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid},
            },
        }
        status, reply = self._call(
            what, "POST", f"{_namespaced(namespace)}/serviceaccounts/{_name(service_account)}/token", request
        )
        if status not in (200, 201):
            raise KubernetesError(f"cannot {what}: {_says(status, reply)}")
        token = _field(reply, "status", "token")
        if not isinstance(token, str) or not token:
            raise KubernetesError(f"cannot {what}: the TokenRequest returned no token")
        return token

    def get_or_create_hmac_key(self, *, namespace: str, name: str) -> bytes:
        """The HMAC key from Secret namespace/name; created (immutable) if missing."""
        path = f"{_namespaced(namespace)}/secrets/{_name(name)}"
        reading = f"read Secret {namespace}/{name}"
        status, reply = self._call(reading, "GET", path)
        if status == 200:
            return _key_from(reply, namespace, name)
        if status != 404:
            raise KubernetesError(f"cannot {reading}: {_says(status, reply)}")
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "vault-csi-provider"},
            },
            "immutable": True,
            "data": {HMAC_KEY_FIELD: base64.b64encode(secrets.token_bytes(HMAC_KEY_BYTES)).decode()},
        }
        creating = f"create Secret {namespace}/{name}"
        status, reply = self._call(creating, "POST", f"{_namespaced(namespace)}/secrets", secret)
        if status in (200, 201):
            logger.info("created HMAC key Secret %s/%s", namespace, name)
            return _key_from(reply, namespace, name)
        if status != 409:
            raise KubernetesError(f"cannot {creating}: {_says(status, reply)}")
        # Another node created it first: use the winner's key.
        status, reply = self._call(reading, "GET", path)
        if status != 200:
            raise KubernetesError(f"cannot {reading}: {_says(status, reply)}")
        return _key_from(reply, namespace, name)

    def pod_uid(self, *, namespace: str, name: str) -> str | None:
        """The uid of the pod, or None when it does not exist."""
        what = f"read pod {namespace}/{name}"
        status, reply = self._call(what, "GET", f"{_namespaced(namespace)}/pods/{_name(name)}")
        if status == 404:
            return None
        if status != 200:
            raise KubernetesError(f"cannot {what}: {_says(status, reply)}")
        uid = _field(reply, "metadata", "uid")
        return uid if isinstance(uid, str) else None

    def _call(self, what: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        config, target = self._config, self._target
        if config is None or target is None:
            raise KubernetesError(f"cannot {what}: no Kubernetes API configured (not in a cluster, no kubeconfig)")
        headers = {"Accept": "application/json"}
        token = self._token(config)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif target.authorization:  # user info in the server's URL
            headers["Authorization"] = target.authorization
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            reply = self._transport.send(
                target,
                config.tls,
                method,
                target.prefix + path,
                json.dumps(body).encode() if body is not None else None,
                headers,
                self._timeout,
                replayable=method == "GET",
            )
        except TransportError as e:
            raise KubernetesError(f"cannot {what}: {truncate(str(e))}") from None
        try:
            return reply.status, json.loads(reply.body) if reply.body.strip() else None
        except ValueError:
            return reply.status, reply.body.decode("utf-8", "replace")

    def _token(self, config: KubeConfig) -> str:
        if not config.token_file:
            return config.token
        with self._token_lock:
            token, read_at = self._file_token
            if not token or time.monotonic() - read_at > TOKEN_FILE_SECONDS:
                try:
                    token = Path(config.token_file).read_text().strip()
                except OSError as e:
                    raise KubernetesError(f"cannot read the service account token {config.token_file}: {e}") from None
                self._file_token = (token, time.monotonic())
            return token


def _namespaced(namespace: str) -> str:
    return f"/api/v1/namespaces/{_name(namespace)}"


def _name(name: str) -> str:
    """A name in a path: whatever a class or pod sent, it stays one path segment."""
    return quote(name, safe="")


def _field(reply: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(reply, dict):
            return None
        reply = reply.get(key)
    return reply


def _says(status: int, reply: Any) -> str:
    """The API server's own message (its Status object's), truncated."""
    message = _field(reply, "message") if isinstance(reply, dict) else reply
    return f"Kubernetes answered {status}: {truncate(str(message or ''))}"


def _key_from(secret: Any, namespace: str, name: str) -> bytes:
    encoded = _field(secret, "data", HMAC_KEY_FIELD)
    try:
        key = base64.b64decode(encoded if isinstance(encoded, str) else "", validate=True)
    except ValueError:
        key = b""
    if len(key) < HMAC_KEY_BYTES:
        raise KubernetesError(
            f"Secret {namespace}/{name} has no {HMAC_KEY_BYTES}-byte {HMAC_KEY_FIELD!r}; "
            "delete it and the provider will create a new one"
        )
    return key


def _named(config: dict[str, Any], section: str, name: Any, inner: str) -> dict[str, Any]:
    for entry in config.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get(inner), dict):
            found: dict[str, Any] = entry[inner]
            return found
    raise KubeConfigError(f"the kubeconfig has no {section[:-1]} named {name!r}")


class _Files:
    """Paths in a kubeconfig (relative to its directory), and its inline -data fields
    written to private files once, for the TLS context; removed when the process exits."""

    def __init__(self, base_dir: Path | None) -> None:
        self._base = base_dir
        self._directory: str | None = None

    def path(self, value: Any) -> str:
        if not value:
            return ""
        path = Path(str(value))
        return str(path if path.is_absolute() or self._base is None else self._base / path)

    def data(self, value: Any, name: str) -> str:
        if not value:
            return ""
        try:
            content = base64.b64decode(str(value), validate=True)
        except ValueError:
            raise KubeConfigError(f"the kubeconfig's {name} data is not base64") from None
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="vault-csi-provider-kube-")  # mode 0700
            atexit.register(shutil.rmtree, self._directory, True)
        path = os.path.join(self._directory, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
        return path
