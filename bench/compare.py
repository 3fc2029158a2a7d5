"""Two versions of the provider, their warm 1-object Mounts taken in turn:
`python -m bench.compare REV` (REV: any git revision, e.g. HEAD or main~3); with `--cold`,
their cold Mounts (each by a new pod: a login, then the read) beside the lean bare cold Mount.

A change worth a few tens of microseconds per Mount is below what two runs of the bench
can tell apart here (their figures wander by 5 to 15% from run to run). This runs the
working tree's provider and REV's (checked out by `git worktree` into a temporary
directory) at once, against one OpenBao, beside the lean bare Mount
(bench/bare_provider.py), and takes their Mounts in turn, in a new order each round
(bench.lean.interleaved_p50s): each p50 sees the same machine. Each run starts both
providers anew, in turns of which starts first (the one started first measured up to
0.04 ms slower), and the result is the mean of the runs' differences: over an even number
of runs the start order cancels out. Two providers of the same code, measured so, differ
by 0.00 to 0.02 ms on the mean (each run within 0.03 ms) on this 2-core machine: what
this can tell apart.
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
THIS = "this tree"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("rev", help="the git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=500, help="Mounts of each per run")
    parser.add_argument("--runs", type=int, default=4, help="an even number: each order of start as often")
    parser.add_argument("--cold", action="store_true", help="cold Mounts, each by a new pod")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        work = Path(tmp)
        tree = work / "rev"
        checkout = subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "--quiet", "--detach", str(tree), args.rev],
            capture_output=True,
            text=True,
        )
        if checkout.returncode != 0:
            raise SystemExit(f"cannot check out {args.rev!r}: {checkout.stderr.strip()}")
        try:
            runs = _measure(work, {THIS: root, args.rev: tree}, args.rounds, args.runs, cold=args.cold)
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=False)
    kind = "cold 1-object Mount (a new pod each)" if args.cold else "warm 1-object Mount"
    print(f"{kind} p50 in ms, taken in turn: {args.runs} runs of {args.rounds} rounds")
    for name, p50s in runs.items():
        print(f"  {name:20}" + "".join(f"{p50:8.3f}" for p50 in p50s) + f"   median {statistics.median(p50s):6.3f}")
    for name in (THIS, BARE):
        differences = [ours - theirs for ours, theirs in zip(runs[name], runs[args.rev], strict=True)]
        print(
            f"  {name} - {args.rev}: mean {statistics.fmean(differences):+.3f} ms "
            f"(runs {', '.join(f'{d:+.3f}' for d in differences)})"
        )
    return 0


def _measure(work: Path, trees: dict[str, Path], rounds: int, runs: int, *, cold: bool) -> dict[str, list[float]]:
    kube = FakeKubernetes()
    kube.start()
    bao = OpenBao(work / "openbao")
    taken: dict[str, list[float]] = {name: [] for name in (*trees, BARE)}
    try:
        bao.start()
        configure(bao, kube)
        pod = kube.add_pod("bench", "pod-0", "bench")
        token = lean.RawVault(bao.port).login("bench", kube.pod_token(pod))
        with lean.bare_providers(bao.port, "lean") as (bare,):
            bare_one = bare.mounter(["secret/data/app/0"], token)
            for run in range(runs):
                order = list(trees) if run % 2 == 0 else list(reversed(trees))
                providers: list[Provider] = []
                # Cold: a new pod per round (warm-up rounds too), its request and token made
                # beforehand, shared by the providers (each logs in on its own).
                new_pods = (
                    [kube.add_pod("bench", f"cold-{run}-{i}", "bench") for i in range(rounds + rounds // 5)]
                    if cold
                    else []
                )
                try:
                    calls: dict[str, Callable[[], object]] = {BARE: bare_one}
                    if cold:
                        jwts = iter([kube.pod_token(new_pod) for new_pod in new_pods])
                        calls[BARE] = bare.cold_mounter(["secret/data/app/0"], jwts)
                    for name in order:  # started in this order, each from its own tree
                        home = work / f"run-{run}-{len(providers)}"
                        home.mkdir()
                        providers.append(Provider(home, bao, kube, cwd=trees[name]))
                        if cold:
                            mounts = iter(
                                [providers[-1].mounter(new_pod, kv_objects(1), "bench") for new_pod in new_pods]
                            )
                            calls[name] = lambda mounts=mounts: next(mounts)()
                        else:
                            calls[name] = providers[-1].mounter(pod, kv_objects(1), "bench")
                    lean.interleaved_p50s(calls, rounds // 5, seed=-1 - run)  # warm up: tokens, parses
                    for name, p50 in lean.interleaved_p50s(calls, rounds, seed=run).items():
                        taken[name].append(p50)
                finally:
                    for provider in providers:
                        provider.stop()
    finally:
        bao.stop()
        kube.stop()
    return taken


if __name__ == "__main__":
    raise SystemExit(main())
