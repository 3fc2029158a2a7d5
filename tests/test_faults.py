"""Vault faults: every one gets a clear, final answer before the caller's deadline, the
provider keeps serving, and the next Mount succeeds as soon as Vault is back.
Reads are retried with backoff; writes only when Vault surely did not act."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from provider.breaker import JITTER, OPEN_BASE_SECONDS
from provider.config import VaultSettings
from provider.dispatch import BACKSTOP_SECONDS
from provider.mount import Mounter, MountPlan, MountResult
from provider.server import DEADLINE_MARGIN_SECONDS
from tests.conftest import ProviderClient, VaultWorld, files_of, start_provider
from tests.fault_proxy import FaultProxy, Rule
from tests.kube_fake import FakePod
from tests.openbao import free_port
from tests.proxy import Forwarder


@pytest.fixture
def kv(world: VaultWorld, unique: str) -> tuple[FakePod, list[dict[str, str]]]:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    return pod, [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]


def failing_mount(
    proxied: ProviderClient, pod: FakePod, objects: list[dict[str, str]], role: str, timeout: float
) -> tuple[grpc.RpcError, float]:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        proxied.mount(pod, objects, role=role, timeout=timeout)
    elapsed = time.monotonic() - started
    assert error.value.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert elapsed < timeout
    return error.value, elapsed


def test_connection_refused_then_back(tmp_path: Path, world: VaultWorld, kv, unique: str) -> None:  # type: ignore[no-untyped-def]
    pod, objects = kv
    port = free_port()
    provider = start_provider(tmp_path, world, vault=VaultSettings(address=f"http://127.0.0.1:{port}"))
    try:
        error, _ = failing_mount(provider, pod, objects, unique, timeout=3)
        assert error.code() == grpc.StatusCode.UNKNOWN
        assert f"cannot reach Vault at http://127.0.0.1:{port}" in error.details()
        vault = Forwarder(("127.0.0.1", world.bao.port), port=port)  # Vault is back
        try:
            # The breaker opened during those retries: Mounts fail at once until its probe
            # (within OPEN_BASE_SECONDS x 1.5) reaches Vault; the Mount that probes succeeds.
            give_up = time.monotonic() + OPEN_BASE_SECONDS * JITTER[1] + 2
            while True:
                try:
                    assert files_of(provider.mount(pod, objects, role=unique, timeout=5)) == {"k": b"v"}
                    break
                except grpc.RpcError as refused:
                    assert "unreachable since" in refused.details(), refused.details()
                    assert time.monotonic() < give_up
                    time.sleep(0.1)
        finally:
            vault.close()
    finally:
        provider.app.stop(grace=1)


def test_a_mount_riding_out_a_short_outage_succeeds(tmp_path: Path, world: VaultWorld, kv, unique: str) -> None:  # type: ignore[no-untyped-def]
    pod, objects = kv
    port = free_port()
    provider = start_provider(tmp_path, world, vault=VaultSettings(address=f"http://127.0.0.1:{port}"))
    results: list[object] = []
    try:
        worker = threading.Thread(target=lambda: results.append(provider.mount(pod, objects, role=unique, timeout=10)))
        worker.start()
        # Back within 0.5 s: at most 4 refused attempts (backoff 0.05-0.1, 0.1-0.2, 0.2-0.4 s),
        # one fewer than opens the breaker, which would end the Mount's retries.
        time.sleep(0.5)
        vault = Forwarder(("127.0.0.1", world.bao.port), port=port)
        worker.join(15)
        vault.close()
        assert len(results) == 1 and files_of(results[0]) == {"k": b"v"}  # type: ignore[arg-type]
    finally:
        provider.app.stop(grace=1)


def test_slower_than_the_deadline(proxied: ProviderClient, proxy: FaultProxy, kv, unique: str) -> None:  # type: ignore[no-untyped-def]
    pod, objects = kv
    proxied.mount(pod, objects, role=unique)  # logged in; now the read is slow
    proxy.add(Rule("GET", f"/v1/kv1/{unique}", delay_seconds=5))
    error, _ = failing_mount(proxied, pod, objects, unique, timeout=2)
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert "did not answer within" in error.details()
    proxy.clear()
    assert files_of(proxied.mount(pod, objects, role=unique)) == {"k": b"v"}


def test_a_mount_thread_held_past_its_deadline_still_gets_the_caller_a_final_answer(
    provider: ProviderClient,
    kv: tuple[FakePod, list[dict[str, str]]],
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Whatever holds a Mount's thread past its deadline where no socket deadline reaches
    # (a defect, a name lookup), the backstop answers the caller with a final error before
    # its own deadline: DEADLINE_EXCEEDED would leave kubelet the mount as uncertain.
    pod, objects = kv
    provider.mount(pod, objects, role=unique)
    held = threading.Event()
    real = Mounter.mount_plan

    def holding(self: Mounter, plan: MountPlan, **kwargs: Any) -> MountResult:
        held.wait(10)
        return real(self, plan, **kwargs)

    monkeypatch.setattr(Mounter, "mount_plan", holding)
    try:
        with caplog.at_level(logging.WARNING, logger="provider.dispatch"):
            error, elapsed = failing_mount(provider, pod, objects, unique, timeout=2)
    finally:
        held.set()
    assert "past its deadline; answered it with an error" in caplog.text  # the operator sees it too
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert "the Mount did not finish before its deadline" in error.details()
    assert "something else held it" in error.details()  # not blamed on Vault: its requests were cut
    # The Mount's deadline is the caller's less DEADLINE_MARGIN_SECONDS; the backstop follows it.
    assert elapsed >= 2 - DEADLINE_MARGIN_SECONDS + BACKSTOP_SECONDS - 0.05
    monkeypatch.undo()
    assert files_of(provider.mount(pod, objects, role=unique)) == {"k": b"v"}  # the thread came back


def test_sealed_vault(provider: ProviderClient, world: VaultWorld, kv, unique: str) -> None:  # type: ignore[no-untyped-def]
    pod, objects = kv
    provider.mount(pod, objects, role=unique)
    world.bao.seal()
    try:
        error, _ = failing_mount(provider, pod, objects, unique, timeout=3)
        assert error.code() == grpc.StatusCode.UNKNOWN
        assert "Vault answered 503" in error.details() and "sealed" in error.details()
        results: list[object] = []
        worker = threading.Thread(target=lambda: results.append(provider.mount(pod, objects, role=unique, timeout=15)))
        worker.start()
        time.sleep(1.0)
    finally:
        world.bao.unseal()
    worker.join(20)
    assert len(results) == 1 and files_of(results[0]) == {"k": b"v"}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "headers"),
    [(429, {"Retry-After": "1"}), (503, {"Retry-After": "1"}), (503, {}), (500, {}), (502, {}), (504, {})],
    ids=["429-retry-after", "503-retry-after", "503-standby", "500", "502", "504"],
)
def test_transient_errors_on_reads_are_retried(
    proxied: ProviderClient,
    proxy: FaultProxy,
    kv,
    unique: str,
    status: int,
    headers: dict[str, str],  # type: ignore[no-untyped-def]
) -> None:
    pod, objects = kv
    proxied.mount(pod, objects, role=unique)  # the class's read is known to be a KV secret now
    rule = proxy.add(
        Rule("GET", f"/v1/kv1/{unique}", status=status, times=3, headers=headers, body=b'{"errors":["try again"]}')
    )
    started = time.monotonic()
    assert files_of(proxied.mount(pod, objects, role=unique, timeout=10)) == {"k": b"v"}
    # The one attempt sent ahead, then the usual way's two, each followed by a wait.
    assert rule.hits == 3
    if "Retry-After" in headers:
        assert time.monotonic() - started >= 2.0  # Vault's Retry-After was honoured twice


def pki(world: VaultWorld, unique: str) -> tuple[FakePod, list[dict[str, object]], str]:
    mount = f"pki-{unique}"
    world.pki_engine(mount)
    pod = world.grant(unique, [f"{mount}/issue/web"])
    objects: list[dict[str, object]] = [
        {
            "objectName": "crt",
            "secretPath": f"{mount}/issue/web",
            "method": "PUT",
            "secretKey": "certificate",
            "secretArgs": {"common_name": "a.example.com"},
        }
    ]
    return pod, objects, f"/v1/{mount}/issue/web"


@pytest.mark.parametrize(
    "rule",
    [
        Rule("PUT", "", status=500),
        Rule("PUT", "", status=502),
        Rule("PUT", "", drop=True),
        Rule("PUT", "", delay_seconds=3),
    ],
    ids=["500", "502", "connection-dropped", "timeout"],
)
def test_writes_that_may_have_reached_vault_are_not_retried(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str, rule: Rule
) -> None:
    pod, objects, path = pki(world, unique)
    rule.path_prefix, rule.times = path, 5
    proxy.add(rule)
    error, _ = failing_mount(proxied, pod, objects, unique, timeout=2)  # type: ignore[arg-type]
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert rule.hits == 1  # exactly one attempt: the certificate may have been issued
    proxy.clear()
    assert files_of(proxied.mount(pod, objects, role=unique))["crt"].startswith(b"-----BEGIN CERTIFICATE")


def test_writes_refused_by_vault_are_retried(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str
) -> None:
    pod, objects, path = pki(world, unique)
    rule = proxy.add(Rule("PUT", path, status=503, times=2, body=b'{"errors":["Vault is sealed"]}'))
    assert files_of(proxied.mount(pod, objects, role=unique, timeout=10))["crt"].startswith(b"-----BEGIN")
    assert rule.hits == 2
    assert [m for m, p in proxy.forwarded if p == path] == ["PUT"]


def test_the_server_keeps_serving_other_pods_while_vault_is_slow_for_one(
    proxied: ProviderClient,
    proxy: FaultProxy,
    world: VaultWorld,
    kv,
    unique: str,  # type: ignore[no-untyped-def]
) -> None:
    pod, objects = kv
    world.bao.api("POST", f"kv1/{unique}-slow", {"k": "slow"})
    slow_pod = world.grant(f"{unique}s", [f"kv1/{unique}-slow"])
    proxy.add(Rule("GET", f"/v1/kv1/{unique}-slow", delay_seconds=3))
    slow = threading.Thread(
        target=lambda: proxied.mount(
            slow_pod, [{"objectName": "k", "secretPath": f"kv1/{unique}-slow", "secretKey": "k"}], role=f"{unique}s"
        )
    )
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    for _ in range(5):
        assert files_of(proxied.mount(pod, objects, role=unique)) == {"k": b"v"}
    assert time.monotonic() - started < 2
    slow.join(10)


def _failed_at_once(mount: Callable[[], object]) -> str:
    """The failed Mount's error text: UNKNOWN, within 2 s (not retried to its deadline)."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        mount()
    assert time.monotonic() - started < 2
    assert error.value.code() == grpc.StatusCode.UNKNOWN
    return str(error.value.details())


