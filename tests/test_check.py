"""`vault-csi-provider check`: offline lint of classes, and a real dry-run Mount."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from provider import check
from provider.cli import main as cli_main
from tests.conftest import VaultWorld

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "daemonset" / "examples"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return check.main(list(argv), out=out), out.getvalue()


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("spc-*.yaml")))
def test_examples_pass(name: str) -> None:
    status, output = run(str(EXAMPLES / name))
    assert status == 0, output
    assert output.startswith("ok: app/")


def test_every_problem_is_reported_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata: {name: broken, namespace: app}
spec:
  provider: vault
  secretObjects:
    - secretName: Bad_Name
      type: Opaque
      data: [{objectName: a, key: "not/valid"}]
    - secretName: tls
      type: kubernetes.io/tls
      data: [{objectName: a, key: tls.crt}, {objectName: missing, key: ca.crt}]
    - secretName: basic
      type: kubernetes.io/basic-auth
      data: [{objectName: a, key: token}]
    - secretName: nodata
  parameters:
    vaultSkipTLSVerify: "maybe"
    objects: |
      - {objectName: a, secretPath: secret/data/a}
      - {objectName: a, secretPath: secret/data/b}
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata: {name: fine, namespace: app}
spec:
  provider: vault
  parameters: {roleName: r, objects: "- {objectName: x, secretPath: p}"}
"""
    )
    status, output = run(str(bad))
    assert status == 1
    lines = output.splitlines()
    assert "ok: app/fine: 1 object(s), 0 synced Secret(s)" in lines
    errors = "\n".join(line for line in lines if line.startswith("error: app/broken:"))
    for expected in [
        "'vaultSkipTLSVerify' in SecretProviderClass parameters must be a boolean",
        "missing 'roleName'",
        'used more than once: "a"',
        '"Bad_Name" is not a valid Secret name',
        'key "not/valid" is not a valid Secret key',
        'a kubernetes.io/tls Secret needs exactly the keys "tls.crt", "tls.key"; it has "tls.crt", "ca.crt"',
        'a kubernetes.io/basic-auth Secret needs one of the keys "password", "username"',
        'secret "nodata": type is required',
        'secret "nodata": data must list at least one objectName and key',
    ]:
        assert expected in errors, expected


def test_unknown_object_names_in_secret_objects(tmp_path: Path) -> None:
    spc = yaml.safe_load((EXAMPLES / "spc-sync.yaml").read_text())
    spc["spec"]["secretObjects"][0]["data"][0]["objectName"] = "secret-9"
    path = tmp_path / "spc.yaml"
    path.write_text(yaml.safe_dump(spc))
    status, output = run(str(path))
    assert status == 1
    assert 'secret "app-credentials": data[0].objectName "secret-9" names no object in \'objects\'' in output


def test_cli_dispatches_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check", str(EXAMPLES / "spc-kv.yaml")]) == 0
    assert "ok: app/app-kv" in capsys.readouterr().out


