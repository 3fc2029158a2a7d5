"""The lease cache on its own: real threads, an injected clock, no Vault."""

from __future__ import annotations

import logging
import sys
import threading
import time
import tracemalloc
from typing import Any

import pytest

from provider import gojson, leases
from provider.errors import VaultUnreachable
from provider.leases import (
    IDLE_SECONDS,
    MAX_KEPT_REPLY_BYTES,
    MAX_KEPT_SECONDS,
    PURGE_INTERVAL_SECONDS,
    ROOM_PURGE_INTERVAL_SECONDS,
    WARNING_INTERVAL_SECONDS,
    LeaseCache,
    LeaseKey,
)
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


def key(pod: str, namespace: str = "team") -> LeaseKey:
    return LeaseKey(pod_uid=pod, pod_namespace=namespace, pod_name=pod, target_path="/t", identity="id", request="req")


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


def fetches(cache: LeaseCache, pod: str, reply: Secret, namespace: str = "team") -> int:
    """How many times two fetches of one pod's request issued."""
    issued = []

    def issue() -> Secret:
        issued.append(1)
        return reply

    for _ in range(2):
        cache.fetch(key(pod, namespace), issue=issue, renew=lambda lease, inc: reply, deadline=float("inf"))
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
    cache = LeaseCache(metrics=Metrics(), max_bytes=10_000, namespace_share=1)
    assert [fetches(cache, f"pod-{i}", padded(i, 4000)) for i in range(3)] == [1, 1, 2]
    assert len(cache) == 2


def test_one_namespace_keeps_at_most_its_share_and_the_others_keep_theirs() -> None:
    """A class of a thousand leased objects, or a Vault of a team's own answering leases,
    filled the whole cache: every other namespace's credentials were then issued on each
    Mount. Now each namespace keeps at most its share, by count and by bytes."""
    metrics = Metrics()
    cache = LeaseCache(metrics=metrics, max_entries=8, namespace_share=0.25)
    assert [fetches(cache, f"greedy-{i}", leased(i), "greedy") for i in range(5)] == [1, 1, 2, 2, 2]
    assert [fetches(cache, f"quiet-{i}", leased(i), "quiet") for i in range(2)] == [1, 1]
    assert len(cache) == 4 and metrics.leases.labels("not_kept")._value.get() == 6
    by_bytes = LeaseCache(metrics=Metrics(), max_bytes=400_000, namespace_share=0.25)  # 100,000 bytes each
    assert [fetches(by_bytes, f"greedy-{i}", padded(i, 40_000), "greedy") for i in range(3)] == [1, 1, 2]
    assert fetches(by_bytes, "quiet", padded(9, 40_000), "quiet") == 1


def test_a_namespaces_share_comes_back_as_its_replies_go() -> None:
    """Counted when kept, given back when a pod is dropped, a reply expires or is re-issued:
    after concurrent churn the share holds exactly as many replies as at the start."""
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), max_entries=40, namespace_share=0.1, clock=lambda: clock[0])
    short = Secret(body={"lease_id": "db/creds/short", "lease_duration": gojson.Number("10"), "data": {}})

    def churn(worker: int) -> None:
        for i in range(200):
            pod = f"pod-{worker}-{i % 7}"
            reply = short if i % 3 else leased(i)
            cache.fetch(key(pod), issue=lambda reply=reply: reply, renew=lambda lease, inc: short, deadline=1e9)
            if i % 5 == 0:
                cache.drop_pod(pod)
            if i % 11 == 0:
                clock[0] += 20  # everything kept so far expires: re-issued, or purged to make room

    workers = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    for uid, _, _ in cache.pods():
        cache.drop_pod(uid)
    assert len(cache) == 0
    assert [fetches(cache, f"again-{i}", leased(i)) for i in range(5)] == [1, 1, 1, 1, 2]


def test_a_reply_issued_for_a_pod_dropped_meanwhile_is_not_kept() -> None:
    cache = LeaseCache(metrics=Metrics(), max_entries=4, namespace_share=0.25)

    def issue() -> Secret:
        cache.drop_pod("gone")  # the sweep forgets the pod while its Mount asks Vault
        return leased(1)

    cache.fetch(key("gone"), issue=issue, renew=lambda lease, inc: leased(0), deadline=1e9)
    assert len(cache) == 0
    assert fetches(cache, "next", leased(2)) == 1  # the namespace's one place is free


