"""A warm Mount whose plan remembers its last one is answered on the event loop, without a
thread (Mounter.mount_on_loop, provider.loopio): its reads still go to Vault with the
pod's own token each time. Whatever the loop cannot finish at once goes to a thread with
what the loop read, and a slow or hostile Vault on the loop holds no other Mount."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from provider import http1, vault
from provider._proto import service_pb2
from provider.config import TLSConfig
from provider.vault import AroundToken, Endpoint, Read, VaultClient
from tests.conftest import ProviderClient, VaultWorld, files_of
from tests.fault_proxy import FaultProxy, Rule


class ThreadJobs:
    """Counts the jobs the provider hands to its Mount threads."""

    def __init__(self, client: ProviderClient) -> None:
        self.count = 0
        threads = client.app.dispatcher._admission.threads
        real = threads.submit

        def submit(job: Callable[[], object]) -> None:
            self.count += 1
            real(job)

        threads.submit = submit  # type: ignore[method-assign]

    def during(self, call: Callable[[], object]) -> int:
        before = self.count
        call()
        return self.count - before


def reads(client: ProviderClient, *statuses: str) -> float:
    """Reads counted in the metrics, by these statuses (200 alone by default)."""
    registry = client.app.metrics.registry
    return sum(
        registry.get_sample_value("vault_csi_provider_vault_requests_total", {"operation": "read", "status": status})
        or 0.0
        for status in statuses or ("200",)
    )


def token_hits(client: ProviderClient) -> float:
    return (
        client.app.metrics.registry.get_sample_value("vault_csi_provider_token_cache_total", {"result": "hit"}) or 0.0
    )


def remounter(client: ProviderClient, pod: Any, objects: list[dict[str, Any]], role: str, **params: str) -> Any:
    """The pod's Mount as kubelet repeats it: the very same request, so its plan is kept."""
    request = client.request(pod, objects, role=role, **params)
    return lambda timeout=30: client.raw_mount(request, timeout=timeout)


def warmed(client: ProviderClient, world: VaultWorld, name: str, value: str = "v", **params: str) -> Any:
    """A KV pod's Mount, repeated until the loop answers it."""
    pod, objects = world.kv_pod(name, value)
    mount = remounter(client, pod, objects, name, **params)
    warm(mount, ThreadJobs(client))  # another counter wraps this one: both count
    return mount


def warm(mount: Callable[[], object], jobs: ThreadJobs) -> None:
    """Mount until a Mount is answered on the loop (the first parse, the next read ahead
    and remembered): at most a few."""
    for _ in range(5):
        if jobs.during(mount) == 0:
            return
    raise AssertionError("no Mount was answered on the loop")


