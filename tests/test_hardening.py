"""Defects found in a review of the Mount path, each pinned by a test that failed before
its fix. Real OpenBao throughout; an HTTP proxy in front of it only where a misbehaving
Vault (or a gateway) is the point."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from provider import replymemory
from provider.config import DEFAULT_MAX_RESPONSE_BYTES, TLSConfig, VaultSettings
from provider.transport import MAX_POOLS, MAX_POOLS_PER_NAMESPACE, NotConnected, Pools, Request, Target, Transport
from tests.conftest import (
    ProviderClient,
    VaultWorld,
    as_namespace,
    connect,
    files_of,
    http_get,
    spawn_provider,
    start_provider,
)
from tests.fault_proxy import FaultProxy, Rule
from tests.openbao import free_port

# 3. The deadline holds against a reply that drips in.


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers"])
def test_a_reply_dripping_one_byte_a_second_is_cut_at_the_deadline(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str, headers_too: bool
) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    proxied.mount(pod, objects, role=unique)  # logged in; now the read drips
    body = b'{"data":{"k":"dripped"},"lease_duration":0,"padding":"' + b"x" * 40 + b'"}'
    proxy.add(Rule("GET", f"/v1/kv1/{unique}", status=200, body=body, drip_seconds=1.0, drip_headers=headers_too))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        proxied.mount(pod, objects, role=unique, timeout=3)
    elapsed = time.monotonic() - started
    assert error.value.code() == grpc.StatusCode.UNKNOWN, error.value.details()
    assert "did not answer within" in error.value.details()
    assert elapsed < 3
    # The thread is free again right after the deadline, not when the drip ends.
    give_up = time.monotonic() + 2
    while proxied.app.admission.running:
        assert time.monotonic() < give_up, "the Mount thread is still held by the drip"
        time.sleep(0.05)
    proxy.clear()
    assert files_of(proxied.mount(pod, objects, role=unique)) == {"k": b"v"}


# 4. Connection pools: keyed by what a connection is, bounded, redirects contained.


def test_pools_are_keyed_by_scheme_host_port_and_tls_not_by_spelling() -> None:
    pools = Pools()
    try:
        for i in range(100):
            pools.get(Target.parse(f"http://127.0.0.1:8200/{i}"), TLSConfig())
            pools.get(Target.parse(f"http://u{i}:p@127.0.0.1:8200"), TLSConfig(ca_cert=f"/ca{i}"))  # TLS: https only
        assert len(pools) == 1
        pools.get(Target.parse("https://127.0.0.1:8200"), TLSConfig())
        pools.get(Target.parse("https://127.0.0.1:8200"), TLSConfig(server_name="vault"))
        assert len(pools) == 3
        for port in range(1000, 1000 + 3 * MAX_POOLS):  # classes of many namespaces: the node's bound
            with as_namespace(f"team-{port % 16}"):
                pools.get(Target.parse(f"http://127.0.0.1:{port}"), TLSConfig())
        assert len(pools) == MAX_POOLS
        with as_namespace("one-team"):  # one namespace: its own share
            for port in range(2000, 2000 + MAX_POOLS):
                pools.get(Target.parse(f"http://127.0.0.1:{port}"), TLSConfig())
        assert len(pools) == MAX_POOLS
        with as_namespace("one-team"):
            ours = [
                port
                for port in range(2000, 2000 + MAX_POOLS)
                if pools.find(Target.parse(f"http://127.0.0.1:{port}"), TLSConfig())
            ]
        assert len(ours) == MAX_POOLS_PER_NAMESPACE  # the rest are still other teams'
    finally:
        pools.close()


def test_a_class_naming_address_after_address_does_not_close_other_classes_kept_connections() -> None:
    # The node keeps MAX_POOLS pools, least recently used out first: a class naming a new
    # (dead) address on every Mount closed every other class's kept-alive connections, and
    # each of their next requests paid a new connection and TLS handshake. A pool holding no
    # connection now goes first.
    with socket.create_server(("127.0.0.1", 0)) as vault:
        pools = Pools(max_pools=4)
        try:
            target = Target.parse(f"http://127.0.0.1:{vault.getsockname()[1]}")
            kept = pools.get(target, TLSConfig())
            kept.give(kept.connect(2.0, lambda sock: None))
            for port in range(1000, 1000 + 3 * 4):
                pools.get(Target.parse(f"http://127.0.0.1:{port}"), TLSConfig())
            assert len(pools) == 4
            assert pools.find(target, TLSConfig()) is kept and not kept.holds_nothing
        finally:
            pools.close()


@contextlib.contextmanager
def _pools_and_servers(servers: int, *, max_pools: int, per_namespace: int) -> Iterator[tuple[Pools, list[Target]]]:
    """Pools with these bounds, and the addresses of `servers` live loopback servers."""
    with contextlib.ExitStack() as stack:
        listening = [stack.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in range(servers)]
        pools = Pools(max_pools=max_pools, per_namespace=per_namespace)
        stack.callback(pools.close)
        yield pools, [Target.parse(f"http://127.0.0.1:{server.getsockname()[1]}") for server in listening]


def _kept_pool(pools: Pools, target: Target) -> Any:
    """target's pool, holding one kept-alive connection to it."""
    pool = pools.get(target, TLSConfig())
    pool.give(pool.connect(2.0, lambda sock: None))
    assert not pool.holds_nothing
    return pool


