"""A warm Mount whose replies are the bytes of its last one answers the files it made then
(mount.MountPlan.memory): the pod's reads still go to Vault, with its own token, every time."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from provider import server
from provider.mount import REMEMBERED_BYTES, _LastMount
from provider.vault import Secret, VaultError
from tests.conftest import ProviderClient, VaultWorld, files_of, start_provider, versions_of
from tests.fault_proxy import FaultProxy, Rule


class Decodes:
    """Counts the replies the provider decodes (VaultClient.answer), then does the real thing."""

    def __init__(self, client: ProviderClient) -> None:
        self.count = 0
        vault = client.app.dispatcher.mounter._vault
        real = vault.answer

        def answer(read: Any, reply: Any) -> Secret | VaultError:
            self.count += 1
            return real(read, reply)

        vault.answer = answer  # type: ignore[method-assign]

    def during(self, call: Any) -> int:
        before = self.count
        call()
        return self.count - before


@pytest.fixture
def decodes(provider: ProviderClient) -> Decodes:
    return Decodes(provider)


def kv2(world: VaultWorld, name: str, **values: str) -> None:
    world.bao.api("POST", f"secret/data/{name}", {"data": values})


def kept_plans(client: ProviderClient) -> list[Any]:
    """The plans of the parses the provider keeps (dispatch.ParsedMounts)."""
    kept = client.app.dispatcher.parsed._kept._kept.values()
    return [dispatched.plan for dispatched, _ in kept if dispatched.plan is not None]


def remounter(client: ProviderClient, pod: Any, objects: list[dict[str, Any]], role: str) -> Any:
    """The pod's Mount as kubelet repeats it: the very same request (its token included),
    so its parse, and the plan that remembers, is kept."""
    request = client.request(pod, objects, role=role)
    return lambda: client.raw_mount(request)


def test_unchanged_replies_are_not_decoded_again_and_changes_show_at_once(
    provider: ProviderClient, world: VaultWorld, unique: str, decodes: Decodes
) -> None:
    kv2(world, unique, user="admin", password="one")
    pod = world.grant(unique, [f"secret/data/{unique}"])
    objects = [
        {"objectName": "user", "secretPath": f"secret/data/{unique}", "secretKey": "user"},
        {"objectName": "password", "secretPath": f"secret/data/{unique}", "secretKey": "password"},
        {"objectName": "dsn", "template": "{{ .Objects.user.Secrets.user }}:{{ .Objects.password.Secrets.password }}"},
    ]
    mount = remounter(provider, pod, objects, unique)
    first = mount()
    assert files_of(first)["dsn"] == b"admin:one"
    assert decodes.during(mount) == 1  # read ahead from now on (the usual way first), and remembered
    for _ in range(3):
        assert decodes.during(mount) == 0
    assert mount() == first
    # A new value is read, decoded and answered on the very next Mount.
    kv2(world, unique, user="admin", password="two")
    changed = mount()
    assert files_of(changed)["dsn"] == b"admin:two"
    assert versions_of(changed)["password"] != versions_of(first)["password"]
    assert versions_of(changed)["user"] == versions_of(first)["user"]
    # A new KV version with the same values: decoded again (its metadata changed), same files.
    kv2(world, unique, user="admin", password="two")
    assert decodes.during(mount) == 1
    assert mount() == changed and decodes.during(mount) == 0


def test_a_remembered_result_is_encoded_once(
    provider: ProviderClient, world: VaultWorld, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server keeps the reply's bytes with the remembered result: Mounts answered from
    memory send them as they are, without making and encoding the MountResponse again."""
    pod, objects = world.kv_pod(unique)
    mount = remounter(provider, pod, objects, unique)
    for _ in range(3):
        first = mount()
    made: list[object] = []
    response = server.service_pb2.MountResponse
    monkeypatch.setattr(server.service_pb2, "MountResponse", lambda **fields: made.append(fields) or response(**fields))
    assert [mount() for _ in range(3)] == [first] * 3
    assert made == []
    [plan] = kept_plans(provider)
    assert plan.memory.last.result.encoded == [first.SerializeToString()]


