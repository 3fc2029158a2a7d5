"""Optional sweep: revoke the Vault tokens and leases of pods that no longer exist.

A dynamic credential outlives its pod until its TTL runs out. With
``-revoke-leases-of-deleted-pods`` the provider asks the Kubernetes API, every
``-revocation-interval``, whether each pod it holds tokens or leases for still exists
with the same uid. For a pod that is gone it revokes each kept lease and then the pod's
Vault token (``auth/token/revoke-self``, allowed by Vault's default policy), which also
revokes every lease the token created, and forgets both, and the pod's kept parses (which
hold its service-account token and the files its last Mount answered).

RBAC: this needs ``get`` on ``pods`` in every namespace that mounts Vault secrets (a
ClusterRole); see deploy/overlays/revocation/.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence

from provider.cache import TokenCache
from provider.dispatch import ParsedMounts
from provider.errors import ProviderError
from provider.kube import KubeClient
from provider.leases import LeaseCache
from provider.metrics import Metrics
from provider.mount import IdentityKey, Issuer
from provider.vault import VaultClient

logger = logging.getLogger(__name__)


class PodSweeper:
    def __init__(
        self,
        *,
        kube: KubeClient,
        vault: VaultClient,
        tokens: TokenCache,
        leases: LeaseCache,
        metrics: Metrics,
        parsed: Sequence[ParsedMounts] = (),
    ) -> None:
        self._kube = kube
        self._parsed = parsed
        self._vault = vault
        self._tokens = tokens
        self._leases = leases
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def known_pods(self) -> set[tuple[str, str, str]]:
        pods = self._leases.pods()
        for parsed in self._parsed:
            pods |= parsed.pods()
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
        parses = sum(parsed.forget_pod(uid) for parsed in self._parsed)
        kept = self._leases.drop_pod(uid)
        logins = self._tokens.pop_where(lambda key: isinstance(key, IdentityKey) and key.pod_uid == uid)
        # Every token that may hold the pod's leases: the cached ones, and the ones that
        # issued kept leases (after a re-login, an earlier token still lives until its TTL).
        tokens: dict[str, Issuer] = {}
        for key, login in logins:
            assert isinstance(key, IdentityKey)
            tokens[login.token] = Issuer(endpoint=key.endpoint, login=login)
        for lease in kept:
            if isinstance(lease.issuer, Issuer):
                tokens.setdefault(lease.issuer.login.token, lease.issuer)
        revoked: set[str] = set()
        for lease in kept:
            if not isinstance(lease.issuer, Issuer):
                continue
            # Default policies may refuse this; revoking the token below takes its leases anyway.
            with contextlib.suppress(ProviderError):
                self._vault.revoke_lease(lease.issuer.endpoint, token=lease.issuer.login.token, lease_id=lease.lease_id)
                revoked.add(lease.lease_id)
        tokens_revoked = 0
        for token, issuer in tokens.items():
            try:
                self._vault.revoke_self(issuer.endpoint, token=token)
            except ProviderError as e:
                logger.warning("revocation sweep: revoking a token of deleted pod %s/%s failed: %s", namespace, name, e)
                continue
            tokens_revoked += 1
            revoked.update(
                lease.lease_id
                for lease in kept
                if isinstance(lease.issuer, Issuer) and lease.issuer.login.token == token
            )
        self._metrics.leases.labels("revoked").inc(len(revoked))
        logger.info(
            "pod %s/%s is gone: revoked %d of %d kept lease(s) and %d of %d token(s); forgot %d kept parse(s)",
            namespace,
            name,
            len(revoked),
            len(kept),
            tokens_revoked,
            len(tokens),
            parses,
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