def test_dry_run_mount_prints_files_and_the_synced_secrets(world: VaultWorld, tmp_path: Path, unique: str) -> None:
    bao = world.bao
    bao.api("POST", f"secret/data/{unique}/sync1", {"data": {"pwd": "s3cret-pwd"}})
    bao.api(
        "POST",
        f"secret/data/{unique}/sync2",
        {"data": {"username": "alice", "username_b64": base64.b64encode(b"bob").decode()}},
    )
    pki = f"pki-{unique}"
    world.pki_engine(pki)
    pod = world.grant(unique, [f"secret/data/{unique}/*", f"{pki}/issue/web"], namespace="app", service_account="app")
    spc_text = (
        (EXAMPLES / "spc-sync.yaml")
        .read_text()
        .replace("secret/data/app/", f"secret/data/{unique}/")
        .replace("pki/issue/app", f"{pki}/issue/web")
        .replace("roleName: app", f'roleName: "{unique}"')
    )
    spc = tmp_path / "spc.yaml"
    spc.write_text(spc_text)
    jwt = tmp_path / "token"
    jwt.write_text(world.kube.pod_token(pod))
    argv = [
        str(spc),
        "--mount",
        f"--vault-addr={bao.url}",
        f"--jwt-file={jwt}",
        "--namespace=app",
        "--service-account=app",
    ]

    status, output = run(*argv)
    assert status == 0, output
    assert "s3cret-pwd" not in output and "alice" not in output  # values only on request
    assert "secret-1  mode 0644  10 bytes  version " in output

    status, output = run(*argv, "--show-values")
    assert status == 0, output
    documents = [d for d in yaml.safe_load_all(output.split("\n---\n", 1)[1]) if d]
    opaque, tls = documents
    assert opaque["metadata"] == {
        "name": "app-credentials",
        "namespace": "app",
        "labels": {"environment": "test", "secrets-store.csi.k8s.io/managed": "true"},
    }
    assert opaque["type"] == "Opaque"
    assert {k: base64.b64decode(v) for k, v in opaque["data"].items()} == {
        "pwd": b"s3cret-pwd",
        "username": b"alice",
        "username_b64": b"bob",
    }
    assert tls["type"] == "kubernetes.io/tls"
    assert tls["metadata"]["annotations"] == {"example.com/issued-by": "vault-pki"}
    cert = x509.load_pem_x509_certificate(base64.b64decode(tls["data"]["tls.crt"]))
    assert cert.subject.rfc4514_string() == "CN=app.example.com"
    assert b"PRIVATE KEY" in base64.b64decode(tls["data"]["tls.key"])


def test_dry_run_leaves_no_token_or_lease_behind(world: VaultWorld, tmp_path: Path, unique: str) -> None:
    """Three dry runs of a class issuing a leased certificate left three tokens and three
    leases alive (database users, with a database class): the run revokes its token, and
    with it what the token issued."""
    bao = world.bao
    issue = world.pki_engine(f"pki-{unique}", generate_lease=True)
    pod = world.grant(unique, [issue], namespace="app", service_account="app")
    spc = tmp_path / "spc.yaml"
    spc.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "secrets-store.csi.x-k8s.io/v1",
                "kind": "SecretProviderClass",
                "metadata": {"name": "pki", "namespace": "app"},
                "spec": {
                    "provider": "vault",
                    "parameters": {
                        "roleName": unique,
                        "objects": yaml.safe_dump(
                            [
                                {
                                    "objectName": "crt",
                                    "secretPath": issue,
                                    "method": "PUT",
                                    "secretArgs": {"common_name": "a.example.com"},
                                    "secretKey": "certificate",
                                }
                            ]
                        ),
                    },
                },
            }
        )
    )
    jwt = tmp_path / "token"
    jwt.write_text(world.kube.pod_token(pod))

    def alive(prefix: str) -> int:
        reply = bao.api("LIST", f"sys/leases/lookup/{prefix}", expect=(200, 404))
        return len(reply["data"]["keys"]) if reply and "data" in reply else 0

    tokens = alive("auth/kubernetes/login")
    for _ in range(3):
        argv = [str(spc), "--mount", f"--vault-addr={bao.url}", f"--jwt-file={jwt}", "--namespace=app"]
        status, output = run(*argv, "--service-account=app")
        assert status == 0, output
        assert "revoked the dry run's Vault token, and the leases it issued" in output
    deadline = time.monotonic() + 10  # Vault revokes a revoked token's leases in the background
    while alive(issue) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(issue) == 0
    assert alive("auth/kubernetes/login") == tokens


def test_dry_run_reports_a_refused_login(world: VaultWorld, tmp_path: Path, unique: str) -> None:
    world.grant(unique, [f"secret/data/{unique}"], namespace="app", service_account="app")
    intruder = world.kube.add_pod("app", f"intruder-{unique}", "intruder")
    spc = tmp_path / "spc.yaml"
    spc.write_text(
        (EXAMPLES / "spc-kv.yaml")
        .read_text()
        .replace("roleName: app", f'roleName: "{unique}"')
        .replace("vaultAddress: https://vault.vault.svc:8200", f"vaultAddress: {world.bao.url}")
    )
    jwt = tmp_path / "token"
    jwt.write_text(world.kube.pod_token(intruder))
    status, output = run(str(spc), "--mount", f"--jwt-file={jwt}", "--namespace=app", "--service-account=intruder")
    assert status == 1
    assert (
        f'mount failed: vault login failed for role "{unique}" at auth/kubernetes as service account app/intruder'
        in output
    )