def test_a_policy_taken_away_fails_the_next_mount(
    provider: ProviderClient, world: VaultWorld, unique: str, decodes: Decodes
) -> None:
    """The pod's reads go to Vault with its token on every Mount, remembered or not."""
    pod, objects = world.kv_pod(unique)
    mount = remounter(provider, pod, objects, unique)
    for _ in range(3):
        mount()
    assert decodes.during(mount) == 0
    world.policy(unique, 'path "kv1/other" { capabilities = ["read"] }')
    with pytest.raises(grpc.RpcError) as denied:
        mount()
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_another_pod_of_the_class_is_never_answered_from_a_pods_memory(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod, objects = world.kv_pod(unique)
    mount = remounter(provider, pod, objects, unique)
    for _ in range(3):
        mount()
    stranger = world.kube.add_pod(pod.namespace, f"stranger-{unique}", "someone-else")
    with pytest.raises(grpc.RpcError) as denied:
        provider.mount(stranger, objects, role=unique)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_whole_reply_is_written_anew_every_mount(
    provider: ProviderClient, world: VaultWorld, unique: str, decodes: Decodes
) -> None:
    """Its file holds the request_id Vault makes for each request, as the reference writes it."""
    kv2(world, unique, k="v")
    pod = world.grant(unique, [f"secret/data/{unique}"])
    objects = [{"objectName": "whole", "secretPath": f"secret/data/{unique}"}]
    mount = remounter(provider, pod, objects, unique)
    ids = {json.loads(files_of(mount())["whole"])["request_id"] for _ in range(4)}
    assert len(ids) == 4 and decodes.during(mount) == 1


def test_a_new_hmac_key_gives_new_versions(tmp_path: Any, world: VaultWorld, unique: str) -> None:
    pod, objects = world.kv_pod(unique)
    client = start_provider(tmp_path, world, hmac_key_ttl=0.0, hmac_secret_name=f"hmac-{unique}")
    try:
        mount = remounter(client, pod, objects, unique)
        for _ in range(3):
            before = versions_of(mount())
        del world.kube.secrets[("vault-csi", f"hmac-{unique}")]
        after = versions_of(mount())
        assert after["k"] and after != before
        assert versions_of(mount()) == after
    finally:
        client.app.stop(grace=1)


def test_concurrent_mounts_never_mix_two_replies(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    """While the secret changes under them, every answer is one reply's files whole: the
    remembered Mount is replaced as one, never field by field."""
    kv2(world, unique, a="0", b="0")
    pod = world.grant(unique, [f"secret/data/{unique}"])
    objects = [{"objectName": name, "secretPath": f"secret/data/{unique}", "secretKey": name} for name in ("a", "b")]
    mount = remounter(provider, pod, objects, unique)
    seen: list[tuple[bytes, bytes, str, str]] = []

    def mounts() -> None:
        for _ in range(12):
            response = mount()
            files, versions = files_of(response), versions_of(response)
            seen.append((files["a"], files["b"], versions["a"], versions["b"]))

    workers = [threading.Thread(target=mounts) for _ in range(4)]
    for worker in workers:
        worker.start()
    # The secret changes all the while the 48 Mounts run (bounded in count and time).
    deadline = time.monotonic() + 60
    for i in range(1, 1000):
        if not any(worker.is_alive() for worker in workers) or time.monotonic() > deadline:
            break
        kv2(world, unique, a=str(i % 3), b=str(i % 3))
    for worker in workers:
        worker.join(60)
    assert len(seen) == 48
    assert len({a for a, _, _, _ in seen}) > 1  # they saw it change
    assert all(a == b for a, b, _, _ in seen)
    versions: dict[bytes, set[str]] = {}
    for a, _, version, _ in seen:
        versions.setdefault(a, set()).add(version)
    assert all(len(found) == 1 for found in versions.values()), versions  # a value, one version


@pytest.fixture
def faked(world: VaultWorld, tmp_path: Any) -> Iterator[tuple[ProviderClient, FaultProxy, Decodes]]:
    proxy = FaultProxy(world.bao.port)
    from provider.config import VaultSettings

    client = start_provider(tmp_path, world, vault=VaultSettings(address=proxy.url))
    try:
        yield client, proxy, Decodes(client)
    finally:
        client.app.stop(grace=1)
        proxy.close()


def answering(
    proxy: FaultProxy, path: str, body: bytes, content_type: str = "application/json", status: int = 200
) -> None:
    proxy.clear()
    proxy.add(Rule("GET", path, status=status, body=body, headers={"Content-Type": content_type}))


def test_only_the_same_status_bytes_and_content_type_are_answered_from_memory(
    faked: tuple[ProviderClient, FaultProxy, Decodes], world: VaultWorld, unique: str
) -> None:
    client, proxy, decodes = faked
    pod, objects = world.kv_pod(unique)
    path = f"/v1/kv1/{unique}"

    def reply(value: str, pad: int = 0) -> bytes:
        data = {"k": value, "pad": "x" * pad}
        return (
            b'{"request_id":"%s",' % str(uuid.uuid4()).encode()
            + json.dumps({"lease_id": "", "renewable": False, "lease_duration": 0, "data": data}).encode()[1:]
        )

    mount = remounter(client, pod, objects, unique)
    answering(proxy, path, reply("v"))
    for _ in range(3):
        mount()
    answering(proxy, path, reply("v"))  # another request_id, the rest the same
    assert decodes.during(mount) == 0
    answering(proxy, path, reply("v"), status=404)  # the same bytes, but not found
    with pytest.raises(grpc.RpcError) as missing:
        mount()
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    answering(proxy, path, reply("v"))
    assert decodes.during(mount) == 1  # a failed Mount forgets what it remembered
    answering(proxy, path, reply("v"), content_type="text/plain")
    assert decodes.during(mount) == 1
    answering(proxy, path, reply("w"))
    assert files_of(mount()) == {"k": b"w"}
    # A reply too large to remember is decoded on every Mount.
    answering(proxy, path, reply("big", pad=REMEMBERED_BYTES))
    mount()
    assert decodes.during(mount) == 1


def test_a_body_that_is_not_json_is_remembered_whole(
    faked: tuple[ProviderClient, FaultProxy, Decodes], world: VaultWorld, unique: str
) -> None:
    """A reply that is not JSON goes into the file as it is: every byte of it decides."""
    client, proxy, _ = faked
    pod, _ = world.kv_pod(unique)
    objects = [{"objectName": "ca", "secretPath": f"kv1/{unique}", "format": "pem-chain"}]
    mount = remounter(client, pod, objects, unique)
    path = f"/v1/kv1/{unique}"
    answering(proxy, path, b'{"request_id":"aaaa",not json', "text/plain")
    for _ in range(3):
        assert files_of(mount())["ca"] == b'{"request_id":"aaaa",not json'
    answering(proxy, path, b'{"request_id":"bbbb",not json', "text/plain")
    assert files_of(mount())["ca"] == b'{"request_id":"bbbb",not json'


def test_many_small_files_are_not_remembered(
    faked: tuple[ProviderClient, FaultProxy, Decodes], world: VaultWorld, unique: str
) -> None:
    """Thousands of empty files weigh megabytes of objects for a few KiB of reply."""
    client, proxy, decodes = faked
    pod, _ = world.kv_pod(unique)
    keys = [f"k{i}" for i in range(300)]
    body = (
        b'{"request_id":"%s",' % str(uuid.uuid4()).encode()
        + json.dumps(
            {"lease_id": "", "renewable": False, "lease_duration": 0, "data": dict.fromkeys(keys, "")}
        ).encode()[1:]
    )
    answering(proxy, f"/v1/kv1/{unique}", body, content_type="application/json; " + "x" * 60_000)
    objects = [{"objectName": f"o{i}", "secretPath": f"kv1/{unique}", "expandKeys": True} for i in range(4)]
    mount = remounter(client, pod, objects, unique)
    for _ in range(3):
        assert len(mount().files) == 1200
    assert decodes.during(mount) == 1
    assert [plan.memory.last for plan in kept_plans(client)] == [None]


def test_a_failed_mount_forgets_what_it_remembered(
    provider: ProviderClient, world: VaultWorld, unique: str, decodes: Decodes
) -> None:
    """The values of a secret the pod may no longer read are not kept in memory."""
    pod, objects = world.kv_pod(unique, value="s3cr3t-value")
    mount = remounter(provider, pod, objects, unique)
    for _ in range(3):
        mount()
    [plan] = kept_plans(provider)
    assert plan.memory.last is not None and "s3cr3t" not in repr(plan.memory.last)
    world.policy(unique, 'path "kv1/other" { capabilities = ["read"] }')
    with pytest.raises(grpc.RpcError):
        mount()
    assert plan.memory.last is None


def test_a_reply_that_is_the_remembered_one_cut_short_is_decoded(
    faked: tuple[ProviderClient, FaultProxy, Decodes], world: VaultWorld, unique: str
) -> None:
    """Its bytes are the remembered ones past the request_id, but without one it is no
    JSON: decoded, it fails the Mount, as it must."""
    client, proxy, _ = faked
    pod, objects = world.kv_pod(unique)
    path = f"/v1/kv1/{unique}"
    mount = remounter(client, pod, objects, unique)
    whole = b'{"request_id":"%s","lease_id":"","data":{"k":"v"}}' % str(uuid.uuid4()).encode()
    answering(proxy, path, whole, content_type="text/plain")
    for _ in range(3):
        assert files_of(mount()) == {"k": b"v"}
    answering(proxy, path, whole[whole.index(b'"lease_id"') :], content_type="text/plain")
    with pytest.raises(grpc.RpcError) as refused:
        mount()
    assert "is not JSON" in (refused.value.details() or "")


def test_an_unexpected_error_forgets_too(
    faked: tuple[ProviderClient, FaultProxy, Decodes], world: VaultWorld, unique: str, monkeypatch: Any
) -> None:
    client, _, _ = faked
    pod, objects = world.kv_pod(unique)
    mount = remounter(client, pod, objects, unique)
    for _ in range(3):
        mount()
    [plan] = kept_plans(client)
    assert plan.memory.last is not None

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("a defect")

    monkeypatch.setattr(_LastMount, "answers", broken)
    with pytest.raises(grpc.RpcError) as failed:
        mount()
    assert failed.value.code() == grpc.StatusCode.INTERNAL and plan.memory.last is None
