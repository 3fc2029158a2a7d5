"""The README's path, end to end: examples/vault-setup.sh on a fresh OpenBao (as an external
Vault, with a real PostgreSQL), then every example SecretProviderClass mounted through the
provider as the examples' pod (service account app/app)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from provider.config import VaultSettings
from tests.conftest import VaultWorld, files_of, start_provider
from tests.openbao import ROOT_TOKEN, OpenBao, bao_binary
from tests.postgres import SUPERUSER, SUPERUSER_PASSWORD, Postgres

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "daemonset" / "examples"


@pytest.fixture(scope="module")
def set_up(tmp_path_factory: pytest.TempPathFactory, world: VaultWorld) -> Iterator[tuple[OpenBao, Postgres]]:
    """A fresh OpenBao configured by nothing but vault-setup.sh."""
    work = tmp_path_factory.mktemp("examples")
    postgres = Postgres()
    bao = OpenBao(work / "openbao")
    try:
        postgres.start()
        bao.start()
        ca = work / "k8s-ca.pem"
        ca.write_text(world.kube.ca_cert_pem())
        env = {
            **os.environ,
            "VAULT": bao_binary(),
            "VAULT_ADDR": bao.url,
            "VAULT_TOKEN": ROOT_TOKEN,
            "K8S_HOST": world.kube.url,
            "K8S_CA_FILE": str(ca),
            "REVIEWER_JWT": world.kube.issue_token("kube-system", "vault-reviewer"),
            "DB_CONNECTION_URL": postgres.vault_connection_url,
            "DB_USERNAME": SUPERUSER,
            "DB_PASSWORD": SUPERUSER_PASSWORD,
            "SKIP_KUBERNETES": "1",
        }
        for _ in range(2):  # running it again changes nothing and fails nothing
            result = subprocess.run(
                ["bash", str(EXAMPLES / "vault-setup.sh")], env=env, capture_output=True, text=True, timeout=120
            )
            assert result.returncode == 0, result.stderr[-2000:]
        yield bao, postgres
    finally:
        bao.stop()
        postgres.stop()


def check_example_contents(name: str, files: dict[str, bytes], postgres: Postgres) -> None:
    """What each example promises in its comment."""
    if name == "spc-sync.yaml":  # the base64 value the script stored, decoded by the provider
        assert files["secret-3"] == files["secret-2"] == b"app-user"
    elif name == "spc-pgpass.yaml":
        host, port, database, user, password = files[".pgpass"].decode().rstrip("\n").split(":")
        assert (host, port, database) == ("db.example.com", "5432", "app")
        with postgres.connect(user, password) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)
    elif name == "spc-env.yaml":
        # CONFIG_VERSION is 2: the test runs the setup script twice.
        env = b'FEATURE_FLAGS="beta"\nLOG_LEVEL="info"\nDB_PASSWORD="example-db-password"\nCONFIG_VERSION=2\n'
        assert files[".env"] == env
        assert files["db-host"] == b"db.example.com"
    elif name == "spc-tls-bundle.yaml":
        chain = x509.load_pem_x509_certificates(files["tls.crt"])
        assert chain[0].subject.rfc4514_string() == "CN=web.example.com"
        assert files["bundle.pem"] == files["tls.crt"] + files["tls.key"].strip() + b"\n"
        assert x509.load_pem_x509_certificates(files["ca-chain.pem"])[0] == chain[-1]
    elif name == "spc-all-keys.yaml":
        assert files["config/log_level"] == b"info" and files["config/feature_flags"] == b"beta"
        assert {f for f in files if f.startswith("flags/")} == {"flags/feature_flags"}
        assert json.loads(files["config.json"])["data"] == {"log_level": "info", "feature_flags": "beta"}


@pytest.fixture(scope="module")
def postgres(set_up: tuple[OpenBao, Postgres]) -> Postgres:
    return set_up[1]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("spc-*.yaml")))
def test_every_example_class_mounts_after_the_setup_script(
    tmp_path: Path, world: VaultWorld, set_up: tuple[OpenBao, Postgres], postgres: Postgres, name: str
) -> None:
    bao = set_up[0]
    spc = next(d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d and d["kind"] == "SecretProviderClass")
    params = {k: v for k, v in spc["spec"]["parameters"].items() if k not in ("objects", "roleName", "vaultAddress")}
    pod = world.kube.add_pod("app", f"web-{name.removesuffix('.yaml')}", "app")
    client = start_provider(tmp_path, world, vault=VaultSettings(address=bao.url))
    try:
        response = client.mount(pod, spc["spec"]["parameters"]["objects"], role="app", **params)
        files = files_of(response)
        objects = yaml.safe_load(spc["spec"]["parameters"]["objects"])
        written = [o for o in objects if o.get("writeFile") is not False]
        assert {f for f in files if "/" not in f} == {o["objectName"] for o in written if not o.get("expandKeys")}
        for expanded in (o["objectName"] for o in written if o.get("expandKeys")):
            assert any(f.startswith(f"{expanded}/") for f in files), expanded
        assert all(files.values())
        check_example_contents(name, files, postgres)
    finally:
        client.close()