def test_a_remembered_mount_is_answered_on_the_loop_and_still_reads_vault_each_time(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    jobs = ThreadJobs(provider)
    pod, objects = world.kv_pod(unique, "one")
    mount = remounter(provider, pod, objects, unique)
    warm(mount, jobs)
    before = reads(provider)
    answered: list[Any] = []
    for _ in range(5):
        assert jobs.during(lambda: answered.append(mount())) == 0
    assert {files_of(response)["k"] for response in answered} == {b"one"}
    assert reads(provider) - before == 5  # each Mount read Vault, with the pod's token
    hits = token_hits(provider)
    mount()
    assert token_hits(provider) - hits == 1
    # A changed secret: the loop read it once, a thread makes the new files from that reply.
    world.bao.api("POST", f"kv1/{unique}", {"k": "two"})
    before = reads(provider)
    changed: list[Any] = []
    assert jobs.during(lambda: changed.append(mount())) == 1
    assert files_of(changed[0]) == {"k": b"two"} and reads(provider) - before == 1
    assert jobs.during(mount) == 0  # and remembered again
    # Taken away: the very next Mount fails, as on a thread.
    world.policy(unique, 'path "kv1/other" { capabilities = ["read"] }')
    with pytest.raises(grpc.RpcError) as denied:
        mount()
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_new_pod_of_a_class_reads_its_kv_secret_ahead_from_its_first_mount(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    """The class's first pod finds its request plain (a KV secret) the usual way, so that
    pod's next Mount reads it ahead and remembers it, and only the one after is answered on
    the loop. A new pod of the class reads it ahead from its first Mount, as the class's
    pods found it, so its second is answered on the loop."""
    jobs = ThreadJobs(provider)
    pod, objects = world.kv_pod(unique, "v")
    first = remounter(provider, pod, objects, unique)
    assert [jobs.during(first) for _ in range(3)] == [1, 1, 0]
    sibling = world.kube.add_pod(pod.namespace, f"sibling-{unique}", pod.service_account)
    second = remounter(provider, sibling, objects, unique)
    before = reads(provider)
    assert [jobs.during(second) for _ in range(2)] == [1, 0]
    assert reads(provider) - before == 2  # each with its own login and token: read every time
    assert files_of(second()) == {"k": b"v"}


def in_background(call: Callable[[], object], count: int = 1) -> list[tuple[grpc.StatusCode, str]]:
    """Start `count` threads making the call; the list fills with each one's code and details."""
    outcomes: list[tuple[grpc.StatusCode, str]] = []

    def one() -> None:
        try:
            call()
            outcomes.append((grpc.StatusCode.OK, ""))
        except grpc.RpcError as e:
            outcomes.append((e.code(), e.details() or ""))

    for _ in range(count):
        threading.Thread(target=one, daemon=True).start()
    return outcomes


def settled(outcomes: list[tuple[grpc.StatusCode, str]], count: int, within: float) -> None:
    deadline = time.monotonic() + within
    while len(outcomes) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(outcomes) == count


@pytest.mark.parametrize(
    "fault",
    [
        Rule("GET", "", drop=True, times=1),  # a kept-alive connection found closed
        Rule("GET", "", status=200, body=b'{"data":{"k":"v"}}', drip_seconds=0.01, drip_headers=True, times=1),
        Rule("GET", "", status=502, body=b"bad gateway", times=1),  # a status worth retrying
    ],
    ids=["closed", "dribbled", "retry-status"],
)
def test_what_the_loop_cannot_finish_at_once_a_thread_does(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str, fault: Rule, request: Any
) -> None:
    client, jobs = proxied, ThreadJobs(proxied)
    pod, objects = world.kv_pod(unique)
    mount = remounter(client, pod, objects, unique)
    warm(mount, jobs)
    fault.path_prefix = f"/v1/kv1/{unique}"
    proxy.add(fault)
    started = time.monotonic()
    answered: list[Any] = []
    counted, hits = reads(client, "200", "502", "error"), token_hits(client)
    assert jobs.during(lambda: answered.append(mount())) == 1
    assert files_of(answered[0]) == {"k": b"v"} and fault.hits == 1
    # Both attempts in the metrics (the loop's, the thread's), the token looked up once.
    assert reads(client, "200", "502", "error") - counted == 2 and token_hits(client) - hits == 1
    assert time.monotonic() - started < 3  # a dribbled reply is given up after a few bytes
    if "retry-status" in request.node.name:
        warm(mount, jobs)  # it went the usual way (retries): remembered again after a read ahead
    else:  # the thread read it ahead again: remembered, the next Mount is on the loop
        assert jobs.during(mount) == 0


def test_a_slow_vault_on_the_loop_holds_no_other_mount(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str
) -> None:
    slow = warmed(proxied, world, unique)
    other = warmed(proxied, world, f"{unique}-b", "fine", vaultAddress=world.bao.url)
    proxy.add(Rule("GET", f"/v1/kv1/{unique}", delay_seconds=4))
    outcomes = in_background(lambda: slow(timeout=2), count=4)
    time.sleep(0.3)
    for _ in range(10):
        started = time.monotonic()
        assert files_of(other()) == {"k": b"fine"}
        assert time.monotonic() - started < 0.5
    settled(outcomes, 4, within=10)
    assert all(code != grpc.StatusCode.OK for code, _ in outcomes)


def test_shutting_down_answers_a_mount_waiting_on_the_loop(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str
) -> None:
    mount = warmed(proxied, world, unique)
    proxy.add(Rule("GET", f"/v1/kv1/{unique}", delay_seconds=10))
    outcomes = in_background(lambda: mount(timeout=25))
    time.sleep(0.5)
    started = time.monotonic()
    proxied.app.stop(grace=2)
    settled(outcomes, 1, within=10)
    assert time.monotonic() - started < 4
    assert "restarting; the driver retries the Mount" in outcomes[0][1]


def test_a_cancelled_mount_waiting_on_the_loop_gives_its_place_back(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str
) -> None:
    client, jobs = proxied, ThreadJobs(proxied)
    pod, objects = world.kv_pod(unique)
    request = client.request(pod, objects, role=unique)
    warm(lambda: client.raw_mount(request), jobs)
    proxy.add(Rule("GET", f"/v1/kv1/{unique}", delay_seconds=5))
    admission = client.app.dispatcher._admission
    call = client.stub.Mount.future(request, timeout=25)
    deadline = time.monotonic() + 2
    while admission.running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert admission.running == 1  # waiting on the loop, holding its class's place
    call.cancel()
    while admission.running and time.monotonic() < deadline + 2:
        time.sleep(0.01)
    assert admission.running == 0


def test_no_pool_is_made_on_the_loop(world: VaultWorld) -> None:
    """Loading a pool's CA store takes tens of milliseconds: a Mount whose pool is gone
    (evicted by other classes' pools) goes to a thread, which makes it."""
    client = VaultClient()
    endpoint = Endpoint(address=world.bao.url, tls=TLSConfig())
    read = Read("GET", "kv1/x", None)

    async def on_loop() -> object:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        return await client.send_reads_on_loop(
            endpoint, token="t", around=AroundToken.of(endpoint, [read]), deadline=time.monotonic() + 5, done=done
        )

    try:
        assert asyncio.run(on_loop()) is None
        assert len(client._transport.pools) == 0
    finally:
        client.close()


def test_requests_made_around_the_token_are_the_ones_a_thread_sends() -> None:
    """A kept plan's loop requests are made once around the token (vault.AroundToken): the
    bytes are those http1 writes for the same reads, headers and token; a token HTTP cannot
    carry, or a path holding the stand-in for the token, sends nothing from the loop."""
    endpoint = Endpoint(address="https://user:pw@vault.example:8200/prefix", tls=TLSConfig(), namespace="team/a")
    reads = [Read("GET", "kv/a b", None), Read("GET", "kv/list", {"version": ["2"]})]
    around = AroundToken.of(endpoint, reads)
    headers = vault._read_headers(endpoint, "s.token")
    assert around.with_token("s.token") == [
        http1.request("GET", endpoint.target.prefix + read.url, "vault.example:8200", headers, None) for read in reads
    ]
    assert around.with_token("s.tok\r\nX-Evil: 1") is None and around.with_token("") is None
    marked = AroundToken.of(endpoint, [Read("GET", f"kv/{vault._TOKEN_MARK}", None)])
    assert marked.parts is None and marked.with_token("s.token") is None
    with pytest.raises(ValueError, match="share one method"):  # a reply is read by its request's method
        AroundToken.of(endpoint, [Read("GET", "kv/a", None), Read("LIST", "kv/", None)])


def test_a_busy_lease_cache_lock_is_not_waited_for_on_the_loop(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    """The lease cache's purge holds its lock a few milliseconds: a Mount on the loop asks
    without waiting (a thread then does the Mount), so the loop answers everyone meanwhile."""
    mount = warmed(provider, world, unique)
    leases = provider.app.dispatcher.mounter._leases
    assert leases is not None
    with leases._lock:
        outcomes = in_background(mount)
        time.sleep(0.2)
        started = time.monotonic()
        provider.stub.Version(service_pb2.VersionRequest(version="v1alpha1"), timeout=2)
        assert time.monotonic() - started < 0.5
    settled(outcomes, 1, within=10)
    assert outcomes[0][0] == grpc.StatusCode.OK


@pytest.mark.parametrize("remembered", [True, False], ids=["on-the-loop", "on-a-thread"])
def test_a_mount_admitted_as_shutdown_begins_is_answered_at_once(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str, remembered: bool
) -> None:
    if remembered:
        mount = warmed(proxied, world, unique)
    else:
        pod, objects = world.kv_pod(unique)
        mount = remounter(proxied, pod, objects, unique)
    proxy.add(Rule("*", "", delay_seconds=5))
    dispatcher = proxied.app.dispatcher
    admission = dispatcher._admission
    enter = admission.enter

    async def enter_then_stop(*args: Any, **kwargs: Any) -> Any:
        ticket = await enter(*args, **kwargs)
        dispatcher.stop_answering()  # shutdown begins just as this Mount is admitted
        return ticket

    admission.enter = enter_then_stop  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as stopped:
        mount(timeout=25)
    assert "restarting; the driver retries the Mount" in (stopped.value.details() or "")
    assert time.monotonic() - started < 2 and admission.running == 0
