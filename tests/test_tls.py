"""TLS to Vault: verification on by default, settings from flags overridden per class."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from provider.config import TLSConfig, VaultSettings
from tests.conftest import ProviderClient, VaultWorld, configure, files_of, start_provider
from tests.openbao import OpenBao


@pytest.fixture(scope="module")
def tls_world(tmp_path_factory: pytest.TempPathFactory, world: VaultWorld) -> Iterator[VaultWorld]:
    bao = OpenBao(tmp_path_factory.mktemp("openbao-tls"), tls=True)
    bao.start()
    tls = VaultWorld(bao=bao, kube=world.kube)
    try:
        configure(tls)
        bao.api("POST", "kv1/app", {"k": "over-tls"})
        tls.grant("tls-role", ["kv1/app"], service_account="tls-app")
        yield tls
    finally:
        bao.stop()


@pytest.fixture
def client(tmp_path: Path, tls_world: VaultWorld) -> Iterator[ProviderClient]:
    provider = start_provider(tmp_path, tls_world)
    yield provider
    provider.app.stop(grace=1)


OBJECTS = [{"objectName": "k", "secretPath": "kv1/app", "secretKey": "k"}]


def mount(client: ProviderClient, world: VaultWorld, **params: str) -> dict[str, bytes]:
    pod = world.kube.add_pod("team", "tls-pod", "tls-app")
    return files_of(client.mount(pod, OBJECTS, role="tls-role", **params))


def test_unknown_certificate_is_refused_by_default(client: ProviderClient, tls_world: VaultWorld) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        mount(client, tls_world)
    assert error.value.code() == grpc.StatusCode.UNKNOWN
    assert f"TLS to Vault at {tls_world.bao.url} failed" in error.value.details()
    assert "unable to get local issuer certificate" in error.value.details()
    assert time.monotonic() - started < 5, "a refused certificate is not retried until the deadline"


def test_ca_certificate_from_the_class(client: ProviderClient, tls_world: VaultWorld) -> None:
    assert mount(client, tls_world, vaultCACertPath=str(tls_world.bao.ca_path)) == {"k": b"over-tls"}


def test_skip_verify_from_the_class(client: ProviderClient, tls_world: VaultWorld) -> None:
    assert mount(client, tls_world, vaultSkipTLSVerify="true") == {"k": b"over-tls"}


def test_ca_certificate_from_flags_and_class_override(tmp_path: Path, tls_world: VaultWorld) -> None:
    tls = TLSConfig(ca_cert=str(tls_world.bao.ca_path))
    provider = start_provider(tmp_path, tls_world, vault=VaultSettings(address=tls_world.bao.url, tls=tls))
    try:
        assert mount(provider, tls_world) == {"k": b"over-tls"}
        with pytest.raises(grpc.RpcError) as error:
            mount(provider, tls_world, vaultTLSServerName="wrong.example.com")
        assert "wrong.example.com" in error.value.details()
        assert mount(provider, tls_world, vaultTLSServerName="localhost") == {"k": b"over-tls"}
    finally:
        provider.app.stop(grace=1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to hash the CA directory")
def test_ca_directory(client: ProviderClient, tls_world: VaultWorld, tmp_path: Path) -> None:
    directory = tmp_path / "cas"
    directory.mkdir()
    digest = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(tls_world.bao.ca_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    shutil.copy(tls_world.bao.ca_path, directory / f"{digest}.0")
    assert mount(client, tls_world, vaultCADirectory=str(directory)) == {"k": b"over-tls"}