def _still_kept(pools: Pools, targets: list[Target], made: list[Any]) -> list[Any]:
    return [pool for target, pool in zip(targets, made, strict=True) if pools.find(target, TLSConfig()) is pool]


def test_a_class_naming_live_server_after_live_server_replaces_its_own_pools_not_another_team_s() -> None:
    # Past the node's pools, one holding a connection went when no pool was empty: a class
    # naming live servers of its own (each answering, so each pool holds a connection) closed
    # other teams' kept-alive connections. A namespace now keeps its own share of pools.
    with _pools_and_servers(12, max_pools=6, per_namespace=3) as (pools, targets):
        with as_namespace("team"):
            victim = _kept_pool(pools, targets[0])
        with as_namespace("other"):
            bystander = _kept_pool(pools, targets[1])
        with as_namespace("evil"):
            evil = [_kept_pool(pools, target) for target in targets[2:]]
        assert len(pools) == 5  # the team's, the other's and evil's 3
        with as_namespace("team"):
            assert _still_kept(pools, targets[:1], [victim]) == [victim] and not victim.holds_nothing
        with as_namespace("other"):
            assert _still_kept(pools, targets[1:2], [bystander]) == [bystander]
        with as_namespace("evil"):
            assert _still_kept(pools, targets[2:], evil) == evil[-3:]  # its own least recently used went


def test_a_pool_another_namespace_uses_is_not_given_up_for_its_maker_s_share() -> None:
    with _pools_and_servers(8, max_pools=20, per_namespace=3) as (pools, targets):
        with as_namespace("evil"):
            shared = _kept_pool(pools, targets[0])  # the shared Vault, first named by evil's class
        with as_namespace("team"):
            assert pools.get(targets[0], TLSConfig()) is shared  # the team uses it too
        with as_namespace("evil"):
            for target in targets[1:]:
                _kept_pool(pools, target)
        with as_namespace("team"):
            assert _still_kept(pools, targets[:1], [shared]) == [shared] and not shared.holds_nothing
        assert len(pools) == 1 + 3


def test_past_the_node_s_pools_the_namespace_keeping_the_most_gives_one_up() -> None:
    with _pools_and_servers(5, max_pools=4, per_namespace=3) as (pools, targets):
        with as_namespace("team"):
            victim = _kept_pool(pools, targets[0])  # the least recently used of all
        with as_namespace("evil"):
            evil = [_kept_pool(pools, target) for target in targets[1:4]]
        with as_namespace("other"):
            newcomer = _kept_pool(pools, targets[4])
        assert len(pools) == 4
        assert _still_kept(pools, [targets[0], targets[4]], [victim, newcomer]) == [victim, newcomer]
        assert _still_kept(pools, targets[1:4], evil) == evil[1:]


