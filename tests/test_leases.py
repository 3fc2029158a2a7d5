"""The lease cache on its own: real threads, an injected clock, no Vault."""

from __future__ import annotations

import sys
import threading
import time

from provider import gojson
from provider.leases import MAX_KEPT_REPLY_BYTES, MAX_KEPT_SECONDS, PURGE_INTERVAL_SECONDS, LeaseCache, LeaseKey
from provider.metrics import Metrics
from provider.vault import Secret


class JumpingClock:
    """Every reading is a purge interval later: each fetch also purges."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.now += PURGE_INTERVAL_SECONDS + 1
            return self.now


def leased(n: int) -> Secret:
    return Secret(body={"lease_id": f"db/creds/app/{n}", "lease_duration": gojson.Number("1000000"), "data": {}})


def key(pod: str) -> LeaseKey:
    return LeaseKey(pod_uid=pod, pod_namespace="team", pod_name=pod, target_path="/t", identity="id", request="req")


def issues_in_a_race(pod: str, threads: int = 8) -> int:
    """How many times `threads` concurrent fetches of one key issued, each also purging."""
    cache = LeaseCache(metrics=Metrics(), clock=JumpingClock())
    issued: list[int] = []
    start = threading.Barrier(threads)

    def issue() -> Secret:
        issued.append(1)
        time.sleep(0.01)
        return leased(len(issued))

    def fetch() -> None:
        start.wait()
        cache.fetch(key(pod), issue=issue, renew=lambda lease, inc: leased(0), deadline=1e9)

    workers = [threading.Thread(target=fetch) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(5)
    return len(issued)


def test_a_purge_racing_concurrent_fetches_never_issues_twice() -> None:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: widen every race window
    try:
        for round_ in range(100):
            assert issues_in_a_race(f"pod-{round_}") == 1, f"round {round_}: one pod's one request issued twice"
    finally:
        sys.setswitchinterval(interval)


def test_unkept_replies_leave_no_slot_behind() -> None:
    cache = LeaseCache(metrics=Metrics(), max_entries=2)
    kv = Secret(body={"data": {"k": "v"}, "lease_duration": gojson.Number("0")})
    for i in range(100):
        cache.fetch(key(f"kv-{i}"), issue=lambda: kv, renew=lambda lease, inc: kv, deadline=float("inf"))
    assert len(cache) == 0 and cache.pods() == set()


def test_kept_replies_share_long_equal_strings_and_nothing_else() -> None:
    """Every certificate of a PKI role carries the same CA: kept once, not once per pod.
    The replies stay each pod's own: only equal strings are shared, short ones never."""
    cache = LeaseCache(metrics=Metrics())

    def certificate(pod: str) -> Secret:
        ca = "".join(["-----BEGIN CERTIFICATE-----\n", "A" * 1200, "\n-----END CERTIFICATE-----"])  # a new str each
        return Secret(
            body={
                "lease_id": f"pki/issue/web/{pod}",
                "lease_duration": gojson.Number("1000000"),
                "data": {"issuing_ca": ca, "ca_chain": [ca], "private_key": f"key-of-{pod}-" + "k" * 300},
            }
        )

    kept = [
        cache.fetch(key(pod), issue=lambda pod=pod: certificate(pod), renew=lambda lease, inc: leased(0), deadline=1e9)
        for pod in ("a", "b")
    ]
    first, second = (secret.data for secret in kept)
    assert first["issuing_ca"] is second["issuing_ca"] is first["ca_chain"][0] is second["ca_chain"][0]
    assert first["private_key"] != second["private_key"]
    assert kept[0].lease_id != kept[1].lease_id


def padded(n: int, pad: int, duration: str = "1000000") -> Secret:
    return Secret(
        body={"lease_id": f"db/creds/app/{n}", "lease_duration": gojson.Number(duration), "data": {"p": "x" * pad}}
    )


def fetches(cache: LeaseCache, pod: str, reply: Secret) -> int:
    """How many times two fetches of one pod's request issued."""
    issued = []

    def issue() -> Secret:
        issued.append(1)
        return reply

    for _ in range(2):
        cache.fetch(key(pod), issue=issue, renew=lambda lease, inc: reply, deadline=float("inf"))
    return len(issued)


def test_a_leased_reply_too_large_to_keep_is_served_not_kept() -> None:
    """A class may name any address: a Vault padding each lease with megabytes had the cache
    hold 150 MiB for ten objects' worth of one-byte files (40 GiB at its 5,000 entries)."""
    metrics = Metrics()
    cache = LeaseCache(metrics=metrics)
    assert fetches(cache, "small", padded(1, 1000)) == 1
    assert fetches(cache, "large", padded(2, MAX_KEPT_REPLY_BYTES)) == 2
    assert len(cache) == 1 and metrics.leases.labels("not_kept")._value.get() == 2


def test_kept_replies_are_bounded_in_bytes_too() -> None:
    cache = LeaseCache(metrics=Metrics(), max_bytes=10_000)
    assert [fetches(cache, f"pod-{i}", padded(i, 4000)) for i in range(3)] == [1, 1, 2]
    assert len(cache) == 2


def test_no_reply_is_kept_past_the_longest_time_vault_grants() -> None:
    """A lease of 2**63 seconds from a token without a TTL was kept for good."""
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), clock=lambda: clock[0])
    reply = padded(1, 10, duration=str(2**63 - 1))
    assert fetches(cache, "pod", reply) == 1
    clock[0] = MAX_KEPT_SECONDS * 0.9
    assert fetches(cache, "pod", reply) == 1  # past 2/3 of its kept life: issued again once
