"""The bench's table against lean floors (bench/floors.py), median of several runs, and the
same Mounts through a proxy adding about 1 ms of round trip (bench/delay_proxy.py)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.classes import kv_objects
from bench.floors import ParallelReads, RawVault, sequential

__all__ = ["COLD_ROUNDS", "RUNS", "RawVault", "delayed_case", "lean_table"]
from provider._proto import service_pb2
from tests.openbao import free_port

RUNS = 3
ROUNDS = 200  # per measurement and run; every loop is bounded by these
COLD_ROUNDS = 30
DELAY_SECONDS = 0.0005  # each direction: ~1 ms more per round trip


def p50_ms(call: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def medians(measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Each figure's median over RUNS runs of `measure`."""
    runs = [measure() for _ in range(RUNS)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def cpu_ms_per_call(provider: Any, call: Callable[[], object], rounds: int) -> float:
    before = provider.cpu_seconds()
    for _ in range(rounds):
        call()
    return (provider.cpu_seconds() - before) * 1000 / rounds


def thread_cpu_ms_per_call(call: Callable[[], object], rounds: int) -> float:
    before = time.thread_time()
    for _ in range(rounds):
        call()
    return (time.thread_time() - before) * 1000 / rounds


def line(name: str, value: float, unit: str, target: str) -> None:
    print(f"  {name:<66} {value:7.2f}{unit:<3} {target}")


def lean_table(provider: Any, bao: Any, kube: Any, pods: list[Any], token: str, jwts: Callable[[], str]) -> None:
    """The issue's table: warm, cold and 10-object Mounts over lean floors; CPU per Mount
    and per extra object. Median over RUNS runs of p50s."""
    one, ten = kv_objects(1), kv_objects(10)
    paths = [f"secret/data/app/{i}" for i in range(10)]
    raw = RawVault(bao.port)
    parallel = ParallelReads(bao.port, paths, token)
    warm_pod = pods[0]
    provider.mount(warm_pod, one, "bench")
    provider.mount(warm_pod, ten, "bench")
    cold_pods = iter(pods[1:])

    def noop() -> object:
        return provider.stub.Version(service_pb2.VersionRequest(version="v1alpha1"))

    def measure() -> dict[str, float]:
        return {
            "read": p50_ms(lambda: raw.read(paths[0], token), ROUNDS),
            "noop": p50_ms(noop, ROUNDS),
            "login": p50_ms(lambda: raw.login("bench", jwts()), COLD_ROUNDS),
            "ten_reads": p50_ms(parallel, ROUNDS // 2),
            "warm": p50_ms(lambda: provider.mount(warm_pod, one, "bench"), ROUNDS),
            "warm_ten": p50_ms(lambda: provider.mount(warm_pod, ten, "bench"), ROUNDS // 2),
            "cold": p50_ms(lambda: provider.mount(next(cold_pods), one, "bench"), COLD_ROUNDS),
            "cpu_noop": cpu_ms_per_call(provider, noop, ROUNDS),
            "cpu_read": thread_cpu_ms_per_call(lambda: raw.read(paths[0], token), ROUNDS),
            "cpu_one": cpu_ms_per_call(provider, lambda: provider.mount(warm_pod, one, "bench"), ROUNDS),
            "cpu_ten": cpu_ms_per_call(provider, lambda: provider.mount(warm_pod, ten, "bench"), ROUNDS // 2),
        }

    try:
        m = medians(measure)
    finally:
        raw.close()
        parallel.close()
    print(f"lean floors (http.client kept-alive; median of {RUNS} runs of p50s)")
    line("raw Vault read", m["read"], "ms", "")
    line("no-op gRPC Version over the socket", m["noop"], "ms", "")
    line("raw login (kubernetes auth + TokenReview)", m["login"], "ms", "")
    line("10 raw reads from 10 threads, each its own connection", m["ten_reads"], "ms", "")
    print("provider against them")
    line("warm 1-object Mount / (no-op + raw read)", m["warm"] / (m["noop"] + m["read"]), "x", "target <= 1.3x")
    line(
        "cold Mount / (no-op + raw read + raw login)",
        m["cold"] / (m["noop"] + m["read"] + m["login"]),
        "x",
        "target <= 1.3x",
    )
    line(
        "warm 10-object Mount / (no-op + 10 parallel raw reads)",
        m["warm_ten"] / (m["noop"] + m["ten_reads"]),
        "x",
        "target <= 1.2x",
    )
    line("provider CPU per warm 1-object Mount", m["cpu_one"], "ms", "target <= 0.5 ms")
    line("provider CPU per extra object in a Mount", (m["cpu_ten"] - m["cpu_one"]) / 9, "ms", "target <= 0.15 ms")
    print("what bounds the CPU targets (same run)")
    line("provider CPU per no-op gRPC Version (grpcio's own cost)", m["cpu_noop"], "ms", "")
    line("CPU per raw http.client read (the floor's client, this process)", m["cpu_read"], "ms", "")


def delayed_case(provider: Any, bao: Any, pod: Any, token: str) -> None:
    """The same Mounts with ~1 ms more round trip: a proxy in its own process delays each
    direction DELAY_SECONDS, as a Vault on another node would."""
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "bench.delay_proxy", str(port), str(bao.port), str(DELAY_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        address = {"vaultAddress": f"http://127.0.0.1:{port}"}
        one = [{"objectName": "p", "secretPath": "secret/data/app/0", "secretKey": "password"}]
        ten = [
            {"objectName": f"p{i}", "secretPath": f"secret/data/app/{i}", "secretKey": "password"} for i in range(10)
        ]
        paths = [f"secret/data/app/{i}" for i in range(10)]
        raw = RawVault(port)
        provider.mount(pod, one, "bench", **address)
        provider.mount(pod, ten, "bench", **address)

        def measure() -> dict[str, float]:
            return {
                "read": p50_ms(lambda: raw.read(paths[0], token), ROUNDS // 2),
                "noop": p50_ms(
                    lambda: provider.stub.Version(service_pb2.VersionRequest(version="v1alpha1")), ROUNDS // 2
                ),
                "sequential": p50_ms(sequential(raw, paths, token), ROUNDS // 4),
                "warm": p50_ms(lambda: provider.mount(pod, one, "bench", **address), ROUNDS // 2),
                "warm_ten": p50_ms(lambda: provider.mount(pod, ten, "bench", **address), ROUNDS // 4),
            }

        try:
            m = medians(measure)
        finally:
            raw.close()
        print(f"through a proxy adding {2 * DELAY_SECONDS * 1000:.0f} ms per round trip (median of {RUNS} runs)")
        line("raw Vault read through the proxy", m["read"], "ms", "")
        line("the reference's shape: 10 sequential raw reads", m["sequential"], "ms", "")
        line("warm 1-object Mount", m["warm"], "ms", "")
        line("warm 10-object Mount", m["warm_ten"], "ms", "")
        line("warm 1-object Mount / (no-op + raw read)", m["warm"] / (m["noop"] + m["read"]), "x", "target <= 1.3x")
        line("warm 10-object Mount / warm 1-object Mount", m["warm_ten"] / m["warm"], "x", "target <= 1.5x")
        line("warm 10-object Mount / 10 sequential raw reads", m["warm_ten"] / m["sequential"], "x", "")
    finally:
        proxy.terminate()
        proxy.wait(10)
