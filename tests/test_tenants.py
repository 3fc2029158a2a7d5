"""One node, many tenants: a dead, slow or refusing Vault for one class costs that class's
pods, never another's; every answer is final and comes before the caller's deadline.

Real OpenBao, real gRPC over the unix socket; "dead" is a loopback port nothing listens
on, "slow" an HTTP proxy holding each request 5 s, "killed" a TCP forwarder in front of
OpenBao closed and reopened on the same port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from provider import revocation
from provider._proto import service_pb2
from provider.admission import PER_CLASS, Admission
from provider.breaker import EndpointKey, State
from provider.config import VaultSettings
from tests.conftest import ProviderClient, VaultWorld, http_get, start_provider
from tests.fault_proxy import FaultProxy, Rule
from tests.kube_fake import FakePod
from tests.openbao import free_port
from tests.proxy import Forwarder

NOT_FINAL = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
}


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    elapsed: float
    timeout: float
    started: float


@dataclass
class Call:
    request: object
    timeout: float


def burst(client: ProviderClient, calls: list[Call]) -> list[Outcome]:
    """Send every call at once (asynchronously, on one channel, like the driver) and wait for all."""
    outcomes: list[Outcome | None] = [None] * len(calls)
    done = threading.Semaphore(0)

    def record(i: int, started: float, timeout: float, future: grpc.Future) -> None:  # type: ignore[type-arg]
        elapsed = time.monotonic() - started
        error = future.exception()
        code = grpc.StatusCode.OK if error is None else error.code()  # type: ignore[attr-defined]
        details = "" if error is None else error.details()  # type: ignore[attr-defined]
        outcomes[i] = Outcome(code, details, elapsed, timeout, started)
        done.release()

    for i, call in enumerate(calls):
        started = time.monotonic()
        future = client.stub.Mount.future(call.request, timeout=call.timeout)
        future.add_done_callback(lambda f, i=i, s=started, t=call.timeout: record(i, s, t, f))
    give_up = time.monotonic() + max(c.timeout for c in calls) + 10
    for _ in calls:
        assert done.acquire(timeout=max(give_up - time.monotonic(), 0)), "a Mount never answered"
    return [o for o in outcomes if o is not None]


def assert_all_final_and_in_time(outcomes: list[Outcome]) -> None:
    late = [(o.code.name, round(o.elapsed, 2), o.details[:120]) for o in outcomes if o.code in NOT_FINAL]
    assert not late, f"{len(late)} answers were not final: {late[:5]}"
    assert all(o.elapsed < o.timeout for o in outcomes)


@dataclass
class Tenant:
    pods: list[FakePod]
    objects: list[dict[str, str]]
    role: str
    params: dict[str, str]

    def calls(self, client: ProviderClient, timeout: float) -> list[Call]:
        return [Call(client.request(pod, self.objects, role=self.role, **self.params), timeout) for pod in self.pods]


@pytest.fixture
def good(world: VaultWorld, unique: str) -> Tenant:
    """Ten pods of a class whose Vault (the session's OpenBao) is fine."""
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    first = world.grant(unique, [f"kv1/{unique}"])
    pods = [first] + [world.kube.add_pod("team", f"good-{unique}-{i}", "app") for i in range(9)]
    return Tenant(pods, [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}], unique, {})


def noisy(world: VaultWorld, unique: str, count: int, address: str) -> Tenant:
    """`count` pods of another team's class whose Vault is at `address`."""
    pods = [world.kube.add_pod("noisy", f"noisy-{unique}-{i}", "noisy") for i in range(count)]
    objects = [{"objectName": "k", "secretPath": "kv1/noisy", "secretKey": "k"}]
    return Tenant(pods, objects, "noisy", {"vaultAddress": address})


