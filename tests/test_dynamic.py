"""Dynamic secrets without churn, proven against real OpenBao and real PostgreSQL:
users are counted in PostgreSQL and leases in OpenBao."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from provider import leases
from provider.admission import Admission
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


def test_a_kept_lease_revoked_in_vault_is_never_served_again(
    provider: ProviderClient,
    world: VaultWorld,
    postgres: Postgres,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator revokes leaked credentials (sys/leases/revoke-prefix), or the pod's token
    and its leases with it: the credentials kept for the pod are looked up before they are
    served again, and new ones are issued, never the dead ones until 2/3 of their life."""
    monkeypatch.setattr(leases, "LEASE_CHECK_SECONDS", 0.0)  # looked up on every Mount
    db = Database(world, postgres, unique, ttl="1h", max_ttl="2h")
    pod = grant_db(world, db)
    first = files_of(provider.mount(pod, db.objects(), role=unique))
    assert files_of(provider.mount(pod, db.objects(), role=unique)) == first  # alive: served as kept
    world.bao.api("PUT", f"sys/leases/revoke-prefix/{db.path}", {})
    second = files_of(provider.mount(pod, db.objects(), role=unique))
    assert second["username"] != first["username"] and logs_in(postgres, second)
    assert metric(provider, "found_revoked") == 1 and len(db.leases()) == 1
    # The pod's token revoked, and its leases with it: a new login, new credentials.
    (token,) = [slot.login.token for slot in provider.app.tokens._slots.values() if slot.login]
    world.bao.api("PUT", "auth/token/revoke", {"token": token})
    third = files_of(provider.mount(pod, db.objects(), role=unique))
    assert third["username"] not in (first["username"], second["username"]) and logs_in(postgres, third)
    assert metric(provider, "found_revoked") == 2 and len(db.leases()) == 1
    assert files_of(provider.mount(pod, db.objects(), role=unique)) == third