TYPOS = Path(__file__).resolve().parent / "corpus" / "classes-with-typos.yaml"


def test_typos_and_common_mistakes_are_named_with_what_to_write(tmp_path: Path) -> None:
    for document in yaml.safe_load_all(TYPOS.read_text()):
        single = tmp_path / f"{document['metadata']['name']}.yaml"
        single.write_text(yaml.safe_dump(document))
        _, output = run(str(single))
        for expected in document["metadata"]["annotations"]["expect"].strip().splitlines():
            assert f"warning: app/{document['metadata']['name']}: {expected}" in output, output
        strict_status, strict_output = run("-strict", str(single))  # Go-style flag, as the daemon's
        assert strict_status == 1 and "error: app/" in strict_output


def test_a_clean_class_has_no_warnings_even_with_strict() -> None:
    status, output = run("--strict", str(EXAMPLES / "spc-kv.yaml"))
    assert status == 0 and "warning" not in output, output


def test_secret_objects_are_checked_even_when_the_class_has_other_errors(tmp_path: Path) -> None:
    spc = tmp_path / "spc.yaml"
    spc.write_text(
        """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata: {name: both, namespace: app}
spec:
  provider: vault
  secretObjects:
    - secretName: creds
      type: Opaque
      data: [{objectName: passwrd, key: password}]
  parameters:
    objects: |
      - objectName: password
        secretPath: secret/data/app
        secretKey: password
"""
    )
    status, output = run(str(spc))
    assert status == 1
    assert "missing 'roleName'" in output
    assert 'data[0].objectName "passwrd" names no object' in output


def test_help_lists_the_check_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["-h"])
    assert "vault-csi-provider check" in capsys.readouterr().out


def shaped_class(objects: str, secret_objects: str = "") -> str:
    return (
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\n"
        "metadata: {name: shaped, namespace: app}\nspec:\n  provider: vault\n"
        + secret_objects
        + "  parameters:\n    roleName: app\n    objects: |\n"
        + "".join(f"      {line}\n" for line in objects.strip("\n").splitlines())
    )


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        (
            "- {objectName: t, template: 'a\n\n  {{ if }}'}",
            'object "t": template line 2: missing value for if',
        ),
        (
            "- {objectName: db, secretPath: database/creds/app}\n- {objectName: t, template: '{{ .Objects.dbb }}'}",
            'object "t": template reads .Objects.dbb, which is not an object of this class with a secretPath '
            '(objects it can read: "db")',
        ),
        ("- {objectName: t, template: '{{ .Secrets.x }}'}", "reads .Secrets, which needs a secretPath of its own"),
        (
            "- {objectName: a, secretPath: p, secretKey: k, secretKeyPath: /k}",
            'object "a": set only one of secretKey, secretKeyPath',
        ),
        ("- {objectName: a, secretPath: p, format: pem}", "format 'pem' is not supported; use json, pem-bundle"),
        ("- {objectName: a, secretPath: p, includeKeys: x}", "includeKeys filters the files of expandKeys"),
        ("- {objectName: a, secretPath: p, expandKeys: true, excludeKeys: '('}", "not a valid RE2 regular expression"),
        ("- {objectName: a, secretPath: p, secretKeyPath: a/b}", "must be a JSON Pointer starting with '/'"),
        ("- {objectName: a, secretPath: p, writeFile: 'no'}", 'object "a": writeFile must be true or false'),
    ],
)
def test_the_shaping_fields_are_checked_offline(tmp_path: Path, objects: str, message: str) -> None:
    spc = tmp_path / "spc.yaml"
    spc.write_text(shaped_class(objects))
    status, output = run(str(spc))
    assert status == 1 and message in output, output


