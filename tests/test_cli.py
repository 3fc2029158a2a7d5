"""The command line and the daemon's life: flags, environment, socket, health, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from provider import __version__
from provider._proto import service_pb2, service_pb2_grpc
from provider.app import App
from provider.cli import build_parser, parse_duration, settings_from
from provider.config import VaultSettings
from tests.conftest import VaultWorld, files_of, http_get, make_settings, spawn_provider, start_provider
from tests.fault_proxy import FaultProxy, Rule
from tests.openbao import free_port
from tests.proxy import Forwarder


def settings(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return settings_from(build_parser().parse_args(argv), env or {})


@pytest.mark.parametrize(
    "argv",
    [["-endpoint=/x.sock"], ["-endpoint", "/x.sock"], ["--endpoint=/x.sock"], ["--endpoint", "/x.sock"]],
    ids=["single-equals", "single-space", "double-equals", "double-space"],
)
def test_go_style_flag_forms(argv: list[str]) -> None:
    assert settings(argv).endpoint == "/x.sock"


def test_defaults_match_the_reference() -> None:
    s = settings([])
    assert (s.endpoint, s.log_level, s.health_addr, s.hmac_secret_name, s.cache_size) == (
        "/tmp/vault.sock",
        "info",
        ":8080",
        "vault-csi-provider-hmac-key",
        1000,
    )
    assert (s.vault.address, s.vault.auth_mount, s.vault.namespace) == ("https://127.0.0.1:8200", "kubernetes", "")
    assert s.vault.tls.skip_verify is False


def test_booleans_and_levels() -> None:
    assert settings(["-debug"]).log_level == "debug"
    assert settings(["-debug", "-log-level=warn"]).log_level == "warn"
    assert settings(["-vault-tls-skip-verify"]).vault.tls.skip_verify is True
    assert settings(["-vault-tls-skip-verify=false"]).vault.tls.skip_verify is False
    assert settings(["-cache-size=0", "-hmac-key-ttl=2m"]).cache_size == 0
    assert settings(["-hmac-key-ttl=1m30s"]).hmac_key_ttl == 90.0
    assert parse_duration("250ms") == 0.25


def test_environment_is_overridden_by_flags() -> None:
    env = {
        "VAULT_ADDR": "https://env:8200",
        "VAULT_NAMESPACE": "env-ns",
        "VAULT_CACERT": "/env/ca.pem",
        "VAULT_CAPATH": "/env/cas",
        "VAULT_TLS_SERVER_NAME": "env.example",
        "VAULT_CLIENT_CERT": "/env/c.pem",
        "VAULT_CLIENT_KEY": "/env/k.pem",
        "VAULT_SKIP_VERIFY": "true",
    }
    from_env = settings([], env).vault
    assert (from_env.address, from_env.namespace) == ("https://env:8200", "env-ns")
    assert (from_env.tls.ca_cert, from_env.tls.ca_directory, from_env.tls.server_name) == (
        "/env/ca.pem",
        "/env/cas",
        "env.example",
    )
    assert (from_env.tls.client_cert, from_env.tls.client_key, from_env.tls.skip_verify) == (
        "/env/c.pem",
        "/env/k.pem",
        True,
    )
    flags = settings(
        ["-vault-addr=https://flag:8200", "-vault-namespace=flag-ns", "-vault-tls-skip-verify=false"], env
    ).vault
    assert (flags.address, flags.namespace, flags.tls.skip_verify) == ("https://flag:8200", "flag-ns", False)


def test_unknown_flags_and_bad_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["-no-such-flag"],
        ["-cache-size=many"],
        ["-output=xml"],
        ["-hmac-key-ttl=soon"],
        ["-lease-cache-namespace-share=0"],
        ["-lease-cache-namespace-share=1.5"],
        ["-lease-cache-namespace-share=nan"],
    ):
        with pytest.raises(SystemExit) as error:
            build_parser().parse_args(argv)
        assert error.value.code == 2
    assert "no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("output", ["json", "json-pretty", "yaml"])
def test_version_flag(output: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "provider", "-version", f"-output={output}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    if output == "yaml":
        assert f"version: {__version__}" in result.stdout
    else:
        assert json.loads(result.stdout)["version"] == __version__


def test_daemon_replaces_a_stale_socket_serves_and_stops_cleanly(tmp_path: Path, world: VaultWorld) -> None:
    endpoint = tmp_path / "vault.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(endpoint))
    stale.close()  # a socket file left behind by a killed process
    port = free_port()
    process = spawn_provider(
        tmp_path, world, f"-health-addr=127.0.0.1:{port}", "-log-level=debug", stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while http_get_safe(f"http://127.0.0.1:{port}/health/ready") != 200:
            assert time.monotonic() < deadline and process.poll() is None, "the daemon did not become ready"
            time.sleep(0.05)
        mode = os.stat(endpoint).st_mode
        assert stat.S_ISSOCK(mode) and not mode & 0o007, oct(mode)
        assert http_get(f"http://127.0.0.1:{port}/health/live")[0] == 200
        status, metrics = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "vault_csi_provider_build_info" in metrics
        with grpc.insecure_channel(f"unix:{endpoint}") as channel:
            stub = service_pb2_grpc.CSIDriverProviderStub(channel)
            version = stub.Version(service_pb2.VersionRequest(version="v1alpha1"), timeout=5)
        assert (version.version, version.runtime_name, version.runtime_version) == (
            "v1alpha1",
            "vault-csi-provider",
            __version__,
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert not endpoint.exists()
    finally:
        if process.poll() is None:
            process.kill()
        _, err = process.communicate(timeout=5)
    assert "removing stale socket" in err and "stopped" in err
    assert re.search(r"set aside \d{4,} objects made at start-up", err), err  # not walked by full collections


def http_get_safe(url: str) -> int:
    try:
        return http_get(url)[0]
    except OSError:
        return 0


def test_in_flight_mounts_finish_on_stop(tmp_path: Path, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    slow = Forwarder(("127.0.0.1", world.bao.port))
    slow.delay_seconds = 0.5
    client = start_provider(tmp_path, world, vault=VaultSettings(address=slow.url))
    results: list[object] = []
    worker = threading.Thread(
        target=lambda: results.append(
            client.mount(pod, [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}], role=unique)
        )
    )
    try:
        worker.start()
        time.sleep(0.3)  # the Mount is now waiting on the slow Vault
        client.app.stop(grace=10)
        worker.join(10)
        assert len(results) == 1 and files_of(results[0]) == {"k": b"v"}  # type: ignore[arg-type]
    finally:
        client.app.stop(grace=1)
        slow.close()


def test_endpoint_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "provider", f"-endpoint={tmp_path}/missing/vault.sock", "-health-addr=127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "KUBECONFIG": str(tmp_path / "none")},
    )
    assert result.returncode != 0
    assert f"directory {tmp_path}/missing does not exist" in result.stderr


# Drop-in flag parity: what an existing DaemonSet passes must keep working.


@pytest.mark.parametrize(
    ("argv", "attribute", "expected"),
    [
        (["-cache-size=-1"], "cache_size", 0),
        (["-cache-size=-100"], "cache_size", 0),
        (["-log-level=INFO"], "log_level", "info"),
        (["-log-level=Debug"], "log_level", "debug"),
        (["-log-level=verbose"], "log_level", "info"),
        (["-endpoint=unix:///run/csi/vault.sock"], "endpoint", "/run/csi/vault.sock"),
    ],
    ids=["cache-minus-one", "cache-negative", "level-upper", "level-mixed", "level-unknown", "endpoint-unix-url"],
)
def test_flags_as_the_reference_parses_them(argv: list[str], attribute: str, expected: object) -> None:
    assert getattr(settings(argv), attribute) == expected


def test_a_namespace_may_hold_a_quarter_of_the_lease_cache_unless_told_otherwise() -> None:
    assert settings([]).lease_cache_namespace_share == 0.25
    assert settings(["-lease-cache-namespace-share=1"]).lease_cache_namespace_share == 1.0


def test_an_endpoint_that_is_not_a_socket_path_is_refused_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "provider", "-endpoint=tcp://127.0.0.1:9000"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "must be a unix socket path (or unix:///path)" in result.stderr


def test_version_carries_the_reference_keys_and_an_empty_output_flag_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "provider", "-version", "-output="], capture_output=True, text=True, timeout=30
    )
    info = json.loads(result.stdout)
    assert {"version", "buildDate", "goVersion", "minDriverVersion"} <= info.keys()
    assert info["version"] == __version__


# The socket: never take over a live one, never remove another's.


def wait_serving(endpoint: Path, process: subprocess.Popen, seconds: float = 20) -> None:  # type: ignore[type-arg]
    give_up = time.monotonic() + seconds
    while True:
        try:
            with grpc.insecure_channel(f"unix:{endpoint}") as channel:
                service_pb2_grpc.CSIDriverProviderStub(channel).Version(service_pb2.VersionRequest(), timeout=0.5)
            return
        except grpc.RpcError:
            assert process.poll() is None and time.monotonic() < give_up, "the provider did not serve"
            time.sleep(0.05)


def test_a_second_instance_refuses_a_live_socket_and_never_removes_anothers(tmp_path: Path, world: VaultWorld) -> None:
    endpoint = tmp_path / "vault.sock"
    first = spawn_provider(tmp_path, world, "-log-level=warn")
    try:
        wait_serving(endpoint, first)
        second = spawn_provider(tmp_path, world, "-log-level=warn", stderr=subprocess.PIPE, text=True)
        _, err = second.communicate(timeout=30)
        assert second.returncode != 0
        assert "another process is serving on this socket" in err and "refusing to take it over" in err
        wait_serving(endpoint, first, 2)  # the first one still serves

        endpoint.unlink()  # an operator (or a rollout) removes the first one's socket...
        third = spawn_provider(tmp_path, world, "-log-level=warn")  # ...and another instance takes the path
        try:
            wait_serving(endpoint, third)
            first.send_signal(signal.SIGTERM)
            assert first.wait(15) == 0
            assert endpoint.exists()  # the first one left the new socket alone
            wait_serving(endpoint, third, 2)
        finally:
            third.terminate()
            third.wait(15)
        assert not endpoint.exists()  # its own socket it removes
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(5)


def test_liveness_and_readiness_follow_the_socket_file(tmp_path: Path, world: VaultWorld) -> None:
    client = start_provider(tmp_path, world)
    try:
        base = f"http://{client.app.health_address}"
        assert http_get(f"{base}/health/live")[0] == 200 and http_get(f"{base}/health/ready")[0] == 200
        Path(client.app.settings.endpoint).unlink()  # the driver can no longer dial us
        time.sleep(1.1)  # past the readiness cache
        assert http_get(f"{base}/health/live")[0] == 503
        assert http_get(f"{base}/health/ready")[0] == 503
    finally:
        client.close()


@pytest.mark.parametrize(
    ("address", "reach"),
    [(":{port}", ("127.0.0.1", "[::1]")), ("[::1]:{port}", ("[::1]",)), ("127.0.0.1:{port}", ("127.0.0.1",))],
    ids=["any-address-both-families", "ipv6-loopback", "ipv4-loopback"],
)
def test_the_health_server_listens_on_ipv4_and_ipv6(
    tmp_path: Path, world: VaultWorld, address: str, reach: tuple[str, ...]
) -> None:
    port = free_port()
    client = start_provider(tmp_path, world, health_addr=address.format(port=port))
    try:
        for host in reach:
            assert http_get(f"http://{host}:{port}/health/live") == (200, "ok\n")
    finally:
        client.close()


def test_a_health_port_in_use_is_one_clear_line_and_leaves_no_socket(tmp_path: Path, world: VaultWorld) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = spawn_provider(tmp_path, world, f"-health-addr=127.0.0.1:{port}", stderr=subprocess.PIPE, text=True)
        _, err = process.communicate(timeout=30)
    assert process.returncode != 0
    assert f"-health-addr 127.0.0.1:{port}: cannot listen: Address already in use" in err
    assert "Traceback" not in err
    assert not (tmp_path / "vault.sock").exists()


def test_two_instances_starting_together_never_both_serve(tmp_path: Path, world: VaultWorld) -> None:
    for round_ in range(4):
        directory = tmp_path / str(round_)
        directory.mkdir()
        apps = [App(make_settings(directory, world), kube_config=None) for _ in range(2)]
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def start(app: App, barrier: threading.Barrier = barrier, outcomes: list[str] = outcomes) -> None:
            barrier.wait()
            try:
                app.start()
                outcomes.append("serving")
            except SystemExit as refused:
                outcomes.append(str(refused))

        threads = [threading.Thread(target=start, args=(app,)) for app in apps]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        try:
            assert sorted(outcomes)[-1] == "serving" and outcomes.count("serving") == 1, outcomes
            assert "another process is serving on this socket" in next(o for o in outcomes if o != "serving")
            assert [p.name for p in directory.iterdir() if p.is_socket()] == ["vault.sock"]
        finally:
            for app in apps:
                app.stop(grace=0.5)


def test_a_staging_socket_left_by_a_killed_instance_is_cleaned_up(tmp_path: Path, world: VaultWorld) -> None:
    leftover = tmp_path / ".99999-deadbeef.vault-csi-staging"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(leftover))  # bound by a process that was then killed: nothing answers
    client = start_provider(tmp_path, world)
    try:
        assert not leftover.exists()
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_socket()) == ["vault.sock"]
    finally:
        client.close()


def test_mounts_still_running_when_the_provider_stops_get_a_final_answer(
    tmp_path: Path, world: VaultWorld, proxy: FaultProxy, unique: str
) -> None:
    pod, objects = world.kv_pod(unique)
    client = start_provider(tmp_path, world, vault=VaultSettings(address=proxy.url))
    client.mount(pod, objects, role=unique)  # logged in; now every read hangs
    proxy.add(Rule("GET", "/v1/kv1/", delay_seconds=14))
    codes: list[tuple[grpc.StatusCode, str]] = []

    def mount() -> None:
        try:
            client.mount(pod, objects, role=unique, timeout=25)
            codes.append((grpc.StatusCode.OK, ""))
        except grpc.RpcError as e:
            codes.append((e.code(), e.details() or ""))

    threads = [threading.Thread(target=mount) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    started = time.monotonic()
    client.app.stop(grace=3)
    for thread in threads:
        thread.join(10)
    client.channel.close()
    assert time.monotonic() - started < 5
    assert len(codes) == 4
    assert {code for code, _ in codes} == {grpc.StatusCode.UNKNOWN}, codes
    assert all("restarting; the driver retries the Mount" in details for _, details in codes)
