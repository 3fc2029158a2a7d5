"""Prometheus metrics, in the provider's own registry.

Labels are low-cardinality by construction: outcomes, gRPC codes, operations and HTTP
status classes. Never a pod, a path or a value. One exception is bounded instead: the
breaker's series (breaker_state, and mounts_refused for an open breaker) carry the
failing endpoint's address and Vault namespace, which a class chooses. They exist only
for an endpoint that has failed, are removed with its breaker, and number at most
breaker.MAX_BREAKERS, however many addresses the node's classes name.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from provider import __version__, lookup

# Mount latency buckets: a warm Mount is milliseconds, a cold one with a login tens of
# milliseconds, and a Vault in trouble is seconds up to the driver's deadline.
_MOUNT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_VAULT_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric the provider exports; one instance per process (or per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.mounts = Counter(
            "vault_csi_provider_mounts",
            "Mount requests answered, by outcome, gRPC code and provider contract (vault or openbao socket).",
            ["outcome", "code", "provider"],
            registry=r,
        )
        self.mount_duration = Histogram(
            "vault_csi_provider_mount_duration_seconds",
            "Time to answer a Mount, by provider contract (vault or openbao socket).",
            ["provider"],
            buckets=_MOUNT_BUCKETS,
            registry=r,
        )
        self.mounts_in_flight = Gauge(
            "vault_csi_provider_mounts_in_flight", "Mount requests being answered now.", registry=r
        )
        # Counted by the servicers, all on the one event loop: a plain int, no lock per Mount.
        self.in_flight = 0
        self.mounts_in_flight.set_function(lambda: self.in_flight)
        self.vault_requests = Counter(
            "vault_csi_provider_vault_requests",
            "Requests sent to Vault, by operation and HTTP status.",
            ["operation", "status"],
            registry=r,
        )
        self.vault_duration = Histogram(
            "vault_csi_provider_vault_request_duration_seconds",
            "Time Vault took to answer, by operation.",
            ["operation"],
            buckets=_VAULT_BUCKETS,
            registry=r,
        )
        self.logins = Counter("vault_csi_provider_logins", "Vault logins, by outcome.", ["outcome"], registry=r)
        self.token_cache = Counter(
            "vault_csi_provider_token_cache", "Token cache lookups and evictions.", ["result"], registry=r
        )
        self.leases = Counter(
            "vault_csi_provider_leases",
            "Dynamic-secret lease events: reused, renewed, reissued, found_revoked, revoked, not_kept.",
            ["event"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "vault_csi_provider_breaker_state",
            "Circuit breaker per Vault endpoint: 0 closed, 1 half-open (probing), 2 open (failing fast).",
            ["address", "vault_namespace"],  # not "namespace": Prometheus Operator adds that (the pod's)
            registry=r,
        )
        self.mounts_refused = Counter(
            "vault_csi_provider_mounts_refused",
            "Mounts answered without a Vault call: vault_unreachable (breaker open) or busy (bulkhead full).",
            ["address", "reason"],
            registry=r,
        )
        self.mount_threads = Gauge(
            "vault_csi_provider_mount_threads_busy",
            "Bulkhead slots in use now: Mounts on a thread, or waiting on the event loop for Vault's replies.",
            registry=r,
        )
        self.mounts_waiting = Gauge(
            "vault_csi_provider_mounts_waiting",
            "Mounts waiting for a thread their class and endpoint may use.",
            registry=r,
        )
        self.name_lookups = Gauge(
            "vault_csi_provider_name_lookups_in_flight",
            "Name lookups of Vault addresses still running, each on a thread of its own: above 0 for long "
            "while the node's DNS servers do not answer.",
            registry=r,
        )
        self.name_lookups.set_function(lookup.in_flight)
        self.build = Info("vault_csi_provider_build", "Build information.", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version()})
