"""`make dashboard`: the README's picture of deploy/monitoring/dashboard.json, from a real run.

Two providers (as two nodes) serve KV and PKI Mounts against a real OpenBao while a real
Prometheus scrapes them; node-b also gets a class whose Vault is dead and a role that is
refused. Then every dashboard panel's queries run over the window (query_range) and the
answers are drawn as an SVG grid like Grafana's. Every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
import threading
import time
from html import escape
from pathlib import Path
from typing import Any

from bench.__main__ import Provider, configure
from bench.classes import kv_objects, pki_object
from tests.kube_fake import FakeKubernetes
from tests.openbao import OpenBao, free_port
from tests.prometheus import Prometheus

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((ROOT / "deploy" / "monitoring" / "dashboard.json").read_text())
OUT = ROOT / "docs" / "dashboard.svg"
SECONDS = 150  # traffic; the picture covers it
STEP = 5
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff7383", "#b877d9", "#ff9830", "#8ab8ff", "#96d98d"]


def traffic(nodes: dict[str, Provider], kube: FakeKubernetes, stop: threading.Event) -> None:
    pods = [kube.add_pod("bench", f"dash-{i}", "bench") for i in range(12)]
    kv = kv_objects(3)
    pki = [pki_object("30s")]
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    rounds = 0
    while not stop.is_set() and rounds < 10_000:
        rounds += 1
        elapsed = time.monotonic() - started
        for index, pod in enumerate(pods):
            node = nodes["node-a"] if index % 2 else nodes["node-b"]
            with contextlib.suppress(Exception):
                node.mount(pod, kv, "bench", timeout=10)
                if index % 3 == 0:
                    node.mount(pod, pki, "bench", timeout=10)
            if elapsed > SECONDS / 3 and index % 4 == 0:  # node-b's Vault for one class dies
                with contextlib.suppress(Exception):
                    nodes["node-b"].mount(pod, kv, "bench", timeout=5, vaultAddress=dead)
            if elapsed > SECONDS / 2 and index % 6 == 0:  # a class with a role Vault refuses
                with contextlib.suppress(Exception):
                    nodes["node-a"].mount(pod, kv, "no-such-role", timeout=5)
        time.sleep(0.5)


def series_of(prometheus: Prometheus, expr: str, start: float, end: float) -> list[tuple[dict[str, str], list[float]]]:
    concrete = expr.replace("$node", ".*").replace("$instance", ".*").replace("$__rate_interval", "30s")
    reply = prometheus.api("query_range", query=concrete, start=str(start), end=str(end), step=str(STEP))
    if reply.get("status") != "success":
        raise SystemExit(f"query failed: {concrete}: {reply}")
    count = int((end - start) // STEP) + 1
    out = []
    for result in reply["data"]["result"]:
        values = [math.nan] * count
        for stamp, value in result["values"]:
            slot = round((float(stamp) - start) / STEP)
            if 0 <= slot < count:
                values[slot] = float(value)
        out.append((result["metric"], values))
    return out


def legend(template: str, metric: dict[str, str]) -> str:
    return (
        "".join(
            metric.get(part[2:-2].strip(), "") if part.startswith("{{") else part
            for part in re.split(r"(\{\{[^}]*\}\})", template)
        ).strip()
        or "value"
    )


def draw(panels: list[dict[str, Any]], start: float, end: float) -> str:
    width, cell_h, gap = 1200, 210, 12
    cell_w = (width - 3 * gap) // 2
    rows = math.ceil(len(panels) / 2)
    height = rows * (cell_h + gap) + gap + 34
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
        f'<rect width="{width}" height="{height}" fill="#111217"/>',
        f'<text x="{gap}" y="24" fill="#d8d9da" font-size="16">{escape(DASHBOARD["title"])} — a real run '
        f"({int(end - start)} s, two nodes; node-b loses one class's Vault, a refused role joins)</text>",
    ]
    for index, panel in enumerate(panels):
        x = gap + (index % 2) * (cell_w + gap)
        y = 34 + gap + (index // 2) * (cell_h + gap)
        parts.append(f'<rect x="{x}" y="{y}" width="{cell_w}" height="{cell_h}" fill="#181b1f" stroke="#2c3235"/>')
        parts.append(f'<text x="{x + 8}" y="{y + 18}" fill="#d8d9da" font-size="13">{escape(panel["title"])}</text>')
        lines = panel["lines"]
        finite = [v for _, values in lines for v in values if not math.isnan(v)]
        top = max(finite, default=1.0) or 1.0
        plot_x, plot_y, plot_w, plot_h = x + 48, y + 28, cell_w - 60, cell_h - 78
        parts.append(
            f'<text x="{x + 6}" y="{plot_y + 8}" fill="#8e8e8e" font-size="10">{top:.3g}</text>'
            f'<text x="{x + 6}" y="{plot_y + plot_h}" fill="#8e8e8e" font-size="10">0</text>'
            f'<line x1="{plot_x}" y1="{plot_y + plot_h}" x2="{plot_x + plot_w}" y2="{plot_y + plot_h}" '
            'stroke="#2c3235"/>'
        )
        for number, (name, values) in enumerate(lines[:8]):
            color = PALETTE[number % len(PALETTE)]
            points = []
            for slot, value in enumerate(values):
                if math.isnan(value):
                    continue
                px = plot_x + plot_w * slot / max(len(values) - 1, 1)
                py = plot_y + plot_h - plot_h * min(value / top, 1.0)
                points.append(f"{px:.1f},{py:.1f}")
            if points:
                parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{" ".join(points)}"/>')
            lx = x + 8 + (number % 4) * (cell_w // 4)
            ly = y + cell_h - 30 + (number // 4) * 14
            parts.append(
                f'<rect x="{lx}" y="{ly - 8}" width="10" height="3" fill="{color}"/>'
                f'<text x="{lx + 14}" y="{ly - 4}" fill="#c7d0d9" font-size="10">{escape(name[:30])}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vault-csi-dashboard-") as tmp:
        work = Path(tmp)
        kube = FakeKubernetes()
        kube.start()
        bao = OpenBao(work / "openbao")
        bao.start()
        nodes: dict[str, Provider] = {}
        prometheus = None
        try:
            configure(bao, kube)
            for name in ("node-a", "node-b"):
                (work / name).mkdir()
                nodes[name] = Provider(work / name, bao, kube)
            prometheus = Prometheus(targets={p.health: n for n, p in nodes.items()}, rule_files=[], interval="2s")
            prometheus.start()
            stop = threading.Event()
            driver = threading.Thread(target=traffic, args=(nodes, kube, stop))
            start = time.time()
            driver.start()
            time.sleep(SECONDS)
            stop.set()
            driver.join(60)
            end = time.time()
            time.sleep(3)
            panels = []
            for panel in DASHBOARD["panels"]:
                lines = []
                for target in panel["targets"]:
                    for metric, values in series_of(prometheus, target["expr"], start, end):
                        lines.append((legend(target["legendFormat"], metric), values))
                panels.append({"title": panel["title"], "lines": lines})
            OUT.parent.mkdir(exist_ok=True)
            OUT.write_text(draw(panels, start, end))
            print(f"wrote {OUT} ({len(panels)} panels, {sum(len(p['lines']) for p in panels)} series)")
            return 0
        finally:
            if prometheus is not None:
                prometheus.stop()
            for provider in nodes.values():
                provider.stop()
            bao.stop()
            kube.stop()


if __name__ == "__main__":
    raise SystemExit(main())
