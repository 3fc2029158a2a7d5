"""Name lookups held to the Mount's deadline (provider.lookup).

For a few names the node's resolver is one whose DNS servers do not answer: it holds the
lookup until the test lets it go, as glibc holds it 5 s per try and server. Every other
name resolves as the system resolves it; OpenBao, gRPC and the provider are real.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from provider import lookup
from provider.address import Target
from provider.breaker import FAILURES_TO_OPEN, JITTER, OPEN_BASE_SECONDS, Breakers, EndpointKey, State, Verdict
from provider.config import TLSConfig
from provider.transport import NotConnected, NotLookedUp, Transport
from provider.vault import Endpoint, NameNotLookedUp, VaultClient
from tests.conftest import ProviderClient, VaultWorld, as_namespace, http_get
from tests.openbao import free_port
from tests.test_tenants import (
    Call,
    assert_all_final_and_in_time,
    burst,
    noisy_and_victim,
    sweep_past,
)


class StalledDNS:
    """socket.getaddrinfo, except for `names`: those wait until `released` (then resolve to
    127.0.0.1), or fail as a lookup nobody answered does after 30 s."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.answered: set[str] = set()  # names it resolves to 127.0.0.1 at once
        self.released = threading.Event()
        self.asked: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._system = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in self.answered:
            return self._system("127.0.0.1", port, *args, **kwargs)
        if host not in self.names:
            return self._system(host, port, *args, **kwargs)
        with self._lock:
            self.asked[host] += 1
        if not self.released.wait(30):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return self._system("127.0.0.1", port, *args, **kwargs)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[StalledDNS]:
    stalled = StalledDNS()
    monkeypatch.setattr(socket, "getaddrinfo", stalled)
    try:
        yield stalled
    finally:
        stalled.released.set()
        give_up = time.monotonic() + 5
        while lookup.in_flight() and time.monotonic() < give_up:  # the lookup threads end
            time.sleep(0.01)


def _refused(future: Any) -> bool:
    error = future.exception()
    return error is not None and "name lookups for pods of this namespace" in error.details()


def _kv_pod(world: VaultWorld, name: str, namespace: str) -> tuple[Any, list[dict[str, str]]]:
    world.bao.api("POST", f"kv1/{name}", {"k": "v"})
    pod = world.grant(name, [f"kv1/{name}"], namespace=namespace)
    return pod, [{"objectName": "k", "secretPath": f"kv1/{name}", "secretKey": "k"}]


def _wait_for(condition: Any, seconds: float) -> bool:
    give_up = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def test_a_vault_name_whose_dns_does_not_answer_fails_the_mount_by_its_deadline_and_frees_its_thread(
    provider: ProviderClient, world: VaultWorld, dns: StalledDNS, unique: str
) -> None:
    name = f"vault-{unique}.stalled.test"
    dns.names.add(name)
    pod, objects = _kv_pod(world, f"dns-{unique}", "dns-team")
    good, good_objects = _kv_pod(world, f"calm-{unique}", "calm-team")
    address = f"http://{name}:{world.bao.port}"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        provider.mount(pod, objects, role=f"dns-{unique}", vaultAddress=address, timeout=3)
    elapsed = time.monotonic() - started
    assert error.value.code() == grpc.StatusCode.UNKNOWN  # final: kubelet retries later
    assert f"the name {name} was not resolved within" in error.value.details()
    assert "the node's DNS servers did not answer" in error.value.details()
    assert elapsed < 3
    # The Mount's thread came back by the deadline; the lookup still waits on its own.
    assert _wait_for(lambda: provider.app.admission.running == 0, 1.0)
    assert lookup.in_flight() == 1
    assert (
        "vault_csi_provider_name_lookups_in_flight 1.0" in http_get(f"http://{provider.app.health_address}/metrics")[1]
    )
    assert provider.mount(good, good_objects, role=f"calm-{unique}", timeout=5).files
    # Once the DNS answers, the same class mounts.
    dns.released.set()
    assert _wait_for(lambda: lookup.in_flight() == 0, 5.0)
    assert provider.mount(pod, objects, role=f"dns-{unique}", vaultAddress=address, timeout=10).files