def test_secret_objects_must_name_files_that_will_exist(tmp_path: Path) -> None:
    spc = tmp_path / "spc.yaml"
    spc.write_text(
        shaped_class(
            "- {objectName: db, secretPath: database/creds/app, writeFile: false}\n"
            "- {objectName: cfg, secretPath: secret/data/app/config, expandKeys: true}\n"
            "- {objectName: pgpass, template: '{{ .Objects.db.Secrets.username }}'}",
            "  secretObjects:\n  - secretName: s\n    type: Opaque\n    data:\n"
            "    - {objectName: db, key: a}\n    - {objectName: cfg, key: b}\n"
            "    - {objectName: cfg/log_level, key: c}\n    - {objectName: pgpass, key: d}\n",
        )
    )
    status, output = run(str(spc))
    assert status == 1
    assert 'data[0].objectName "db" is an object with writeFile: false, which writes no file' in output
    assert 'data[1].objectName "cfg" is an expandKeys object, which writes one file per key: name one' in output
    assert "data[2]" not in output and "data[3]" not in output


def test_new_keys_are_known_and_an_unread_write_file_false_is_a_warning(tmp_path: Path) -> None:
    spc = tmp_path / "spc.yaml"
    spc.write_text(shaped_class("- {objectName: db, secretPath: database/creds/app, writeFile: false, tempate: x}"))
    _, output = run(str(spc))
    assert 'unknown key "tempate" is ignored (did you mean "template"?)' in output
    assert 'object "db": writeFile: false and no template in this class reads it' in output
    clean = tmp_path / "clean.yaml"
    clean.write_text((EXAMPLES / "spc-env.yaml").read_text())
    status, output = run("--strict", str(clean))
    assert status == 0 and "warning" not in output, output


def test_dry_run_shows_rendered_templates_and_values_only_on_request(
    world: VaultWorld, tmp_path: Path, unique: str
) -> None:
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"user": "alice", "pass": "s3cret-pass"}})
    pod = world.grant(unique, [f"secret/data/{unique}"], namespace="app", service_account="app")
    spc = tmp_path / "spc.yaml"
    spc.write_text(
        shaped_class(
            f"- {{objectName: creds, secretPath: secret/data/{unique}, writeFile: false}}\n"
            "- {objectName: netrc, template: 'login {{ .Objects.creds.Secrets.user }} "
            "password {{ .Objects.creds.Secrets.pass }}'}\n"
            f"- {{objectName: all, secretPath: secret/data/{unique}, expandKeys: true}}"
        ).replace("roleName: app", f'roleName: "{unique}"')
    )
    jwt = tmp_path / "token"
    jwt.write_text(world.kube.pod_token(pod))
    argv = [str(spc), "--mount", f"--vault-addr={world.bao.url}", f"--jwt-file={jwt}", "--namespace=app"]
    status, output = run(*argv, "--service-account=app")
    assert status == 0, output
    assert "netrc  mode 0644  32 bytes  version " in output
    assert "all/pass  mode 0644  11 bytes" in output and "all/user" in output
    assert "creds" not in output.replace("objects", "")
    assert "s3cret-pass" not in output and "alice" not in output
    status, output = run(*argv, "--service-account=app", "--show-values")
    assert "login alice password s3cret-pass" in output


def test_a_hostile_file_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """A linter of tenants' classes reads hostile files: 683 bytes of nested aliases as
    metadata.name made check build and print 43 million values (stopped at 640 MiB; here two
    levels fewer, so that going back fails in seconds rather than hangs), and
    5,000 nested brackets ended it with a RecursionError traceback."""
    levels = ['    a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"    a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]  # 9**7 values
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  x:\n"
        + "\n".join(levels)
        + "\n  name: *a6\nspec:\n  provider: vault\n"
    )
    deep = tmp_path / "deep.yaml"
    deep.write_text("kind: SecretProviderClass\nspec: " + "[" * 5000 + "]" * 5000 + "\n")
    # The depth is refused by our bound or by the YAML scanner's own ("while increasing flow
    # level", in some PyYAML builds): either way an error line, not a traceback.
    for path, reason in ((bomb, "more than 200000 values"), (deep, "")):
        started = time.process_time()
        code, out = run(str(path))
        assert code == 1 and out.startswith(f"error: cannot read {path}") and reason in out, out
        assert time.process_time() - started < 1


def test_fields_that_should_be_strings_are_not_printed_whatever_they_hold(tmp_path: Path) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(
        "kind: SecretProviderClass\nmetadata: {name: [1, 2], namespace: {a: b}}\nspec: {provider: [vault]}\n"
    )
    code, out = run(str(path))
    assert code == 1 and "default/?" in out and 'spec.provider is "(missing, or not a string)"' in out, out
