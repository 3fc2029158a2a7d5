"""The manifests render, validate against Kubernetes' schemas offline, and agree with
the code (socket, health port and paths, every argument a real flag)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from provider.cli import build_parser, settings_from
from provider.health import create_health_server
from provider.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.33.0"
SPC_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "secretproviderclass-v1.json").read_text())


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: run scripts/install-system-deps"
    rendered = subprocess.run([kubectl, "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(rendered) if d]


def validate(document: dict[str, Any]) -> None:
    if document["kind"] == "SecretProviderClass":
        jsonschema.validate(document, SPC_SCHEMA)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize(DEPLOY / "daemonset")


def only(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (document,) = [d for d in documents if d["kind"] == kind]
    return document


def test_base_renders_and_every_object_validates(base: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in base)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Namespace",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    for document in base:
        validate(document)
        assert document["metadata"]["labels"]["app.kubernetes.io/name"] == "vault-csi-provider"


def test_revocation_overlay_renders_validates_and_adds_pod_reading() -> None:
    documents = kustomize(DEPLOY / "overlays" / "revocation")
    for document in documents:
        validate(document)
    args = only(documents, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "-revoke-leases-of-deleted-pods" in args
    roles = [d for d in documents if d["kind"] == "ClusterRole"]
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]} in [r for c in roles for r in c["rules"]]


@pytest.mark.parametrize("name", sorted(p.name for p in (DEPLOY / "daemonset" / "examples").glob("*.yaml")))
def test_examples_validate(name: str) -> None:
    for document in yaml.safe_load_all((DEPLOY / "daemonset" / "examples" / name).read_text()):
        validate(document)


def test_rbac_is_least_privilege(base: list[dict[str, Any]]) -> None:
    role = only(base, "Role")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["vault-csi-provider-hmac-key"],
            "verbs": ["get"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    assert only(base, "ClusterRole")["rules"] == [
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}
    ]


def test_daemonset_agrees_with_the_code(base: list[dict[str, Any]]) -> None:
    daemonset = only(base, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = settings_from(build_parser().parse_args(container["args"]), {})  # every arg is a real flag
    defaults = settings_from(build_parser().parse_args([]), {})
    assert settings.hmac_secret_name == defaults.hmac_secret_name
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["hostPath"] == {"path": "/var/run/secrets-store-csi-providers", "type": "DirectoryOrCreate"}
    assert settings.endpoint == f"{mount['mountPath']}/vault.sock"
    port = int(settings.health_addr.rsplit(":", 1)[1])
    assert container["ports"] == [{"name": "health", "containerPort": port, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "health"}
    assert container["resources"]["requests"] == container["resources"]["limits"] == {"cpu": "50m", "memory": "100Mi"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert {"operator": "Exists"} in pod["tolerations"]
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"


def test_probe_paths_are_served(base: list[dict[str, Any]]) -> None:
    container = only(base, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    server = create_health_server("127.0.0.1:0", ready=lambda: True, metrics=Metrics())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        for probe in ("livenessProbe", "readinessProbe"):
            path = container[probe]["httpGet"]["path"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_driver_values_pair_with_the_provider() -> None:
    values = yaml.safe_load((DEPLOY / "daemonset" / "driver-values.yaml").read_text())
    assert values["tokenRequests"] == [{"audience": "vault"}]
    assert values["syncSecret"]["enabled"] is True and values["enableSecretRotation"] is True
    assert values["rotationPollInterval"]


def test_dockerfile_runs_the_console_script() -> None:
    dockerfile = (DEPLOY / "daemonset" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["vault-csi-provider"]' in dockerfile
    assert "slim" in dockerfile
    assert 'vault-csi-provider = "provider.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_the_base_moves_to_another_namespace_with_every_binding() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "tests" / "overlays" / "renamespaced")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    namespaced = [o for o in objects if o["kind"] not in ("ClusterRole", "ClusterRoleBinding", "Namespace")]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"csi"}
    assert only(objects, "Namespace")["metadata"]["name"] == "csi"
    bindings = [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert len(bindings) == 3
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "vault-csi-provider", "namespace": "csi"}]
    (container,) = only(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/platform/vault-csi-provider:0.1.0"


def test_the_daemonset_is_node_critical_with_probe_timeouts_and_a_namespace_that_admits_it(
    base: list[dict[str, Any]],
) -> None:
    pod = only(base, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    (container,) = pod["containers"]
    assert container["livenessProbe"]["timeoutSeconds"] > 1 and container["readinessProbe"]["timeoutSeconds"] > 1
    labels = only(base, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"  # hostPath needs it


def test_the_wheel_the_image_installs_holds_the_daemon_and_its_entrypoint(tmp_path: Path) -> None:
    # The Dockerfile builds this wheel and runs its console script; CI cannot build images,
    # so build the wheel the same way and run what it holds, away from the source tree.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
        names = set(archive.namelist())
    sources = {f"provider/{p.relative_to(ROOT / 'provider')}" for p in (ROOT / "provider").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    (entry_points,) = unpacked.glob("*.dist-info/entry_points.txt")
    assert "vault-csi-provider = provider.cli:main" in entry_points.read_text()

    def from_the_wheel(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,  # not the source tree: only the unpacked wheel provides `provider`
            env={**os.environ, "PYTHONPATH": str(unpacked)},
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = from_the_wheel("import sys; from provider.cli import main; sys.exit(main(['-version']))")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"]
    assert str(unpacked) in from_the_wheel("import provider; print(provider.__file__)").stdout
