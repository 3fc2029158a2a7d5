"""Shared fixtures: one real OpenBao and one fake Kubernetes API per test session, and a
provider per test serving on a unix socket in tmp_path."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from provider._proto import service_pb2, service_pb2_grpc
from provider.admission import Admission
from provider.app import App
from provider.config import Settings, VaultSettings
from provider.kube import KubeConfig
from provider.tenant import TENANT
from tests.fault_proxy import FaultProxy
from tests.kube_fake import FakeKubernetes, FakePod
from tests.openbao import OpenBao, enable_kubernetes_auth, free_port, pki_engine

PROVIDER_NAMESPACE = "vault-csi"


@dataclass
class VaultWorld:
    """OpenBao configured against the fake Kubernetes API."""

    bao: OpenBao
    kube: FakeKubernetes

    def policy(self, name: str, rules: str, namespace: str = "") -> None:
        self.bao.api("PUT", f"sys/policies/acl/{name}", {"policy": rules}, namespace=namespace)

    def kube_role(
        self,
        name: str,
        *,
        service_accounts: list[str],
        namespaces: list[str],
        policies: list[str],
        mount: str = "kubernetes",
        audience: str | None = "vault",
        ttl: str = "1h",
        vault_namespace: str = "",
    ) -> None:
        body: dict[str, Any] = {
            "bound_service_account_names": service_accounts,
            "bound_service_account_namespaces": namespaces,
            "token_policies": policies,
            "token_ttl": ttl,
        }
        if audience:
            body["audience"] = audience
        self.bao.api("PUT", f"auth/{mount}/role/{name}", body, namespace=vault_namespace)

    def grant(
        self,
        name: str,
        paths: list[str],
        *,
        capabilities: str = '"read", "create", "update"',
        service_account: str = "app",
        namespace: str = "team",
        **role: Any,
    ) -> FakePod:
        """A policy and a role called `name` for one service account; returns a pod using it."""
        self.policy(name, "\n".join(f'path "{p}" {{ capabilities = [{capabilities}] }}' for p in paths))
        self.kube_role(name, service_accounts=[service_account], namespaces=[namespace], policies=[name], **role)
        return self.kube.add_pod(namespace, f"pod-{name}-{uuid.uuid4().hex[:6]}", service_account)

    def enable_kubernetes_auth(self, mount: str = "kubernetes", namespace: str = "") -> None:
        enable_kubernetes_auth(self.bao, self.kube, mount=mount, namespace=namespace)

    def kv_pod(self, name: str, value: str = "v") -> tuple[FakePod, list[dict[str, str]]]:
        """A KV v1 secret kv1/<name> {k: value}, a pod allowed to read it, and its one object."""
        self.bao.api("POST", f"kv1/{name}", {"k": value})
        pod = self.grant(name, [f"kv1/{name}"])
        return pod, [{"objectName": "k", "secretPath": f"kv1/{name}", "secretKey": "k"}]

    def pki_engine(self, mount: str, *, ttl: str = "87600h", **role: Any) -> str:
        """A PKI engine with a root CA and a role `web` for example.com; returns its issue path."""
        pki_engine(self.bao, mount, ttl=ttl, **role)
        return f"{mount}/issue/web"


def configure(world: VaultWorld) -> None:
    """Kubernetes auth against the fake, KV v1 at kv1/, KV v2 at secret/, jwt auth."""
    bao = world.bao
    world.enable_kubernetes_auth()
    bao.api("POST", "sys/mounts/kv1", {"type": "kv", "options": {"version": "1"}})
    mounts = bao.api("GET", "sys/mounts")
    if "secret/" not in mounts.get("data", mounts):
        bao.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
    bao.api("POST", "sys/auth/jwt", {"type": "jwt"})
    bao.api("PUT", "auth/jwt/config", {"jwt_validation_pubkeys": [world.kube.public_key_pem]})


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultWorld]:
    kube = FakeKubernetes()
    kube.start()
    bao = OpenBao(tmp_path_factory.mktemp("openbao"))
    bao.start()
    world = VaultWorld(bao=bao, kube=kube)
    try:
        configure(world)
        yield world
    finally:
        bao.stop()
        kube.stop()


@dataclass
class ProviderClient:
    """Calls the provider the way the driver does, through its unix socket."""

    app: App
    channel: grpc.Channel
    kube: FakeKubernetes
    stub: service_pb2_grpc.CSIDriverProviderStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = service_pb2_grpc.CSIDriverProviderStub(self.channel)

    def attributes(
        self,
        pod: FakePod | None,
        objects: list[dict[str, Any]] | str,
        *,
        role: str = "kv-role",
        audience: str | None = None,
        send_token: bool = True,
        **params: str,
    ) -> str:
        attrs: dict[str, str] = {"roleName": role} if role else {}
        attrs["objects"] = objects if isinstance(objects, str) else yaml.safe_dump(objects)
        if audience is not None:
            attrs["audience"] = audience
        if pod is not None:
            attrs.update(
                {
                    "csi.storage.k8s.io/pod.name": pod.name,
                    "csi.storage.k8s.io/pod.namespace": pod.namespace,
                    "csi.storage.k8s.io/pod.uid": pod.uid,
                    "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
                    "csi.storage.k8s.io/ephemeral": "false",
                }
            )
            if send_token:
                token_audience = audience or "vault"
                token = self.kube.pod_token(pod, token_audience)
                attrs["csi.storage.k8s.io/serviceAccount.tokens"] = json.dumps(
                    {token_audience: {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}}
                )
        attrs.update(params)
        return json.dumps(attrs)

    def request(
        self,
        pod: FakePod | None,
        objects: list[dict[str, Any]] | str,
        *,
        permission: str = "420",
        target_path: str = "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/secrets/mount",
        **kwargs: Any,
    ) -> service_pb2.MountRequest:
        return service_pb2.MountRequest(
            attributes=self.attributes(pod, objects, **kwargs),
            secrets="{}",
            target_path=target_path,
            permission=permission,
        )

    def mount(
        self, pod: FakePod | None, objects: list[dict[str, Any]] | str, *, timeout: float = 30, **kwargs: Any
    ) -> service_pb2.MountResponse:
        return self.stub.Mount(self.request(pod, objects, **kwargs), timeout=timeout)

    def raw_mount(self, request: service_pb2.MountRequest, timeout: float = 30) -> service_pb2.MountResponse:
        return self.stub.Mount(request, timeout=timeout)

    def close(self) -> None:
        """Hang up and stop the provider this client started."""
        self.channel.close()
        self.app.stop(grace=1)


@contextlib.contextmanager
def as_namespace(namespace: str) -> Iterator[None]:
    """Work done for a Mount of a pod of `namespace` (the dispatcher sets TENANT so)."""
    token = TENANT.set(namespace)
    try:
        yield
    finally:
        TENANT.reset(token)


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def files_of(response: service_pb2.MountResponse) -> dict[str, bytes]:
    return {f.path: f.contents for f in response.files}


def versions_of(response: service_pb2.MountResponse) -> dict[str, str]:
    return {v.id: v.version for v in response.object_version}


def make_settings(tmp_path: Path, world: VaultWorld, **overrides: Any) -> Settings:
    vault = overrides.pop("vault", VaultSettings(address=world.bao.url))
    overrides.setdefault("health_addr", "127.0.0.1:0")
    return Settings(endpoint=str(tmp_path / "vault.sock"), vault=vault, **overrides)


def start_provider(
    tmp_path: Path, world: VaultWorld, *, admission: Admission | None = None, **overrides: Any
) -> ProviderClient:
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = make_settings(tmp_path, world, **overrides)
    app = App(
        settings, kube_config=KubeConfig.from_dict(world.kube.kubeconfig(PROVIDER_NAMESPACE)), admission=admission
    )
    app.start()
    # Like the driver's client, but allowed to receive whatever the provider may send.
    channel = grpc.insecure_channel(
        f"unix:{settings.endpoint}", options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    )
    return ProviderClient(app=app, channel=channel, kube=world.kube)


def spawn_provider(
    tmp_path: Path, world: VaultWorld, *flags: str, vault_addr: str = "", kubeconfig: bool = True, **popen: Any
) -> subprocess.Popen[Any]:
    """The provider in a process of its own, as the DaemonSet runs it (`python -m provider`),
    serving on tmp_path/vault.sock; a health port is picked unless flags name one."""
    config = tmp_path / "kubeconfig"
    if kubeconfig:
        config.write_text(json.dumps(world.kube.kubeconfig()))
    health = [] if any(f.startswith("-health-addr") for f in flags) else [f"-health-addr=127.0.0.1:{free_port()}"]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "provider",
            f"-endpoint={tmp_path / 'vault.sock'}",
            f"-vault-addr={vault_addr or world.bao.url}",
            *health,
            *flags,
        ],
        env={**os.environ, "KUBECONFIG": str(config)},
        **popen,
    )


def connect(endpoint: Path, kube: FakeKubernetes) -> ProviderClient:
    """A client for a provider running in another process (no App at hand)."""
    client = ProviderClient.__new__(ProviderClient)
    client.channel = grpc.insecure_channel(f"unix:{endpoint}")
    client.kube = kube
    client.stub = service_pb2_grpc.CSIDriverProviderStub(client.channel)
    return client


@pytest.fixture
def provider(tmp_path: Path, world: VaultWorld) -> Iterator[ProviderClient]:
    client = start_provider(tmp_path, world)
    try:
        yield client
    finally:
        client.channel.close()
        client.app.stop(grace=1)


@pytest.fixture
def proxy(world: VaultWorld) -> Iterator[FaultProxy]:
    """An HTTP proxy in front of the session's OpenBao that can answer in its place."""
    proxy = FaultProxy(world.bao.port)
    yield proxy
    proxy.close()


@pytest.fixture
def proxied(tmp_path: Path, world: VaultWorld, proxy: FaultProxy) -> Iterator[ProviderClient]:
    """A provider that reaches OpenBao through `proxy`."""
    provider = start_provider(tmp_path, world, vault=VaultSettings(address=proxy.url))
    yield provider
    provider.app.stop(grace=1)


@pytest.fixture
def unique() -> str:
    """A short unique name, so tests sharing the session's OpenBao do not collide. It starts
    with a letter: hex digits alone can read as a number in YAML (12e45678 is a float, and
    a policy named so became +inf in a class's secretArgs)."""
    return "u" + uuid.uuid4().hex[:7]


@pytest.fixture(autouse=True)
def _quiet_libraries() -> None:
    logging.getLogger("urllib3").setLevel(logging.WARNING)