def test_a_pool_whose_connection_is_in_use_is_not_taken_for_one_holding_nothing() -> None:
    # Past the node's pools, one with no idle connection went first: another team's pool
    # whose one connection was out on an exchange looked empty, and went before any of the
    # namespace keeping the most of its own. Lent connections count now.
    with _pools_and_servers(5, max_pools=4, per_namespace=3) as (pools, targets):
        with as_namespace("team"):
            busy = pools.get(targets[0], TLSConfig())
            conn = busy.connect(2.0, lambda sock: None)  # out on an exchange
        with as_namespace("other"):
            others = [_kept_pool(pools, target) for target in targets[1:3]]
        with as_namespace("evil"):
            _kept_pool(pools, targets[3])
        with as_namespace("quiet"):
            pools.get(targets[4], TLSConfig())
        assert not busy.holds_nothing
        assert _still_kept(pools, targets[:1], [busy]) == [busy]
        assert _still_kept(pools, targets[1:3], others) == others[1:]  # the namespace keeping the most gave one
        busy.give(conn)  # back from its exchange: kept for the next
        assert busy.take() is conn
        busy.drop(conn)
        assert busy.holds_nothing


def test_a_connection_changing_hands_is_never_seen_as_a_pool_holding_nothing() -> None:
    # holds_nothing is read without the pool's lock (Pools picks what to close under its
    # own): between a connection leaving the idle list and being counted as lent, or the
    # other way round, the pool looked empty while its connection was in use.
    seen: list[bool] = []

    class Watched(list):  # type: ignore[type-arg]
        def pop(self, *args: Any) -> Any:
            seen.append(pool.holds_nothing)
            return super().pop(*args)

        def append(self, item: Any) -> None:
            seen.append(pool.holds_nothing)
            super().append(item)

    with _pools_and_servers(1, max_pools=4, per_namespace=3) as (pools, targets):
        pool = _kept_pool(pools, targets[0])
        pool._idle = Watched(pool._idle)
        for _ in range(3):
            conn = pool.take()
            assert conn is not None
            pool.give(conn)
        assert seen and not any(seen)


def test_a_batch_that_fails_to_start_gives_back_what_it_had_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    # A batch whose second request raised something no caller foresaw (no memory for the
    # thread of a name lookup) left its first request's connection lent and open for good.
    with _pools_and_servers(1, max_pools=4, per_namespace=3) as (_, targets):
        transport = Transport(max_body_bytes=1024)
        with pytest.raises(NotConnected):  # its watchdog's thread started: only the lookup's fails
            transport.send(
                Target.parse(f"http://127.0.0.1:{free_port()}"), TLSConfig(), "GET", "/", None, {}, 2.0, replayable=True
            )
        pool = _kept_pool(transport.pools, targets[0])
        conn = pool.take()
        assert conn is not None
        pool.give(conn)

        def no_memory(self: threading.Thread) -> None:
            raise MemoryError()

        monkeypatch.setattr(threading.Thread, "start", no_memory)
        requests = [
            Request(targets[0], TLSConfig(), "GET", "/v1/a", None, {}, 2.0, True),
            Request(Target.parse("http://vault.no-memory.test:8200"), TLSConfig(), "GET", "/v1/b", None, {}, 2.0, True),
        ]
        try:
            with pytest.raises(MemoryError):
                transport.send_many(requests)
        finally:
            monkeypatch.undo()
            transport.close()
        assert pool.holds_nothing and conn.sock.fileno() == -1  # dropped, not lent for ever


