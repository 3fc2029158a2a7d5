"""Two versions of the provider, their warm 1-object Mounts taken in turn:
`python -m bench.compare REV` (REV: any git revision, e.g. HEAD or main~3).

A change worth a few tens of microseconds per Mount is below what two runs of the bench
can tell apart here (their figures wander by 5 to 15% from run to run). This runs the
working tree's provider and REV's (checked out by `git worktree` into a temporary
directory) at once, against one OpenBao, beside the lean bare Mount
(bench/bare_provider.py), and takes their Mounts in turn, in a new order each round
(bench.lean.interleaved_p50s): each p50 sees the same machine. Three providers of the same
code, measured so, agreed within 0.01 to 0.04 ms (about 1%) on this 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench import lean
from bench.__main__ import Provider, configure
from bench.classes import kv_objects
from tests.kube_fake import FakeKubernetes
from tests.openbao import OpenBao

BARE = "lean bare Mount"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("rev", help="the git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=500, help="Mounts of each per run")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        work = Path(tmp)
        tree = work / "rev"
        subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "--quiet", "--detach", str(tree), args.rev], check=True
        )
        try:
            runs = _measure(work, {"this tree": root, f"{args.rev}": tree}, args.rounds, args.runs)
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"warm 1-object Mount p50 in ms, taken in turn: {args.runs} runs of {args.rounds} rounds")
    medians = {name: statistics.median(p50s) for name, p50s in runs.items()}
    for name, p50s in runs.items():
        beside = f"{medians[name] - medians[args.rev]:+8.3f} ms vs {args.rev}" if name != args.rev else ""
        print(f"  {name:20}" + "".join(f"{p50:8.3f}" for p50 in p50s) + f"   median {medians[name]:6.3f} {beside}")
    return 0


def _measure(work: Path, trees: dict[str, Path], rounds: int, runs: int) -> dict[str, list[float]]:
    kube = FakeKubernetes()
    kube.start()
    bao = OpenBao(work / "openbao")
    providers: list[Provider] = []
    try:
        bao.start()
        configure(bao, kube)
        pod = kube.add_pod("bench", "pod-0", "bench")
        token = lean.RawVault(bao.port).login("bench", kube.pod_token(pod))
        calls: dict[str, Callable[[], object]] = {}
        for index, (name, tree) in enumerate(trees.items()):
            home = work / f"provider-{index}"
            home.mkdir()
            providers.append(Provider(home, bao, kube, cwd=tree))
            calls[name] = providers[-1].mounter(pod, kv_objects(1), "bench")
        with lean.bare_providers(bao.port, "lean") as (bare,):
            calls[BARE] = bare.mounter(["secret/data/app/0"], token)
            lean.interleaved_p50s(calls, rounds // 5)  # warm up: connections, tokens, parses
            taken = [lean.interleaved_p50s(calls, rounds) for _ in range(runs)]
    finally:
        for provider in providers:
            provider.stop()
        bao.stop()
        kube.stop()
    return {name: [run[name] for run in taken] for name in calls}


if __name__ == "__main__":
    raise SystemExit(main())
