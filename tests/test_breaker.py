"""The circuit breaker on its own: an injected clock and random source, no sockets."""

from __future__ import annotations

import random
import time

import pytest

from provider.breaker import (
    FAILURES_TO_OPEN,
    JITTER,
    OPEN_BASE_SECONDS,
    OPEN_MAX_SECONDS,
    Breaker,
    Breakers,
    EndpointKey,
    State,
    Verdict,
)
from provider.config import TLSConfig
from provider.errors import VaultCircuitOpen, VaultUnreachable
from provider.tenant import TENANT
from provider.vault import Endpoint, VaultClient
from tests.openbao import free_port

KEY = EndpointKey(address="https://vault.example:8200", namespace="team")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, changes: list[State] | None = None, seed: int = 1) -> Breaker:
    return Breaker(
        KEY,
        clock=clock,
        wall_clock=lambda: 1_700_000_000.0,
        rng=random.Random(seed),
        on_change=(lambda key, state: changes.append(state)) if changes is not None else None,
    )


def fail(b: Breaker, times: int) -> None:
    for _ in range(times):
        b.record_failure("cannot reach Vault at https://vault.example:8200: Connection refused")


def test_stays_closed_below_the_threshold_and_a_success_resets_the_count() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, FAILURES_TO_OPEN - 1)
    b.record_success()
    fail(b, FAILURES_TO_OPEN - 1)
    assert b.state is State.CLOSED
    assert b.check() is Verdict.ALLOW


def test_opens_after_consecutive_failures_and_refuses_saying_since_when_and_why() -> None:
    clock = Clock()
    changes: list[State] = []
    b = breaker(clock, changes)
    fail(b, FAILURES_TO_OPEN)
    assert b.state is State.OPEN and changes == [State.OPEN]
    clock.now += 0.1
    with pytest.raises(VaultCircuitOpen) as refused:
        b.check()
    message = str(refused.value)
    assert (
        "Vault at https://vault.example:8200 (namespace team) has been unreachable since 2023-11-14T22:13:20Z"
        in message
    )
    assert "Connection refused" in message and "next probe in" in message


def test_one_probe_after_a_jittered_pause_then_closed_on_success() -> None:
    clock = Clock()
    changes: list[State] = []
    b = breaker(clock, changes)
    fail(b, FAILURES_TO_OPEN)
    clock.now += OPEN_BASE_SECONDS * JITTER[0] - 0.01
    with pytest.raises(VaultCircuitOpen):
        b.check()
    clock.now += OPEN_BASE_SECONDS * (JITTER[1] - JITTER[0]) + 0.02
    assert b.check() is Verdict.PROBE
    with pytest.raises(VaultCircuitOpen, match="a probe is under way"):
        b.check()  # only one probe at a time
    b.record_success()
    assert b.check() is Verdict.ALLOW
    assert changes == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_a_failed_probe_doubles_the_pause_up_to_the_ceiling() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, FAILURES_TO_OPEN)
    pauses = []
    for _ in range(8):
        opened = clock.now
        while True:
            clock.now += 0.05
            try:
                assert b.check() is Verdict.PROBE
                break
            except VaultCircuitOpen:
                pass
        pauses.append(clock.now - opened)
        fail(b, 1)  # the probe failed
    for n, pause in enumerate(pauses):
        nominal = min(OPEN_MAX_SECONDS, OPEN_BASE_SECONDS * 2**n)
        assert nominal * JITTER[0] - 0.1 <= pause <= nominal * JITTER[1] + 0.1


def test_pauses_differ_between_nodes() -> None:
    pauses = set()
    for seed in range(20):
        clock = Clock()
        b = breaker(clock, seed=seed)
        fail(b, FAILURES_TO_OPEN)
        while True:
            clock.now += 0.01
            try:
                b.check()
                break
            except VaultCircuitOpen:
                pass
        pauses.add(round(clock.now - 1000.0, 2))
    assert len(pauses) >= 15  # not in step


def test_an_in_flight_success_closes_an_open_breaker() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, FAILURES_TO_OPEN)
    b.record_success()  # a Mount that was riding out the blip got through
    assert b.state is State.CLOSED and b.refusal() is None


