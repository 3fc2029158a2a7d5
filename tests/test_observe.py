"""Health, metrics, error codes and log formats: what operators see."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from provider.errors import (
    ConfigError,
    KubernetesError,
    ObjectError,
    ProviderError,
    ResponseTooLarge,
    VaultBadResponse,
    VaultLoginDenied,
    VaultNotFound,
    VaultPermissionDenied,
    VaultUnreachable,
)
from provider.health import ReadinessCheck
from provider.server import status_code
from tests.conftest import ProviderClient, VaultWorld, spawn_provider
from tests.conftest import http_get as get

# kubelet treats these as "maybe still in progress": the provider must never answer them.
NON_FINAL = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (VaultLoginDenied("x"), grpc.StatusCode.UNAUTHENTICATED),
        (VaultPermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (VaultNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (ResponseTooLarge("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (KubernetesError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (VaultUnreachable("x"), grpc.StatusCode.UNKNOWN),
        (VaultBadResponse("x"), grpc.StatusCode.UNKNOWN),
        (ObjectError([("a", VaultNotFound("x")), ("b", ConfigError("y"))]), grpc.StatusCode.NOT_FOUND),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, ProviderError) else "",
)
def test_every_error_has_one_final_code(error: ProviderError, code: grpc.StatusCode) -> None:
    assert status_code(error) == code
    assert status_code(error) not in NON_FINAL


def test_readiness_is_cached_and_a_failing_probe_means_not_ready() -> None:
    now = [0.0]
    calls: list[int] = []

    def probe() -> bool:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("socket gone")
        return True

    ready = ReadinessCheck(probe, clock=lambda: now[0])
    assert ready() and ready() and len(calls) == 1
    now[0] = 1.5
    assert not ready() and len(calls) == 2
    now[0] = 3.0
    assert ready() and len(calls) == 3


def test_metrics_count_mounts_and_never_carry_pods_paths_or_values(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    canary = f"canary-{unique}"
    world.bao.api("POST", f"kv1/{unique}", {"k": canary})
    pod = world.grant(unique, [f"kv1/{unique}*"])
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    provider.mount(pod, objects, role=unique)
    provider.mount(pod, objects, role=unique)
    with pytest.raises(grpc.RpcError):
        provider.mount(pod, [{"objectName": "k", "secretPath": f"kv1/{unique}-missing"}], role=unique)
    status, text = get(f"http://{provider.app.health_address}/metrics")
    assert status == 200
    for family in [
        'vault_csi_provider_mounts_total{code="OK",outcome="ok",provider="vault"} 2.0',
        'vault_csi_provider_mounts_total{code="NOT_FOUND",outcome="error",provider="vault"} 1.0',
        "vault_csi_provider_mount_duration_seconds_bucket",
        'vault_csi_provider_vault_requests_total{operation="read",status="200"} 2.0',
        'vault_csi_provider_vault_requests_total{operation="read",status="404"} 1.0',
        'vault_csi_provider_vault_requests_total{operation="login",status="200"} 1.0',
        "vault_csi_provider_vault_request_duration_seconds_bucket",
        'vault_csi_provider_logins_total{outcome="ok"} 1.0',
        'vault_csi_provider_token_cache_total{result="hit"} 2.0',
        'vault_csi_provider_token_cache_total{result="miss"} 1.0',
        "vault_csi_provider_mounts_in_flight 0.0",
        "vault_csi_provider_build_info{",
    ]:
        assert family in text, family
    for private in (pod.name, pod.namespace + "/", unique, canary, pod.uid):
        assert private not in text


def test_health_endpoints(provider: ProviderClient) -> None:
    base = f"http://{provider.app.health_address}"
    assert get(f"{base}/health/live") == (200, "ok\n")
    assert get(f"{base}/health/ready") == (200, "ok\n")
    assert get(f"{base}/nope")[0] == 404


def test_json_log_format(tmp_path: Path, world: VaultWorld) -> None:
    endpoint = tmp_path / "vault.sock"
    process = spawn_provider(tmp_path, world, "-log-format=json", kubeconfig=False, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not endpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.terminate()
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    entries = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any("serving on unix:" in e["message"] for e in entries)
