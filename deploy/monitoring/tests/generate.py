"""Writes alerts.test.yaml: promtool unit tests of every alert in ../alerts.yaml, one case
that fires and one that does not. Run `python deploy/monitoring/tests/generate.py` after
changing the alerts; tests/test_monitoring.py checks the file is current and runs
`promtool test rules` on it.

The expected annotations are the alert's own templates with the case's labels and value
filled in (only `$labels.x`, `$value | humanizePercentage` and `$value | humanizeDuration`
are used), so a test fails when an expression does not produce the labels or the value
the case is built for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "alerts.yaml"
OUT = HERE / "alerts.test.yaml"

A = {"instance": "10.0.0.1:8080", "node": "node-a"}
B = {"instance": "10.0.0.2:8080", "node": "node-b"}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def mounts(node: dict[str, str], outcome: str, code: str, values: str) -> dict[str, str]:
    return series("vault_csi_provider_mounts_total", {**node, "outcome": outcome, "code": code}, values)


def per_second(rate: float, minutes: int = 60) -> str:
    """A counter growing `rate` per second, sampled every minute."""
    step = rate * 60
    return f"0+{step:g}x{minutes}"


# Each case: alert name, input series, the time it is evaluated at, and the labels and
# $value of the alerts expected to fire then (none for the quiet case).
CASES: list[dict[str, Any]] = [
    {
        "alert": "VaultCSIProviderMountsFailing",
        "fires": [mounts(A, "error", "NOT_FOUND", per_second(1)), mounts(A, "ok", "OK", per_second(1))],
        "expect": [(A, 0.5)],
        "quiet": [mounts(A, "error", "NOT_FOUND", per_second(0.05)), mounts(A, "ok", "OK", per_second(10))],
        "at": "20m",
    },
    {
        "alert": "VaultCSIProviderNodeFailing",
        "fires": [mounts(A, "error", "UNKNOWN", per_second(1)), mounts(B, "ok", "OK", per_second(1))],
        "expect": [(A, 1)],
        # Every node failing: not this node's problem (MountsFailing covers it).
        "quiet": [mounts(A, "error", "UNKNOWN", per_second(1)), mounts(B, "error", "UNKNOWN", per_second(1))],
        "at": "25m",
    },
    {
        "alert": "VaultCSIProviderVaultUnreachable",
        "fires": [
            series("vault_csi_provider_breaker_state", {**A, "address": "https://vault:8200", "vault_namespace": ""}, "2x20")
        ],
        "expect": [({**A, "address": "https://vault:8200"}, 2)],
        "quiet": [
            series("vault_csi_provider_breaker_state", {**A, "address": "https://vault:8200", "vault_namespace": ""}, "1x20")
        ],
        "at": "10m",
    },
    {
        "alert": "VaultCSIProviderMountsSlow",
        "fires": [
            series("vault_csi_provider_mount_duration_seconds_bucket", {**A, "le": "5.0"}, "0x60"),
            series("vault_csi_provider_mount_duration_seconds_bucket", {**A, "le": "10.0"}, per_second(1)),
            series("vault_csi_provider_mount_duration_seconds_bucket", {**A, "le": "+Inf"}, per_second(1)),
        ],
        "expect": [(A, 9.95)],  # 99th percentile inside the (5, 10] bucket
        "quiet": [
            series("vault_csi_provider_mount_duration_seconds_bucket", {**A, "le": "0.1"}, per_second(1)),
            series("vault_csi_provider_mount_duration_seconds_bucket", {**A, "le": "+Inf"}, per_second(1)),
        ],
        "at": "30m",
    },
    {
        "alert": "VaultCSIProviderLoginsFailing",
        "fires": [
            series("vault_csi_provider_logins_total", {**A, "outcome": "denied"}, per_second(1)),
            series("vault_csi_provider_logins_total", {**A, "outcome": "ok"}, per_second(1)),
        ],
        "expect": [(A, 0.5)],
        "quiet": [
            series("vault_csi_provider_logins_total", {**A, "outcome": "denied"}, per_second(0.1)),
            series("vault_csi_provider_logins_total", {**A, "outcome": "ok"}, per_second(10)),
        ],
        "at": "25m",
    },
    {
        "alert": "VaultCSIProviderLeaseChurn",
        # Reissued and never renewed (no renewed series at all): churn.
        "fires": [series("vault_csi_provider_leases_total", {**A, "event": "reissued"}, per_second(1, 120))],
        "expect": [(A, 1)],
        "quiet": [
            series("vault_csi_provider_leases_total", {**A, "event": "reissued"}, per_second(0.1, 120)),
            series("vault_csi_provider_leases_total", {**A, "event": "renewed"}, per_second(0.1, 120)),
        ],
        "at": "70m",
    },
    {
        "alert": "VaultCSIProviderBusy",
        "fires": [
            series("vault_csi_provider_mounts_refused_total", {**A, "address": "", "reason": "busy"}, per_second(1))
        ],
        "expect": [(A, 1)],
        "quiet": [
            series(
                "vault_csi_provider_mounts_refused_total",
                {**A, "address": "https://vault:8200", "reason": "vault_unreachable"},
                per_second(1),
            )
        ],
        "at": "25m",
    },
    {
        "alert": "VaultCSIProviderDown",
        "fires": [series("up", {**A, "job": "vault-csi-provider/vault-csi-provider"}, "0x20")],
        "expect": [({**A, "job": "vault-csi-provider/vault-csi-provider"}, 0)],
        "quiet": [series("up", {**A, "job": "vault-csi-provider/vault-csi-provider"}, "1x20")],
        "at": "10m",
    },
]


def humanize_percentage(value: float) -> str:
    return f"{value * 100:.4g}%"


def humanize_duration(value: float) -> str:
    return f"{value:.4g}s"  # Prometheus writes durations under a minute as seconds


def render(template: str, labels: dict[str, str], value: float) -> str:
    def fill(match: re.Match[str]) -> str:
        expression = match.group(1).strip()
        if expression.startswith("$labels."):
            return labels.get(expression.removeprefix("$labels."), "")
        if expression == "$value | humanizePercentage":
            return humanize_percentage(value)
        if expression == "$value | humanizeDuration":
            return humanize_duration(value)
        raise ValueError(f"the generator cannot render {{{{ {expression} }}}}")

    return re.sub(r"\{\{(.*?)\}\}", fill, template)


def build() -> dict[str, Any]:
    rules = {r["alert"]: r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]}
    missing = set(rules) - {case["alert"] for case in CASES}
    if missing:
        raise SystemExit(f"no test case for {sorted(missing)}")
    tests = []
    for case in CASES:
        rule = rules[case["alert"]]
        expected = []
        for labels, value in case["expect"]:
            expected.append(
                {
                    "exp_labels": {**labels, **rule.get("labels", {})},
                    "exp_annotations": {k: render(v, labels, value) for k, v in rule["annotations"].items()},
                }
            )
        for inputs, alerts in ((case["fires"], expected), (case["quiet"], [])):
            tests.append(
                {
                    "interval": "1m",
                    "input_series": inputs,
                    "alert_rule_test": [{"eval_time": case["at"], "alertname": case["alert"], "exp_alerts": alerts}],
                }
            )
    return {"rule_files": ["../alerts.yaml"], "evaluation_interval": "1m", "tests": tests}


def text() -> str:
    header = "# Generated by generate.py; run `promtool test rules alerts.test.yaml` here.\n"
    return header + yaml.safe_dump(build(), sort_keys=False, width=1000)


if __name__ == "__main__":
    OUT.write_text(text())
    print(f"wrote {len(build()['tests'])} tests to {OUT}")
