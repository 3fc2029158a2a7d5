"""The README's path, end to end: examples/vault-setup.sh on a fresh OpenBao (as an external
Vault, with a real PostgreSQL), then every example SecretProviderClass mounted through the
provider as the examples' pod (service account app/app)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from provider.config import VaultSettings
from tests.conftest import VaultWorld, files_of, start_provider
from tests.openbao import ROOT_TOKEN, OpenBao, bao_binary
from tests.postgres import SUPERUSER, SUPERUSER_PASSWORD, Postgres

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "daemonset" / "examples"


@pytest.fixture(scope="module")
def set_up(tmp_path_factory: pytest.TempPathFactory, world: VaultWorld) -> Iterator[OpenBao]:
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
        yield bao
    finally:
        bao.stop()
        postgres.stop()


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("spc-*.yaml")))
def test_every_example_class_mounts_after_the_setup_script(
    tmp_path: Path, world: VaultWorld, set_up: OpenBao, name: str
) -> None:
    spc = next(d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d and d["kind"] == "SecretProviderClass")
    params = {k: v for k, v in spc["spec"]["parameters"].items() if k not in ("objects", "roleName", "vaultAddress")}
    pod = world.kube.add_pod("app", f"web-{name.removesuffix('.yaml')}", "app")
    client = start_provider(tmp_path, world, vault=VaultSettings(address=set_up.url))
    try:
        response = client.mount(pod, spc["spec"]["parameters"]["objects"], role="app", **params)
        files = files_of(response)
        objects = yaml.safe_load(spc["spec"]["parameters"]["objects"])
        assert set(files) == {o["objectName"] for o in objects}
        assert all(files.values())
        if name == "spc-sync.yaml":  # the base64 value the script stored, decoded by the provider
            assert files["secret-3"] == files["secret-2"] == b"app-user"
    finally:
        client.close()
