"""Mount through the real gRPC socket against the real OpenBao: the reference's behaviour."""

from __future__ import annotations

import gc
import json
import logging
import sys
import tracemalloc
import urllib.parse
import weakref
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import example, given, settings
from hypothesis import strategies as st

from provider import config as config_module
from provider._proto import service_pb2
from provider.breaker import EndpointKey
from provider.config import Route, TLSConfig, VaultSettings, parse_mount, parse_objects, template_weight
from provider.dispatch import PARSED_MAX_BYTES, PLAN_BYTES_PER_REQUEST, Dispatched, ParsedMounts, weight_of
from provider.lru import WeightedLRU
from provider.mount import (
    ENCODED_OVERHEAD_BYTES,
    MountedFile,
    MountPlan,
    MountRequest,
    MountResult,
    _ClassPlan,
    _endpoint,
    encoded_size,
)
from provider.server import encoded
from tests.conftest import ProviderClient, VaultWorld, files_of, start_provider, versions_of
from tests.proxy import Forwarder


def metric(client: ProviderClient, name: str, **labels: str) -> float:
    return client.app.metrics.registry.get_sample_value(name, labels) or 0.0


def logins(client: ProviderClient) -> float:
    return metric(client, "vault_csi_provider_logins_total", outcome="ok")


def reads(client: ProviderClient) -> float:
    return sum(
        metric(client, "vault_csi_provider_vault_requests_total", operation="read", status=s)
        for s in ("200", "403", "404")
    )


def mount_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    return error.value


def test_kv_v1_key_and_whole_response(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"user": "admin", "html": "<b>&</b>", "port": 5432})
    pod = world.grant(unique, [f"kv1/{unique}"])
    response = provider.mount(
        pod,
        [
            {"objectName": "user", "secretPath": f"kv1/{unique}", "secretKey": "user"},
            {"objectName": "port", "secretPath": f"kv1/{unique}", "secretKey": "port"},
            {"objectName": "all.json", "secretPath": f"kv1/{unique}"},
        ],
        role=unique,
    )
    files = files_of(response)
    assert files["user"] == b"admin"
    assert files["port"] == b"5432"
    whole = files["all.json"]
    parsed = json.loads(whole)
    assert list(parsed) == ["request_id", "lease_id", "lease_duration", "renewable", "data", "warnings"]
    assert parsed["data"] == {"html": "<b>&</b>", "port": 5432, "user": "admin"}
    assert parsed["warnings"] is None and parsed["lease_id"] == "" and parsed["renewable"] is False
    request_id = parsed["request_id"]
    lease = parsed["lease_duration"]
    assert (
        whole
        == (
            f'{{"request_id":"{request_id}","lease_id":"","lease_duration":{lease},"renewable":false,'
            '"data":{"html":"\\u003cb\\u003e\\u0026\\u003c/b\\u003e","port":5432,"user":"admin"},"warnings":null}'
        ).encode()
    )


def test_kv_v2_reads_data_data_and_honours_version_query(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"password": "first"}})
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"password": "second", "nested": {"b": 1, "a": [True]}}})
    pod = world.grant(unique, [f"secret/data/{unique}"])
    response = provider.mount(
        pod,
        [
            {"objectName": "latest", "secretPath": f"secret/data/{unique}", "secretKey": "password"},
            {"objectName": "v1", "secretPath": f"secret/data/{unique}?version=1", "secretKey": "password"},
            {"objectName": "nested", "secretPath": f"/v1/secret/data/{unique}", "secretKey": "nested"},
        ],
        role=unique,
    )
    assert files_of(response) == {"latest": b"second", "v1": b"first", "nested": b'{"a":[true],"b":1}'}


