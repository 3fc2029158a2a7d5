"""Optional sweep: revoke the Vault tokens and leases of pods that no longer exist.

A dynamic credential outlives its pod until its TTL runs out. With
``-revoke-leases-of-deleted-pods`` the provider asks the Kubernetes API, every
``-revocation-interval``, whether each pod it holds tokens or leases for still exists
with the same uid. For a pod that is gone it revokes each kept lease and then the pod's
Vault token (``auth/token/revoke-self``, allowed by Vault's default policy), which also
revokes every lease the token created, and forgets both.

RBAC: this needs ``get`` on ``pods`` in every namespace that mounts Vault secrets (a
ClusterRole); see deploy/overlays/revocation/.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from provider.cache import TokenCache
from provider.errors import ProviderError
from provider.kube import KubeClient
from provider.leases import LeaseCache
from provider.metrics import Metrics
from provider.mount import IdentityKey
from provider.vault import VaultClient

logger = logging.getLogger(__name__)


class PodSweeper:
    def __init__(
        self, *, kube: KubeClient, vault: VaultClient, tokens: TokenCache, leases: LeaseCache, metrics: Metrics
    ) -> None:
        self._kube = kube
        self._vault = vault
        self._tokens = tokens
        self._leases = leases
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def known_pods(self) -> set[tuple[str, str, str]]:
        pods = self._leases.pods()
        for key in self._tokens.identities():
            if isinstance(key, IdentityKey):
                pods.add((key.pod_uid, key.pod_namespace, key.pod_name))
        return pods

    def sweep(self) -> int:
        """Revoke for every known pod that is gone; return how many pods were revoked."""
        revoked = 0
        for uid, namespace, name in sorted(self.known_pods()):
            try:
                current = self._kube.pod_uid(namespace=namespace, name=name)
            except ProviderError as e:
                logger.warning("revocation sweep: cannot check pod %s/%s, keeping its leases: %s", namespace, name, e)
                continue
            if current == uid:
                continue
            self._revoke(uid, namespace, name)
            revoked += 1
        return revoked

    def _revoke(self, uid: str, namespace: str, name: str) -> None:
        lease_ids = self._leases.drop_pod(uid)
        logins = self._tokens.pop_where(lambda key: isinstance(key, IdentityKey) and key.pod_uid == uid)
        for key, login in logins:
            assert isinstance(key, IdentityKey)
            for lease_id in lease_ids:
                # Default policies may refuse this; revoking the token below takes its leases anyway.
                with contextlib.suppress(ProviderError):
                    self._vault.revoke_lease(key.endpoint, token=login.token, lease_id=lease_id)
            try:
                self._vault.revoke_self(key.endpoint, token=login.token)
            except ProviderError as e:
                logger.warning(
                    "revocation sweep: revoking the token of deleted pod %s/%s failed: %s", namespace, name, e
                )
        self._metrics.leases.labels("revoked").inc(len(lease_ids))
        logger.info(
            "pod %s/%s is gone: revoked %d lease(s) and %d token(s)", namespace, name, len(lease_ids), len(logins)
        )

    def start(self, interval: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sweep()
                except Exception:
                    logger.exception("revocation sweep failed")

        self._thread = threading.Thread(target=loop, name="revocation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
