"""deploy/monitoring: the alerts pass promtool's checks and unit tests, and a real
Prometheus scraping real providers (one node serving, one failing) answers every
dashboard query and alert expression, and fires the failure alerts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from provider.config import VaultSettings
from tests.conftest import ProviderClient, VaultWorld, http_get, start_provider
from tests.openbao import free_port
from tests.prometheus import Prometheus, binary

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yaml"
DASHBOARD = json.loads((MONITORING / "dashboard.json").read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in DASHBOARD["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([binary("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not() -> None:
    sys.path.insert(0, str(MONITORING / "tests"))
    try:
        import generate  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    assert (MONITORING / "tests" / "alerts.test.yaml").read_text() == generate.text(), "run generate.py"
    tests = yaml.safe_load((MONITORING / "tests" / "alerts.test.yaml").read_text())["tests"]
    for rule in alert_rules():
        cases = [t["alert_rule_test"][0] for t in tests if t["alert_rule_test"][0]["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in cases) and any(not c["exp_alerts"] for c in cases), rule["alert"]
    result = subprocess.run(
        [binary("promtool"), "test", "rules", "alerts.test.yaml"],
        cwd=MONITORING / "tests",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_each_alert_says_what_to_check_first() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert "First:" in rule["annotations"]["description"], rule["alert"]


def test_the_operator_rule_and_pod_monitor_match_the_rules_and_the_daemonset() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, check=True
    ).stdout
    documents = {d["kind"]: d for d in yaml.safe_load_all(rendered) if d}
    rule = documents["PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert rule["metadata"]["namespace"] == "vault-csi-provider"
    monitor = documents["PodMonitor"]
    pod = documents["DaemonSet"]["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in endpoint["relabelings"]


def test_the_dashboard_is_importable_as_is() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"node", "instance"} <= set(variables)
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'node=~"$node"' in target["expr"] and 'instance=~"$instance"' in target["expr"], panel["title"]
    titles = " ".join(panel["title"].lower() for panel in DASHBOARD["panels"])
    for topic in ("gRPC code", "latency", "vault requests", "logins", "token cache", "lease", "in flight", "breaker"):
        assert topic.lower() in titles, topic


def exported_names(metrics_text: str) -> set[str]:
    names: set[str] = set()
    for match in re.finditer(r"^# TYPE (\S+) (\S+)$", metrics_text, re.MULTILINE):
        name, kind = match.groups()
        names.add(name)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_count", f"{name}_sum"})
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(vault_csi_provider_\w+)", expr))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, world: VaultWorld) -> Iterator[dict[str, ProviderClient]]:
    """Two providers, as two nodes: node-a serves, node-b's Vault is dead."""
    a = start_provider(tmp_path_factory.mktemp("node-a"), world)
    try:
        dead = VaultSettings(address=f"http://127.0.0.1:{free_port()}")
        b = start_provider(tmp_path_factory.mktemp("node-b"), world, vault=dead)
        try:
            yield {"node-a": a, "node-b": b}
        finally:
            b.close()
    finally:
        a.close()


@pytest.fixture(scope="module")
def prometheus(nodes: dict[str, ProviderClient], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    # The shipped rules, with their `for:` waits cut to nothing: the test has seconds, not minutes.
    rules = tmp_path_factory.mktemp("rules") / "alerts.yaml"
    rules.write_text(re.sub(r"^(\s+)for: \S+$", r"\1for: 0s", RULES.read_text(), flags=re.MULTILINE))
    server = Prometheus(targets={n.app.health_address: name for name, n in nodes.items()}, rule_files=[rules])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def drive(nodes: dict[str, ProviderClient], world: VaultWorld, unique: str) -> None:
    """Good Mounts (KV, and a PKI certificate kept for its pod) on node-a; failing ones on node-b."""
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    issue = world.pki_engine(f"pki-{unique}", ttl="1h")
    pod = world.grant(unique, [f"kv1/{unique}", issue])
    kv = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    pki = [
        {
            "objectName": "crt",
            "secretPath": issue,
            "method": "PUT",
            "secretArgs": {"common_name": "a.example.com", "ttl": "30m"},
            "secretKey": "certificate",
        }
    ]
    for _ in range(12):  # over ~6 s: several scrapes (1 s apart) see the counters grow
        nodes["node-a"].mount(pod, kv, role=unique)
        nodes["node-a"].mount(pod, pki, role=unique)
        with pytest.raises(Exception):  # noqa: B017  # any gRPC error: Vault is dead for node-b
            nodes["node-b"].mount(pod, kv, role=unique, timeout=5)
        time.sleep(0.5)


def concrete(expr: str) -> str:
    return expr.replace("$node", ".*").replace("$instance", ".*").replace("$__rate_interval", "1m")


def test_a_real_prometheus_answers_every_dashboard_query_and_fires_the_failure_alerts(
    nodes: dict[str, ProviderClient], prometheus: Prometheus, world: VaultWorld, unique: str
) -> None:
    status, metrics_text = http_get(f"http://{nodes['node-a'].app.health_address}/metrics")
    assert status == 200
    exported = exported_names(metrics_text)
    for title, expr in dashboard_queries():
        assert metric_names(expr) <= exported, (title, metric_names(expr) - exported)

    # Both targets scraped before the traffic starts, so rates see the counters grow.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        up = prometheus.query("up == 1")["data"]["result"]
        if len(up) == 2:
            break
        time.sleep(0.2)
    drive(nodes, world, unique)
    pending = dict(dashboard_queries())
    answers: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for title, expr in list(pending.items()):
            reply = prometheus.query(concrete(expr))
            assert reply["status"] == "success", (title, reply)
            if reply["data"]["result"]:
                answers[title] = reply["data"]["result"]
                del pending[title]
        time.sleep(1)
    assert not pending, f"no data for: {sorted(pending)}"
    nodes_seen = {series["metric"].get("node") for series in answers["Mount failure ratio by node"]}
    assert nodes_seen == {"node-a", "node-b"}

    for rule in alert_rules():
        reply = prometheus.query(rule["expr"])
        assert reply["status"] == "success", (rule["alert"], reply)
        for name in metric_names(rule["expr"]):
            assert prometheus.query(f"count({name})")["data"]["result"], (rule["alert"], name)

    wanted = {"VaultCSIProviderMountsFailing", "VaultCSIProviderNodeFailing", "VaultCSIProviderVaultUnreachable"}
    firing: dict[str, set[str]] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alerts = prometheus.api("alerts")["data"]["alerts"]
        firing = {}
        for alert in alerts:
            if alert["state"] == "firing":
                firing.setdefault(alert["labels"]["alertname"], set()).add(alert["labels"].get("node", ""))
        if wanted <= set(firing):
            break
        time.sleep(1)
    assert wanted <= set(firing), firing
    for name in wanted:
        assert firing[name] == {"node-b"}, (name, firing[name])  # the serving node never alerts
    assert "VaultCSIProviderDown" not in firing
