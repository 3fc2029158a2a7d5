"""One provider for Vault and OpenBao: the same process serves vault.sock (the reference's
contract, unchanged) and openbao.sock (openbao-csi-provider's), against the real OpenBao."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from provider._proto import service_pb2, service_pb2_grpc
from provider.cli import build_parser, settings_from
from provider.config import VaultSettings
from provider.mount import MountRequest
from provider.versions import object_json
from tests.conftest import PROVIDER_NAMESPACE, ProviderClient, VaultWorld, files_of, start_provider, versions_of
from tests.kube_fake import FakePod
from tests.openbao import free_port

DEAD = "http://127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture
def both(tmp_path: Path, world: VaultWorld) -> Iterator[tuple[ProviderClient, service_pb2_grpc.CSIDriverProviderStub]]:
    """One provider serving vault.sock and openbao.sock; the client of each."""
    client = start_provider(
        tmp_path,
        world,
        extra_endpoints=(str(tmp_path / "openbao.sock"),),
        openbao=VaultSettings(address=world.bao.url),
    )
    channel = grpc.insecure_channel(f"unix:{tmp_path / 'openbao.sock'}")
    try:
        yield client, service_pb2_grpc.CSIDriverProviderStub(channel)  # type: ignore[no-untyped-call]
    finally:
        channel.close()
        client.close()


def attributes(world: VaultWorld, pod: FakePod, params: dict[str, str], audiences: tuple[str, ...]) -> str:
    tokens = {audience: {"token": world.kube.pod_token(pod, audience)} for audience in audiences}
    return json.dumps(
        {
            **params,
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
            "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(tokens),
        }
    )


def mount(stub: Any, attrs: str) -> service_pb2.MountResponse:
    request = service_pb2.MountRequest(attributes=attrs, target_path="/t", permission="420", secrets="{}")
    return stub.Mount(request, timeout=30)  # type: ignore[no-any-return]


def objects(name: str) -> str:
    return yaml.safe_dump([{"objectName": "k", "secretPath": f"kv1/{name}", "secretKey": "k"}])


@pytest.fixture
def openbao_pod(world: VaultWorld, unique: str) -> FakePod:
    """A KV secret and a role bound to the audience `openbao`, as the OpenBao provider's docs set it up."""
    world.bao.api("POST", f"kv1/{unique}", {"k": "from-openbao"})
    return world.grant(unique, [f"kv1/{unique}"], audience="openbao")


@pytest.mark.parametrize(
    ("params", "wins"),
    [
        ({"baoAddress": "{bao}", "openbaoAddress": DEAD, "vaultAddress": DEAD}, "bao"),
        ({"openbaoAddress": "{bao}", "vaultAddress": DEAD}, "openbao"),
        ({"vaultAddress": "{bao}"}, "vault"),
    ],
    ids=["bao-first", "openbao-second", "vault-last"],
)
def test_openbao_parameters_are_looked_up_bao_then_openbao_then_vault(
    both: tuple[ProviderClient, Any],
    world: VaultWorld,
    openbao_pod: FakePod,
    unique: str,
    params: dict[str, str],
    wins: str,
) -> None:
    _, openbao = both
    params = {key: value.replace("{bao}", world.bao.url) for key, value in params.items()}
    role = {"bao": "baoRoleName", "openbao": "openbaoRoleName", "vault": "roleName"}[wins]
    attrs = attributes(world, openbao_pod, {**params, role: unique, "objects": objects(unique)}, ("openbao",))
    assert files_of(mount(openbao, attrs)) == {"k": b"from-openbao"}


