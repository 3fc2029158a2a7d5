from __future__ import annotations

from tests.conftest import ProviderClient, VaultWorld, files_of, versions_of


def test_kv2_secret_is_mounted(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"password": "s3cret", "n": 42}})
    world.policy(unique, f'path "secret/data/{unique}" {{ capabilities = ["read"] }}')
    world.kube_role(unique, service_accounts=["app"], namespaces=["team"], policies=[unique])
    pod = world.kube.add_pod("team", f"web-{unique}", "app")
    response = provider.mount(
        pod,
        [
            {"objectName": "password", "secretPath": f"secret/data/{unique}", "secretKey": "password"},
            {"objectName": "n", "secretPath": f"secret/data/{unique}", "secretKey": "n"},
        ],
        role=unique,
    )
    assert files_of(response) == {"password": b"s3cret", "n": b"42"}
    assert set(versions_of(response)) == {"password", "n"}
    assert all(versions_of(response).values())