@pytest.mark.parametrize(
    ("location", "followed"),
    [
        ("http://u{i}@127.0.0.1:{port}/v1/kv1/{name}", True),
        ("https://127.0.0.1:{port}/v1/kv1/{name}", False),
        ("ftp://127.0.0.1:{port}/v1/kv1/{name}", False),
    ],
    ids=["same-scheme-with-userinfo", "scheme-change", "not-http"],
)
def test_redirects_stay_on_the_scheme_and_make_no_new_pools(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str, location: str, followed: bool
) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    proxied.mount(pod, objects, role=unique)
    pools = len(proxied.app.vault._transport.pools)
    for i in range(20):
        target = location.format(i=i, port=world.bao.port, name=unique)
        # Every read during the Mount is redirected, as a standby redirects each request (a
        # read sent ahead once, then the usual way's, which follows or not).
        proxy.add(Rule("GET", f"/v1/kv1/{unique}", status=307, headers={"Location": target}))
        if followed:
            assert files_of(proxied.mount(pod, objects, role=unique)) == {"k": b"v"}
        else:
            with pytest.raises(grpc.RpcError) as error:
                proxied.mount(pod, objects, role=unique)
            assert "Vault answered 307" in error.value.details()
        proxy.clear()
    assert len(proxied.app.vault._transport.pools) <= pools + 1


# 6. A path and user info in vaultAddress are kept, as the reference keeps them.


@pytest.fixture
def gateway(world: VaultWorld) -> Iterator[FaultProxy]:
    """OpenBao behind a gateway that serves it under /vault."""
    proxy = FaultProxy(world.bao.port, prefix="/vault")
    yield proxy
    proxy.close()


def test_a_vault_address_with_a_path_and_credentials_reaches_vault_through_a_gateway(
    provider: ProviderClient, gateway: FaultProxy, world: VaultWorld, unique: str
) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    world.bao.api("POST", f"kv1/{unique}-2", {"k": "v2"})
    pod = world.grant(unique, [f"kv1/{unique}", f"kv1/{unique}-2"])
    objects = [
        {"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"},
        {"objectName": "k2", "secretPath": f"kv1/{unique}-2", "secretKey": "k"},  # two reads: sent together
    ]
    address = gateway.url.replace("http://", "http://gw-user:s%40cret@") + "/vault/"
    assert files_of(provider.mount(pod, objects, role=unique, vaultAddress=address)) == {"k": b"v", "k2": b"v2"}
    assert set(gateway.authorizations) == {"Basic Z3ctdXNlcjpzQGNyZXQ="}  # gw-user:s@cret, on every request
    assert "s%40cret" not in str(provider.app.metrics.registry.collect())  # never in a label


# 5. A KV secret with a numeric `expiration` is not a certificate: changes show at once.