def test_one_lookup_of_a_name_however_many_mounts_wait_for_it(
    provider: ProviderClient, world: VaultWorld, dns: StalledDNS, unique: str
) -> None:
    name = f"shared-{unique}.stalled.test"
    dns.names.add(name)
    pods = [world.kube.add_pod("wait-team", f"wait-{unique}-{i}", "app") for i in range(6)]
    objects = [{"objectName": "k", "secretPath": "kv1/x", "secretKey": "k"}]
    calls = [
        Call(provider.request(pod, objects, role="r", vaultAddress=f"http://{name}:{world.bao.port}"), 3)
        for pod in pods
    ]
    outcomes = burst(provider, calls)
    assert_all_final_and_in_time(outcomes)
    assert all(f"the name {name} was not resolved" in o.details for o in outcomes), outcomes[0].details
    assert dns.asked[name] == 1


def test_a_namespace_naming_stalled_name_after_stalled_name_holds_its_own_lookups_not_the_node_s(
    provider: ProviderClient, world: VaultWorld, dns: StalledDNS, unique: str
) -> None:
    names = [f"n{i}-{unique}.stalled.test" for i in range(2 * lookup.LOOKUPS_PER_NAMESPACE)]
    dns.names.update(names)
    objects = [{"objectName": "k", "secretPath": "kv1/x", "secretKey": "k"}]
    calls = [
        Call(
            provider.request(
                world.kube.add_pod("evil", f"evil-{unique}-{i}", "evil"),
                objects,
                role=f"r{i}",
                vaultAddress=f"http://{name}:{world.bao.port}",
            ),
            3,
        )
        for i, name in enumerate(names)
    ]
    started = time.monotonic()
    futures = [provider.stub.Mount.future(call.request, timeout=call.timeout) for call in calls]
    refused_after: list[float] = []
    for future in futures:
        future.add_done_callback(lambda f: refused_after.append(time.monotonic() - started) if _refused(f) else None)
    assert _wait_for(lambda: lookup.in_flight() == lookup.LOOKUPS_PER_NAMESPACE, 2.0)
    # Another namespace still looks names up (localhost, through a lookup thread like any name).
    pod, good_objects = _kv_pod(world, f"other-{unique}", "other-team")
    address = f"http://localhost:{world.bao.port}"
    assert provider.mount(pod, good_objects, role=f"other-{unique}", vaultAddress=address, timeout=5).files
    details = []
    for future in futures:
        with pytest.raises(grpc.RpcError) as error:
            future.result()
        assert error.value.code() == grpc.StatusCode.UNKNOWN
        details.append(error.value.details())
    assert sum(dns.asked.values()) == lookup.LOOKUPS_PER_NAMESPACE  # no more lookups were started
    refused = [d for d in details if "name lookups for pods of this namespace are still waiting for DNS" in d]
    assert len(refused) == len(names) - lookup.LOOKUPS_PER_NAMESPACE, details
    assert all(elapsed < 1.0 for elapsed in refused_after), refused_after  # at once, not retried to the deadline
    # A refused lookup is the namespace's limit, not its endpoint's failure: no breaker counts it.
    refused_names = [name for name in names if dns.asked[name] == 0]
    for name in refused_names:
        assert provider.app.breakers.peek(EndpointKey.of(f"http://{name}:{world.bao.port}")) is None


