"""HA failover: a real 3-node OpenBao Raft cluster behind a round-robin TCP proxy (the
Kubernetes Service), a steady Mount load over many pods, and the active node killed.
Mounts ride out the election: reads retry with backoff inside their deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from provider.config import VaultSettings
from tests.conftest import VaultWorld, files_of, start_provider
from tests.proxy import Forwarder
from tests.raft import RaftCluster

LOAD_SECONDS = 45.0
KILL_AFTER_SECONDS = 10.0
WORKERS = 5  # each mounts about once a second: ~5 Mounts/s over 25 pods
PODS = 25
MAX_MOUNTS = 600  # a bound on the loop, whatever the timing


class ClusterAPI:
    """What VaultWorld needs of an OpenBao: `api`, sent to the active node."""

    def __init__(self, cluster: RaftCluster) -> None:
        self.cluster = cluster

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, **_: Any) -> Any:
        return self.cluster.api(method, path, body)


@dataclass
class Sample:
    started: float
    ended: float
    ok: bool
    error: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RaftCluster]:
    cluster = RaftCluster(tmp_path_factory.mktemp("raft"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_mounts_survive_killing_the_active_node(tmp_path: Path, cluster: RaftCluster, world: VaultWorld) -> None:
    ha = VaultWorld(bao=ClusterAPI(cluster), kube=world.kube)  # type: ignore[arg-type]
    ha.enable_kubernetes_auth()
    cluster.api("POST", "sys/mounts/kv1", {"type": "kv", "options": {"version": "1"}})
    cluster.api("POST", "kv1/ha", {"k": "replicated"})
    ha.policy("ha", 'path "kv1/ha" { capabilities = ["read"] }')
    ha.kube_role("ha", service_accounts=["ha"], namespaces=["ha"], policies=["ha"])
    service = Forwarder([("127.0.0.1", node.api_port) for node in cluster.nodes])
    provider = start_provider(tmp_path, world, vault=VaultSettings(address=service.url))
    pods = [world.kube.add_pod("ha", f"ha-{i}", "ha") for i in range(PODS)]
    objects = [{"objectName": "k", "secretPath": "kv1/ha", "secretKey": "k"}]
    samples: list[Sample] = []
    lock = threading.Lock()
    try:
        for pod in pods:  # every pod has mounted once: the load is the driver's remounts
            assert files_of(provider.mount(pod, objects, role="ha")) == {"k": b"replicated"}
        begin = time.monotonic()
        counter = iter(range(MAX_MOUNTS))

        def worker() -> None:
            for n in counter:
                now = time.monotonic()
                if now - begin > LOAD_SECONDS:
                    return
                # Every fifth Mount is a new pod: a login (a write) as well as a read.
                pod = world.kube.add_pod("ha", f"new-{n}", "ha") if n % 5 == 0 else pods[n % PODS]
                started = time.monotonic()
                try:
                    ok = files_of(provider.mount(pod, objects, role="ha", timeout=30)) == {"k": b"replicated"}
                    error = ""
                except grpc.RpcError as e:
                    ok, error = False, f"{e.code().name}: {e.details()}"
                with lock:
                    samples.append(Sample(started, time.monotonic(), ok, error))
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

        threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
        for t in threads:
            t.start()
        time.sleep(KILL_AFTER_SECONDS)
        victim = cluster.active()
        killed_at = time.monotonic()
        victim.kill()
        survivors = [node for node in cluster.nodes if node is not victim]
        while not any(node.health() == 200 for node in survivors):
            assert time.monotonic() - killed_at < 60, "no new leader within 60 s"
            time.sleep(0.05)
        election = time.monotonic() - killed_at
        for t in threads:
            t.join(LOAD_SECONDS + 60)
    finally:
        provider.app.stop(grace=1)
        service.close()
    succeeded = [s for s in samples if s.ok]
    share = len(succeeded) / len(samples)
    worst = max(s.ended - s.started for s in samples)
    after_kill = [s for s in succeeded if s.started >= killed_at]
    logins = provider.app.metrics.registry.get_sample_value("vault_csi_provider_logins_total", {"outcome": "ok"})
    recovery = min(s.ended for s in after_kill) - killed_at if after_kill else float("inf")
    report = (
        f"HA failover: {len(samples)} Mounts, {share:.2%} succeeded, worst latency {worst:.2f} s, "
        f"election {election:.2f} s, first success after the kill at {recovery:.2f} s, {logins:.0f} logins; "
        f"failures: {sorted({s.error for s in samples if not s.ok})}"
    )
    print(report)
    assert len(samples) >= 150, report
    assert share >= 0.99, report
    # Mounts caught by the election finish within it plus the last backoff (1 s) and slack.
    assert worst <= election + 1.5, report