def test_replies_not_kept_are_warned_about_once_per_namespace_a_while(caplog: pytest.LogCaptureFixture) -> None:
    """A thousand-object class past its share logged a thousand lines per Mount."""
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), max_entries=4, namespace_share=0.25, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="provider.leases"):
        for i in range(50):
            fetches(cache, f"greedy-{i}", leased(i), "greedy")
        fetches(cache, "other", leased(100), "other")
        fetches(cache, "other-2", leased(101), "other")
        clock[0] += WARNING_INTERVAL_SECONDS
        fetches(cache, "greedy-late", leased(200), "greedy")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("namespace greedy holds its share of the lease cache (1 kept replies, ")
    assert "-lease-cache-namespace-share" in lines[0] and "(pod greedy/greedy-1;" in lines[0]
    assert "namespace other holds its share" in lines[1] and "namespace greedy" in lines[2]


def test_no_reply_is_kept_past_the_longest_time_vault_grants() -> None:
    """A lease of 2**63 seconds from a token without a TTL was kept for good."""
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), clock=lambda: clock[0])
    reply = padded(1, 10, duration=str(2**63 - 1))
    assert fetches(cache, "pod", reply) == 1
    clock[0] = MAX_KEPT_SECONDS * 0.9
    assert fetches(cache, "pod", reply) == 1  # past 2/3 of its kept life: issued again once


def test_a_reply_weighs_its_values_not_only_its_text() -> None:
    """30,000 zeros are 60 KiB of JSON and 2 MiB decoded: a namespace's 8 MiB share of
    such replies held 226 MiB. Each value now weighs what it holds."""
    cache = LeaseCache(metrics=Metrics())
    zeros = Secret(
        body={
            "lease_id": "db/creds/app/zeros",
            "lease_duration": gojson.Number("1000000"),
            "data": {"z": [gojson.Number("0")] * 30_000},
        }
    )
    assert gojson.encoded_size(zeros.body, MAX_KEPT_REPLY_BYTES) < MAX_KEPT_REPLY_BYTES
    assert fetches(cache, "zeros", zeros) == 2
    assert fetches(cache, "few", padded(1, 100)) == 1


@pytest.mark.parametrize(
    "text",
    [
        "[" + ",".join(["1.5"] * 900) + "]",
        "[" + ",".join(['{"a":1.5}'] * 900) + "]",
        "[" + ",".join(["12345"] * 900) + "]",
        "{" + ",".join(f'"key{i}":{i}' for i in range(900)) + "}",
        "[" + ",".join(['{"a":[1,{"b":"c"}]}'] * 300) + "]",
        '{"certificate":"' + "A" * 3000 + '","serial_number":"1a:2b","expiration":1700000000}',
    ],
    ids=["floats", "maps-of-a-float", "ints", "map-of-ints", "nested", "certificate"],
)
def test_a_reply_weighs_at_least_what_it_holds_decoded(text: str) -> None:
    """The weight (its JSON, and its values by kind) is never less than what the decoded
    reply holds: weighed at 64 bytes a value, 900 floats held 1.6 times their weight."""
    raw = text.encode()
    tracemalloc.start()
    try:
        decoded = gojson.loads(raw)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    weight = gojson.encoded_size(decoded, 10**9) + leases._values_weight(decoded, 10**9)
    assert held <= weight < 3 * held + 2048


def test_a_tiny_share_still_keeps_a_reply() -> None:
    cache = LeaseCache(metrics=Metrics(), namespace_share=1e-6)
    assert fetches(cache, "one", padded(1, 1000)) == 1


def test_a_refused_reply_walks_the_cache_only_when_a_walk_could_make_room() -> None:
    """A namespace at its share walked every entry, with the cache locked, once a second."""
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), max_entries=400, namespace_share=0.25, clock=lambda: clock[0])
    for i in range(100):
        fetches(cache, f"kept-{i}", leased(i))
    walks = []
    real = cache._purge

    def purge(now: float, **kwargs: Any) -> None:
        if kwargs.get("make_room"):
            walks.append(now)
        real(now, **kwargs)

    cache._purge = purge  # type: ignore[method-assign]
    for i in range(50):
        clock[0] += 2 * ROOM_PURGE_INTERVAL_SECONDS
        assert fetches(cache, f"refused-{i}", leased(1000 + i)) == 2
    assert walks == []
    clock[0] += IDLE_SECONDS  # now the first hundred are idle: one walk makes room
    assert fetches(cache, "late", leased(2000)) == 1 and len(walks) == 1


