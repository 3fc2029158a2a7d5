"""Dynamic secrets without churn, proven against real OpenBao and real PostgreSQL:
users are counted in PostgreSQL and leases in OpenBao."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from provider.config import VaultSettings
from tests.conftest import ProviderClient, VaultWorld, files_of, start_provider, versions_of
from tests.fault_proxy import FaultProxy, Rule
from tests.kube_fake import FakePod
from tests.postgres import SUPERUSER, SUPERUSER_PASSWORD, Postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    server.start()
    yield server
    server.stop()


class Database:
    """A database secrets engine mounted for one test, with one role."""

    def __init__(self, world: VaultWorld, postgres: Postgres, name: str, *, ttl: str, max_ttl: str) -> None:
        self.world, self.postgres, self.name = world, postgres, name
        self.mount = f"db-{name}"
        api = world.bao.api
        api("POST", f"sys/mounts/{self.mount}", {"type": "database"})
        api(
            "POST",
            f"{self.mount}/config/pg",
            {
                "plugin_name": "postgresql-database-plugin",
                "connection_url": postgres.vault_connection_url,
                "username": SUPERUSER,
                "password": SUPERUSER_PASSWORD,
                "allowed_roles": [name],
                "verify_connection": True,
            },
        )
        api(
            "POST",
            f"{self.mount}/roles/{name}",
            {
                "db_name": "pg",
                "creation_statements": [
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"
                ],
                "default_ttl": ttl,
                "max_ttl": max_ttl,
            },
        )
        self.path = f"{self.mount}/creds/{name}"

    def users(self) -> set[str]:
        return {u for u in self.postgres.users("v-") if f"-{self.name}-" in u}

    def leases(self) -> list[str]:
        reply = self.world.bao.api("LIST", f"sys/leases/lookup/{self.path}", expect=(200, 404))
        return list(reply["data"]["keys"]) if reply and "data" in reply else []

    def objects(self) -> list[dict[str, str]]:
        return [
            {"objectName": "username", "secretPath": self.path, "secretKey": "username"},
            {"objectName": "password", "secretPath": self.path, "secretKey": "password"},
        ]


def lease_expiry(world: VaultWorld, lease_id: str) -> str:
    return str(world.bao.api("PUT", "sys/leases/lookup", {"lease_id": lease_id})["data"]["expire_time"])


def logs_in(postgres: Postgres, files: dict[str, bytes]) -> bool:
    with postgres.connect(files["username"].decode(), files["password"].decode()) as conn:
        return conn.execute("SELECT current_user").fetchone() == (files["username"].decode(),)


def grant_db(world: VaultWorld, db: Database, **kwargs: object) -> FakePod:
    return world.grant(db.name, [db.path, "sys/leases/*"], **kwargs)  # type: ignore[arg-type]


def test_remounts_of_a_pod_reuse_one_database_user(
    provider: ProviderClient, world: VaultWorld, postgres: Postgres, unique: str
) -> None:
    db = Database(world, postgres, unique, ttl="1h", max_ttl="2h")
    pod = grant_db(world, db)
    first = provider.mount(pod, db.objects(), role=unique)
    assert len(db.users()) == 1 and len(db.leases()) == 1
    for _ in range(5):
        again = provider.mount(pod, db.objects(), role=unique)
        assert files_of(again) == files_of(first)
        assert versions_of(again) == versions_of(first)
    assert len(db.users()) == 1 and len(db.leases()) == 1
    assert logs_in(postgres, files_of(first))


def test_lease_is_renewed_then_reissued_past_max_ttl(
    tmp_path: Path, world: VaultWorld, postgres: Postgres, unique: str
) -> None:
    db = Database(world, postgres, unique, ttl="6s", max_ttl="12s")
    pod = grant_db(world, db)
    # Renewing at half the TTL leaves at least half a second either side of every step.
    provider = start_provider(tmp_path, world, lease_renew_fraction=0.5)
    try:
        first = provider.mount(pod, db.objects(), role=unique)
        issued = time.monotonic()  # the lease was issued just before this
        (lease,) = db.leases()
        expiry = lease_expiry(world, f"{db.path}/{lease}")

        time.sleep(max(0.0, issued + 3.5 - time.monotonic()))  # past half of 6 s: renew, same user
        renewed = provider.mount(pod, db.objects(), role=unique)
        assert files_of(renewed) == files_of(first) and versions_of(renewed) == versions_of(first)
        assert lease_expiry(world, f"{db.path}/{lease}") > expiry
        assert len(db.users()) == 1
        assert metric(provider, "renewed") == 1

        time.sleep(max(0.0, issued + 7.0 - time.monotonic()))  # renewal now falls short of 6 s (max TTL)
        capped = provider.mount(pod, db.objects(), role=unique)
        assert files_of(capped) == files_of(first)
        assert metric(provider, "renewed") == 2

        time.sleep(max(0.0, issued + 10.5 - time.monotonic()))  # the max TTL is near: new credentials
        reissued = provider.mount(pod, db.objects(), role=unique)
        assert files_of(reissued)["username"] != files_of(first)["username"]
        assert versions_of(reissued)["username"] != versions_of(first)["username"]
        assert logs_in(postgres, files_of(reissued))
        assert metric(provider, "reissued") == 1
    finally:
        provider.app.stop(grace=1)


def metric(provider: ProviderClient, event: str) -> float:
    return provider.app.metrics.registry.get_sample_value("vault_csi_provider_leases_total", {"event": event}) or 0.0


def test_two_pods_get_two_users(provider: ProviderClient, world: VaultWorld, postgres: Postgres, unique: str) -> None:
    db = Database(world, postgres, unique, ttl="1h", max_ttl="2h")
    one = grant_db(world, db)
    two = world.kube.add_pod(one.namespace, f"two-{unique}", one.service_account)
    files_one = files_of(provider.mount(one, db.objects(), role=unique))
    files_two = files_of(provider.mount(two, db.objects(), role=unique))
    assert files_one["username"] != files_two["username"]
    for _ in range(3):
        assert files_of(provider.mount(one, db.objects(), role=unique)) == files_one
        assert files_of(provider.mount(two, db.objects(), role=unique)) == files_two
    assert len(db.users()) == 2


def test_pki_certificate_is_kept_until_two_thirds_of_its_validity(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    mount = f"pki-{unique}"
    world.pki_engine(mount, ttl="1h", not_before_duration="1s")
    pod = world.grant(unique, [f"{mount}/issue/web"])
    objects = [
        {
            "objectName": "tls.crt",
            "secretPath": f"{mount}/issue/web",
            "method": "PUT",
            "secretArgs": {"common_name": "a.example.com", "ttl": "6s"},
            "secretKey": "certificate",
        }
    ]
    first = files_of(provider.mount(pod, objects, role=unique))["tls.crt"]
    start = time.monotonic()  # the certificate was issued just before this
    assert files_of(provider.mount(pod, objects, role=unique))["tls.crt"] == first
    time.sleep(max(0.0, start + 4.6 - time.monotonic()))
    second = files_of(provider.mount(pod, objects, role=unique))["tls.crt"]
    assert second != first
    assert x509.load_pem_x509_certificate(second).serial_number != x509.load_pem_x509_certificate(first).serial_number


def test_kv_changes_are_visible_on_the_next_mount(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"k": "one"}})
    pod = world.grant(unique, [f"secret/data/{unique}"])
    objects = [{"objectName": "k", "secretPath": f"secret/data/{unique}", "secretKey": "k"}]
    assert files_of(provider.mount(pod, objects, role=unique)) == {"k": b"one"}
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"k": "two"}})
    assert files_of(provider.mount(pod, objects, role=unique)) == {"k": b"two"}


def test_revocation_sweep_revokes_a_deleted_pods_credentials(
    provider: ProviderClient, world: VaultWorld, postgres: Postgres, unique: str
) -> None:
    db = Database(world, postgres, unique, ttl="1h", max_ttl="2h")
    gone = grant_db(world, db)
    stays = world.kube.add_pod(gone.namespace, f"stays-{unique}", gone.service_account)
    provider.mount(gone, db.objects(), role=unique)
    kept = files_of(provider.mount(stays, db.objects(), role=unique))
    assert len(db.users()) == 2
    assert provider.app.sweeper.sweep() == 0  # both pods still exist
    world.kube.delete_pod(gone)
    assert provider.app.sweeper.sweep() == 1
    deadline = time.monotonic() + 15
    while len(db.users()) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert db.users() == {kept["username"].decode()}
    assert len(db.leases()) == 1
    assert metric(provider, "revoked") == 1
    assert files_of(provider.mount(stays, db.objects(), role=unique)) == kept


def test_concurrent_mounts_of_one_pod_share_one_vault_call(
    tmp_path: Path, world: VaultWorld, postgres: Postgres, unique: str
) -> None:
    db = Database(world, postgres, unique, ttl="1h", max_ttl="2h")
    pod = grant_db(world, db)
    proxy = FaultProxy(world.bao.port)
    proxy.add(Rule("GET", f"/v1/{db.path}", delay_seconds=0.5))
    provider = start_provider(tmp_path, world, vault=VaultSettings(address=proxy.url))
    try:
        results: list[dict[str, bytes]] = []
        threads = [
            threading.Thread(target=lambda: results.append(files_of(provider.mount(pod, db.objects(), role=unique))))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 4 and all(r == results[0] for r in results)
        assert len(db.users()) == 1
        assert [p for _, p in proxy.forwarded if p.startswith(f"/v1/{db.path}")] == [f"/v1/{db.path}"]
    finally:
        provider.app.stop(grace=1)
        proxy.close()


def test_distinct_requests_are_fetched_in_parallel_in_object_order(
    tmp_path: Path, world: VaultWorld, unique: str
) -> None:
    paths = [f"kv1/{unique}/{i}" for i in range(10)]
    for i, path in enumerate(paths):
        world.bao.api("POST", path, {"k": f"v{i}"})
    pod = world.grant(unique, [f"kv1/{unique}/*"])
    proxy = FaultProxy(world.bao.port)
    proxy.add(Rule("GET", f"/v1/kv1/{unique}/", delay_seconds=0.4))
    provider = start_provider(tmp_path, world, vault=VaultSettings(address=proxy.url))
    try:
        objects = [{"objectName": f"o{9 - i}", "secretPath": paths[9 - i], "secretKey": "k"} for i in range(10)]
        provider.mount(pod, objects[:1], role=unique)  # log in first: measure only the reads
        started = time.monotonic()
        response = provider.mount(pod, objects, role=unique)
        elapsed = time.monotonic() - started
        assert [f.path for f in response.files] == [o["objectName"] for o in objects]
        assert files_of(response)["o3"] == b"v3"
        assert elapsed < 10 * 0.4 / 2, f"10 reads of 0.4 s took {elapsed:.2f} s: not parallel"
        with pytest.raises(grpc.RpcError) as error:
            provider.mount(
                pod,
                [
                    *objects[:2],
                    {"objectName": "x", "secretPath": f"kv1/{unique}/nope"},
                    {"objectName": "y", "secretPath": f"kv1/{unique}/nope2"},
                ],
                role=unique,
            )
        assert "2 objects failed" in error.value.details()
        assert 'object "x"' in error.value.details() and 'object "y"' in error.value.details()
    finally:
        provider.app.stop(grace=1)
        proxy.close()


def test_token_is_renewed_by_login_before_it_expires(tmp_path: Path, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"], ttl="3s")
    provider = start_provider(tmp_path, world)
    try:
        objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
        provider.mount(pod, objects, role=unique)
        time.sleep(2.6)  # past 80 % of the token's 3 s TTL
        provider.mount(pod, objects, role=unique)
        registry = provider.app.metrics.registry
        assert registry.get_sample_value("vault_csi_provider_logins_total", {"outcome": "ok"}) == 2
        assert not registry.get_sample_value(
            "vault_csi_provider_vault_requests_total", {"operation": "read", "status": "403"}
        )
    finally:
        provider.app.stop(grace=1)


def test_leased_replies_are_never_shared_between_pods_of_one_service_account(
    provider: ProviderClient, world: VaultWorld, postgres: Postgres, unique: str
) -> None:
    db = Database(world, postgres, unique, ttl="1h", max_ttl="2h")
    pods = [grant_db(world, db)]
    pods += [world.kube.add_pod(pods[0].namespace, f"p{i}-{unique}", pods[0].service_account) for i in range(4)]
    seen: dict[str, str] = {}
    threads = [
        threading.Thread(
            target=lambda p=pod: seen.__setitem__(
                p.uid, files_of(provider.mount(p, db.objects(), role=unique))["username"].decode()
            )
        )
        for pod in pods
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(seen) == 5 and len(set(seen.values())) == 5
    assert db.users() == set(seen.values())
