"""Instructions per warm Mount, counted by valgrind's callgrind: `python -m bench.instructions`.

Times on a shared 2-core machine wander by 15% from run to run; an instruction count
repeats to within 0.1 to 2% whatever else the machine does (the garbage collector's timing
moves it most), so it tells a change of a few microseconds apart. It counts the provider's
own user-space work (Python, the JSON and regular-expression engines, OpenSSL's hashing),
not the kernel's (system calls, thread wake-ups) nor grpcio's C core: a Mount is served in
process, its request handed to the servicer as grpcio would, against a real OpenBao (which
runs outside valgrind).

The script runs itself under callgrind, and zeroes and dumps the counters around each
measured loop (callgrind_control), for a 1-object and a 10-object KV class, and for cold
1-object Mounts (each by a new pod: the request parsed, a login, the read); and the same
for the lean bare Mount (bench/bare_provider.py reading with provider.http1: a grpc.aio
Mount that hands its reads to a thread and answers the bodies, nothing else; cold, it
logs in with the pod's token first), the floor in the same unit. Needs valgrind
(Debian's package). Takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

OBJECT_COUNTS = (1, 10)
WARMUP_ROUNDS = 5
COLD = "cold"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20, help="Mounts counted per class")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return _measure(args.rounds)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind: apt-get install valgrind")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}/cg.%p",
                "--dump-instr=no",
                sys.executable,
                "-m",
                "bench.instructions",
                "--inside",
                f"--rounds={args.rounds}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        counted = _dumps(Path(out))
    first, last = OBJECT_COUNTS[0], OBJECT_COUNTS[-1]
    print("instructions per Mount (callgrind; the servicer, its hand-off and the Mount thread, in process)")
    print(f"{'':34}{'provider':>10}{'lean bare':>11}{'ratio':>8}")
    for label, numbers in (
        ("warm 1-object Mount", lambda who: counted[(who, str(first))]),
        ("each extra object", lambda who: (counted[(who, str(last))] - counted[(who, str(first))]) / (last - first)),
        ("cold 1-object Mount (login, read)", lambda who: counted[(who, COLD)]),
    ):
        ours, bare = numbers("provider") / args.rounds, numbers("bare") / args.rounds
        print(f"  {label:32}{ours / 1000:9.0f}k{bare / 1000:10.0f}k{ours / bare:7.2f}x")
    return 0


def _dumps(out: Path) -> dict[tuple[str, str], int]:
    """Instructions counted by each dump named WHO-N (warm, N objects) or WHO-cold, summed
    over threads."""
    counted: dict[tuple[str, str], int] = {}
    for dump in out.glob("cg.*"):
        text = dump.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: .*?(provider|bare)-(\d+|cold)", text, re.M)
        total = re.search(r"^summary: (\d+)", text, re.M) or re.search(r"^totals: (\d+)", text, re.M)
        if trigger and total:
            key = (trigger.group(1), trigger.group(2))
            counted[key] = counted.get(key, 0) + int(total.group(1))
    labels = [str(count) for count in OBJECT_COUNTS] + [COLD]
    missing = {(who, label) for who in ("provider", "bare") for label in labels} - set(counted)
    if missing:
        raise SystemExit(f"callgrind wrote no count for {sorted(missing)}")
    return counted


def _encode(reply: Any) -> bytes:
    """The reply's bytes, as grpcio sends them: the provider's Mount answers them encoded."""
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


def _measure(rounds: int) -> int:
    import yaml

    from bench.__main__ import configure
    from bench.bare_provider import BareProvider
    from bench.classes import kv_objects
    from bench.floors import RawVault
    from provider._proto import service_pb2
    from provider.app import App
    from provider.config import Settings, VaultSettings
    from provider.kube import KubeConfig
    from provider.server import ProviderServicer
    from tests.kube_fake import FakeKubernetes
    from tests.openbao import OpenBao

    def callgrind(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)

    class Context:
        def time_remaining(self) -> float:
            return 30.0

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        kube = FakeKubernetes()
        kube.start()
        bao = OpenBao(work / "openbao")
        try:
            bao.start()
            configure(bao, kube)
            pod = kube.add_pod("bench", "pod-0", "bench")
            settings = Settings(
                endpoint=str(work / "vault.sock"), vault=VaultSettings(address=bao.url), health_addr="127.0.0.1:0"
            )
            app = App(settings, kube_config=KubeConfig.from_dict(kube.kubeconfig("kube-system")))
            servicer = ProviderServicer(app.dispatchers["vault"], app.metrics)
            bare = BareProvider(bao.port, "lean")
            raw = RawVault(bao.port)
            vault_token = raw.login("bench", kube.pod_token(pod))
            raw.close()

            async def counting(label: str, mount: Any) -> None:
                for _ in range(WARMUP_ROUNDS):
                    _encode(await mount())
                callgrind("--zero")
                for _ in range(rounds):
                    _encode(await mount())
                callgrind("--dump", label)

            def request_for(pod: Any, objects: int) -> service_pb2.MountRequest:
                attributes: dict[str, Any] = {
                    "roleName": "bench",
                    "objects": yaml.safe_dump(kv_objects(objects)),
                    "csi.storage.k8s.io/pod.name": pod.name,
                    "csi.storage.k8s.io/pod.namespace": pod.namespace,
                    "csi.storage.k8s.io/pod.uid": pod.uid,
                    "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
                    "csi.storage.k8s.io/serviceAccount.tokens": json.dumps({"vault": {"token": kube.pod_token(pod)}}),
                }
                return service_pb2.MountRequest(attributes=json.dumps(attributes), target_path="/t", permission="420")

            async def mounts() -> None:
                app.admission.bind(asyncio.get_running_loop())
                for objects in OBJECT_COUNTS:
                    request = request_for(pod, objects)
                    await counting(f"provider-{objects}", lambda request=request: servicer.Mount(request, Context()))
                    paths = [obj["secretPath"] for obj in kv_objects(objects)]
                    bare_request = service_pb2.MountRequest(
                        attributes=json.dumps({"paths": paths, "token": vault_token}),
                        target_path="/t",
                        permission="420",
                    )
                    await counting(f"bare-{objects}", lambda request=bare_request: bare.Mount(request, Context()))
                # Cold: each Mount by a new pod, its request (and token) made beforehand, as
                # the driver sends a ready one.
                new_pods = [kube.add_pod("bench", f"cold-{i}", "bench") for i in range(WARMUP_ROUNDS + rounds)]
                cold = iter([request_for(new_pod, 1) for new_pod in new_pods])
                await counting(f"provider-{COLD}", lambda: servicer.Mount(next(cold), Context()))
                paths = [obj["secretPath"] for obj in kv_objects(1)]
                bare_cold = iter(
                    [
                        service_pb2.MountRequest(
                            attributes=json.dumps({"paths": paths, "jwt": kube.pod_token(new_pod)}),
                            target_path="/t",
                            permission="420",
                        )
                        for new_pod in new_pods
                    ]
                )
                await counting(f"bare-{COLD}", lambda: bare.Mount(next(bare_cold), Context()))

            asyncio.run(mounts())
        finally:
            bao.stop()
            kube.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