def test_replies_idle_for_long_make_room_for_a_namespaces_live_pods(caplog: pytest.LogCaptureFixture) -> None:
    """Without the revocation sweep, gone pods' credentials filled a namespace's share
    until they expired, and every live pod's were then issued on each Mount."""
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), max_entries=8, namespace_share=0.25, clock=lambda: clock[0])
    assert [fetches(cache, f"gone-{i}", leased(i), "batch") for i in range(2)] == [1, 1]
    clock[0] += IDLE_SECONDS / 2
    assert fetches(cache, "live", leased(10), "batch") == 2  # the gone ones are not idle long enough yet
    clock[0] += IDLE_SECONDS / 2 + ROOM_PURGE_INTERVAL_SECONDS
    with caplog.at_level(logging.WARNING, logger="provider.leases"):
        assert fetches(cache, "live", leased(11), "batch") == 1
    assert any("dropped 2 kept credentials no Mount asked for" in r.getMessage() for r in caplog.records)
    assert cache.pods() == {("live", "batch", "live")}


def test_each_kind_of_warning_is_said_and_each_is_said_once_a_while(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), max_entries=4, namespace_share=0.25, clock=lambda: clock[0])
    failing = Secret(body={"lease_id": "db/creds/app/f", "lease_duration": gojson.Number("3"), "renewable": True})

    def renew(lease: str, increment: int) -> Secret:
        raise VaultUnreachable("Vault did not answer")

    with caplog.at_level(logging.WARNING, logger="provider.leases"):
        fetches(cache, "big", padded(1, MAX_KEPT_REPLY_BYTES), "ns")
        fetches(cache, "kept", leased(2), "ns")
        fetches(cache, "over", leased(3), "ns")
        for _ in range(10):  # a Vault whose renewals fail: said once, not once per Mount
            clock[0] += 2.5
            cache.fetch(key("renewing", "other"), issue=lambda: failing, renew=renew, deadline=1e9)
    said = [r.getMessage().split(":")[0] for r in caplog.records]
    assert len(said) == 3, said
    assert said[0].startswith("a leased reply weighing more than")
    assert said[1].startswith("namespace ns holds its share")
    assert said[2].startswith("renewing a lease failed (Vault did not answer)")


def test_a_namespace_out_of_its_share_makes_room_only_among_its_own_replies() -> None:
    """It cannot gain from other namespaces' idle replies: dropping them took them out of
    revocation with their pods, for nothing."""
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), max_entries=40, namespace_share=0.25, clock=lambda: clock[0])
    fetches(cache, "quiet", leased(1), "good")  # never remounted (rotation off)
    clock[0] += IDLE_SECONDS + 1
    for i in range(10):
        fetches(cache, f"greedy-{i}", leased(100 + i), "greedy")  # its whole share, in use
    clock[0] += ROOM_PURGE_INTERVAL_SECONDS
    assert fetches(cache, "greedy-extra", leased(999), "greedy") == 2
    assert ("quiet", "good", "quiet") in cache.pods()
    clock[0] += IDLE_SECONDS  # now its own are idle: they make room for its new pod
    assert fetches(cache, "greedy-new", leased(1000), "greedy") == 1


def test_a_reply_busy_during_a_purge_still_counts_when_room_is_needed() -> None:
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), max_entries=4, namespace_share=1.0, clock=lambda: clock[0])
    short = Secret(body={"lease_id": "db/creds/app/s", "lease_duration": gojson.Number("60"), "data": {}})
    fetches(cache, "short", short)
    for i in range(3):
        fetches(cache, f"long-{i}", leased(i))
    slot = cache._slots[key("short")]
    with slot.lock:  # a Mount renewing it: a Vault round trip under the slot's lock
        clock[0] = 45.0
        cache.purge_if_due()
    clock[0] = 61.0  # the short one has expired: a purge makes room for a new reply
    assert fetches(cache, "new", leased(50)) == 1


def test_a_renewal_granting_less_than_was_left_still_lets_its_expiry_make_room() -> None:
    """Near its max TTL Vault grants less than was left: the reply expires sooner than the
    bound said, and a namespace out of its share was refused room until the next purge."""
    clock = [0.0]
    cache = LeaseCache(metrics=Metrics(), max_entries=4, namespace_share=0.5, clock=lambda: clock[0])

    def renewable(n: int, duration: int) -> Secret:
        return Secret(
            body={
                "lease_id": f"db/creds/app/{n}",
                "lease_duration": gojson.Number(str(duration)),
                "renewable": True,
                "data": {},
            }
        )

    for pod in ("p1", "p2"):
        cache.fetch(key(pod), issue=lambda: renewable(1, 1000), renew=lambda lease, inc: renewable(0, 0), deadline=1e9)
    clock[0] = 700.0  # past 2/3: renewed, but granted only 10 s more
    cache.fetch(key("p1"), issue=lambda: renewable(2, 1000), renew=lambda lease, inc: renewable(1, 10), deadline=1e9)
    clock[0] = 720.0  # p1's reply has expired: its place is free
    assert fetches(cache, "p3", leased(3)) == 1
