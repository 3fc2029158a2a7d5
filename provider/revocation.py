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

One sweep serves every namespace, and a namespace's Vault may hang: namespaces take turns,
one pod each per round; each revocation has REVOKE_SECONDS, each namespace NAMESPACE_SECONDS
of its own turns per sweep, and a Vault endpoint that did not answer one of a namespace's
revocations is not asked again for that namespace in that sweep (for that namespace only: a
revocation one namespace makes slow, a lease whose database hangs behind a shared Vault say,
is not another's Vault going silent). What is left is forgotten unrevoked, as a failed revocation is (the
credentials' TTL ends them), and said in a warning. A failure nobody foresaw is logged for
its pod, and the sweep goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from provider.breaker import EndpointKey
from provider.cache import TokenCache
from provider.dispatch import ParsedMounts
from provider.errors import ProviderError, VaultUnreachable
from provider.kube import KubeClient
from provider.leases import LeaseCache
from provider.metrics import Metrics
from provider.mount import IdentityKey, Issuer
from provider.tenant import TENANT
from provider.vault import Endpoint, NameNotLookedUp, VaultClient

logger = logging.getLogger(__name__)

# One revocation's time, and one namespace's in a sweep: a hung Vault of one namespace
# delays the sweep of the others by at most that (it was 30 s per call, serially: hours
# for a thousand pods' tokens).
REVOKE_SECONDS = 5.0
NAMESPACE_SECONDS = 15.0


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
        gone: dict[str, list[tuple[str, str]]] = {}  # pod uid and name, by namespace
        for uid, namespace, name in sorted(self.known_pods()):
            try:
                current = self._kube.pod_uid(namespace=namespace, name=name)
            except ProviderError as e:
                logger.warning("revocation sweep: cannot check pod %s/%s, keeping its leases: %s", namespace, name, e)
                continue
            if current != uid:
                gone.setdefault(namespace, []).append((uid, name))
        # One pod of each namespace per round: a namespace whose Vault is slow delays another's
        # revocations by one of its own per round, not by its whole time.
        turns = deque((_Budget(), namespace, deque(pods)) for namespace, pods in gone.items())
        while turns:
            budget, namespace, pods = turns.popleft()
            uid, name = pods.popleft()
            tenant = TENANT.set(namespace)  # a breaker its Vault makes is its namespace's
            budget.start()
            try:
                self._revoke(uid, namespace, name, budget)
            except Exception:  # a defect of ours, or a reply nobody foresaw: the others go on
                logger.exception("revocation sweep: revoking for deleted pod %s/%s failed", namespace, name)
            finally:
                budget.stop()
                TENANT.reset(tenant)
            if pods:
                turns.append((budget, namespace, pods))
        return sum(len(pods) for pods in gone.values())

    def _revoke(self, uid: str, namespace: str, name: str, budget: _Budget) -> None:
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
            endpoint = lease.issuer.endpoint
            deadline = budget.deadline(endpoint)
            if deadline is None:
                continue
            # Default policies may refuse this; revoking the token below takes its leases anyway.
            try:
                self._vault.revoke_lease(
                    endpoint, token=lease.issuer.login.token, lease_id=lease.lease_id, deadline=deadline
                )
                revoked.add(lease.lease_id)
            except NameNotLookedUp:  # this namespace's lookups stall: not the endpoint's silence
                pass
            except VaultUnreachable:
                budget.silent.add(endpoint.key)
            except ProviderError:
                pass
        tokens_revoked = 0
        for token, issuer in tokens.items():
            deadline = budget.deadline(issuer.endpoint)
            if deadline is None:
                logger.warning(
                    "revocation sweep: a token of deleted pod %s/%s is left to its TTL: %s",
                    namespace,
                    name,
                    f"Vault at {issuer.endpoint.key.describe()} did not answer in this sweep"
                    if issuer.endpoint.key in budget.silent
                    else f"the sweep's {NAMESPACE_SECONDS:.0f}s for namespace {namespace} ran out",
                )
                continue
            try:
                self._vault.revoke_self(issuer.endpoint, token=token, deadline=deadline)
            except ProviderError as e:
                if isinstance(e, VaultUnreachable) and not isinstance(e, NameNotLookedUp):
                    budget.silent.add(issuer.endpoint.key)
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


class _Budget:
    """A namespace's time in a sweep (NAMESPACE_SECONDS, spent only on its own turns), and
    the endpoints that did not answer its revocations in the sweep: its own, as a shared set
    let one namespace's slow revocation at a shared Vault skip every other namespace's."""

    def __init__(self) -> None:
        self.silent: set[EndpointKey] = set()
        self._left = NAMESPACE_SECONDS
        self._turn_started = 0.0

    def start(self) -> None:
        self._turn_started = time.monotonic()

    def stop(self) -> None:
        self._left -= time.monotonic() - self._turn_started

    def deadline(self, endpoint: Endpoint) -> float | None:
        """The deadline for one revocation at endpoint, in a turn; None when it is not to
        be tried: the endpoint did not answer this namespace in this sweep, or the namespace's
        time ran out."""
        now = time.monotonic()
        deadline = now + min(REVOKE_SECONDS, self._left - (now - self._turn_started))
        if endpoint.key in self.silent or deadline - now < MIN_REVOKE_SECONDS:
            return None
        return deadline


# A revocation with less time than this is not started.
MIN_REVOKE_SECONDS = 0.5
