"""The Kubernetes API: the only module that talks to it (through lightkube).

Three calls: a TokenRequest for a pod's service account (used only when the driver
sent no token), the HMAC key Secret (read, else created immutable), and a Pod lookup
(for the optional lease-revocation sweep). Failures leave as KubernetesError.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from pathlib import Path

import httpx2
import lightkube
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod, Secret, ServiceAccount

from provider.errors import KubernetesError, truncate

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


def load_config() -> KubeConfig | None:
    """In-cluster config, else KUBECONFIG or ~/.kube/config; None when there is none."""
    try:
        return KubeConfig.from_env()
    except (LightkubeConfigError, KeyError, OSError):
        return None


def own_namespace(config: KubeConfig | None) -> str:
    """The namespace the provider runs in: the SA file, POD_NAMESPACE, kubeconfig, default."""
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
    except OSError:
        pass
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if config is not None:
        try:
            single = config.get()
        except LightkubeConfigError:
            single = None
        if single is not None and single.namespace:
            return single.namespace
    return "default"


class KubeClient:
    """The few Kubernetes API calls the provider makes; thread-safe."""

    def __init__(self, config: KubeConfig | None, *, timeout: float = API_TIMEOUT_SECONDS) -> None:
        self._client = lightkube.Client(config, timeout=httpx2.Timeout(timeout), trust_env=False) if config else None

    @property
    def configured(self) -> bool:
        return self._client is not None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _require(self, what: str) -> lightkube.Client:
        if self._client is None:
            raise KubernetesError(f"cannot {what}: no Kubernetes API configured (not in a cluster, no kubeconfig)")
        return self._client

    def create_token(self, *, namespace: str, service_account: str, audience: str, pod_name: str, pod_uid: str) -> str:
        """A pod-bound service-account token from the TokenRequest API."""
        what = f"create a token for service account {namespace}/{service_account}"
        client = self._require(what)
        request = ServiceAccount.Token(
            metadata=ObjectMeta(name=service_account, namespace=namespace),
            spec=TokenRequestSpec(
                audiences=[audience] if audience else [],
                expirationSeconds=TOKEN_EXPIRATION_SECONDS,
                boundObjectRef=BoundObjectReference(apiVersion="v1", kind="Pod", name=pod_name, uid=pod_uid),
            ),
        )
        try:
            result = client.create(request, service_account, namespace=namespace)
        except (ApiError, httpx2.HTTPError, OSError, ValueError) as e:
            raise KubernetesError(f"cannot {what}: {_describe(e)}") from None
        token = result.status.token if result.status else None
        if not token:
            raise KubernetesError(f"cannot {what}: the TokenRequest returned no token")
        return token

    def get_or_create_hmac_key(self, *, namespace: str, name: str) -> bytes:
        """The HMAC key from Secret namespace/name; created (immutable) if missing."""
        client = self._require("read the HMAC key")
        try:
            return _key_from(client.get(Secret, name, namespace=namespace), namespace, name)
        except ApiError as e:
            if e.status.code != 404:
                raise KubernetesError(f"cannot read Secret {namespace}/{name}: {_describe(e)}") from None
        except (httpx2.HTTPError, OSError, ValueError) as e:
            raise KubernetesError(f"cannot read Secret {namespace}/{name}: {_describe(e)}") from None
        secret = Secret(
            metadata=ObjectMeta(
                name=name,
                namespace=namespace,
                labels={"app.kubernetes.io/managed-by": "vault-csi-provider"},
            ),
            immutable=True,
            data={HMAC_KEY_FIELD: base64.b64encode(secrets.token_bytes(HMAC_KEY_BYTES)).decode()},
        )
        try:
            created = client.create(secret, namespace=namespace)
            logger.info("created HMAC key Secret %s/%s", namespace, name)
            return _key_from(created, namespace, name)
        except ApiError as e:
            if e.status.code != 409:
                raise KubernetesError(f"cannot create Secret {namespace}/{name}: {_describe(e)}") from None
        except (httpx2.HTTPError, OSError, ValueError) as e:
            raise KubernetesError(f"cannot create Secret {namespace}/{name}: {_describe(e)}") from None
        # Another node created it first: use the winner's key.
        try:
            return _key_from(client.get(Secret, name, namespace=namespace), namespace, name)
        except (ApiError, httpx2.HTTPError, OSError, ValueError) as e:
            raise KubernetesError(f"cannot read Secret {namespace}/{name}: {_describe(e)}") from None

    def pod_uid(self, *, namespace: str, name: str) -> str | None:
        """The uid of the pod, or None when it does not exist."""
        client = self._require("look up pods")
        try:
            pod = client.get(Pod, name, namespace=namespace)
        except ApiError as e:
            if e.status.code == 404:
                return None
            raise KubernetesError(f"cannot read pod {namespace}/{name}: {_describe(e)}") from None
        except (httpx2.HTTPError, OSError, ValueError) as e:
            raise KubernetesError(f"cannot read pod {namespace}/{name}: {_describe(e)}") from None
        return pod.metadata.uid if pod.metadata else None


def _key_from(secret: Secret, namespace: str, name: str) -> bytes:
    encoded = (secret.data or {}).get(HMAC_KEY_FIELD)
    try:
        key = base64.b64decode(encoded or "", validate=True)
    except ValueError:
        key = b""
    if len(key) < HMAC_KEY_BYTES:
        raise KubernetesError(
            f"Secret {namespace}/{name} has no {HMAC_KEY_BYTES}-byte {HMAC_KEY_FIELD!r}; "
            "delete it and the provider will create a new one"
        )
    return key


def _describe(error: Exception) -> str:
    if isinstance(error, ApiError):
        return f"Kubernetes answered {error.status.code}: {truncate(error.status.message or '')}"
    return truncate(str(error) or type(error).__name__)
