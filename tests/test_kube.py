"""Where the provider finds the Kubernetes API and its own namespace."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from provider import kube
from tests.kube_fake import FakeKubernetes


@pytest.fixture(scope="module")
def kube_fake() -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes()
    fake.start()
    yield fake
    fake.stop()


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


def kubeconfig_for(fake: FakeKubernetes, user: dict[str, Any]) -> dict[str, Any]:
    config = fake.kubeconfig()
    config["users"][0]["user"] = user
    return config


def test_calls_reach_the_api_with_the_kubeconfig_token(kube_fake: FakeKubernetes) -> None:
    client = kube.KubeClient(kube.KubeConfig.from_dict(kube_fake.kubeconfig()))
    try:
        key = client.get_or_create_hmac_key(namespace="vault-csi", name="hmac-test")
        assert len(key) == kube.HMAC_KEY_BYTES
        assert client.get_or_create_hmac_key(namespace="vault-csi", name="hmac-test") == key  # read, not made again
        pod = kube_fake.add_pod("team", "web-1", "app")
        assert client.pod_uid(namespace="team", name="web-1") == pod.uid
        assert client.pod_uid(namespace="team", name="gone") is None
        # A name is one path segment whatever it holds: no way to another resource.
        assert client.pod_uid(namespace="team", name="../../namespaces/team/pods/web-1") is None
        token = client.create_token(
            namespace="team", service_account="app", audience="vault", pod_name="web-1", pod_uid=pod.uid
        )
        assert kube_fake.review(token, ["vault"])["authenticated"] is True
    finally:
        client.close()


def test_a_token_file_is_read_again_as_the_kubelet_rotates_it(
    kube_fake: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("expired-token\n")
    client = kube.KubeClient(kube.KubeConfig.from_dict(kubeconfig_for(kube_fake, {"tokenFile": str(token_file)})))
    try:
        with pytest.raises(kube.KubernetesError, match="Kubernetes answered 401"):
            client.pod_uid(namespace="team", name="any")
        token_file.write_text(kube_fake.admin_token + "\n")
        with pytest.raises(kube.KubernetesError, match="Kubernetes answered 401"):
            client.pod_uid(namespace="team", name="any")  # still the token read a moment ago
        monkeypatch.setattr(kube, "TOKEN_FILE_SECONDS", 0.0)
        assert client.pod_uid(namespace="team", name="any") is None  # the rotated token is used
    finally:
        client.close()


def test_in_cluster_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("t")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = kube.KubeConfig.in_cluster(tmp_path)
    assert config is not None
    assert config.server == "https://[fd00::1]:443"
    assert (config.token_file, config.tls.ca_cert) == (str(tmp_path / "token"), str(tmp_path / "ca.crt"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert kube.KubeConfig.in_cluster(tmp_path) is None


def test_inline_certificates_are_written_privately(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    data = {
        "clusters": [
            {"name": "c", "cluster": {"server": "https://k8s.example:6443", "certificate-authority-data": b64(pem)}}
        ],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [
            {"name": "u", "user": {"client-certificate-data": b64(pem), "client-key-data": b64(b"key"), "token": ""}}
        ],
        "current-context": "c",
    }
    config = kube.KubeConfig.from_dict(data)
    for path, content in ((config.tls.ca_cert, pem), (config.tls.client_cert, pem), (config.tls.client_key, b"key")):
        assert Path(path).read_bytes() == content
        assert Path(path).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"exec": {"command": "aws"}}, "exec plugin"),
        ({"auth-provider": {"name": "gcp"}}, "exec plugin or auth provider"),
    ],
)
def test_unsupported_kubeconfig_users_are_named(user: dict[str, Any], message: str) -> None:
    config = {
        "clusters": [{"name": "c", "cluster": {"server": "https://k8s.example"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": user}],
        "current-context": "c",
    }
    with pytest.raises(kube.KubeConfigError, match=message):
        kube.KubeConfig.from_dict(config)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