@pytest.mark.parametrize("form", ["/v1/{p}", "v1/{p}", "/{p}", "{p}"], ids=["slash-v1", "v1", "slash", "bare"])
def test_secret_path_forms(provider: ProviderClient, world: VaultWorld, unique: str, form: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    path = form.format(p=f"kv1/{unique}")
    response = provider.mount(pod, [{"objectName": "k", "secretPath": path, "secretKey": "k"}], role=unique)
    assert files_of(response) == {"k": b"v"}


def test_encodings_decode_like_go(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"b64": "aGVs\nbG8=", "hex": "68656C6C6F", "bad": "not base64!"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    response = provider.mount(
        pod,
        [
            {"objectName": "b64", "secretPath": f"kv1/{unique}", "secretKey": "b64", "encoding": "BASE64"},
            {"objectName": "hex", "secretPath": f"kv1/{unique}", "secretKey": "hex", "encoding": "hex"},
            {"objectName": "plain", "secretPath": f"kv1/{unique}", "secretKey": "hex", "encoding": "utf-8"},
        ],
        role=unique,
    )
    assert files_of(response) == {"b64": b"hello", "hex": b"hello", "plain": b"68656C6C6F"}
    error = mount_error(
        lambda: provider.mount(
            pod,
            [{"objectName": "bad", "secretPath": f"kv1/{unique}", "secretKey": "bad", "encoding": "base64"}],
            role=unique,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'object "bad"' in error.details() and "not valid base64" in error.details()
    assert "not base64!" not in error.details()


def test_missing_key_and_missing_path_are_not_found(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"user": "u"}})
    pod = world.grant(unique, [f"secret/data/{unique}", f"secret/data/{unique}-gone"])
    error = mount_error(
        lambda: provider.mount(
            pod,
            [
                {"objectName": "db-pass", "secretPath": f"secret/data/{unique}", "secretKey": "password"},
                {"objectName": "gone", "secretPath": f"secret/data/{unique}-gone", "secretKey": "x"},
            ],
            role=unique,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert f'object "db-pass": key "password" does not exist at secret/data/{unique}' in error.details()
    assert 'object "gone"' in error.details() and "404" in error.details()


def test_pki_issue_is_sent_once_for_cert_key_and_whole_json(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    mount = f"pki-{unique}"
    world.pki_engine(mount)
    pod = world.grant(unique, [f"{mount}/issue/web"])
    args = {"common_name": "app.example.com", "ttl": "1h"}
    objects = [
        {
            "objectName": "tls.crt",
            "secretPath": f"{mount}/issue/web",
            "method": "PUT",
            "secretArgs": args,
            "secretKey": "certificate",
        },
        {
            "objectName": "tls.key",
            "secretPath": f"{mount}/issue/web",
            "method": "PUT",
            "secretArgs": args,
            "secretKey": "private_key",
        },
        {"objectName": "issue.json", "secretPath": f"{mount}/issue/web", "method": "PUT", "secretArgs": args},
    ]
    before = reads(provider)
    files = files_of(provider.mount(pod, objects, role=unique))
    assert reads(provider) - before == 1
    cert = x509.load_pem_x509_certificate(files["tls.crt"])
    key = serialization.load_pem_private_key(files["tls.key"], password=None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert cert.subject.rfc4514_string() == "CN=app.example.com"
    whole = json.loads(files["issue.json"])
    assert whole["data"]["certificate"] == files["tls.crt"].decode()
    assert whole["lease_id"].startswith("") and list(whole)[:4] == [
        "request_id",
        "lease_id",
        "lease_duration",
        "renewable",
    ]


def test_wrong_service_account_is_denied_with_vaults_message(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    world.grant(unique, [f"kv1/{unique}"], service_account="app")
    intruder = world.kube.add_pod("team", f"intruder-{unique}", "other")
    error = mount_error(
        lambda: provider.mount(intruder, [{"objectName": "k", "secretPath": f"kv1/{unique}"}], role=unique)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details().startswith(
        f'vault login failed for role "{unique}" at auth/kubernetes as service account team/other: '
    )
    assert "service account name not authorized" in error.details()


def test_custom_audience(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "aud"})
    pod = world.grant(unique, [f"kv1/{unique}"], audience="custom-aud")
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    assert files_of(provider.mount(pod, objects, role=unique, audience="custom-aud")) == {"k": b"aud"}
    # A token for the default audience is refused by the role: the audience really matters.
    error = mount_error(lambda: provider.mount(pod, objects, role=unique))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_jwt_auth_mount(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "via-jwt"})
    world.policy(unique, f'path "kv1/{unique}" {{ capabilities = ["read"] }}')
    world.bao.api(
        "PUT",
        f"auth/jwt/role/{unique}",
        {
            "role_type": "jwt",
            "user_claim": "sub",
            "bound_audiences": ["vault"],
            "bound_subject": "system:serviceaccount:team:jwt-app",
            "token_policies": [unique],
        },
    )
    pod = world.kube.add_pod("team", f"jwt-{unique}", "jwt-app")
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    response = provider.mount(pod, objects, role=unique, vaultAuthMountPath="jwt")
    assert files_of(response) == {"k": b"via-jwt"}
    response = provider.mount(pod, objects, role=unique, vaultKubernetesMountPath="/jwt/")
    assert files_of(response) == {"k": b"via-jwt"}


def test_vault_namespace(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    namespace = f"team-{unique}"
    world.bao.api("POST", f"sys/namespaces/{namespace}", {})
    world.enable_kubernetes_auth(namespace=namespace)
    world.bao.api("POST", "sys/mounts/kv", {"type": "kv", "options": {"version": "2"}}, namespace=namespace)
    world.bao.api("POST", "kv/data/app", {"data": {"k": "in-namespace"}}, namespace=namespace)
    world.policy("reader", 'path "kv/data/app" { capabilities = ["read"] }', namespace=namespace)
    world.kube_role(
        "app", service_accounts=["ns-app"], namespaces=["team"], policies=["reader"], vault_namespace=namespace
    )
    pod = world.kube.add_pod("team", f"ns-{unique}", "ns-app")
    objects = [{"objectName": "k", "secretPath": "kv/data/app", "secretKey": "k"}]
    assert files_of(provider.mount(pod, objects, role="app", vaultNamespace=namespace)) == {"k": b"in-namespace"}
    error = mount_error(lambda: provider.mount(pod, objects, role="app"))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_request_fallback_when_the_driver_sends_no_token(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod, objects = world.kv_pod(unique, "fallback")
    before = world.kube.calls["tokenrequest"]
    response = provider.mount(pod, objects, role=unique, send_token=False, audience="vault")
    assert files_of(response) == {"k": b"fallback"}
    assert world.kube.calls["tokenrequest"] == before + 1
    # Without pod information no token can be requested: the error says what is missing.
    error = mount_error(lambda: provider.mount(None, objects, role=unique))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'no service account token for audience "vault"' in error.details()
    assert "csi.storage.k8s.io/pod.namespace" in error.details()


def test_token_is_reused_across_mounts_but_never_across_pods(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    sibling = world.kube.add_pod(pod.namespace, f"sibling-{unique}", pod.service_account)
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
    start = logins(provider)
    for _ in range(3):
        provider.mount(pod, objects, role=unique)
    assert logins(provider) - start == 1
    provider.mount(sibling, objects, role=unique)
    assert logins(provider) - start == 2


def test_a_repeated_request_is_parsed_once_and_its_parse_serves_only_that_request(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    """Kubelet sends a volume the very same request on every republish: its parse is kept
    (the reads are not), keyed by the whole request, the pod's token included."""
    pod, objects = world.kv_pod(unique)
    mounter = provider.app.dispatcher.mounter
    parsed: list[str] = []
    real_parse = mounter.parse

    def parse(request: Any, **kwargs: Any) -> Any:
        parsed.append(request.permission)
        return real_parse(request, **kwargs)

    mounter.parse = parse  # type: ignore[method-assign]  # counts, then does the real thing
    request = provider.request(pod, objects, role=unique)
    assert files_of(provider.raw_mount(request)) == {"k": b"v"}
    world.bao.api("POST", f"kv1/{unique}", {"k": "changed"})
    assert files_of(provider.raw_mount(request)) == {"k": b"changed"}  # read again, not parsed again
    assert parsed == ["420"]
    # The same attributes with another file mode: a request of its own, parsed for itself.
    other_mode = provider.raw_mount(
        service_pb2.MountRequest(attributes=request.attributes, target_path=request.target_path, permission="256")
    )
    assert [f.mode for f in other_mode.files] == [256] and parsed == ["420", "256"]
    assert [f.mode for f in provider.raw_mount(request).files] == [420]
    # Another pod of the same class: its own parse, and its own login.
    sibling = world.kube.add_pod(pod.namespace, f"sibling-{unique}", pod.service_account)
    before = logins(provider)
    assert files_of(provider.mount(sibling, objects, role=unique)) == {"k": b"changed"}
    assert len(parsed) == 3 and logins(provider) == before + 1
    # A request that fails its parse is parsed (and refused, saying why) every time.
    for _ in range(2):
        bad = mount_error(lambda: provider.mount(pod, objects, role=unique, permission="4096"))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "permission" in (bad.details() or "")
    assert len(parsed) == 5


def _parsed(
    objects: list[dict[str, Any]], pad: str = "", *, pod: bool = False, uid: str = "uid-1", address: str = ""
) -> tuple[MountRequest, MountPlan]:
    """A Mount request and its real parse, as kept; with a pod's uid when `pod`."""
    fields = {"roleName": "r", "objects": yaml.safe_dump(objects), "pad": pad}
    if pod:
        fields |= {"csi.storage.k8s.io/pod.uid": uid, "csi.storage.k8s.io/pod.name": "p"}
        fields |= {"csi.storage.k8s.io/pod.namespace": "ns", "csi.storage.k8s.io/serviceAccount.name": "sa"}
    if address:
        fields["vaultAddress"] = address
    attributes = json.dumps(fields, ensure_ascii=False)
    request = MountRequest(attributes=attributes, target_path="/t", permission="420")
    defaults = VaultSettings(address="http://127.0.0.1:8200")
    return request, MountPlan.of(
        parse_mount(attributes=attributes, target_path="/t", permission="420", defaults=defaults)
    )


def test_kept_parses_are_bounded_by_count_and_weight() -> None:
    route = Route(pod="ns/p", role="r", vault_address="http://v", vault_namespace="", tenant=("ns", 1), decoded={})
    dispatched = Dispatched(route=route, endpoint=EndpointKey(address="http://v"))
    kv = [{"objectName": "k", "secretPath": "kv/x", "secretKey": "k"}]
    parsed = ParsedMounts(entries=2)
    made = [_parsed(kv, pad=str(i)) for i in range(3)]
    for request, config in made:
        parsed.put(request, dispatched, config)
    assert len(parsed) == 2 and parsed.get(made[0][0]) is None
    kept = parsed.get(made[2][0])
    assert kept is not None and kept.plan is made[2][1] and kept.route.decoded is None
    # Weighed in bytes, not characters, and with the templates' trees: a request of a few
    # hundred characters whose template parses to a large tree is not kept (that tree would
    # be kept once per pod here, where the objects cache keeps it once per class at most).
    # 397 characters, 697 bytes each, and a plan of one request: two fit, not three.
    max_bytes = 697 + PLAN_BYTES_PER_REQUEST + 100
    by_weight = ParsedMounts(entries=10, total_bytes=2 * (697 + PLAN_BYTES_PER_REQUEST) + 200, max_bytes=max_bytes)
    wide = [_parsed(kv, pad=f"{i}" + "é" * 300) for i in range(3)]
    for request, config in wide:
        by_weight.put(request, dispatched, config)
    assert len(by_weight) == 2 and by_weight.get(wide[0][0]) is None
    by_weight.put(wide[2][0], dispatched, wide[2][1])  # the same request again
    assert by_weight.get(wide[1][0]) is not None and by_weight.get(wide[2][0]) is not None  # counted once
    templated = _parsed([*kv, {"objectName": "t", "template": "{{ .Objects.k.Secrets.k }}" * 3}])
    assert len(templated[0].attributes) < 1000 and template_weight(templated[1].config.objects) > max_bytes
    by_weight.put(templated[0], dispatched, templated[1])
    assert by_weight.get(templated[0]) is None
    # And with its plan's requests: each holds a read and a lease key for this pod alone.
    many = _parsed([{"objectName": f"k{i}", "secretPath": f"kv/{i}", "secretKey": "k"} for i in range(4)])
    assert len(many[0].attributes) < 400 and len(many[1].distinct) * PLAN_BYTES_PER_REQUEST > max_bytes
    by_weight.put(many[0], dispatched, many[1])
    assert by_weight.get(many[0]) is None


def test_a_plans_requests_on_the_loop_are_made_once_and_weighed_as_they_are() -> None:
    """A pod's plan of at most LOOP_MAX_READS plain reads makes their requests around the
    token once (vault.AroundToken), and its weight counts them and the escaped URLs byte
    for byte; a plan of more reads makes none and is not weighed for them."""
    route = Route(pod="ns/p", role="r", vault_address="http://v", vault_namespace="", tenant=("ns", 1), decoded={})
    dispatched = Dispatched(route=route, endpoint=EndpointKey(address="http://v"))
    request, plan = _parsed([{"objectName": "k", "secretPath": "kv/x", "secretKey": "k"}], pod=True)
    assert plan.around_token is not None and plan.around_token.parts is not None
    assert weight_of(request, plan) == (
        len(request.attributes) + PLAN_BYTES_PER_REQUEST + len("/v1/kv/x") + plan.around_token.size()
    )
    assert _parsed([{"objectName": "k", "secretPath": "kv/x", "secretKey": "k"}])[1].around_token is None  # no pod
    # Many reads: none on the loop, and kept as before (36 reads weigh far below the limit).
    many = _parsed([{"objectName": f"k{i}", "secretPath": f"kv/{i}", "secretKey": "k"} for i in range(36)], pod=True)
    assert many[1].around_token is None
    kept = ParsedMounts()
    kept.put(many[0], dispatched, many[1])
    assert kept.get(many[0]) is not None
    # A path of % signs is three times longer escaped, once in its read and once in its
    # request: 8 KiB of attributes that would hold about 50 KiB are not kept.
    heavy = _parsed([{"objectName": "k", "secretPath": "kv/" + "%" * 8000, "secretKey": "k"}], pod=True)
    assert len(heavy[0].attributes) < PARSED_MAX_BYTES < weight_of(*heavy)
    kept.put(heavy[0], dispatched, heavy[1])
    assert kept.get(heavy[0]) is None


def test_a_classs_requests_are_made_once_for_all_its_pods_and_weighed_in_the_objects_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a plan works out from the class alone (its requests, reads, and those made
    around the token) is made by the first pod's parse and shared by the next pods' plans,
    per endpoint, while the objects list is cached, and weighed there: a class whose
    requests would make that entry too heavy has them made per plan instead."""
    cache: WeightedLRU[bytes, Any] = WeightedLRU(
        entries=8, total_weight=64 * 1024, max_weight=4096, on_drop=config_module._forget_shared
    )
    monkeypatch.setattr(config_module, "_PARSED", cache)
    kv = [{"objectName": "k", "secretPath": "kv/shared", "secretKey": "k"}]
    first, second = _parsed(kv, pod=True, uid="a")[1], _parsed(kv, pod=True, uid="b")[1]
    assert first.identity != second.identity and first.lease_keys != second.lease_keys  # each pod's own
    assert second.reads is first.reads and second.around_token is first.around_token is not None
    assert second.requests is first.requests and second.distinct is first.distinct
    assert (
        len(cache) == 1
        and cache.total() == len(yaml.safe_dump(kv)) + _ClassPlan.of(first.config.objects, first.endpoint).weight()
    )
    # Another address for the same objects: requests of its own (another Host), made once too.
    elsewhere = _parsed(kv, pod=True, uid="c", address="http://vault.example:8200")[1]
    assert elsewhere.around_token is not first.around_token and elsewhere.around_token is not None
    assert elsewhere.around_token.parts != first.around_token.parts
    assert b"Host: vault.example:8200" in (elsewhere.around_token.with_token("t") or [b""])[0]
    assert _parsed(kv, pod=True, uid="d", address="http://vault.example:8200")[1].reads is elsewhere.reads
    # Requests too heavy for the entry (long escaped paths) are made by each plan.
    heavy = [{"objectName": "k", "secretPath": "kv/" + "%" * 1200, "secretKey": "k"}]
    one, other = _parsed(heavy, pod=True, uid="a")[1], _parsed(heavy, pod=True, uid="b")[1]
    assert one.reads == other.reads and one.reads is not other.reads
    # An objects list the cache drops lets go of what it kept (kept parses still hold the
    # list), and keeps nothing more; nor is a parse of the same text the cache no longer
    # holds charged to the entry of the one it holds.
    dropped = first.config.objects
    assert len(getattr(dropped, "shared", {})) == 2
    cache.drop_where(lambda _: True)
    third = _endpoint("http://third.example:8200", TLSConfig(), "")
    assert getattr(dropped, "shared", None) == {}
    assert _ClassPlan.of(dropped, third) is not _ClassPlan.of(dropped, third) and dropped.shared == {}  # type: ignore[attr-defined]
    again = _parsed(kv, pod=True, uid="e")[1]  # parsed anew, and cached anew
    weight = cache.total()
    _ClassPlan.of(dropped, first.endpoint)
    assert cache.total() == weight and again.config.objects is not dropped
    # Filling the cache with other classes drops the list, and what it kept, too.
    for i in range(8):
        _parsed([{"objectName": "k", "secretPath": f"kv/other-{i}", "secretKey": "k"}], pod=True)
    assert getattr(again.config.objects, "shared", None) == {}


def test_a_classs_requests_are_weighed_at_least_at_what_they_hold() -> None:
    """A class plan's weight (what the objects cache counts for it) is no less than the
    memory it holds, whatever the shape: many objects over one path, many query values,
    long escaped paths, aliases of one path."""
    endpoint = _endpoint("http://127.0.0.1:8200", TLSConfig(), "")
    shapes = {
        "objects over one path": [{"objectName": f"o{i}", "secretPath": "kv/x", "secretKey": "k"} for i in range(500)],
        "distinct paths": [{"objectName": f"o{i}", "secretPath": f"kv/{i}", "secretKey": "k"} for i in range(500)],
        "query values": [
            {"objectName": "o", "secretPath": "kv/x?" + "&".join(f"key{i}=value{i}" for i in range(5000))}
        ],
        "escaped paths": [{"objectName": f"o{i}", "secretPath": f"kv/{i}" + "%" * 2000} for i in range(2)],
        "a large query value": [{"objectName": "o", "secretPath": "kv/x?v=" + "z" * 200_000}],
        "aliases of a large query value with bodies of their own": [
            {"objectName": f"o{i}", "method": "POST", "secretArgs": {"i": i}, "secretPath": "kv/x?v=" + "z" * 4000}
            for i in range(60)
        ],
    }
    texts = {name: yaml.safe_dump(objects, width=10**9) for name, objects in shapes.items()}
    texts["aliases of one path"] = (
        "- {objectName: o0, secretPath: &p kv/"
        + "x" * 4000
        + "}\n"
        + "".join(f"- {{objectName: o{i}, secretPath: *p}}\n" for i in range(1, 60))
    )
    for name, text in texts.items():
        objects = parse_objects(text)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            plan = _ClassPlan._of(objects, endpoint)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        # Not counted: tables shared by every class, grown once in a while (the map of
        # requests by object; urllib's memo of how each byte is escaped).
        shared = [tracemalloc.Filter(False, weakref.__file__), tracemalloc.Filter(False, urllib.parse.__file__)]
        held = sum(
            stat.size_diff for stat in after.filter_traces(shared).compare_to(before.filter_traces(shared), "filename")
        )
        assert held <= plan.weight(), (name, held, plan.weight())
    aliased = _ClassPlan._of(parse_objects(texts["aliases of one path"]), endpoint)
    assert len(aliased.requests) == 60 and len({id(request) for request in aliased.requests.values()}) == 1


def test_an_entry_weighed_more_later_makes_room_or_is_not_weighed() -> None:
    """add_weight weighs an entry more only while it holds that very value, drops the least
    recently used others to make room, and tells the owner of each value dropped."""
    told: list[object] = []
    cache: WeightedLRU[str, object] = WeightedLRU(entries=10, total_weight=100, max_weight=60, on_drop=told.append)
    values = {key: object() for key in "abc"}
    for key, value in values.items():
        cache.put(key, value, 30)
    assert not cache.add_weight("missing", 1, value=values["a"]) and cache.total() == 90
    added: list[str] = []
    assert not cache.add_weight("a", 1, value=values["b"], then=lambda: added.append("b"))  # another value under a
    assert cache.total() == 90 and not added
    assert not cache.add_weight("a", 31, value=values["a"]) and cache.total() == 90  # 61: over the most for one
    assert cache.add_weight("a", 30, value=values["a"], then=lambda: added.append("a"))  # b made room
    assert cache.total() == 90 and added == ["a"]
    assert cache.get("b") is None and cache.get("a") is values["a"] and cache.get("c") is values["c"]
    assert told == [values["b"]]
    cache.put("d", object(), 60)  # room for it: a goes (c was looked up since)
    assert told == [values["b"], values["a"]] and cache.total() == 90
    assert cache.drop_where(lambda value: True) == 2 and len(told) == 4 and cache.total() == 0
    # An owner that fails when told does not stop the cache, nor the telling of the others.
    failing: WeightedLRU[str, int] = WeightedLRU(entries=1, total_weight=100, max_weight=100, on_drop=lambda v: 1 // v)
    failing.put("zero", 0, 10)
    failing.put("one", 1, 10)
    assert len(failing) == 1 and failing.get("one") == 1


@settings(max_examples=200, deadline=None)
@example([("€" * 300, 0o644, b"", "")])  # the path is held twice, three bytes a character
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=300),
            st.integers(min_value=0, max_value=0o777),
            st.binary(max_size=3000),
            st.text(max_size=100),
        ),
        max_size=8,
    )
)
def test_a_remembered_results_encoding_is_never_larger_than_counted(files: list[tuple[str, int, bytes, str]]) -> None:
    """_remembered counts what the encoded reply will hold (mount.encoded_size): never less."""
    mounted = tuple(MountedFile(path=p, mode=m, contents=c, version=v) for p, m, c, v in files)
    result = MountResult(config=cast(Any, None), files=mounted)
    assert len(encoded(result)) + sys.getsizeof(b"") <= ENCODED_OVERHEAD_BYTES + sum(map(encoded_size, mounted))


def test_cache_size_zero_logs_in_every_time(tmp_path: Path, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    client = start_provider(tmp_path, world, cache_size=0)
    try:
        objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
        for _ in range(2):
            client.mount(pod, objects, role=unique)
        assert logins(client) == 2
    finally:
        client.app.stop(grace=1)


def test_revoked_cached_token_is_replaced_once(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    pod, objects = world.kv_pod(unique)
    provider.mount(pod, objects, role=unique)
    world.bao.api("PUT", "sys/leases/revoke-prefix/auth/kubernetes/login", {})
    assert files_of(provider.mount(pod, objects, role=unique)) == {"k": b"v"}
    assert logins(provider) == 2
    # A 403 that a fresh token does not cure is reported, after exactly one more login.
    world.policy(unique, 'path "nothing" { capabilities = ["read"] }')
    error = mount_error(lambda: provider.mount(pod, objects, role=unique))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "permission denied" in error.details()
    assert logins(provider) == 3


def test_a_lone_read_read_ahead_goes_the_usual_way_once_it_fails(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    """A lone KV read of a kept parse is read ahead (one attempt) once its last reply was
    not kept; a failure sends it the usual way (retries, a new login after a 403), and it
    stays there until that succeeds: a failing read does not pay for the read ahead on
    every Mount."""
    pod, objects = world.kv_pod(unique)
    request = provider.request(pod, objects, role=unique)  # the very same request, as kubelet sends it

    def mount_costs(answer: grpc.StatusCode = grpc.StatusCode.OK) -> float:
        before = reads(provider)
        if answer is grpc.StatusCode.OK:
            assert files_of(provider.raw_mount(request)) == {"k": b"v"}
        else:
            assert mount_error(lambda: provider.raw_mount(request)).code() == answer
        return reads(provider) - before

    assert [mount_costs(), mount_costs()] == [1, 1]  # the usual way, then read ahead
    world.policy(unique, 'path "nothing" { capabilities = ["read"] }')
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert mount_costs(denied) == 3  # read ahead, then the usual way: a read, a new login, a read
    assert mount_costs(denied) == 2  # the usual way alone
    world.policy(unique, f'path "kv1/{unique}" {{ capabilities = ["read"] }}')
    assert [mount_costs(), mount_costs()] == [1, 1]


def test_versions_are_stable_change_with_content_and_survive_restarts(
    tmp_path: Path, world: VaultWorld, unique: str
) -> None:
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"a": "1", "b": "2"}})
    pod = world.grant(unique, [f"secret/data/{unique}"])
    objects = [
        {"objectName": "a", "secretPath": f"secret/data/{unique}", "secretKey": "a"},
        {"objectName": "b", "secretPath": f"secret/data/{unique}", "secretKey": "b"},
        {"objectName": "whole", "secretPath": f"secret/data/{unique}"},
    ]
    first = start_provider(tmp_path / "one", world)
    try:
        v1 = versions_of(first.mount(pod, objects, role=unique))
        v2 = versions_of(first.mount(pod, objects, role=unique))
        assert v1 == v2 and all(v1.values())
        world.bao.api("POST", f"secret/data/{unique}", {"data": {"a": "changed", "b": "2"}})
        v3 = versions_of(first.mount(pod, objects, role=unique))
        assert v3["a"] != v1["a"] and v3["b"] == v1["b"] and v3["whole"] != v1["whole"]
    finally:
        first.app.stop(grace=1)
    (tmp_path / "two").mkdir()
    second = start_provider(tmp_path / "two", world)
    try:
        assert versions_of(second.mount(pod, objects, role=unique)) == v3
    finally:
        second.app.stop(grace=1)


def test_hmac_key_secret_is_created_immutable_and_rotates_when_deleted(
    tmp_path: Path, world: VaultWorld, unique: str
) -> None:
    pod, objects = world.kv_pod(unique)
    client = start_provider(tmp_path, world, hmac_key_ttl=0.0, hmac_secret_name=f"hmac-{unique}")
    try:
        before = versions_of(client.mount(pod, objects, role=unique))
        secret = world.kube.secrets[("vault-csi", f"hmac-{unique}")]
        assert secret["immutable"] is True and len(secret["data"]["key"]) == 44
        del world.kube.secrets[("vault-csi", f"hmac-{unique}")]
        after = versions_of(client.mount(pod, objects, role=unique))
        assert after["k"] and after != before
    finally:
        client.app.stop(grace=1)


def test_hmac_key_is_read_once_per_ttl(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    pod, objects = world.kv_pod(unique)
    provider.mount(pod, objects, role=unique)
    reads_before = world.kube.calls["secret.get"]
    for _ in range(5):
        provider.mount(pod, objects, role=unique)
    assert world.kube.calls["secret.get"] == reads_before


def test_unreachable_kubernetes_gives_empty_versions_and_a_warning(
    tmp_path: Path, world: VaultWorld, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    from provider.app import App
    from provider.kube import KubeConfig
    from tests.conftest import ProviderClient, make_settings
    from tests.openbao import free_port

    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    settings = make_settings(tmp_path, world)
    unreachable = world.kube.kubeconfig()
    unreachable["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{free_port()}"
    app = App(settings, kube_config=KubeConfig.from_dict(unreachable))
    app.start()
    client = ProviderClient(app=app, channel=grpc.insecure_channel(f"unix:{settings.endpoint}"), kube=world.kube)
    try:
        with caplog.at_level(logging.WARNING):
            response = client.mount(
                pod, [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}], role=unique
            )
        assert files_of(response) == {"k": b"v"}
        assert versions_of(response) == {"k": ""}
        assert "object versions will be empty" in caplog.text
    finally:
        client.channel.close()
        app.stop(grace=1)


def test_file_modes(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    response = provider.mount(
        pod,
        f"- {{objectName: default, secretPath: kv1/{unique}, secretKey: k}}\n"
        f"- {{objectName: private, secretPath: kv1/{unique}, secretKey: k, filePermission: 0400}}\n",
        role=unique,
        permission="416",
    )
    assert {f.path: f.mode for f in response.files} == {"default": 0o640, "private": 0o400}
    assert [v.id for v in response.object_version] == ["default", "private"]


def test_vault_agent_unix_socket_address(tmp_path: Path, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "via-agent"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    agent = Forwarder(("127.0.0.1", world.bao.port), unix_path=str(tmp_path / "agent.sock"))
    client = start_provider(tmp_path, world, vault=VaultSettings(address=f"unix://{tmp_path}/agent.sock"))
    try:
        objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}]
        assert files_of(client.mount(pod, objects, role=unique)) == {"k": b"via-agent"}
        assert agent.connections >= 1
    finally:
        client.app.stop(grace=1)
        agent.close()


def test_no_secret_material_in_logs(
    provider: ProviderClient, world: VaultWorld, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    canary = f"canary-{unique}-value"
    world.bao.api("POST", f"kv1/{unique}", {"k": canary})
    world.bao.api("POST", f"kv1/{unique}-2", {"k": canary})  # a second path: the reads are sent together
    pod = world.grant(unique, [f"kv1/{unique}", f"kv1/{unique}-2"])
    attributes = provider.attributes(
        pod,
        [
            {"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"},
            {"objectName": "k2", "secretPath": f"kv1/{unique}-2", "secretKey": "k"},
            {"objectName": "all", "secretPath": f"kv1/{unique}"},
            {"objectName": "pointer", "secretPath": f"kv1/{unique}", "secretKeyPath": "/k"},
            {"objectName": "keys", "secretPath": f"kv1/{unique}", "expandKeys": True},
            {"objectName": "json", "secretPath": f"kv1/{unique}", "format": "json"},
            {"objectName": "template", "template": "{{ .Objects.k.Secrets.k | quote }}"},
        ],
        role=unique,
    )
    jwt = json.loads(json.loads(attributes)["csi.storage.k8s.io/serviceAccount.tokens"])["vault"]["token"]
    from provider._proto import service_pb2

    with caplog.at_level(1):
        provider.raw_mount(service_pb2.MountRequest(attributes=attributes, target_path="/t", permission="420"))
        bad_attributes = provider.attributes(
            pod, [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "missing"}], role=unique
        )
        bad = service_pb2.MountRequest(attributes=bad_attributes, target_path="/t", permission="420")
        with pytest.raises(grpc.RpcError):
            provider.raw_mount(bad)
        for template in ("{{ b64dec .Secrets.k }}", "{{ .Secrets.k.x }}", "{{ lt .Secrets.k 1 }}", "{{ .Secrets.j }}"):
            bad_template = provider.attributes(
                pod, [{"objectName": "t", "secretPath": f"kv1/{unique}", "template": template}], role=unique
            )
            with pytest.raises(grpc.RpcError) as error:
                provider.raw_mount(
                    service_pb2.MountRequest(attributes=bad_template, target_path="/t", permission="420")
                )
            assert canary not in error.value.details()
    tokens = [slot.login.token for slot in provider.app.tokens._slots.values() if slot.login]
    assert tokens
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "mount pod=team/" in text
    for material in [canary, jwt, jwt.split(".")[1], *tokens]:
        assert material not in text


def test_whole_response_with_an_auth_block_keeps_gos_field_order(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod = world.grant(unique, ["auth/token/create"])
    world.policy(unique, 'path "auth/token/create" { capabilities = ["create", "update"] }')
    response = provider.mount(
        pod,
        [
            {
                "objectName": "token.json",
                "secretPath": "auth/token/create",
                "method": "POST",
                "secretArgs": {"ttl": "1m", "policies": [unique]},
            }
        ],
        role=unique,
    )
    whole = json.loads(files_of(response)["token.json"])
    assert list(whole)[:7] == ["request_id", "lease_id", "lease_duration", "renewable", "data", "warnings", "auth"]
    assert list(whole["auth"]) == [
        "client_token",
        "accessor",
        "policies",
        "token_policies",
        "identity_policies",
        "metadata",
        "orphan",
        "entity_id",
        "lease_duration",
        "renewable",
        "mfa_requirement",
    ]
    assert whole["auth"]["lease_duration"] == 60
