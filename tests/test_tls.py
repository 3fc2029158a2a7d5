"""TLS to Vault: verification on by default, settings from flags overridden per class."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provider.config import TLSConfig, VaultSettings
from tests.conftest import ProviderClient, VaultWorld, configure, files_of, start_provider
from tests.openbao import OpenBao, free_port
from tests.test_loop_mounts import ThreadJobs, remounter, warm


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


def test_warm_mounts_over_tls_are_answered_on_the_loop(client: ProviderClient, tls_world: VaultWorld) -> None:
    jobs = ThreadJobs(client)
    pod = tls_world.kube.add_pod("team", "tls-pod", "tls-app")
    mount = remounter(client, pod, OBJECTS, "tls-role", vaultCACertPath=str(tls_world.bao.ca_path))
    warm(mount, jobs)
    answered: list[Any] = []
    for _ in range(3):
        assert jobs.during(lambda: answered.append(mount())) == 0
    assert [files_of(response) for response in answered] == [{"k": b"over-tls"}] * 3
    tls_world.bao.api("POST", "kv1/app", {"k": "changed-over-tls"})
    try:
        assert files_of(mount()) == {"k": b"changed-over-tls"}
    finally:
        tls_world.bao.api("POST", "kv1/app", {"k": "over-tls"})


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


# Mutual TLS: a listener of OpenBao's that requires a client certificate.


@dataclass(frozen=True)
class _MutualTLS:
    world: VaultWorld
    url: str
    server_ca: Path
    client_cert: Path
    client_key: Path


def _certificate(
    directory: Path, name: str, *, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A P-256 key and certificate: a CA when `issuer` is None, else a leaf for 127.0.0.1
    signed by it. Both are written to directory/name.pem and name-key.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    certificate = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certificate, key


@pytest.fixture(scope="module")
def mutual_tls(tmp_path_factory: pytest.TempPathFactory, world: VaultWorld) -> Iterator[_MutualTLS]:
    files = tmp_path_factory.mktemp("mtls-files")
    server_ca = _certificate(files, "server-ca")
    _certificate(files, "server", issuer=server_ca)
    client_ca = _certificate(files, "client-ca")
    _certificate(files, "client", issuer=client_ca)
    port = free_port()
    listener = f"""
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{files / "server.pem"}"
  tls_key_file = "{files / "server-key.pem"}"
  tls_require_and_verify_client_cert = true
  tls_client_ca_file = "{files / "client-ca.pem"}"
}}
"""
    bao = OpenBao(tmp_path_factory.mktemp("openbao-mtls"), config=listener)
    bao.start()  # its dev listener (plain http) sets it up; the Mounts go to the mutual-TLS one
    try:
        mtls = VaultWorld(bao=bao, kube=world.kube)
        configure(mtls)
        bao.api("POST", "kv1/app", {"k": "over-mutual-tls"})
        mtls.grant("tls-role", ["kv1/app"], service_account="tls-app")
        yield _MutualTLS(
            world=mtls,
            url=f"https://127.0.0.1:{port}",
            server_ca=files / "server-ca.pem",
            client_cert=files / "client.pem",
            client_key=files / "client-key.pem",
        )
    finally:
        bao.stop()


def test_a_client_certificate_from_the_class_opens_a_mutual_tls_listener(
    client: ProviderClient, mutual_tls: _MutualTLS
) -> None:
    tls = {"vaultAddress": mutual_tls.url, "vaultCACertPath": str(mutual_tls.server_ca)}
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        mount(client, mutual_tls.world, **tls)  # no client certificate: the handshake is refused
    assert error.value.code() == grpc.StatusCode.UNKNOWN
    assert f"TLS to Vault at {mutual_tls.url} failed" in error.value.details()
    assert "if it requires a client certificate: set vaultTLSClientCertPath" in error.value.details()
    assert time.monotonic() - started < 5, "a refused handshake is not retried until the deadline"
    files = mount(
        client,
        mutual_tls.world,
        **tls,
        vaultTLSClientCertPath=str(mutual_tls.client_cert),
        vaultTLSClientKeyPath=str(mutual_tls.client_key),
    )
    assert files == {"k": b"over-mutual-tls"}


def test_a_client_certificate_from_the_flags(tmp_path: Path, mutual_tls: _MutualTLS) -> None:
    tls = TLSConfig(
        ca_cert=str(mutual_tls.server_ca),
        client_cert=str(mutual_tls.client_cert),
        client_key=str(mutual_tls.client_key),
    )
    provider = start_provider(tmp_path, mutual_tls.world, vault=VaultSettings(address=mutual_tls.url, tls=tls))
    try:
        assert mount(provider, mutual_tls.world) == {"k": b"over-mutual-tls"}
    finally:
        provider.app.stop(grace=1)
