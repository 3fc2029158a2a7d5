"""Where the provider finds the Kubernetes API and its own namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from provider import kube


def test_no_configuration_degrades(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", tmp_path / "no-sa")
    assert kube.load_config() is None
    assert kube.own_namespace(None) == "default"
    client = kube.KubeClient(None)
    assert not client.configured
    with pytest.raises(kube.KubernetesError, match="no Kubernetes API configured"):
        client.get_or_create_hmac_key(namespace="x", name="y")


def test_namespace_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "config"
    config_file.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "from-kubeconfig"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "current-context": "c",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(config_file))
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", tmp_path / "sa")
    config = kube.load_config()
    assert config is not None
    assert kube.own_namespace(config) == "from-kubeconfig"
    monkeypatch.setenv("POD_NAMESPACE", "from-env")
    assert kube.own_namespace(config) == "from-env"
    (tmp_path / "sa").mkdir()
    (tmp_path / "sa" / "namespace").write_text("from-service-account\n")
    assert kube.own_namespace(config) == "from-service-account"