def dead_address() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_sixty_pods_of_a_dead_vault_do_not_hold_up_ten_pods_of_a_live_one(
    provider: ProviderClient, world: VaultWorld, good: Tenant, unique: str
) -> None:
    bad = noisy(world, unique, 60, dead_address())
    calls = bad.calls(provider, 10) + good.calls(provider, 10)
    outcomes = burst(provider, calls)
    assert_all_final_and_in_time(outcomes)
    for o in outcomes[60:]:
        assert o.code == grpc.StatusCode.OK and o.elapsed < 2, (o.code, o.elapsed, o.details)
    assert all(o.code == grpc.StatusCode.UNKNOWN for o in outcomes[:60])


def test_sixty_pods_of_a_slow_vault_do_not_hold_up_ten_pods_of_a_live_one(
    provider: ProviderClient, world: VaultWorld, proxy: FaultProxy, good: Tenant, unique: str
) -> None:
    proxy.add(Rule("*", "/", delay_seconds=5))  # every request through it is held 5 s
    bad = noisy(world, unique, 60, proxy.url)
    outcomes = burst(provider, bad.calls(provider, 8) + good.calls(provider, 8))
    assert_all_final_and_in_time(outcomes)
    for o in outcomes[60:]:
        assert o.code == grpc.StatusCode.OK and o.elapsed < 2, (o.code, o.elapsed, o.details)
    waited = [o for o in outcomes[:60] if "could not start" in o.details]
    assert waited and "this SecretProviderClass already has" in waited[0].details