def test_a_probe_that_never_reports_back_lets_another_try() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, FAILURES_TO_OPEN)
    clock.now += OPEN_MAX_SECONDS
    assert b.check() is Verdict.PROBE
    clock.now += 10
    assert b.check() is Verdict.PROBE


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("https://user:secret@vault.example:8200", "https://vault.example:8200"),
        ("https://a@b@Vault.Example/vault/", "https://vault.example:443/vault"),
        ("http://vault:8200/", "http://vault:8200"),
        ("unix:///run/vault.sock", "unix:///run/vault.sock"),
    ],
    ids=["userinfo", "at-in-userinfo", "trailing-slash", "unix"],
)
def test_endpoint_keys_never_hold_credentials(address: str, expected: str) -> None:
    assert EndpointKey.of(address).address == expected


def test_the_registry_is_bounded_and_forgets_closed_breakers_first() -> None:
    forgotten: list[EndpointKey] = []
    breakers = Breakers(max_breakers=3, on_forget=forgotten.append)
    down = breakers.get(EndpointKey(address="http://down"))
    fail(down, FAILURES_TO_OPEN)
    for i in range(5):
        breakers.get(EndpointKey(address=f"http://up{i}"))
    assert len(breakers) == 3
    assert breakers.get(EndpointKey(address="http://down")) is down  # the open one was kept
    assert EndpointKey(address="http://down") not in forgotten and len(forgotten) >= 2


def test_a_registry_full_of_open_breakers_still_keeps_a_new_one() -> None:
    # A class naming many dead addresses fills the registry with open breakers; another
    # Vault that fails next still gets a breaker that counts its failures and opens.
    forgotten: list[EndpointKey] = []
    changes: list[tuple[EndpointKey, State]] = []
    breakers = Breakers(max_breakers=3, on_forget=forgotten.append, on_change=lambda k, s: changes.append((k, s)))
    dead = [breakers.get(EndpointKey(address=f"http://dead{i}")) for i in range(3)]
    for breaker in dead:
        fail(breaker, FAILURES_TO_OPEN)
    new_key = EndpointKey(address="http://new")
    for _ in range(FAILURES_TO_OPEN):
        breakers.get(new_key).record_failure("connection refused")  # as vault.py does: a get per failure
    new = breakers.get(new_key)
    assert new.state is State.OPEN
    assert forgotten == [dead[0].key]  # the least recently used, open as it was
    # The forgotten one, still held by a Mount, changes state: nobody is told (its metric
    # series went with it).
    told = len(changes)
    fail(dead[0], FAILURES_TO_OPEN)
    dead[0].record_success()
    assert len(changes) == told


def _as(namespace: str, breakers: Breakers, key: EndpointKey) -> Breaker:
    """The breaker a Mount of pod namespace `namespace` gets (the dispatcher sets TENANT)."""
    token = TENANT.set(namespace)
    try:
        return breakers.get(key)
    finally:
        TENANT.reset(token)


def test_one_namespace_fills_its_own_share_of_the_registry_not_the_node_s() -> None:
    # The review's ping-pong: with the registry full, an attacker's new breaker between
    # each of the victim's failures evicted the victim's (its only closed one), so the
    # victim's dead Vault never got an open breaker.
    breakers = Breakers(max_breakers=8, max_per_namespace=3)
    attacker = [_as("attacker", breakers, EndpointKey(address=f"http://dead{i}")) for i in range(20)]
    for breaker in attacker:
        fail(breaker, FAILURES_TO_OPEN)
    assert len(breakers) == 3  # its share, whatever it names
    victim_key = EndpointKey(address="http://victim")
    for i in range(FAILURES_TO_OPEN):
        _as("victim", breakers, victim_key).record_failure("connection refused")
        fail(_as("attacker", breakers, EndpointKey(address=f"http://more{i}")), FAILURES_TO_OPEN)
    victim = breakers.peek(victim_key)
    assert victim is not None and victim.state is State.OPEN


def test_many_namespaces_flooding_the_registry_pay_for_it_not_a_namespace_counting_failures() -> None:
    # The second review's R1: namespaces each within their share fill the registry; more,
    # each failing once on a new endpoint, forgot the victim's breaker while it counted
    # its failures (a closed one, forgotten first). The namespaces holding the most pay.
    breakers = Breakers(max_breakers=16, max_per_namespace=4)
    for team in range(5):
        for i in range(4):
            fail(_as(f"flood-{team}", breakers, EndpointKey(address=f"http://dead-{team}-{i}")), FAILURES_TO_OPEN)
    assert len(breakers) == 16
    victim_key = EndpointKey(address="http://victim")
    for i in range(FAILURES_TO_OPEN):
        _as("victim", breakers, victim_key).record_failure("connection refused")
        _as(f"more-{i}", breakers, EndpointKey(address=f"http://new-{i}")).record_failure("connection refused")
    victim = breakers.peek(victim_key)
    assert victim is not None and victim.state is State.OPEN
    assert len(breakers) == 16