class _OtherProtocol:
    """A TCP server on loopback that answers every request as an SSH server greets: the
    Vault address a class may name by mistake (another service's port)."""

    GREETING = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"

    def __init__(self) -> None:
        self.requests = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="other-protocol", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    if conn.recv(65536):
                        self.requests += 1
                        conn.sendall(self.GREETING)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


def test_a_server_speaking_another_protocol_fails_the_mount_at_once_naming_the_address(
    provider: ProviderClient,
    kv,
    unique: str,  # type: ignore[no-untyped-def]
) -> None:
    # Not "cannot reach Vault", retried to the deadline: it was reached, it is not Vault,
    # and asking again gets the same greeting.
    pod, objects = kv
    other = _OtherProtocol()
    try:
        address = f"http://127.0.0.1:{other.port}"
        details = _failed_at_once(lambda: provider.mount(pod, objects, role=unique, vaultAddress=address, timeout=10))
        assert other.requests == 1
        assert f"the server at {address} does not answer as Vault does" in details, details
        assert "does not start with an HTTP status line" in details
        assert "vaultAddress" in details
        assert "cannot reach" not in details
        assert files_of(provider.mount(pod, objects, role=unique)) == {"k": b"v"}  # the provider serves on
    finally:
        other.close()


def test_a_redirect_to_a_node_speaking_another_protocol_names_both_and_not_the_class_address(
    proxied: ProviderClient,
    proxy: FaultProxy,
    kv,
    unique: str,  # type: ignore[no-untyped-def]
) -> None:
    # The class's address is Vault's (a standby); the active node it names is not: the
    # advice is Vault's api_addr, not the class's vaultAddress.
    pod, objects = kv
    other = _OtherProtocol()
    try:
        node = f"http://127.0.0.1:{other.port}"
        proxy.add(Rule("GET", f"/v1/kv1/{unique}", status=307, headers={"Location": f"{node}/v1/kv1/{unique}"}))
        details = _failed_at_once(lambda: proxied.mount(pod, objects, role=unique, timeout=10))
        assert f"Vault at {proxy.url} redirected to {node}, which does not answer as Vault does" in details, details
        assert "check the api_addr of Vault's nodes" in details
        assert "vaultAddress" not in details
    finally:
        other.close()


def test_a_redirect_to_a_node_that_is_down_says_who_redirected(
    proxied: ProviderClient,
    proxy: FaultProxy,
    kv,
    unique: str,  # type: ignore[no-untyped-def]
) -> None:
    # "cannot reach Vault at <a node the class never named>" sent the operator looking for an
    # address in the class; it was a standby naming an active node that is down.
    pod, objects = kv
    node = f"http://127.0.0.1:{free_port()}"
    proxy.add(Rule("GET", f"/v1/kv1/{unique}", status=307, headers={"Location": f"{node}/v1/kv1/{unique}"}))
    error, _ = failing_mount(proxied, pod, objects, unique, timeout=3)
    details = error.details()
    assert f"cannot reach Vault at {node}" in details, details
    assert f"Vault at {proxy.url} redirected there: a standby naming an active node that is down" in details