def test_a_hundred_pods_against_a_dead_vault_fail_fast_once_it_is_known_down(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    bad = noisy(world, unique, 100, dead_address())
    first = burst(provider, bad.calls(provider, 30))
    assert_all_final_and_in_time(first)
    # The breaker opens within a second; the Mounts already retrying then stop too (their
    # next retry checks it), and everyone else is answered as soon as it opens.
    assert max(o.elapsed for o in first) < 2.5, sorted(o.elapsed for o in first)[-5:]
    refused_at_once = [o for o in first if "has been unreachable since" in o.details]
    assert len(refused_at_once) >= len(first) - PER_CLASS
    # Later Mounts of those pods, one after another as kubelet retries them: each is
    # answered within 100 ms.
    times = []
    for call in bad.calls(provider, 30):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            provider.raw_mount(call.request, timeout=30)  # type: ignore[arg-type]
        times.append(time.monotonic() - started)
        assert refused.value.code() == grpc.StatusCode.UNKNOWN
    assert max(times) < 0.1, sorted(times)[-5:]
    metrics = provider.app.metrics.registry
    address = bad.params["vaultAddress"]
    made = provider.app.breakers.peek(EndpointKey.of(address))
    assert made is not None and made.tenant == "noisy"  # its Mounts' pod namespace's share holds it
    assert metrics.get_sample_value(
        "vault_csi_provider_breaker_state", {"address": address, "vault_namespace": ""}
    ) in (
        State.OPEN,
        State.HALF_OPEN,
    )
    refused = metrics.get_sample_value(
        "vault_csi_provider_mounts_refused_total", {"address": address, "reason": "vault_unreachable"}
    )
    assert refused is not None and refused >= 190


def test_breaker_series_are_bounded_however_many_addresses_classes_name(
    tmp_path: Path, world: VaultWorld, unique: str
) -> None:
    # The breaker's series carry a class-chosen address: as many breakers as the registry
    # keeps, and a forgotten breaker's series go with it.
    client = start_provider(tmp_path, world)
    try:
        breakers, registry = client.app.breakers, client.app.metrics.registry
        breakers._max = 3  # the bound is MAX_BREAKERS (1024); three shows it as well
        addresses = [f"http://{unique}-{i}.invalid:8200" for i in range(6)]
        for address in addresses:
            breaker = breakers.get(EndpointKey(address=address))
            while breaker.state is State.CLOSED:
                breaker.record_failure("connection refused")

        def series(metric: str) -> set[str]:
            return {
                sample.labels["address"]
                for family in registry.collect()
                if family.name == metric
                for sample in family.samples
            }

        assert series("vault_csi_provider_breaker_state") == set(addresses[-3:])
        assert len(breakers) == 3
        # A Mount refused (or a breaker changing) just as another thread forgot its breaker
        # does not bring its series back.
        dispatcher = client.app.dispatchers["vault"]
        for address in (addresses[0], addresses[-1]):
            dispatcher._count_refusal(EndpointKey(address=address))
        client.app._breaker_changed(EndpointKey(address=addresses[1]), State.OPEN)
        assert series("vault_csi_provider_mounts_refused") == {addresses[-1]}
        assert series("vault_csi_provider_breaker_state") == set(addresses[-3:])
    finally:
        client.close()


def test_refusals_counted_by_address_outlive_one_vault_namespace_s_breaker(
    tmp_path: Path, world: VaultWorld, unique: str
) -> None:
    # mounts_refused is by address; breakers by address and Vault namespace. Forgetting one
    # namespace's breaker keeps the count while another's for that address is kept.
    client = start_provider(tmp_path, world)
    try:
        breakers, metrics = client.app.breakers, client.app.metrics
        breakers._max = 2
        address = f"http://{unique}.invalid:8200"
        for key in (EndpointKey(address=address, namespace="team-a"), EndpointKey(address=address, namespace="team-b")):
            breaker = breakers.get(key)
            while breaker.state is State.CLOSED:
                breaker.record_failure("connection refused")
        metrics.mounts_refused.labels(address, "vault_unreachable").inc(2)  # as the dispatcher counts refusals

        def refused() -> float | None:
            return metrics.registry.get_sample_value(
                "vault_csi_provider_mounts_refused_total", {"address": address, "reason": "vault_unreachable"}
            )

        for i, kept in ((0, 2.0), (1, None)):  # each new breaker forgets the oldest of these
            other = breakers.get(EndpointKey(address=f"http://{unique}-{i}.invalid:8200"))
            while other.state is State.CLOSED:
                other.record_failure("connection refused")
            assert refused() == kept
    finally:
        client.close()


def _mounted_pods(
    client: ProviderClient, world: VaultWorld, name: str, namespace: str, count: int, **params: str
) -> list[FakePod]:
    """`count` pods of `namespace` that mounted kv1/<name> once each (their Vault tokens
    cached), with the class `params` (a vaultAddress through a proxy, say)."""
    world.bao.api("POST", f"kv1/{name}", {"k": "v"})
    world.grant(name, [f"kv1/{name}"], namespace=namespace, service_account="app")
    pods = [world.kube.add_pod(namespace, f"p-{name}-{i}", "app") for i in range(count)]
    for pod in pods:
        client.mount(pod, [{"objectName": "k", "secretPath": f"kv1/{name}", "secretKey": "k"}], role=name, **params)
    return pods


def _vault_token(client: ProviderClient, pod: FakePod) -> str:
    """The pod's Vault token, as the provider keeps it."""
    token = next(client.app.tokens.peek(key) for key in client.app.tokens.identities() if key.pod_uid == pod.uid)
    assert token
    return token


def sweep_past(client: ProviderClient, world: VaultWorld, noisy: list[FakePod], victim: FakePod, token: str) -> None:
    """Delete the pods and sweep: within one revocation's time (REVOKE_SECONDS, set to 1 s)
    for the noisy pods' Vault and a few seconds more, the victim's token is revoked."""
    for pod in [*noisy, victim]:
        world.kube.delete_pod(pod)
    started = time.monotonic()
    assert client.app.sweeper.sweep() == len(noisy) + 1
    assert time.monotonic() - started < 1.0 + 3
    world.bao.api("GET", "auth/token/lookup-self", token=token, expect=(403,))  # revoked


@contextlib.contextmanager
def sweeping_provider(tmp_path: Path, world: VaultWorld, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProviderClient]:
    """A provider whose sweep gives each revocation 1 s (REVOKE_SECONDS), closed after."""
    monkeypatch.setattr(revocation, "REVOKE_SECONDS", 1.0)
    client = start_provider(tmp_path, world)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def noisy_and_victim(
    tmp_path: Path,
    world: VaultWorld,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    noisy: int,
    victim_params: dict[str, str] | None = None,
    **params: str,
) -> Iterator[tuple[ProviderClient, list[FakePod], FakePod, str]]:
    """A sweeping_provider; `noisy` pods of noisy-team mounted with the class `params` and
    one victim pod of team (with `victim_params`); the victim's token."""
    with sweeping_provider(tmp_path, world, monkeypatch) as client:
        noisy_pods = _mounted_pods(client, world, f"{unique}n", "noisy-team", noisy, **params)
        (victim,) = _mounted_pods(client, world, unique, "team", 1, **(victim_params or {}))
        yield client, noisy_pods, victim, _vault_token(client, victim)


def test_a_hung_vault_of_one_namespace_does_not_hold_up_the_revocation_sweep_of_another(
    tmp_path: Path, world: VaultWorld, proxy: FaultProxy, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sweep revoked one token after another, 30 s each against a Vault that accepts and
    # never answers: hours for a thousand pods, while other namespaces' deleted pods kept
    # live credentials. Now a revocation has REVOKE_SECONDS, a silent endpoint is not asked
    # again in that sweep, and a namespace has NAMESPACE_SECONDS. The noisy team's Vault is
    # the same OpenBao, through a proxy that will hang.
    with noisy_and_victim(tmp_path, world, unique, monkeypatch, 6, vaultAddress=proxy.url) as (
        client,
        noisy,
        victim,
        token,
    ):
        proxy.add(Rule("*", "/", delay_seconds=30))  # the noisy team's Vault accepts and never answers
        try:
            sweep_past(client, world, noisy, victim, token)  # one revocation's time, not 6 x 30 s
        finally:
            proxy.clear()


def test_a_revocation_one_namespace_makes_slow_at_a_shared_vault_does_not_skip_another_s(
    tmp_path: Path, world: VaultWorld, proxy: FaultProxy, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An endpoint that did not answer a revocation was skipped for the rest of the sweep, for
    # every namespace: a lease one team made slow to revoke (its own database hanging behind
    # a shared Vault, here its lease revocations held) left every other team's deleted pods
    # of that Vault their credentials. Silence is now a namespace's own.
    issue = world.pki_engine(f"pki-{unique}", generate_lease=True)
    noisy = world.grant(f"{unique}n", [issue, "sys/leases/revoke"], namespace="noisy-team")
    with sweeping_provider(tmp_path, world, monkeypatch) as client:
        try:
            certificate = [
                {
                    "objectName": "crt",
                    "secretPath": issue,
                    "method": "PUT",
                    "secretArgs": {"common_name": "a.example.com"},
                }
            ]
            client.mount(noisy, certificate, role=f"{unique}n", vaultAddress=proxy.url)
            victims = _mounted_pods(client, world, unique, "team", 2, vaultAddress=proxy.url)  # a turn after noisy's
            tokens = [_vault_token(client, victim) for victim in victims]
            proxy.add(Rule("PUT", "/v1/sys/leases/revoke", delay_seconds=30))  # noisy's lease revocation hangs
            for pod in [noisy, *victims]:
                world.kube.delete_pod(pod)
            started = time.monotonic()
            assert client.app.sweeper.sweep() == 3
            assert time.monotonic() - started < 1.0 + 3
            for token in tokens:
                world.bao.api("GET", "auth/token/lookup-self", token=token, expect=(403,))  # revoked
        finally:
            proxy.clear()


def test_a_failure_nobody_foresaw_in_one_pod_s_revocation_does_not_stop_the_sweep(
    tmp_path: Path, world: VaultWorld, unique: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A ValueError from one namespace's Vault reply once ended the sweep: every namespace
    # after it kept its deleted pods' credentials. Whatever escapes is logged for its pod.
    client = start_provider(tmp_path, world)
    try:
        pods = [_mounted_pods(client, world, f"{unique}{team}", team, 1)[0] for team in ("first-team", "second-team")]
        tokens = {pod.namespace: _vault_token(client, pod) for pod in pods}
        revoke_self = client.app.vault.revoke_self
        calls: list[str] = []

        def first_one_fails(endpoint: Any, *, token: str, deadline: float | None = None) -> None:
            calls.append(token)
            if len(calls) == 1:
                raise ValueError("Invalid IPv6 URL")
            revoke_self(endpoint, token=token, deadline=deadline)

        monkeypatch.setattr(client.app.vault, "revoke_self", first_one_fails)
        for pod in pods:
            world.kube.delete_pod(pod)
        with caplog.at_level(logging.ERROR, logger="provider.revocation"):
            assert client.app.sweeper.sweep() == 2
        failed, revoked = (next(ns for ns, token in tokens.items() if token == calls[i]) for i in (0, 1))
        world.bao.api("GET", "auth/token/lookup-self", token=tokens[revoked], expect=(403,))
        assert f"revoking for deleted pod {failed}/p-{unique}{failed}-0 failed" in caplog.text
    finally:
        client.close()


def test_slow_vaults_of_several_namespaces_delay_another_s_revocation_by_one_turn_each(
    tmp_path: Path, world: VaultWorld, proxy: FaultProxy, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The third review's F3: namespaces were swept one after another, each within its 15 s,
    # so N namespaces whose Vault answers just within a revocation's time delayed another's
    # by N x 15 s. They now take turns, one pod each per round.
    with sweeping_provider(tmp_path, world, monkeypatch) as client:
        noisy: list[FakePod] = []
        for team in range(3):
            noisy += _mounted_pods(client, world, f"{unique}{team}", f"slow-{team}", 3, vaultAddress=proxy.url)
        world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
        world.grant(unique, [f"kv1/{unique}"], namespace="victim-team")
        # Its uid sorts after theirs: a sweep that takes namespaces one after another takes it last.
        victim = world.kube.add_pod("victim-team", f"v-{unique}", "app", uid="ffffffff-ffff-4fff-bfff-ffffffffffff")
        assert all(pod.uid < victim.uid for pod in noisy)
        client.mount(victim, [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}], role=unique)
        victim_token = _vault_token(client, victim)
        proxy.add(Rule("*", "/", delay_seconds=0.7))  # answers, just within a revocation's time
        try:
            for pod in [*noisy, victim]:
                world.kube.delete_pod(pod)
            revoked_after: list[float] = []
            started = time.monotonic()

            def watch() -> None:  # when the victim's token stops working
                while time.monotonic() - started < 20:
                    try:
                        world.bao.api("GET", "auth/token/lookup-self", token=victim_token)
                    except Exception:
                        revoked_after.append(time.monotonic() - started)
                        return
                    time.sleep(0.05)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            assert client.app.sweeper.sweep() == len(noisy) + 1
            watcher.join(25)
            # At most one turn of each slow namespace before the victim's (3 x 0.7 s), not all of
            # their pods (9 x 0.7 s).
            assert revoked_after and revoked_after[0] < 3 * 0.7 + 1.5, revoked_after
        finally:
            proxy.clear()


@pytest.mark.parametrize("fault", ["dead", "slow", "logins-refused"])
def test_ten_times_more_mounts_than_threads_all_get_a_final_answer_in_time(
    tmp_path: Path, world: VaultWorld, proxy: FaultProxy, good: Tenant, unique: str, fault: str
) -> None:
    admission = Admission(total=8, per_endpoint=8, per_class=4)
    client = start_provider(tmp_path, world, admission=admission)
    try:
        if fault == "slow":
            proxy.add(Rule("*", "/", delay_seconds=5))
        elif fault == "logins-refused":
            proxy.add(Rule("POST", "/v1/auth/", status=403, body=b'{"errors":["permission denied"]}'))
        bad = noisy(world, unique, 80, dead_address() if fault == "dead" else proxy.url)
        outcomes = burst(client, bad.calls(client, 6) + good.calls(client, 6))
        assert_all_final_and_in_time(outcomes)
        assert all(o.code == grpc.StatusCode.OK and o.elapsed < 2 for o in outcomes[80:]), [
            (o.code.name, round(o.elapsed, 2), o.details[:100]) for o in outcomes[80:] if o.code != grpc.StatusCode.OK
        ]
        if fault == "logins-refused":
            assert {o.code for o in outcomes[:80]} == {grpc.StatusCode.UNAUTHENTICATED}
        assert admission.waiting == 0
    finally:
        client.close()


def vault_connections(port: int) -> int:
    """Established TCP connections from this process's side to `port` (pooled connections)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Record:
    started: float
    ended: float
    ok: bool
    details: str


@pytest.fixture
def killable(world: VaultWorld) -> Iterator[list[Forwarder]]:
    """A TCP forwarder to OpenBao whose port stays fixed across kills (a list: it is replaced)."""
    holder = [Forwarder(("127.0.0.1", world.bao.port))]
    yield holder
    holder[0].close()


def test_vault_killed_and_restarted_under_load_fails_fast_recovers_and_leaks_nothing(
    tmp_path: Path, world: VaultWorld, good: Tenant, killable: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="provider.breaker")
    port = killable[0].port
    address = f"http://127.0.0.1:{port}"
    client = start_provider(tmp_path, world, vault=VaultSettings(address=address))
    breaker = client.app.breakers.get(EndpointKey.of(address))
    records: list[Record] = []
    stop = threading.Event()

    def load(pod: FakePod) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                client.mount(pod, good.objects, role=good.role, timeout=5)
                ok, details = True, ""
            except grpc.RpcError as e:
                ok, details = False, e.details() or ""
                assert e.code() not in NOT_FINAL, (e.code(), details)
            records.append(Record(started, time.monotonic(), ok, details))
            time.sleep(0.05)

    def logins() -> float:
        return client.app.metrics.registry.get_sample_value("vault_csi_provider_logins_total", {"outcome": "ok"}) or 0

    def wait_for(condition: object, seconds: float) -> float:
        give_up = time.monotonic() + seconds
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < give_up, "timed out"
            time.sleep(0.02)
        return time.monotonic()

    workers = [threading.Thread(target=load, args=(pod,), daemon=True) for pod in good.pods[:6]]
    for worker in workers:
        worker.start()
    counts: list[tuple[int, int]] = []
    try:
        for _cycle in range(3):
            wait_for(lambda: sum(r.ok for r in records) >= 20, 10)
            logged_in = logins()
            killable[0].close()  # Vault is gone
            opened = wait_for(lambda: breaker.state is not State.CLOSED, 10)

            # Mounts in flight ride out their retries (5 s deadline); those after fail at once.
            def failed_after_open(opened: float = opened) -> list[Record]:
                return [r for r in records if r.started > opened + 0.05 and not r.ok]

            wait_for(lambda: len(failed_after_open()) >= 10, 10)
            fast = failed_after_open()
            assert all(r.ended - r.started < 0.1 for r in fast), sorted(r.ended - r.started for r in fast)[-3:]
            assert all("unreachable since" in r.details for r in fast)
            killable[0] = Forwarder(("127.0.0.1", world.bao.port), port=port)  # Vault is back
            back = time.monotonic()
            recovered = wait_for(lambda back=back: any(r.ok and r.started > back for r in records), 15)
            time.sleep(0.5)
            after = [r for r in records if r.started > recovered]
            assert after and all(r.ok for r in after), [r.details for r in after if not r.ok][:3]
            assert logins() == logged_in  # cached tokens were used: no herd of logins
            records.clear()
            # The Mount pool starts threads up to its high-water mark and keeps them (bounded
            # by the admission limit); the test's own servers (forwarder, fakes) come and go
            # with connections. Every other thread must be gone once its work is.
            pool = [t for t in threading.enumerate() if t.name.startswith("mount")]
            assert len(pool) <= client.app.admission.total
            others = [
                t
                for t in threading.enumerate()
                if not t.name.startswith(("mount", "forwarder")) and "process_request" not in t.name
            ]
            # Kept-alive connections to Vault follow the load's high-water mark (bounded by the
            # pool); each costs three descriptors here (ours, and the forwarder's two ends).
            pooled = vault_connections(port)
            assert pooled <= len(workers) + 2
            counts.append((fd_count() - 3 * pooled, len(others)))
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
        client.close()
    # One log line when the endpoint goes down and one when it comes back, per outage.
    breaker_lines = [r.getMessage() for r in caplog.records if r.name == "provider.breaker"]
    assert sum("is unreachable" in line for line in breaker_lines) == 3, breaker_lines
    assert sum("is reachable again" in line for line in breaker_lines) == 3, breaker_lines
    (fds_first, threads_first), (fds_last, threads_last) = counts[0], counts[-1]
    assert fds_last - fds_first <= 4, counts
    assert threads_last - threads_first <= 2, counts


# Found by attacking the above as a hostile tenant: each of these once got through.


def test_an_address_that_names_the_shared_vault_but_connects_elsewhere_is_refused(
    provider: ProviderClient, world: VaultWorld, good: Tenant, unique: str
) -> None:
    shared = world.bao.url.split("://", 1)[1]
    for trick in (f"http://127.0.0.1:{free_port()}?@{shared}", f"http://127.0.0.1:{free_port()}#@{shared}"):
        pod = world.kube.add_pod("evil", f"evil-{unique}-{len(trick)}", "evil")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            provider.mount(pod, [{"objectName": "k", "secretPath": "kv1/x"}], role="x", vaultAddress=trick)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no query (?) or fragment (#)" in error.value.details()
        assert time.monotonic() - started < 1
    outcomes = burst(provider, good.calls(provider, 5))
    assert all(o.code == grpc.StatusCode.OK for o in outcomes)
    assert provider.app.breakers.peek(EndpointKey.of(world.bao.url)) is None  # nothing was counted against it


def test_one_namespace_cannot_fill_a_shared_vaults_share(
    provider: ProviderClient, world: VaultWorld, good: Tenant, unique: str
) -> None:
    hole = socket.socket()  # the shared Vault's address, but a path of it that never answers
    hole.bind(("127.0.0.1", 0))
    hole.listen(1024)
    try:
        address = f"http://127.0.0.1:{hole.getsockname()[1]}"
        calls = [
            Call(
                provider.request(
                    world.kube.add_pod("evil", f"evil-{unique}-{c}-{i}", "evil"),
                    [{"objectName": "k", "secretPath": "kv1/x"}],
                    role=f"r{c}",
                    vaultAddress=address + f"/{c}",
                ),
                6,
            )
            for c in range(6)
            for i in range(8)
        ]
        futures = [provider.stub.Mount.future(c.request, timeout=c.timeout) for c in calls]
        time.sleep(1.0)
        assert provider.app.admission.running <= 16  # the namespace's share, whatever it spreads over
        outcomes = burst(provider, good.calls(provider, 5))
        assert all(o.code == grpc.StatusCode.OK and o.elapsed < 2 for o in outcomes)
        for future in futures:
            with contextlib.suppress(grpc.RpcError):
                future.result()
    finally:
        hole.close()


def test_long_addresses_are_refused_before_anything_is_kept(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod = world.kube.add_pod("evil", f"evil-{unique}", "evil")
    for i in range(20):
        address = f"http://127.0.0.1:1/{i}-" + "a" * 100_000
        with pytest.raises(grpc.RpcError) as error:
            provider.mount(pod, [{"objectName": "k", "secretPath": "kv1/x"}], role="x", vaultAddress=address)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "longer than 512 characters" in error.value.details()
    assert len(provider.app.breakers) == 0
    metrics = http_get(f"http://{provider.app.health_address}/metrics")[1]
    assert len(metrics) < 20_000 and "aaaaaaaaaa" not in metrics


def test_credentials_in_addresses_never_reach_a_message(
    tmp_path: Path, world: VaultWorld, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    vault = VaultSettings(address=world.bao.url, allowed_addresses=("https://gwuser:GWPASSWORD@gw.example/vault",))
    client = start_provider(tmp_path, world, vault=vault)
    pod = world.kube.add_pod("evil", f"evil-{unique}", "evil")
    try:
        details = []
        for address in ("https://bob:hunter2@other.example", "http://admin:TOPSECRETPW@127.0.0.1:99999"):
            with pytest.raises(grpc.RpcError) as error:
                client.mount(pod, [{"objectName": "k", "secretPath": "kv1/x"}], role="x", vaultAddress=address)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details.append(error.value.details())
        text = " ".join(details) + caplog.text
        for secret in ("GWPASSWORD", "gwuser", "hunter2", "TOPSECRETPW"):
            assert secret not in text
        assert "https://gw.example/vault" in details[0]
    finally:
        client.close()


def test_attributes_too_costly_to_decode_are_refused_without_stalling_anyone(
    provider: ProviderClient, world: VaultWorld, good: Tenant
) -> None:
    many_keys = json.dumps({**{f"k{i}": "" for i in range(140_000)}, "roleName": "evil"})  # < 2 MiB
    hostile = service_pb2.MountRequest(attributes=many_keys, target_path="/t", permission="420")
    stop = time.monotonic() + 4
    refusals: list[str] = []

    def attack() -> None:
        for _ in range(200):
            if time.monotonic() > stop:
                return
            try:
                provider.raw_mount(hostile, timeout=10)
            except grpc.RpcError as e:
                refusals.append(e.details() or "")

    threads = [threading.Thread(target=attack) for _ in range(4)]
    for thread in threads:
        thread.start()
    request = good.calls(provider, 5)[0].request
    latencies = []
    while time.monotonic() < stop:
        started = time.monotonic()
        provider.raw_mount(request, timeout=5)  # type: ignore[arg-type]
        latencies.append(time.monotonic() - started)
    for thread in threads:
        thread.join(15)
    assert refusals and all("a SecretProviderClass has at most 256" in r for r in refusals)
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.1, latencies[-5:]


def test_one_namespaces_heavy_templates_do_not_hold_up_another_namespaces_mounts(
    provider: ProviderClient, world: VaultWorld, good: Tenant, unique: str
) -> None:
    """Sixty pods, each of its own class (nothing remembered between them), whose templates
    spin just under their step limit. Past a few thousand steps renders take turns per
    namespace, so the noisy namespace burns one thread (and GIL share), not sixteen.
    Measured here: the good pods' remounts took 0.53-0.67 s with turns, 5.9-6.7 s without,
    0.06-0.08 s alone."""
    world.bao.api("POST", f"secret/data/{unique}-noisy", {"data": {"k": "v"}})
    noisy_pod = world.grant(f"{unique}-noisy", [f"secret/data/{unique}-noisy"], namespace="noisy", service_account="n")
    calls = []
    for i in range(60):
        template = f"{{{{/* class {i} */}}}}{{{{ range $i := 14000 }}}}{{{{ $i }}}}{{{{ $i }}}}{{{{ end }}}}"
        objects = [{"objectName": "t", "secretPath": f"secret/data/{unique}-noisy", "template": template}]
        calls.append(Call(provider.request(noisy_pod, objects, role=f"{unique}-noisy"), 10))
    light = [*good.objects, {"objectName": "t", "template": "{{ .Objects.k.Secrets.k | upper }}"}]
    good_calls = [Call(provider.request(pod, light, role=good.role), 10) for pod in good.pods]
    alone = burst(provider, good_calls)  # parsed, logged in: what a remount costs
    assert all(o.code == grpc.StatusCode.OK for o in alone)
    outcomes = burst(provider, calls + good_calls)
    assert_all_final_and_in_time(outcomes)
    limit = max(1.5, 10 * max(o.elapsed for o in alone))
    for o in outcomes[60:]:
        assert o.code == grpc.StatusCode.OK and o.elapsed < limit, (o.code, o.elapsed, limit, o.details)
    assert {o.code for o in outcomes[:60]} <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