def test_a_lease_the_pods_token_may_not_look_up_is_served_as_kept(
    provider: ProviderClient, world: VaultWorld, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role whose tokens leave out the default policy may not look leases up: its kept
    certificate is served as before (one login more to find that out), not issued anew."""
    monkeypatch.setattr(leases, "LEASE_CHECK_SECONDS", 0.0)
    issue = world.pki_engine(f"pki-{unique}", generate_lease=True)
    pod = world.grant(unique, [issue])
    world.bao.api("PUT", f"auth/kubernetes/role/{unique}", {"token_no_default_policy": True})
    objects = [
        {
            "objectName": "crt",
            "secretPath": issue,
            "method": "PUT",
            "secretArgs": {"common_name": "a.example.com"},
            "secretKey": "certificate",
        }
    ]
    first = files_of(provider.mount(pod, objects, role=unique))
    logins = world.kube.calls["tokenreview"]
    for _ in range(3):
        assert files_of(provider.mount(pod, objects, role=unique)) == first
    assert world.kube.calls["tokenreview"] - logins == 1
    assert metric(provider, "found_revoked") == 0 and metric(provider, "issued") == 1


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


def test_the_sweep_forgets_a_deleted_pods_kept_parses(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    # A kept parse holds the pod's service-account token and the files its last Mount
    # answered: a pod found gone takes them along, not left until newer requests push them out.
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    gone = world.grant(unique, [f"kv1/{unique}"])
    stays = world.kube.add_pod(gone.namespace, f"stays-{unique}", gone.service_account)
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    for pod in (gone, stays):
        republished = provider.request(pod, objects, role=unique)  # kubelet's same request each time
        for _ in range(2):  # the second is answered from the kept parse's remembered files
            assert files_of(provider.raw_mount(republished)) == {"k": b"v"}
    parsed = provider.app.dispatcher.parsed
    assert {uid for uid, _, _ in parsed.pods()} == {gone.uid, stays.uid} and len(parsed) == 2
    # Its token pushed out of the token cache meanwhile: the sweep still finds it by its parse.
    assert provider.app.tokens.pop_where(lambda key: getattr(key, "pod_uid", None) == gone.uid)
    world.kube.delete_pod(gone)
    assert provider.app.sweeper.sweep() == 1
    assert {uid for uid, _, _ in parsed.pods()} == {stays.uid} and len(parsed) == 1
    assert provider.app.sweeper.sweep() == 0  # nothing left of it to find
    assert files_of(provider.mount(stays, objects, role=unique)) == {"k": b"v"}


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


def _ten_slow_reads(world: VaultWorld, unique: str) -> tuple[list[str], FakePod, FaultProxy]:
    """Ten KV secrets a pod may read, and a proxy to Vault holding each read of them 0.4 s."""
    paths = [f"kv1/{unique}/{i}" for i in range(10)]
    for i, path in enumerate(paths):
        world.bao.api("POST", path, {"k": f"v{i}"})
    pod = world.grant(unique, [f"kv1/{unique}/*"])
    proxy = FaultProxy(world.bao.port)
    proxy.add(Rule("GET", f"/v1/kv1/{unique}/", delay_seconds=0.4))
    return paths, pod, proxy


def test_distinct_requests_are_fetched_in_parallel_in_object_order(
    tmp_path: Path, world: VaultWorld, unique: str
) -> None:
    paths, pod, proxy = _ten_slow_reads(world, unique)
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


def test_credentials_never_outlive_the_token_that_issued_them(
    provider: ProviderClient, world: VaultWorld, postgres: Postgres, unique: str
) -> None:
    # The pod's token lives 5 s; the database lease 6 s, renewable for an hour. Vault revokes
    # the lease (and drops the user) when the token that issued it expires, whatever a
    # renewal granted.
    db = Database(world, postgres, unique, ttl="6s", max_ttl="1h")
    pod = grant_db(world, db, ttl="5s")
    first = files_of(provider.mount(pod, db.objects(), role=unique))
    logged_in = time.monotonic()
    # Past 2/3 of what the token leaves the lease, and past the token cache's re-login at
    # 80 %: a renewal now would reach past the first token's death.
    time.sleep(max(0.0, logged_in + 4.4 - time.monotonic()))
    provider.mount(pod, db.objects(), role=unique)
    time.sleep(max(0.0, logged_in + 6.8 - time.monotonic()))  # the first token and its leases are gone
    assert first["username"].decode() not in db.users()
    served = files_of(provider.mount(pod, db.objects(), role=unique))
    assert served["username"] != first["username"]
    assert served["username"].decode() in db.users()
    assert logs_in(postgres, served)


def test_the_sweep_revokes_leases_of_a_pods_earlier_token_and_counts_only_what_it_revoked(
    tmp_path: Path, world: VaultWorld, postgres: Postgres, proxy: FaultProxy, unique: str
) -> None:
    db = Database(world, postgres, unique, ttl="1h", max_ttl="2h")
    # Default-policy-like rights: renew, but no sys/leases/revoke; revoke-self is always allowed.
    world.policy(
        unique,
        f'path "{db.path}" {{ capabilities = ["read"] }}\npath "sys/leases/renew" {{ capabilities = ["update"] }}',
    )
    world.kube_role(unique, service_accounts=["app"], namespaces=["team"], policies=[unique], ttl="10s")
    gone = world.kube.add_pod("team", f"gone-{unique}", "app")
    unlucky = world.kube.add_pod("team", f"unlucky-{unique}", "app")
    provider = start_provider(tmp_path, world, lease_renew_fraction=0.9, vault=VaultSettings(address=proxy.url))
    try:
        first = files_of(provider.mount(gone, db.objects(), role=unique))
        provider.mount(unlucky, db.objects(), role=unique)
        issued = time.monotonic()
        time.sleep(max(0.0, issued + 8.4 - time.monotonic()))  # past the token's 80 %: a new login
        assert files_of(provider.mount(gone, db.objects(), role=unique)) == first  # lease of the first token
        assert metric(provider, "issued") == 2
        world.kube.delete_pod(gone)
        assert provider.app.sweeper.sweep() == 1
        give_up = time.monotonic() + 15
        while first["username"].decode() in db.users():
            assert time.monotonic() < give_up, "the first token's lease was not revoked"
            time.sleep(0.2)
        assert metric(provider, "revoked") == 1
        # Vault refuses every revocation for the next pod: nothing is counted.
        proxy.add(Rule("*", "/v1/auth/token/revoke-self", status=500, body=b'{"errors":["boom"]}'))
        world.kube.delete_pod(unlucky)
        assert provider.app.sweeper.sweep() == 1
        assert metric(provider, "revoked") == 1
    finally:
        provider.app.stop(grace=1)


def test_kv_reads_do_not_take_the_room_of_kept_credentials(tmp_path: Path, world: VaultWorld, unique: str) -> None:
    issue = world.pki_engine(f"pki-{unique}")
    args = {"common_name": "a.example.com", "ttl": "1h"}
    cert = [{"objectName": "crt", "secretPath": issue, "method": "PUT", "secretKey": "certificate", "secretArgs": args}]
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    holder = world.grant(unique, [issue, f"kv1/{unique}"])
    provider = start_provider(tmp_path, world, lease_cache_size=1)
    try:
        kept = files_of(provider.mount(holder, cert, role=unique))
        kv = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
        for i in range(30):  # many pods reading KV: nothing to keep, nothing evicted
            other = world.kube.add_pod("team", f"kv-{unique}-{i}", "app")
            provider.mount(other, kv, role=unique)
        assert len(provider.app.leases) == 1
        latecomer = world.kube.add_pod("team", f"late-{unique}", "app")
        provider.mount(latecomer, cert, role=unique)  # the cache is full of a live certificate
        assert metric(provider, "not_kept") == 1
        assert files_of(provider.mount(holder, cert, role=unique)) == kept  # never evicted
        assert metric(provider, "issued") == 1
    finally:
        provider.app.stop(grace=1)


def test_one_namespaces_certificates_cannot_take_every_other_namespaces_place(
    tmp_path: Path, world: VaultWorld, unique: str
) -> None:
    """One namespace's many-object class filled the whole lease cache; every other
    namespace then got new credentials on each Mount. Each keeps at most its share now."""
    issue = world.pki_engine(f"pki-{unique}")
    world.policy(unique, f'path "{issue}" {{ capabilities = ["update"] }}')
    greedy_ns, quiet_ns = f"greedy-{unique}", f"quiet-{unique}"
    world.kube_role(unique, service_accounts=["app"], namespaces=[greedy_ns, quiet_ns], policies=[unique])

    def certs(count: int) -> list[dict[str, object]]:
        return [
            {
                "objectName": f"c{i}",
                "secretPath": issue,
                "method": "PUT",
                "secretKey": "certificate",
                "secretArgs": {"common_name": f"c{i}.example.com", "ttl": "1h"},  # five requests, not one
            }
            for i in range(count)
        ]

    provider = start_provider(tmp_path, world, lease_cache_size=8, lease_cache_namespace_share=0.25)
    try:
        greedy = world.kube.add_pod(greedy_ns, "greedy", "app")
        first = files_of(provider.mount(greedy, certs(5), role=unique))
        again = files_of(provider.mount(greedy, certs(5), role=unique))
        assert sum(first[name] == again[name] for name in first) == 2  # its share: two of eight
        quiet = world.kube.add_pod(quiet_ns, "quiet", "app")
        kept = files_of(provider.mount(quiet, certs(1), role=unique))
        assert files_of(provider.mount(quiet, certs(1), role=unique)) == kept
        assert len(provider.app.leases) == 3 and metric(provider, "not_kept") == 6
    finally:
        provider.app.stop(grace=1)


def test_a_mounts_plain_reads_go_out_together_from_one_thread(tmp_path: Path, world: VaultWorld, unique: str) -> None:
    """With no thread to borrow (one per class), ten reads held 0.4 s each by the proxy
    still take about one round trip: they are sent before any reply is read."""
    paths, pod, proxy = _ten_slow_reads(world, unique)
    provider = start_provider(tmp_path, world, vault=VaultSettings(address=proxy.url), admission=Admission(per_class=1))
    try:
        objects = [{"objectName": f"o{i}", "secretPath": paths[i], "secretKey": "k"} for i in range(10)]
        provider.mount(pod, objects[:1], role=unique)  # log in first: measure only the reads
        started = time.monotonic()
        response = provider.mount(pod, objects, role=unique)
        elapsed = time.monotonic() - started
        assert files_of(response) == {f"o{i}": f"v{i}".encode() for i in range(10)}
        assert elapsed < 3 * 0.4, f"10 reads of 0.4 s on one thread took {elapsed:.2f} s: not sent together"
    finally:
        provider.app.stop(grace=1)
        proxy.close()


def test_kept_credentials_are_not_read_ahead(
    provider: ProviderClient, world: VaultWorld, postgres: Postgres, unique: str
) -> None:
    """Two database roles in one class: both users are issued together on the first
    Mount, then kept; remounts read neither again (a read of database creds issues one)."""
    first_db = Database(world, postgres, f"{unique}a", ttl="1h", max_ttl="2h")
    second_db = Database(world, postgres, f"{unique}b", ttl="1h", max_ttl="2h")
    objects = [
        {"objectName": "a-user", "secretPath": first_db.path, "secretKey": "username"},
        {"objectName": "b-user", "secretPath": second_db.path, "secretKey": "username"},
        {"objectName": "kv", "secretPath": f"kv1/{unique}", "secretKey": "k"},
    ]
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [first_db.path, second_db.path, f"kv1/{unique}", "sys/leases/*"])
    first = provider.mount(pod, objects, role=unique)
    for _ in range(5):
        assert files_of(provider.mount(pod, objects, role=unique)) == files_of(first)
    assert len(first_db.leases()) == 1 and len(second_db.leases()) == 1  # one user each, ever
    users = files_of(first)
    assert users["a-user"] != users["b-user"]
    assert postgres.users(users["a-user"].decode()) == {users["a-user"].decode()}  # a real role


def test_concurrent_mounts_of_one_pod_leave_one_user_per_role(
    provider: ProviderClient, world: VaultWorld, postgres: Postgres, unique: str
) -> None:
    """Mounts of one pod racing (the driver's rotation beside kubelet's republish), each
    reading ahead: whatever one of them read and the lease cache did not keep is revoked,
    so each role ends with one lease, the one served."""
    first_db = Database(world, postgres, f"{unique}a", ttl="1h", max_ttl="2h")
    second_db = Database(world, postgres, f"{unique}b", ttl="1h", max_ttl="2h")
    pod = world.grant(unique, [first_db.path, second_db.path, "sys/leases/*"])
    objects = [
        {"objectName": "a-user", "secretPath": first_db.path, "secretKey": "username"},
        {"objectName": "b-user", "secretPath": second_db.path, "secretKey": "username"},
    ]
    results: list[dict[str, bytes]] = []
    barrier = threading.Barrier(4)

    def mount() -> None:
        barrier.wait()
        results.append(files_of(provider.mount(pod, objects, role=unique)))

    threads = [threading.Thread(target=mount) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 4
    assert len({r["a-user"] for r in results}) == 1 and len({r["b-user"] for r in results}) == 1
    assert len(first_db.leases()) == 1 and len(second_db.leases()) == 1


def test_a_read_ahead_reply_is_kept_only_when_the_lease_cache_would_keep_it(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    """Two KV secrets read together: one shaped like a PKI certificate (kept until it
    expires, as an issued certificate is), one plain (read again on every Mount, and
    never through the lease cache's bookkeeping)."""
    expires = int(time.time()) + 3600
    certificate = {"certificate": "PEM", "serial_number": "1a:2b", "expiration": expires, "n": "1"}
    world.bao.api("POST", f"kv1/{unique}/cert", certificate)
    world.bao.api("POST", f"kv1/{unique}/plain", {"n": "1"})
    pod = world.grant(unique, [f"kv1/{unique}/*"])
    objects = [
        {"objectName": "cert", "secretPath": f"kv1/{unique}/cert", "secretKey": "n"},
        {"objectName": "plain", "secretPath": f"kv1/{unique}/plain", "secretKey": "n"},
    ]
    leases = provider.app.leases
    fetched: list[str] = []
    real_fetch = leases.fetch

    def fetch(key: Any, **kwargs: Any) -> Any:
        fetched.append(key.request.path)
        return real_fetch(key, **kwargs)

    leases.fetch = fetch  # type: ignore[method-assign]  # counts, then does the real thing
    assert files_of(provider.mount(pod, objects, role=unique)) == {"cert": b"1", "plain": b"1"}
    assert fetched == [f"kv1/{unique}/cert"]  # both read ahead; only the keepable one kept
    assert len(leases) == 1
    world.bao.api("POST", f"kv1/{unique}/cert", {**certificate, "n": "2"})
    world.bao.api("POST", f"kv1/{unique}/plain", {"n": "2"})
    # Now the certificate is kept (not read again) and the plain secret read alone.
    assert files_of(provider.mount(pod, objects, role=unique)) == {"cert": b"1", "plain": b"2"}