def test_a_name_whose_dns_stops_answering_does_not_hold_up_the_revocation_sweep_of_another_namespace(
    tmp_path: Path, world: VaultWorld, dns: StalledDNS, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lookup the sweep made waited for the DNS as long as glibc does (30 s here), past the
    # namespace's budget, while other namespaces' deleted pods kept live credentials.
    name = f"vault-{unique}.flaky.test"
    dns.names.add(name)
    dns.released.set()  # it answers while the pods mount
    address = f"http://{name}:{world.bao.port}"
    with noisy_and_victim(tmp_path, world, unique, monkeypatch, 3, vaultAddress=address) as (
        client,
        noisy,
        victim,
        token,
    ):
        dns.released.clear()  # then it stops answering
        try:
            client.app.vault._transport.pools.close()  # no kept-alive connection: a revocation looks the name up
            sweep_past(client, world, noisy, victim, token)  # one revocation's time, not 30 s
        finally:
            dns.released.set()


def test_a_namespace_whose_lookups_stall_gives_back_the_probe_of_a_shared_vault_s_breaker(
    world: VaultWorld, dns: StalledDNS, unique: str
) -> None:
    # The one probe of a breaker every class of a shared Vault uses goes to the next Mount
    # to it, whatever its namespace. One whose own lookups were all stalled had its lookup
    # of the shared Vault's name refused, and the probe counted that as Vault's failure: the
    # breaker opened again for everyone, Vault never asked.
    shared = f"vault-{unique}.shared.test"
    dns.answered.add(shared)
    evil_names = [f"v{i}-{unique}.evil.test" for i in range(lookup.LOOKUPS_PER_NAMESPACE)]
    dns.names.update(evil_names)
    now = [1000.0]
    breakers = Breakers(clock=lambda: now[0])
    vault = VaultClient(breakers=breakers)
    endpoint = Endpoint(address=f"http://{shared}:{world.bao.port}", tls=TLSConfig())
    try:
        with as_namespace("team"):  # an outage opened it
            breaker = breakers.get(endpoint.key)
            for _ in range(FAILURES_TO_OPEN):
                breaker.record_failure("cannot reach Vault: connection refused")
        with as_namespace("evil"):
            for name in evil_names:
                with pytest.raises(lookup.LookupTimedOut):
                    lookup.addresses(name, 8200, 0.05)
            now[0] += 120  # Vault is back; evil's Mount comes first
            assert breaker.check() is Verdict.PROBE
            with pytest.raises(NameNotLookedUp) as error:
                vault.probe(endpoint, deadline=time.monotonic() + 10)
            assert "name lookups for pods of this namespace" in str(error.value)
        # Given back, not failed: due again at once, its last error still the outage's.
        refusal = breaker.refusal()
        assert refusal is not None and "name lookups" not in str(refusal)
        with as_namespace("team"):  # the next Mount probes, and Vault answers
            assert breaker.check() is Verdict.PROBE
            vault.probe(endpoint, deadline=time.monotonic() + 10)
        assert breaker.state is State.CLOSED
    finally:
        vault.close()


def test_a_lookup_no_thread_can_be_started_for_is_refused_not_an_internal_error(
    dns: StalledDNS, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    transport = Transport(max_body_bytes=1024)
    with pytest.raises(NotConnected):  # its watchdog's thread started: only the lookup's is refused
        transport.send(
            Target.parse(f"http://127.0.0.1:{free_port()}"), TLSConfig(), "GET", "/", None, {}, 2.0, replayable=True
        )
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    try:
        with pytest.raises(NotLookedUp) as error:
            transport.send(
                Target.parse(f"http://vault-{unique}.test:8200"),
                TLSConfig(),
                "GET",
                "/",
                None,
                {},
                2.0,
                replayable=True,
            )
        assert "no thread could be started to look up" in str(error.value)
    finally:
        monkeypatch.undo()
        transport.close()
    assert lookup.in_flight() == 0


def test_the_node_has_at_most_lookups_on_node_in_flight(
    dns: StalledDNS, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lookup, "LOOKUPS_ON_NODE", 3)
    names = [f"n{i}-{unique}.stalled.test" for i in range(4)]
    dns.names.update(names)
    for i, name in enumerate(names[:3]):
        with as_namespace(f"team-{i}"), pytest.raises(lookup.LookupTimedOut):
            lookup.addresses(name, 8200, 0.05)
    with as_namespace("team-3"), pytest.raises(lookup.LookupRefused) as error:
        lookup.addresses(names[3], 8200, 0.05)
    assert "3 name lookups are still waiting for DNS on this node" in str(error.value)
    assert lookup.in_flight() == 3 and dns.asked[names[3]] == 0


def test_a_namespace_whose_lookups_stall_does_not_silence_a_shared_vault_for_the_sweep(
    tmp_path: Path, world: VaultWorld, dns: StalledDNS, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sweep skips, for the rest of a sweep, an endpoint that did not answer. A lookup
    # refused for the namespace's own stalled lookups is not the endpoint's silence: taken
    # for it, it left every other namespace's deleted pods of that Vault their credentials.
    shared = f"vault-{unique}.shared.test"
    dns.answered.add(shared)
    address = {"vaultAddress": f"http://{shared}:{world.bao.port}"}
    with noisy_and_victim(tmp_path, world, unique, monkeypatch, 2, address, **address) as (
        client,
        noisy,
        victim,
        token,
    ):
        stalled = [f"v{i}-{unique}.noisy.test" for i in range(lookup.LOOKUPS_PER_NAMESPACE)]
        dns.names.update(stalled)
        with as_namespace("noisy-team"):  # the noisy team's other classes' names stall
            for name in stalled:
                with pytest.raises(lookup.LookupTimedOut):
                    lookup.addresses(name, 8200, 0.05)
        client.app.vault._transport.pools.close()  # no kept-alive connection: a revocation looks the name up
        sweep_past(client, world, noisy, victim, token)


def test_a_lookup_thread_that_cannot_start_leaves_nothing_in_flight(
    dns: StalledDNS, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"vault-{unique}.answered.test"
    dns.answered.add(name)
    for error, raised in ((RuntimeError("can't start new thread"), lookup.LookupRefused), (MemoryError(), MemoryError)):

        def no_thread(self: threading.Thread, error: BaseException = error) -> None:
            raise error

        with monkeypatch.context() as patched:
            patched.setattr(threading.Thread, "start", no_thread)
            with pytest.raises(raised):
                lookup.addresses(name, 8200, 1.0)
        assert lookup.in_flight() == 0  # nothing left for later lookups of the name to wait on
    assert lookup.addresses(name, 8200, 1.0)


def test_a_mount_whose_namespace_s_lookups_stall_is_told_so_when_it_holds_the_probe(
    provider: ProviderClient, world: VaultWorld, dns: StalledDNS, unique: str
) -> None:
    shared = f"vault-{unique}.shared.test"
    dns.answered.add(shared)
    address = f"http://{shared}:{world.bao.port}"
    with as_namespace("team"):  # an outage opened the shared Vault's breaker
        breaker = provider.app.breakers.get(EndpointKey.of(address))
        for _ in range(FAILURES_TO_OPEN):
            breaker.record_failure("cannot reach Vault: connection refused")
    stalled = [f"v{i}-{unique}.evil.test" for i in range(lookup.LOOKUPS_PER_NAMESPACE)]
    dns.names.update(stalled)
    with as_namespace("evil"):
        for name in stalled:
            with pytest.raises(lookup.LookupTimedOut):
                lookup.addresses(name, 8200, 0.05)
    time.sleep(OPEN_BASE_SECONDS * JITTER[1] + 0.1)  # the pause is over: the next Mount probes
    evil = world.kube.add_pod("evil", f"evil-{unique}", "evil")
    with pytest.raises(grpc.RpcError) as error:
        provider.mount(evil, [{"objectName": "k", "secretPath": "kv1/x"}], role="x", vaultAddress=address, timeout=5)
    assert "name lookups for pods of this namespace are still waiting for DNS" in error.value.details()
    pod, objects = _kv_pod(world, f"team-{unique}", "team")  # the probe was given back: the team's Mount probes
    assert provider.mount(pod, objects, role=f"team-{unique}", vaultAddress=address, timeout=5).files
