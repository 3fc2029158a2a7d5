"""Size limits, isolation between pods, Kubernetes API faults, restarts without leaks, and
no secret material anywhere."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from provider._proto import service_pb2, service_pb2_grpc
from tests.conftest import (
    ProviderClient,
    VaultWorld,
    configure,
    connect,
    files_of,
    spawn_provider,
    start_provider,
    versions_of,
)
from tests.openbao import OpenBao


def test_a_reply_over_the_grpc_limit_is_refused_naming_objects(
    tmp_path: Path, world: VaultWorld, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    big = "x" * (2 * 1024 * 1024 + 512 * 1024)
    world.bao.api("POST", f"kv1/{unique}", {"a": big, "b": big, "small": "s"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    objects = [{"objectName": n, "secretPath": f"kv1/{unique}", "secretKey": n} for n in ("a", "b", "small")]
    provider = start_provider(tmp_path / "default", world)
    try:
        with pytest.raises(grpc.RpcError) as error:
            provider.mount(pod, objects, role=unique)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = error.value.details()
        assert "over the 4194304-byte response limit (-max-response-bytes)" in details
        # Past the limit after "b": "small" is not built.
        assert f'objects: "a" ({len(big)} bytes), "b" ({len(big)} bytes)' in details
        assert "by the first 2 (the rest were not built)" in details and '"small"' not in details
    finally:
        provider.app.stop(grace=1)
    roomy = start_provider(tmp_path / "roomy", world, max_response_bytes=16 * 1024 * 1024)
    try:
        with caplog.at_level(logging.WARNING):
            files = files_of(roomy.mount(pod, objects, role=unique))
        assert len(files["a"]) == len(big) and files["small"] == b"s"  # whole, never truncated
        assert "objects over 1 MiB cannot be synced to a Kubernetes Secret: 'a', 'b'" in caplog.text
    finally:
        roomy.app.stop(grace=1)


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, world: VaultWorld) -> Iterator[tuple[VaultWorld, Path]]:
    workdir = tmp_path_factory.mktemp("openbao-audit")
    audit_log = workdir / "audit.log"
    bao = OpenBao(
        workdir,
        config=f'audit "file" "isolation" {{\n  options {{\n    file_path = "{audit_log}"\n'
        '    hmac_accessor = "false"\n  }\n}\n',
    )
    bao.start()
    audited_world = VaultWorld(bao=bao, kube=world.kube)
    try:
        configure(audited_world)
        yield audited_world, audit_log
    finally:
        bao.stop()


def test_fifty_pods_only_ever_see_their_own_secrets(
    tmp_path: Path, audited: tuple[VaultWorld, Path], unique: str
) -> None:
    world, audit_log = audited
    pods = []
    for i in range(50):
        world.bao.api("POST", f"kv1/iso/{unique}/{i}", {"k": f"secret-of-{i}"})
        pods.append(
            world.grant(
                f"iso-{unique}-{i}", [f"kv1/iso/{unique}/{i}"], service_account=f"sa-{i}", namespace=f"ns-{i % 5}"
            )
        )
    provider = start_provider(tmp_path, world)
    results: dict[int, list[bytes]] = defaultdict(list)
    errors: list[str] = []

    def mount_ten_times(i: int) -> None:
        for _ in range(10):
            try:
                # Every pod asks for its own path, and tries a neighbour's too: Vault must refuse that.
                files = files_of(
                    provider.mount(
                        pods[i],
                        [{"objectName": "mine", "secretPath": f"kv1/iso/{unique}/{i}", "secretKey": "k"}],
                        role=f"iso-{unique}-{i}",
                    )
                )
                results[i].append(files["mine"])
            except grpc.RpcError as e:
                errors.append(e.details())

    threads = [threading.Thread(target=mount_ten_times, args=(i,)) for i in range(50)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with pytest.raises(grpc.RpcError) as refused:
            provider.mount(
                pods[0],
                [{"objectName": "theirs", "secretPath": f"kv1/iso/{unique}/1", "secretKey": "k"}],
                role=f"iso-{unique}-0",
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        provider.app.stop(grace=1)
    assert errors == []
    assert {i: set(values) for i, values in results.items()} == {i: {f"secret-of-{i}".encode()} for i in range(50)}
    assert all(len(values) == 10 for values in results.values())
    accessors: dict[str, set[str]] = defaultdict(set)
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        for auth in (entry.get("auth"), (entry.get("response") or {}).get("auth")):
            if auth and auth.get("accessor") and "service_account_name" in (auth.get("metadata") or {}):
                accessors[auth["accessor"]].add(
                    f"{auth['metadata'].get('service_account_namespace')}/{auth['metadata']['service_account_name']}"
                )
    ours = {a: sas for a, sas in accessors.items() if any(sa.split("/")[1].startswith("sa-") for sa in sas)}
    assert len(ours) >= 50  # one token per pod at least
    assert all(len(sas) == 1 for sas in ours.values()), {a: s for a, s in ours.items() if len(s) > 1}


@pytest.fixture
def kube_fault(world: VaultWorld) -> Iterator[VaultWorld]:
    yield world
    world.kube.fail_status = None
    world.kube.delay_seconds = 0.0


@pytest.mark.parametrize("fault", ["403", "500", "slow"])
def test_kubernetes_api_faults(
    tmp_path: Path, kube_fault: VaultWorld, unique: str, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    world = kube_fault
    pod, objects = world.kv_pod(unique)
    provider = start_provider(tmp_path, world, hmac_secret_name=f"hmac-{unique}")
    if fault == "slow":
        world.kube.delay_seconds = 4.0  # beyond the provider's 3 s API timeout
    else:
        world.kube.fail_status = int(fault)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            response = provider.mount(pod, objects, role=unique, timeout=10)
        assert files_of(response) == {"k": b"v"} and versions_of(response) == {"k": ""}
        assert "object versions will be empty" in caplog.text
        assert time.monotonic() - started < 5
        fresh = world.kube.add_pod(pod.namespace, f"fresh-{unique}", pod.service_account)  # no cached token
        with pytest.raises(grpc.RpcError) as error:  # the TokenRequest fallback has no token to give
            provider.mount(fresh, objects, role=unique, send_token=False, audience="vault", timeout=10)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert 'no service account token for audience "vault"' in error.value.details()
        assert f"cannot create a token for service account team/{pod.service_account}" in error.value.details()
        world.kube.fail_status, world.kube.delay_seconds = None, 0.0
        assert files_of(provider.mount(fresh, objects, role=unique, send_token=False, audience="vault")) == {"k": b"v"}
    finally:
        provider.app.stop(grace=1)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_or_thread_leaks_across_a_thousand_failing_mounts(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}*"])
    missing = [{"objectName": "k", "secretPath": f"kv1/{unique}-missing", "secretKey": "k"}]
    invalid = service_pb2.MountRequest(attributes='{"roleName": 3}', target_path="/t", permission="420")

    def fail(i: int) -> None:
        with pytest.raises(grpc.RpcError):
            if i % 2:
                provider.raw_mount(invalid)
            else:
                provider.mount(pod, missing, role=unique)

    warm = [threading.Thread(target=lambda: [fail(i) for i in range(20)]) for _ in range(16)]
    for t in warm:
        t.start()
    for t in warm:
        t.join(60)
    fds, threads = fd_count(), threading.active_count()
    for i in range(1000):
        fail(i)
    assert fd_count() - fds <= 2, f"{fd_count() - fds} descriptors leaked"
    assert threading.active_count() - threads <= 1, f"{threading.active_count() - threads} threads leaked"
    assert files_of(
        provider.mount(pod, [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}], role=unique)
    ) == {"k": b"v"}


def test_sigkill_during_mounts_then_restart_serves_at_once(tmp_path: Path, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    endpoint = tmp_path / "vault.sock"

    def spawn() -> subprocess.Popen[bytes]:
        return spawn_provider(tmp_path, world, "-log-level=warn")

    def serving_after(process: subprocess.Popen[bytes], started: float) -> float:
        while time.monotonic() - started < 20:
            try:
                # A channel of its own (no shared subchannel): the load's reconnect backoff
                # must not be what this measures.
                with grpc.insecure_channel(
                    f"unix:{endpoint}", options=[("grpc.use_local_subchannel_pool", 1)]
                ) as channel:
                    service_pb2_grpc.CSIDriverProviderStub(channel).Version(service_pb2.VersionRequest(), timeout=0.5)
                return time.monotonic() - started
            except grpc.RpcError:
                assert process.poll() is None
                time.sleep(0.02)
        raise AssertionError("the provider never served")

    first = spawn()
    serving_after(first, time.monotonic())
    client = connect(endpoint, world.kube)
    channel = client.channel
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            with contextlib.suppress(grpc.RpcError):  # the provider is killed under this load
                client.mount(pod, objects, role=unique, timeout=2)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert endpoint.exists()  # the killed process left its socket behind
    started = time.monotonic()
    second = spawn()
    try:
        elapsed = serving_after(second, started)
        stop.set()
        for w in workers:
            w.join(10)
        grpc.channel_ready_future(channel).result(timeout=10)  # the load's channel, after its backoff
        assert files_of(client.mount(pod, objects, role=unique)) == {"k": b"v"}
        print(f"restart after SIGKILL: serving {elapsed * 1000:.0f} ms after spawn")
        assert elapsed < 3.0
    finally:
        stop.set()
        channel.close()
        second.terminate()
        second.wait(15)


def test_no_secret_material_anywhere(
    provider: ProviderClient, world: VaultWorld, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    canary = f"canary-{unique}-value"
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"k": canary, "n": 7}})
    pod = world.grant(unique, [f"secret/data/{unique}"])
    intruder = world.kube.add_pod("team", f"intruder-{unique}", "intruder")
    good = [
        {"objectName": "k", "secretPath": f"secret/data/{unique}", "secretKey": "k"},
        {"objectName": "whole", "secretPath": f"secret/data/{unique}"},
        {"objectName": "b64", "secretPath": f"secret/data/{unique}", "secretKey": "k", "encoding": "base64"},
    ]
    jwts: list[str] = []
    details: list[str] = []
    with caplog.at_level(1):
        for _ in range(2):
            attributes = provider.attributes(pod, good[:2], role=unique)
            jwts.append(
                json.loads(json.loads(attributes)["csi.storage.k8s.io/serviceAccount.tokens"])["vault"]["token"]
            )
            provider.raw_mount(service_pb2.MountRequest(attributes=attributes, target_path="/t", permission="420"))
        for who, objects in ((pod, good), (intruder, good[:1]), (pod, [{**good[0], "secretKey": "missing"}])):
            attributes = provider.attributes(who, objects, role=unique)
            jwts.append(
                json.loads(json.loads(attributes)["csi.storage.k8s.io/serviceAccount.tokens"])["vault"]["token"]
            )
            with pytest.raises(grpc.RpcError) as error:
                provider.raw_mount(service_pb2.MountRequest(attributes=attributes, target_path="/t", permission="420"))
            details.append(error.value.details())
    tokens = [slot.login.token for slot in provider.app.tokens._slots.values() if slot.login]
    assert tokens and jwts
    with urllib.request.urlopen(f"http://{provider.app.health_address}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    reprs = [repr(provider.app.tokens._slots), repr(provider.app.leases._slots)]
    config = provider.app.mounter.parse(
        __import__("provider.mount", fromlist=["MountRequest"]).MountRequest(
            attributes=provider.attributes(pod, good, role=unique), target_path="/t", permission="420"
        )
    )
    reprs.append(repr(config))
    login = provider.app.tokens._slots[next(iter(provider.app.tokens._slots))].login
    reprs.append(repr(login))
    haystacks = {
        "logs": caplog.text + "".join(repr(r.args) for r in caplog.records),
        "errors": "\n".join(details),
        "metrics": metrics,
        "reprs": "\n".join(reprs),
    }
    assert "mount pod=team/" in haystacks["logs"] and len(caplog.records) > 10
    for where, text in haystacks.items():
        for material in [canary, *jwts, *(j.split(".")[2] for j in jwts), *tokens]:
            assert material not in text, f"secret material in {where}"