def test_a_kv_secret_with_an_expiration_field_is_read_again_on_every_mount(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    expires = int(time.time()) + 30 * 86400
    world.bao.api("POST", f"kv1/{unique}", {"api_key": "old", "expiration": expires})
    pod = world.grant(unique, [f"kv1/{unique}"])
    objects = [{"objectName": "key", "secretPath": f"kv1/{unique}", "secretKey": "api_key"}]
    assert files_of(provider.mount(pod, objects, role=unique)) == {"key": b"old"}
    world.bao.api("POST", f"kv1/{unique}", {"api_key": "new", "expiration": expires})
    assert files_of(provider.mount(pod, objects, role=unique)) == {"key": b"new"}


# 7. A stalled Vault neither starves other pods' parallel fetches nor the readiness probe.


def test_stalled_many_object_mounts_leave_other_pods_and_readiness_alone(
    tmp_path: Path, world: VaultWorld, proxy: FaultProxy, unique: str
) -> None:
    client = start_provider(tmp_path, world, vault=VaultSettings(address=world.bao.url))
    try:
        for i in range(10):
            world.bao.api("POST", f"kv1/{unique}-{i}", {"k": f"v{i}"})
        pod = world.grant(unique, [f"kv1/{unique}-*"])
        ten = [{"objectName": f"o{i}", "secretPath": f"kv1/{unique}-{i}", "secretKey": "k"} for i in range(10)]
        two = ten[:2]
        proxy.add(Rule("GET", "/v1/kv1/", delay_seconds=6))  # reads through the proxy stall

        def stall() -> None:
            with pytest.raises(grpc.RpcError):
                client.mount(pod, ten, role=unique, timeout=5, vaultAddress=proxy.url)

        stalled = [threading.Thread(target=stall) for _ in range(2)]
        for thread in stalled:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        assert files_of(client.mount(pod, two, role=unique, timeout=5)) == {"o0": b"v0", "o1": b"v1"}
        assert time.monotonic() - started < 1
        assert http_get(f"http://{client.app.health_address}/health/ready")[0] == 200
        for thread in stalled:
            thread.join(10)
    finally:
        client.close()


# 2. No class or reply can make one Mount cost the node its memory or its CPU.


@pytest.fixture
def spawned(tmp_path: Path, world: VaultWorld, proxy: FaultProxy) -> Iterator[tuple[ProviderClient, int]]:
    """The provider in its own process (reaching OpenBao through `proxy`), so its peak
    memory and CPU are its own: a client and the process id."""
    process = spawn_provider(tmp_path, world, "-log-level=warn", vault_addr=proxy.url)
    client = connect(tmp_path / "vault.sock", world.kube)
    try:
        grpc.channel_ready_future(client.channel).result(timeout=20)
        yield client, process.pid
    finally:
        client.channel.close()
        process.terminate()
        process.wait(15)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def big_map_aliased(keys: int, uses: int) -> str:
    big = "{" + ", ".join(f"k{i}: v" for i in range(keys)) + "}"
    head = f"- objectName: o0\n  secretPath: kv1/x\n  secretArgs: &big {big}\n"
    return head + "".join(f"- objectName: o{i}\n  secretPath: kv1/x\n  secretArgs: *big\n" for i in range(1, uses))


AMPLIFIERS = {
    "objects-flow-list": "[" + ",".join(["a"] * 499_000) + "]",
    "secretArgs-flow-list": "- objectName: o\n  secretPath: kv1/x\n  secretArgs: {k: ["
    + ",".join(["a"] * 480_000)
    + "]}\n",
    "aliases-to-a-big-map": big_map_aliased(9_000, 60),
}


def test_hostile_classes_and_replies_stay_within_memory_and_cpu(
    spawned: tuple[ProviderClient, int], proxy: FaultProxy, world: VaultWorld, unique: str
) -> None:
    client, pid = spawned
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    for name, objects in AMPLIFIERS.items():
        assert len(objects) < 1024 * 1024, name
        before = cpu_seconds(pid)
        with pytest.raises(grpc.RpcError) as error:
            client.mount(pod, objects, role=unique, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.value.details())
        assert "values (an alias counts as what it repeats)" in error.value.details()
        assert cpu_seconds(pid) - before < 1.0, name
    # A reply of two million zeros: within the 8 MiB body limit, and a third of what the
    # namespace may hold (replymemory), so that it is read, then refused by its count.
    body = b'{"data":[' + b"0," * 2_000_000 + b'0],"lease_duration":0}'
    proxy.add(Rule("GET", f"/v1/kv1/{unique}", status=200, body=body))
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    before = cpu_seconds(pid)
    with pytest.raises(grpc.RpcError) as error:
        client.mount(pod, objects, role=unique, timeout=30)
    assert "reply holds more than 100000 values" in error.value.details()
    assert cpu_seconds(pid) - before < 1.0
    proxy.clear()
    assert files_of(client.mount(pod, objects, role=unique)) == {"k": b"v"}
    assert peak_rss_mib(pid) < 100


def test_what_a_namespace_mounts_at_once_is_bounded_in_memory(
    spawned: tuple[ProviderClient, int], proxy: FaultProxy, world: VaultWorld, unique: str
) -> None:
    """Each reply within its limit (8 MiB) and each Mount's files small, twelve 8 MiB
    replies took one Mount past 300 MiB, and four such Mounts at once past 1.2 GiB: what a
    namespace's Mounts hold at once is bounded (replymemory). The Mount past the bound
    fails at once naming it, another namespace mounts meanwhile, and what was held is
    given back when the Mounts end."""
    client, pid = spawned
    namespace = f"big-{unique}"
    paths = [f"kv1/{unique}/{i}" for i in range(12)]
    first = world.grant(unique, [f"kv1/{unique}/*"], namespace=namespace)
    pods = [first] + [world.kube.add_pod(namespace, f"pod-{i}-{unique}", "app") for i in range(3)]
    for path in paths:
        world.bao.api("POST", path, {"k": "v"})
    objects = [{"objectName": f"o{i}", "secretPath": path, "secretKey": "k"} for i, path in enumerate(paths)]
    victim, victim_objects = world.kv_pod(f"v{unique}")
    assert files_of(client.mount(victim, victim_objects, role=f"v{unique}")) == {"k": b"v"}
    base = peak_rss_mib(pid)
    body = json.dumps({"data": {"k": "v", "pad": "A" * (3 * 1024 * 1024)}, "lease_duration": 0}).encode()
    for path in paths:
        proxy.add(Rule("GET", f"/v1/{path}", status=200, body=body))
    refusals: list[grpc.RpcError | None] = []

    def mount(pod: Any) -> None:
        try:
            client.mount(pod, objects, role=unique, timeout=30)
            refusals.append(None)  # served: every one of them needs 72 MiB
        except grpc.RpcError as e:
            refusals.append(e)

    threads = [threading.Thread(target=mount, args=(pod,)) for pod in pods]
    for thread in threads:
        thread.start()
    assert files_of(client.mount(victim, victim_objects, role=f"v{unique}")) == {"k": b"v"}
    for thread in threads:
        thread.join(60)
    share = replymemory.NAMESPACE_RESPONSES * DEFAULT_MAX_RESPONSE_BYTES
    assert len(refusals) == len(pods)
    for refusal in refusals:
        assert refusal is not None and refusal.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"Mounts of namespace {namespace} (this one included) already hold" in refusal.details()
        assert f"a namespace may hold {share} at once" in refusal.details()
    # 20 MiB held at most, and what reading it takes (24 to 37 MiB measured; the allocator
    # varies): within the 100 MiB budget from a start of about 50.
    assert peak_rss_mib(pid) - base < 45
    proxy.clear()
    assert files_of(client.mount(first, objects, role=unique)) == {f"o{i}": b"v" for i in range(12)}


# 8. A reply without Vault's envelope: the whole map is the data, as in the reference.


def test_a_reply_without_the_envelope_is_looked_into_as_data(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod, _ = world.kv_pod(unique)
    objects = [
        {"objectName": "jwks", "secretPath": "identity/oidc/.well-known/keys", "secretKey": "keys"},
        {"objectName": "whole", "secretPath": "identity/oidc/.well-known/keys"},
    ]
    files = files_of(provider.mount(pod, objects, role=unique))
    keys = json.loads(files["jwks"])
    assert isinstance(keys, list)
    assert json.loads(files["whole"])["data"] == {"keys": keys}


# 9. encoding is ignored without secretKey, as the reference ignores it.


def test_an_unknown_encoding_without_a_secret_key_is_ignored(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod, _ = world.kv_pod(unique)
    whole = [{"objectName": "all", "secretPath": f"kv1/{unique}", "encoding": "bogus"}]
    assert json.loads(files_of(provider.mount(pod, whole, role=unique))["all"])["data"] == {"k": "v"}
    keyed = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k", "encoding": "bogus"}]
    with pytest.raises(grpc.RpcError) as error:
        provider.mount(pod, keyed, role=unique)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "encoding 'bogus' is not supported" in error.value.details()


# 10. The HMAC key: never fetched for a failing Mount, never fetched behind a lock.


def test_the_hmac_key_is_not_fetched_for_a_failing_mount_nor_waited_for_behind_a_lock(
    tmp_path: Path, world: VaultWorld, unique: str
) -> None:
    pod, objects = world.kv_pod(unique)
    client = start_provider(tmp_path, world, hmac_secret_name=f"hmac-{unique}", hmac_key_ttl=1.0)
    try:
        before = world.kube.calls["secret.get"]
        missing = [{"objectName": "k", "secretPath": f"kv1/{unique}-missing", "secretKey": "k"}]
        with pytest.raises(grpc.RpcError):
            client.mount(pod, missing, role=unique)
        assert world.kube.calls["secret.get"] == before  # no API call for a Mount that failed
        client.mount(pod, objects, role=unique)  # the key is now cached
        time.sleep(1.1)  # the key expires...
        world.kube.delay_seconds = 2.0  # ...and the API turns slow
        results: list[float] = []

        def timed_mount() -> None:
            started = time.monotonic()
            client.mount(pod, objects, role=unique)
            results.append(time.monotonic() - started)

        threads = [threading.Thread(target=timed_mount) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        # One Mount waited for the slow API; the others went on with the key they had.
        assert len(results) == 6 and sorted(results)[-2] < 1.0, sorted(results)
    finally:
        world.kube.delay_seconds = 0.0
        client.close()


# 13. -allowed-vault-addresses: the provider is no egress path around NetworkPolicy.


def test_vault_addresses_outside_the_allow_list_are_refused(
    tmp_path: Path, world: VaultWorld, proxy: FaultProxy, unique: str
) -> None:
    pod, objects = world.kv_pod(unique)
    vault = VaultSettings(address=world.bao.url, allowed_addresses=(proxy.url + "/",))
    client = start_provider(tmp_path, world, vault=vault)
    try:
        assert files_of(client.mount(pod, objects, role=unique)) == {"k": b"v"}  # the default address
        assert files_of(client.mount(pod, objects, role=unique, vaultAddress=proxy.url)) == {"k": b"v"}
        for elsewhere in ("http://169.254.169.254", f"http://127.0.0.2:{world.bao.port}", proxy.url + "/other"):
            with pytest.raises(grpc.RpcError) as error:
                client.mount(pod, objects, role=unique, vaultAddress=elsewhere)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not allowed on this node" in error.value.details()
            assert "-allowed-vault-addresses" in error.value.details()
    finally:
        client.close()


# Found by attacking the above: a few more ways in, each closed.


@pytest.mark.parametrize("mode", ["0x_", "0o_", "0b_", "1" * 5000], ids=["hex-empty", "oct-empty", "bin-empty", "huge"])
def test_file_permissions_that_are_no_number_are_invalid_not_internal(
    provider: ProviderClient, world: VaultWorld, unique: str, mode: str
) -> None:
    pod, _ = world.kv_pod(unique)
    with pytest.raises(grpc.RpcError) as error:
        provider.mount(pod, f"- objectName: a\n  secretPath: kv1/x\n  filePermission: {mode}\n", role=unique)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filePermission must be a file mode" in error.value.details()


def test_an_invalid_address_is_refused_at_once_not_retried(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod, objects = world.kv_pod(unique)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        provider.mount(pod, objects, role=unique, vaultAddress="http://127.0.0.1:99999", timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'vaultAddress' in SecretProviderClass parameters is not a valid Vault address" in error.value.details()
    assert time.monotonic() - started < 1


def test_a_broken_class_is_parsed_once_and_parses_never_starve_others(
    spawned: tuple[ProviderClient, int], world: VaultWorld, unique: str
) -> None:
    client, pid = spawned
    pairs = ", ".join(f"k{i}: v" for i in range(9_990))
    heavy = f"- objectName: a\n  secretPath: b\n  secretArgs: {{{pairs}}}\n- objectName: a\n  secretPath: b\n"
    pod, objects = world.kv_pod(unique)
    client.mount(pod, objects, role=unique)  # warm
    evil = [world.kube.add_pod("evil", f"evil-{unique}-{i}", "evil") for i in range(16)]
    before = cpu_seconds(pid)
    stop = time.monotonic() + 6

    def attack(i: int) -> None:
        n = 0
        while time.monotonic() < stop and n < 200:
            n += 1
            text = heavy if i % 2 else f"# {i}-{n}\n" + heavy  # the same broken class, and new ones
            with contextlib.suppress(grpc.RpcError):
                client.mount(evil[i], text, role=f"r{i % 4}", timeout=5)

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    latencies = []
    while time.monotonic() < stop:
        started = time.monotonic()
        assert files_of(client.mount(pod, objects, role=unique, timeout=5)) == {"k": b"v"}
        latencies.append(time.monotonic() - started)
        time.sleep(0.1)
    for thread in threads:
        thread.join(15)
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.5 and latencies[-1] < 2, latencies[-5:]
    assert cpu_seconds(pid) - before < 6 * 2  # bounded by the parse gate, not by the attackers