def test_the_openbao_socket_defaults_to_the_openbao_audience_and_its_own_hmac_key(
    both: tuple[ProviderClient, Any], world: VaultWorld, openbao_pod: FakePod, unique: str
) -> None:
    vault, openbao = both
    params = {"roleName": unique, "objects": objects(unique)}
    requested = world.kube.calls["tokenrequest"]
    # The driver's tokenRequests hold only audience openbao: what openbao.sock uses...
    response = mount(openbao, attributes(world, openbao_pod, params, ("openbao",)))
    assert files_of(response) == {"k": b"from-openbao"}
    assert world.kube.calls["tokenrequest"] == requested  # the driver's token served
    secret = world.kube.secrets[(PROVIDER_NAMESPACE, "openbao-csi-provider-hmac-key")]
    key = base64.b64decode(secret["data"]["key"])
    parsed = vault.app.dispatchers["openbao"].mounter.parse(
        MountRequest(attributes=attributes(world, openbao_pod, params, ()), target_path="/t", permission="420")
    )
    digest = hmac.new(key, object_json(parsed.objects[0]) + b"from-openbao", hashlib.sha256).digest()
    assert versions_of(response) == {"k": base64.urlsafe_b64encode(digest).decode()}
    # ...while vault.sock, unchanged, looks for audience vault and, not finding it, asks
    # the TokenRequest API for a token of its own.
    with contextlib.suppress(grpc.RpcError):  # whether the role takes that token is Vault's call
        mount(vault.stub, attributes(world, openbao_pod, params, ("openbao",)))
    assert world.kube.calls["tokenrequest"] == requested + 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"baoSkipTLSVerify": "maybe"}, "'baoSkipTLSVerify' in SecretProviderClass parameters must be a boolean"),
        (
            {"baoKubernetesMountPath": "a", "openbaoAuthMountPath": "b"},
            "set only one of 'baoKubernetesMountPath' and 'openbaoAuthMountPath'",
        ),
        ({"openbaoAddress": "ftp://x y"}, "'openbaoAddress' in SecretProviderClass parameters is not a valid OpenBao"),
        ({"baoNamespace": "n" * 300}, "'baoNamespace' is longer than 256 characters"),
    ],
)
def test_openbao_errors_name_the_parameter_the_class_wrote(
    both: tuple[ProviderClient, Any],
    world: VaultWorld,
    openbao_pod: FakePod,
    unique: str,
    params: dict[str, str],
    message: str,
) -> None:
    _, openbao = both
    attrs = attributes(world, openbao_pod, {"roleName": unique, "objects": objects(unique), **params}, ("openbao",))
    with pytest.raises(grpc.RpcError) as error:
        mount(openbao, attrs)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_the_vault_socket_still_reads_only_the_references_names(
    both: tuple[ProviderClient, Any], world: VaultWorld, unique: str
) -> None:
    vault, _ = both
    world.bao.api("POST", f"kv1/{unique}", {"k": "from-vault"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    # baoAddress means nothing here: the default address (the real OpenBao) is used.
    params = {"roleName": unique, "objects": objects(unique), "baoAddress": DEAD, "baoRoleName": "ignored"}
    assert files_of(mount(vault.stub, attributes(world, pod, params, ("vault",)))) == {"k": b"from-vault"}
    with pytest.raises(grpc.RpcError) as error:  # vaultAddress is read, as always
        mount(vault.stub, attributes(world, pod, {**params, "vaultAddress": DEAD}, ("vault",)))
    assert "cannot reach Vault at http://127.0.0.1:1" in error.value.details()


def test_both_sockets_serve_at_once_with_every_feature_and_a_flavour_label(
    both: tuple[ProviderClient, Any], world: VaultWorld, openbao_pod: FakePod, unique: str
) -> None:
    vault, openbao = both
    issue = world.pki_engine(f"pki-{unique}", ttl="1h")
    world.policy(
        unique, f'path "kv1/{unique}" {{ capabilities = ["read"] }}\npath "{issue}" {{ capabilities = ["update"] }}'
    )
    shaped = yaml.safe_dump(
        [
            {"objectName": "kv", "secretPath": f"kv1/{unique}", "writeFile": False},
            {
                "objectName": "tls.crt",
                "secretPath": issue,
                "method": "PUT",
                "secretArgs": {"common_name": "a.example.com", "ttl": "30m"},
                "format": "pem-chain",
            },
            {"objectName": "env", "template": "K={{ .Objects.kv.Secrets.k }}\n"},
        ]
    )
    attrs = attributes(world, openbao_pod, {"openbaoRoleName": unique, "objects": shaped}, ("openbao",))
    first = mount(openbao, attrs)
    assert files_of(first)["env"] == b"K=from-openbao\n"
    again = mount(openbao, attrs)
    assert files_of(again) == files_of(first) and versions_of(again) == versions_of(first)  # the certificate kept
    world.bao.api("POST", f"kv1/{unique}-v", {"k": "v"})
    vault_pod = world.grant(f"{unique}-v", [f"kv1/{unique}-v"])
    vault_attrs = attributes(
        world, vault_pod, {"roleName": f"{unique}-v", "objects": objects(f"{unique}-v")}, ("vault",)
    )
    assert files_of(mount(vault.stub, vault_attrs)) == {"k": b"v"}
    registry = vault.app.metrics.registry
    for flavour in ("vault", "openbao"):
        value = registry.get_sample_value(
            "vault_csi_provider_mounts_total", {"outcome": "ok", "code": "OK", "provider": flavour}
        )
        assert value is not None and value >= 1, flavour


def test_flags_and_environment_aliases_for_openbao() -> None:
    parse = build_parser().parse_args
    env = {"BAO_ADDR": "https://bao:8200", "VAULT_ADDR": "https://vault:8200", "VAULT_NAMESPACE": "ns-v"}
    settings = settings_from(parse(["-endpoint=/p/vault.sock", "-endpoint=/p/openbao.sock"]), env)
    assert settings.endpoints == ("/p/vault.sock", "/p/openbao.sock")
    assert settings.vault.address == "https://vault:8200"
    assert settings.openbao.address == "https://bao:8200"  # BAO_ADDR first
    assert settings.openbao.namespace == "ns-v"  # then VAULT_*
    assert settings.openbao_hmac_secret_name == "openbao-csi-provider-hmac-key"
    flags = [
        "-endpoint=/p/openbao.sock",
        "-openbao-addr=https://flag:8200",
        "-openbao-mount=jwt",
        "-openbao-namespace=team",
        "-openbao-tls-ca-cert=/ca.pem",
        "-openbao-tls-server-name=bao.local",
        "-openbao-tls-skip-verify",
        "-openbao-hmac-secret-name=mine",
    ]
    settings = settings_from(parse(flags), {**env, "BAO_CAPATH": "/cas", "BAO_CLIENT_CERT": "/c.pem"})
    openbao = settings.openbao
    assert (openbao.address, openbao.auth_mount, openbao.namespace) == ("https://flag:8200", "jwt", "team")
    assert (openbao.tls.ca_cert, openbao.tls.ca_directory, openbao.tls.server_name) == ("/ca.pem", "/cas", "bao.local")
    assert openbao.tls.client_cert == "/c.pem" and openbao.tls.skip_verify
    assert settings.openbao_hmac_secret_name == "mine"
    assert settings.vault.tls == VaultSettings().tls  # the Vault defaults are untouched
    with_openbao = parse(["-endpoint=/p/openbao.sock"])
    assert settings_from(with_openbao, {"BAO_SKIP_VERIFY": "true"}).openbao.tls.skip_verify
    assert not settings_from(with_openbao, {"BAO_SKIP_VERIFY": "true"}).vault.tls.skip_verify


def test_a_socket_named_twice_is_refused() -> None:
    from provider.errors import ConfigError

    with pytest.raises(ConfigError, match="given more than once"):
        settings_from(build_parser().parse_args(["-endpoint=/a.sock", "-endpoint=/a.sock"]), {})


def test_the_provider_process_serves_both_sockets(
    tmp_path: Path, world: VaultWorld, openbao_pod: FakePod, unique: str
) -> None:
    from tests.conftest import spawn_provider

    health = free_port()
    process = spawn_provider(
        tmp_path,
        world,
        f"-endpoint={tmp_path / 'openbao.sock'}",
        f"-openbao-addr={world.bao.url}",
        f"-health-addr=127.0.0.1:{health}",
    )
    try:
        import time

        deadline = time.monotonic() + 30
        while not (tmp_path / "openbao.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with grpc.insecure_channel(f"unix:{tmp_path / 'openbao.sock'}") as channel:
            stub = service_pb2_grpc.CSIDriverProviderStub(channel)  # type: ignore[no-untyped-call]
            attrs = attributes(world, openbao_pod, {"roleName": unique, "objects": objects(unique)}, ("openbao",))
            assert files_of(mount(stub, attrs)) == {"k": b"from-openbao"}
        assert (tmp_path / "vault.sock").exists()
    finally:
        process.terminate()
        process.wait(30)
    assert not (tmp_path / "openbao.sock").exists() and not (tmp_path / "vault.sock").exists()


OPENBAO_CLASS = """
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata: {name: bao-kv, namespace: app}
spec:
  provider: PROVIDER
  parameters:
    openbaoRoleName: app
    baoAddress: https://openbao.openbao:8200
    openbaoSkipTLSVerify: "false"
    objects: |
      - {objectName: k, secretPath: secret/data/app, secretKey: k}
"""


def test_check_reads_spec_provider(tmp_path: Path) -> None:
    from provider import check

    spc = tmp_path / "spc.yaml"
    spc.write_text(OPENBAO_CLASS.replace("PROVIDER", "openbao"))
    out = io.StringIO()
    assert check.main(["--strict", str(spc)], out=out) == 0, out.getvalue()
    assert "warning" not in out.getvalue()
    spc.write_text(OPENBAO_CLASS.replace("PROVIDER", "vault"))
    out = io.StringIO()
    assert check.main([str(spc)], out=out) == 1  # no roleName for the Vault contract
    assert 'unknown parameter "baoAddress" is ignored: that is the OpenBao provider\'s name' in out.getvalue()
    spc.write_text(OPENBAO_CLASS.replace("PROVIDER", "azure"))
    out = io.StringIO()
    assert check.main([str(spc)], out=out) == 1
    assert "this provider answers 'vault' (vault.sock) and 'openbao' (openbao.sock)" in out.getvalue()


def test_the_openbao_overlay_serves_both_sockets_from_one_daemonset() -> None:
    from tests.test_deploy import DEPLOY, kustomize, only, validate

    documents = kustomize(DEPLOY / "overlays" / "openbao")
    for document in documents:
        validate(document)
    container = only(documents, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    endpoints = [a.split("=", 1)[1] for a in container["args"] if a.startswith("-endpoint=")]
    assert endpoints == ["/provider/vault.sock", "/provider/openbao.sock"]
    settings = settings_from(
        build_parser().parse_args(container["args"]), {e["name"]: e["value"] for e in container["env"] if "value" in e}
    )
    assert settings.openbao.address == "https://openbao.openbao.svc:8200"
    assert settings.vault.address == "https://vault.vault.svc:8200"
    # The provider may read both HMAC key Secrets (a copied openbao one is read, not created).
    role = only(documents, "Role")
    readable = [name for rule in role["rules"] if "get" in rule["verbs"] for name in rule.get("resourceNames", [])]
    assert {settings.hmac_secret_name, settings.openbao_hmac_secret_name} <= set(readable)


def test_an_empty_bao_variable_falls_back_to_vault_and_vault_only_nodes_ignore_bao() -> None:
    from provider.errors import ConfigError

    parse = build_parser().parse_args
    both_sockets = parse(["-endpoint=/p/vault.sock", "-endpoint=/p/openbao.sock"])
    env = {"BAO_ADDR": "", "VAULT_ADDR": "https://vault:8200", "BAO_SKIP_VERIFY": "", "VAULT_SKIP_VERIFY": "true"}
    settings = settings_from(both_sockets, env)
    assert settings.openbao.address == "https://vault:8200" and settings.openbao.tls.skip_verify
    with pytest.raises(ConfigError, match="BAO_SKIP_VERIFY must be a boolean"):
        settings_from(both_sockets, {"BAO_SKIP_VERIFY": "nope"})
    with pytest.raises(ConfigError, match="VAULT_SKIP_VERIFY must be a boolean"):  # the variable actually read
        settings_from(both_sockets, {"VAULT_SKIP_VERIFY": "garbage"})
    # A node serving vault.sock alone starts as before, whatever BAO_* holds.
    vault_only = settings_from(parse(["-vault-tls-skip-verify=false"]), {"BAO_SKIP_VERIFY": "nope"})
    assert not vault_only.vault.tls.skip_verify


def test_empty_openbao_parameters_count_as_unset() -> None:
    from provider.flavour import OPENBAO

    params, written = OPENBAO.canonical({"baoRoleName": "", "roleName": "r", "baoAddress": "", "vaultAddress": "v"})
    assert params["roleName"] == "r" and written["roleName"] == "roleName"
    assert params["vaultAddress"] == "v" and written["vaultAddress"] == "vaultAddress"


def test_check_hints_openbao_names_on_a_vault_class_only_for_real_ones(tmp_path: Path) -> None:
    from provider import check

    warnings = check.lint_parameters({"baoRoleName": "r", "openbaoAddress": "a", "baobab": "x", "roleName": "r"})
    assert any(
        '"baoRoleName" is ignored: that is the OpenBao provider\'s name' in w and "write roleName" in w
        for w in warnings
    )
    assert any('"openbaoAddress"' in w and "write vaultAddress" in w for w in warnings)
    assert not any('"baobab"' in w and "OpenBao" in w for w in warnings)


def test_check_uses_the_openbao_defaults_for_openbao_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provider import check

    monkeypatch.setenv("BAO_ADDR", "https://bao.example:8200")
    monkeypatch.setenv("VAULT_ADDR", "not a url")
    spc = tmp_path / "spc.yaml"
    spc.write_text(
        OPENBAO_CLASS.replace("PROVIDER", "openbao").replace("    baoAddress: https://openbao.openbao:8200\n", "")
    )
    out = io.StringIO()
    assert check.main([str(spc)], out=out) == 0, out.getvalue()