def test_a_shared_vault_s_breaker_is_not_forgotten_for_the_namespace_charged_with_it() -> None:
    # The second review's R2: the attacker fails first on a Vault another team uses too, so
    # its breaker is charged to the attacker; churning its own share then forgot it before
    # the victim's failures opened it. Once another namespace uses it, its share keeps it.
    breakers = Breakers(max_breakers=1024, max_per_namespace=4)
    for i in range(3):
        fail(_as("attacker", breakers, EndpointKey(address=f"http://own-{i}")), FAILURES_TO_OPEN)
    shared_key = EndpointKey(address="http://shared-vault")
    for i in range(FAILURES_TO_OPEN):
        _as("attacker", breakers, shared_key).record_failure("connection refused")  # first, so charged to it
        _as("victim", breakers, shared_key).record_failure("connection refused")
        for own in [k for k in list(breakers._breakers) if k != shared_key]:
            breakers.peek(own, tenant="attacker")  # its own used since: the shared one is its least recent
        fail(_as("attacker", breakers, EndpointKey(address=f"http://churn-{i}")), FAILURES_TO_OPEN)
    shared = breakers.peek(shared_key)
    assert shared is not None and shared.tenant == "attacker" and shared.state is State.OPEN


def test_an_open_breaker_refusing_mounts_is_not_forgotten_for_newer_ones() -> None:
    # Many namespaces, each within its share, fill the registry: a breaker whose Mounts are
    # being refused (looked at) stays; an unused one goes first.
    breakers = Breakers(max_breakers=4, max_per_namespace=2)
    victim_key = EndpointKey(address="http://victim")
    fail(_as("victim", breakers, victim_key), FAILURES_TO_OPEN)
    for i in range(12):
        fail(_as(f"team-{i}", breakers, EndpointKey(address=f"http://dead{i}")), FAILURES_TO_OPEN)
        refusing = breakers.peek(victim_key)  # the victim's next Mount, refused at admission
        assert refusing is not None and refusing.state is State.OPEN
    assert len(breakers) == 4


@pytest.mark.parametrize(
    "address",
    [
        "http://127.0.0.1:1?@vault.example:8200",
        "http://127.0.0.1:1#@vault.example:8200",
        "http://vault:99999",
        "vault:8200",
    ],
    ids=["query-hiding-a-host", "fragment-hiding-a-host", "port-out-of-range", "no-scheme"],
)
def test_addresses_that_could_mean_two_places_have_no_key(address: str) -> None:
    with pytest.raises(ValueError):
        EndpointKey.of(address)


def test_a_probe_with_too_little_time_left_is_given_to_the_next_mount() -> None:
    # A Mount that waited for a bulkhead may be elected the probe with a fraction of a
    # second left: a probe that short says nothing of Vault, and its failure would keep
    # the breaker every class of that Vault shares open. It is given back, untried.
    clock = Clock()
    breakers = Breakers(clock=clock)
    client = VaultClient(breakers=breakers)
    endpoint = Endpoint(address=f"http://127.0.0.1:{free_port()}", tls=TLSConfig())
    down = breakers.get(EndpointKey.of(endpoint.address))
    fail(down, FAILURES_TO_OPEN)
    clock.now += OPEN_MAX_SECONDS * JITTER[1]
    try:
        assert down.check() is Verdict.PROBE
        with pytest.raises(VaultUnreachable, match="no time left to probe"):
            client.probe(endpoint, deadline=time.monotonic() + 0.3)
        assert down.state is State.OPEN
        assert down.check() is Verdict.PROBE  # the next Mount probes, at once
        with pytest.raises(VaultUnreachable, match="cannot reach Vault"):  # with time: tried, and counted
            client.probe(endpoint, deadline=time.monotonic() + 5)
        assert down.state is State.OPEN
        with pytest.raises(VaultCircuitOpen):  # the failed probe paused it again
            down.check()
    finally:
        client.close()
