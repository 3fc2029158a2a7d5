"""Shaping the files, against real OpenBao (and PostgreSQL): secretKeyPath, expandKeys,
format, raw PEM passthrough, templates and writeFile, through the gRPC socket."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provider import render
from tests.conftest import ProviderClient, VaultWorld, files_of, start_provider, versions_of
from tests.kube_fake import FakePod
from tests.postgres import Postgres
from tests.test_dynamic import Database, grant_db, logs_in


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def kv2_pod(world: VaultWorld, name: str, data: dict[str, Any]) -> FakePod:
    world.bao.api("POST", f"secret/data/{name}", {"data": data})
    return world.grant(name, [f"secret/data/{name}"])


def refused(provider: ProviderClient, pod: FakePod, objects: list[dict[str, Any]], role: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        provider.mount(pod, objects, role=role)
    return error.value


CONFIG = {"POSTGRES": {"host": "db.internal", "port": 5432}, "items": ["first", "second"], "a.b": "dotted"}


def test_secret_key_path_selects_nested_values_in_kv2(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    pod = kv2_pod(world, unique, {**CONFIG, "blob": {"inner": base64.b64encode(b"\x00bin").decode()}})
    path = f"secret/data/{unique}"
    objects = [
        {"objectName": "host", "secretPath": path, "secretKeyPath": "/POSTGRES/host"},
        {"objectName": "port", "secretPath": path, "secretKeyPath": "/POSTGRES/port"},
        {"objectName": "pg", "secretPath": path, "secretKeyPath": "/POSTGRES"},
        {"objectName": "second", "secretPath": path, "secretKeyPath": "/items/1"},
        {"objectName": "dotted", "secretPath": path, "secretKey": "a.b"},  # still the literal key
        {"objectName": "bin", "secretPath": path, "secretKeyPath": "/blob/inner", "encoding": "base64"},
    ]
    files = files_of(provider.mount(pod, objects, role=unique))
    assert files == {
        "host": b"db.internal",
        "port": b"5432",
        "pg": b'{"host":"db.internal","port":5432}',
        "second": b"second",
        "dotted": b"dotted",
        "bin": b"\x00bin",
    }


@pytest.mark.parametrize(
    ("pointer", "message"),
    [
        ("/POSTGRES/user", 'secretKeyPath "/POSTGRES/user" does not exist at secret/data/{}: no key "user" under'),
        ("/items/2", '"/items" is a list of 2 items, not "2"'),
        ("/items/x", '"/items" is a list of 2 items, not "x"'),
        ("/POSTGRES/host/x", '"/POSTGRES/host" is not a map or list'),
    ],
)
def test_a_secret_key_path_that_misses_names_the_pointer_and_the_path(
    provider: ProviderClient, world: VaultWorld, unique: str, pointer: str, message: str
) -> None:
    pod = kv2_pod(world, unique, CONFIG)
    objects = [{"objectName": "x", "secretPath": f"secret/data/{unique}", "secretKeyPath": pointer}]
    error = refused(provider, pod, objects, unique)
    assert error.code() == grpc.StatusCode.NOT_FOUND  # as for a missing secretKey
    assert message.format(unique) in error.details()
    assert "db.internal" not in error.details()


def test_secret_key_path_in_kv1(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"nested": {"list": [{"k": "v1"}]}})
    pod = world.grant(unique, [f"kv1/{unique}"])
    objects = [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKeyPath": "/nested/list/0/k"}]
    assert files_of(provider.mount(pod, objects, role=unique)) == {"k": b"v1"}


@pytest.mark.parametrize("engine", ["kv1", "kv2"])
def test_expand_keys_writes_one_file_per_key_each_with_its_own_version(
    provider: ProviderClient, world: VaultWorld, unique: str, engine: str
) -> None:
    data = {"username": "app", "password": "pw", "port": 5432, "DB_HOST": "h", "DB_NAME": "n"}
    if engine == "kv1":
        world.bao.api("POST", f"kv1/{unique}", data)
        path, pod = f"kv1/{unique}", world.grant(unique, [f"kv1/{unique}"])
    else:
        path, pod = f"secret/data/{unique}", kv2_pod(world, unique, data)
    objects = [
        {"objectName": "app", "secretPath": path, "expandKeys": True},
        {"objectName": "db", "secretPath": path, "expandKeys": True, "includeKeys": "^DB_", "excludeKeys": "NAME$"},
    ]
    response = provider.mount(pod, objects, role=unique)
    assert files_of(response) == {
        "app/DB_HOST": b"h",
        "app/DB_NAME": b"n",
        "app/password": b"pw",
        "app/port": b"5432",
        "app/username": b"app",
        "db/DB_HOST": b"h",
    }
    versions = versions_of(response)
    assert set(versions) == set(files_of(response))  # one version per file, its id the file's path
    assert len(set(versions.values())) == len(versions)
    again = provider.mount(pod, objects, role=unique)
    assert versions_of(again) == versions  # unchanged secret, unchanged versions
    if engine == "kv1":
        world.bao.api("POST", path, {**data, "password": "new"})
    else:
        world.bao.api("POST", path, {"data": {**data, "password": "new"}})
    changed = versions_of(provider.mount(pod, objects, role=unique))
    assert {k for k in versions if changed[k] != versions[k]} == {"app/password"}


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ({"a/b": "x"}, {}, 'key "a/b" at secret/data/{} is not a safe file name'),
        ({"..": "x"}, {}, "must not contain '..'"),
        ({"ok": "x", "bad\nname": "y"}, {}, "control or invisible characters"),
        ({"a": "x"}, {"includeKeys": "^z"}, "no keys left at secret/data/{} after includeKeys/excludeKeys"),
        ({}, {}, "no keys left at secret/data/{}; nothing to write"),
    ],
    ids=["slash", "dotdot", "control", "filtered-out", "empty"],
)
def test_expand_keys_refuses_unsafe_or_no_keys_naming_the_object(
    provider: ProviderClient, world: VaultWorld, unique: str, data: dict[str, str], extra: dict[str, Any], message: str
) -> None:
    pod = kv2_pod(world, unique, data)
    objects = [{"objectName": "app", "secretPath": f"secret/data/{unique}", "expandKeys": True, **extra}]
    error = refused(provider, pod, objects, unique)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'object "app"' in error.details() and message.format(unique) in error.details()


def test_two_objects_writing_one_file_are_refused(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    pod = kv2_pod(world, unique, {"username": "app"})
    path = f"secret/data/{unique}"
    objects = [
        {"objectName": "app", "secretPath": path, "expandKeys": True},
        {"objectName": "app/username", "secretPath": path, "secretKey": "username"},
    ]
    error = refused(provider, pod, objects, unique)
    assert 'writes "app/username", which object "app" writes' in error.details()


@pytest.mark.parametrize(
    ("objects", "inner", "outer"),
    [
        (
            [{"objectName": "db", "secretKey": "password"}, {"objectName": "db/user", "secretKey": "username"}],
            "db/user",
            "db",
        ),
        (
            [{"objectName": "db", "expandKeys": True}, {"objectName": "db/password/more", "secretKey": "username"}],
            "db/password/more",
            "db/password",
        ),
        (
            [{"objectName": "a/b/c", "secretKey": "username"}, {"objectName": "a", "secretKey": "password"}],
            "a/b/c",
            "a",
        ),
    ],
    ids=["object-in-object", "object-in-expanded-key", "written-first"],
)
def test_a_file_where_another_objects_directory_must_be_is_refused(
    provider: ProviderClient, world: VaultWorld, unique: str, objects: list[dict[str, Any]], inner: str, outer: str
) -> None:
    """The driver could write neither: the Mount says which objects clash, not the pod's
    later "file exists"."""
    pod = kv2_pod(world, unique, {"username": "app", "password": "pw"})
    objects = [{**o, "secretPath": f"secret/data/{unique}"} for o in objects]
    error = refused(provider, pod, objects, unique)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f'writes "{inner}" inside "{outer}", which object ' in error.details()


def test_format_json_keeps_its_version_while_the_secret_stays(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod = kv2_pod(world, unique, {"z": "1", "a": {"y": 2, "b": True}})
    path = f"secret/data/{unique}"
    objects = [{"objectName": "doc", "secretPath": path, "format": "json"}, {"objectName": "whole", "secretPath": path}]
    first = provider.mount(pod, objects, role=unique)
    doc = json.loads(files_of(first)["doc"])
    assert doc["data"] == {"z": "1", "a": {"y": 2, "b": True}} and set(doc) == {"data", "metadata"}
    assert files_of(first)["doc"] == json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    assert b"request_id" in files_of(first)["whole"]  # the whole response is unchanged: today's bytes
    second = provider.mount(pod, objects, role=unique)
    assert files_of(second)["doc"] == files_of(first)["doc"]
    assert versions_of(second)["doc"] == versions_of(first)["doc"]
    world.bao.api("POST", path, {"data": {"z": "2"}})
    assert versions_of(provider.mount(pod, objects, role=unique))["doc"] != versions_of(first)["doc"]


def test_pem_bundle_and_chain_come_from_one_issue_and_are_kept_on_remount(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    mount = f"pki-{unique}"
    issue = world.pki_engine(mount, ttl="1h")
    pod = world.grant(unique, [f"{mount}/issue/web"])
    args = {"common_name": "a.example.com", "ttl": "30m"}
    common = {"secretPath": issue, "method": "PUT", "secretArgs": args}
    objects = [
        {"objectName": "tls.crt", "format": "pem-chain", **common},
        {"objectName": "tls.key", "secretKey": "private_key", **common},
        {"objectName": "bundle.pem", "format": "pem-bundle", **common},
    ]
    first = files_of(provider.mount(pod, objects, role=unique))
    chain = x509.load_pem_x509_certificates(first["tls.crt"])
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=a.example.com", f"CN={mount}-ca"]
    key = serialization.load_pem_private_key(first["tls.key"], password=None)
    assert key.public_key() == chain[0].public_key()  # the key and the certificate of one issue
    assert first["bundle.pem"] == first["tls.crt"] + first["tls.key"].strip() + b"\n"
    assert first["tls.crt"].endswith(b"-----END CERTIFICATE-----\n")
    certificates = world.bao.api("LIST", f"{mount}/certs")["data"]["keys"]
    for _ in range(3):
        assert files_of(provider.mount(pod, objects, role=unique)) == first
    assert world.bao.api("LIST", f"{mount}/certs")["data"]["keys"] == certificates  # nothing reissued


def test_pem_format_without_a_certificate_says_what_it_needs(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod = kv2_pod(world, unique, {"certificate": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----"})
    objects = [{"objectName": "b", "secretPath": f"secret/data/{unique}", "format": "pem-bundle"}]
    assert 'format pem-bundle needs a "private_key"' in refused(provider, pod, objects, unique).details()
    objects = [{"objectName": "c", "secretPath": f"secret/data/{unique}", "format": "pem-chain"}]
    assert files_of(provider.mount(pod, objects, role=unique))["c"].count(b"BEGIN CERTIFICATE") == 1


def test_raw_pem_replies_are_passed_through(provider: ProviderClient, world: VaultWorld, unique: str) -> None:
    mount = f"pki-{unique}"
    world.pki_engine(mount)
    pod = world.grant(unique, [f"{mount}/ca_chain", f"{mount}/ca/pem"])
    objects = [
        {"objectName": "chain.pem", "secretPath": f"{mount}/ca_chain"},
        {"objectName": "ca.pem", "secretPath": f"{mount}/ca/pem", "format": "pem-chain"},
    ]
    files = files_of(provider.mount(pod, objects, role=unique))
    ca = x509.load_pem_x509_certificate(files["ca.pem"])
    assert ca.subject.rfc4514_string() == f"CN={mount}-ca"
    assert x509.load_pem_x509_certificates(files["chain.pem"])[0] == ca
    objects = [{"objectName": "k", "secretPath": f"{mount}/ca/pem", "secretKey": "certificate"}]
    error = refused(provider, pod, objects, unique)
    assert f"reply at {mount}/ca/pem is not JSON (e.g. PEM), so secretKey cannot select from it" in error.details()


PGPASS = "{{ with .Objects.db.Secrets }}db.internal:5432:app:{{ .username }}:{{ .password }}{{ end }}\n"


def test_a_template_over_database_credentials_keeps_one_user_across_remounts(
    provider: ProviderClient, world: VaultWorld, postgres: Postgres, unique: str
) -> None:
    db = Database(world, postgres, unique, ttl="1h", max_ttl="2h")
    pod = grant_db(world, db)
    objects = [
        {"objectName": "db", "secretPath": db.path, "writeFile": False},
        {"objectName": ".pgpass", "template": PGPASS, "filePermission": 0o600},
        {"objectName": "lease", "secretPath": db.path, "template": "{{ .Lease.ID }} {{ .Lease.Renewable }}"},
    ]
    first = provider.mount(pod, objects, role=unique)
    files = files_of(first)
    assert set(files) == {".pgpass", "lease"}  # writeFile: false writes nothing
    host, port, database, user, password = files[".pgpass"].decode().rstrip("\n").split(":")
    assert (host, port, database) == ("db.internal", "5432", "app")
    assert logs_in(postgres, {"username": user.encode(), "password": password.encode()})
    assert files["lease"].decode() == f"{db.leases() and db.path + '/' + db.leases()[0]} true"
    assert [f.mode for f in first.files if f.path == ".pgpass"] == [0o600]
    for _ in range(3):
        again = provider.mount(pod, objects, role=unique)
        assert files_of(again) == files and versions_of(again) == versions_of(first)
    assert len(db.users()) == 1 and len(db.leases()) == 1


def test_a_template_reads_several_engines_and_kv2_metadata(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"api_key": "k-1", "flags": ["a", "b"]}})
    world.bao.api("POST", f"kv1/{unique}", {"LOG_LEVEL": "info", "REGION": "eu"})
    pod = world.grant(unique, [f"secret/data/{unique}", f"kv1/{unique}"])
    env = (
        "{{- range $k, $v := .Objects.settings.Secrets }}{{ $k }}={{ $v | quote }}\n{{ end -}}\n"
        "API_KEY={{ .Objects.api.Secrets.api_key }}\n"
        'FLAGS={{ join "," .Objects.api.Secrets.flags }}\n'
        "API_VERSION={{ .Objects.api.Metadata.version }}\n"
    )
    objects = [
        {"objectName": "api", "secretPath": f"secret/data/{unique}", "writeFile": False},
        {"objectName": "settings", "secretPath": f"kv1/{unique}", "writeFile": False},
        {"objectName": ".env", "template": env},
    ]
    files = files_of(provider.mount(pod, objects, role=unique))
    assert files == {".env": b'LOG_LEVEL="info"\nREGION="eu"\nAPI_KEY=k-1\nFLAGS=a,b\nAPI_VERSION=1\n'}


def test_editing_a_template_changes_its_version_even_when_the_output_does_not(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod = kv2_pod(world, unique, {"k": "v"})
    base = {"objectName": "t", "secretPath": f"secret/data/{unique}"}
    first = provider.mount(pod, [{**base, "template": "{{ .Secrets.k }}"}], role=unique)
    edited = provider.mount(pod, [{**base, "template": "{{/* edited */}}{{ .Secrets.k }}"}], role=unique)
    assert files_of(first) == files_of(edited) == {"t": b"v"}
    assert versions_of(first)["t"] != versions_of(edited)["t"]


@pytest.mark.parametrize(
    ("template", "code", "message"),
    [
        ("{{ .Secrets.passwrd }}", "INVALID_ARGUMENT", "template line 1: no key 'passwrd' in .Secrets (keys: k)"),
        ("a\n{{ if }}", "INVALID_ARGUMENT", 'object "t": template line 2: missing value for if'),
        ("{{ .Objects.nope.Secrets }}", "INVALID_ARGUMENT", "reads .Objects.nope, which is not an object"),
        ("{{ exec }}", "INVALID_ARGUMENT", "function 'exec' not defined"),
    ],
)
def test_template_errors_name_the_object_and_the_line(
    provider: ProviderClient, world: VaultWorld, unique: str, template: str, code: str, message: str
) -> None:
    pod = kv2_pod(world, unique, {"k": "secret-value"})
    objects = [{"objectName": "t", "secretPath": f"secret/data/{unique}", "template": template}]
    error = refused(provider, pod, objects, unique)
    assert error.code() == getattr(grpc.StatusCode, code)
    assert message in error.details() and "secret-value" not in error.details()


# Templates a hostile tenant might write: each fails its own Mount, quickly, as
# INVALID_ARGUMENT, and the provider keeps serving everyone else meanwhile.
HOSTILE_TEMPLATES = [
    "{{ range 100000000 }}x{{ end }}",
    "{{ range 300 }}{{ range 300 }}{{ range 300 }}{{ end }}{{ end }}{{ end }}",
    '{{ $s := "aaaaaaaaaaaaaaaa" }}{{ range 40 }}{{ $s = print $s $s }}{{ end }}{{ $s }}',
    '{{ range 2000 }}{{ printf "%4000s" "x" }}{{ end }}',
    "{{ if 1 }}" * 60 + "{{ end }}" * 60,
    "{{ " + "(" * 60 + "1" + ")" * 60 + " }}",
    '{{ define "a" }}{{ template "a" }}{{ end }}{{ template "a" }}',
    "{{ .__class__.__mro__ }}",
    "{{ .Secrets.k.__class__ }}",
    '{{ index . "__globals__" }}',
    "{{ call .Secrets.k }}",
    '{{ printf "%999999999s" "x" }}',
    "{{ " + "a" * 70_000 + " }}",
    "{{ range $i := .Secrets }}{{ $i.x.y.z }}{{ end }}",
    '{{ len . | printf "%d" | b64dec }}',
    "{{ toJson . }}{{ range 200000 }}{{ end }}",
]


def test_hostile_templates_fail_their_own_mount_while_others_mount(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    hostile_pod = kv2_pod(world, unique, {"k": "v"})
    good_pod, good_objects = world.kv_pod(f"{unique}-good")
    stop = threading.Event()
    good: list[float] = []
    errors: list[BaseException] = []

    def mount_good() -> None:
        while not stop.is_set() and len(good) < 500:
            started = time.monotonic()
            try:
                assert files_of(provider.mount(good_pod, good_objects, role=f"{unique}-good")) == {"k": b"v"}
            except BaseException as e:  # reported by the assertion below
                errors.append(e)
                return
            good.append(time.monotonic() - started)

    neighbour = threading.Thread(target=mount_good)
    neighbour.start()
    try:
        for template in HOSTILE_TEMPLATES:
            objects = [{"objectName": "t", "secretPath": f"secret/data/{unique}", "template": template}]
            started = time.monotonic()
            error = refused(provider, hostile_pod, objects, unique)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (template[:60], error.details())
            assert time.monotonic() - started < 3, template[:60]
    finally:
        stop.set()
        neighbour.join(timeout=30)
    assert not errors
    assert len(good) > 5 and max(good) < 2.5
    assert files_of(provider.mount(hostile_pod, [{"objectName": "k", **_kv2(unique)}], role=unique)) == {"k": b"v"}


def _kv2(name: str) -> dict[str, str]:
    return {"secretPath": f"secret/data/{name}", "secretKey": "k"}


def test_a_template_over_its_limits_fails_fast_on_the_next_mounts(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    pod = kv2_pod(world, unique, {"k": "v"})
    objects = [
        {"objectName": "t", "secretPath": f"secret/data/{unique}", "template": "{{ range 99999 }}{{ . }}{{ end }}"}
    ]
    first = refused(provider, pod, objects, unique)
    assert "steps" in first.details() or "took longer than" in first.details()
    started = time.monotonic()
    again = refused(provider, pod, objects, unique)
    assert "not rendered again for" in again.details()
    assert time.monotonic() - started < 0.5


def engine_object(world: VaultWorld, postgres: Postgres, engine: str, name: str) -> tuple[FakePod, dict[str, Any]]:
    """A pod allowed to read one secret of `engine`, and the request fields that read it."""
    if engine == "kv1":
        world.bao.api("POST", f"kv1/{name}", {"username": "u1", "password": "p1"})
        return world.grant(name, [f"kv1/{name}"]), {"secretPath": f"kv1/{name}"}
    if engine == "kv2":
        return kv2_pod(world, name, {"username": "u2", "password": "p2"}), {"secretPath": f"secret/data/{name}"}
    if engine == "database":
        db = Database(world, postgres, name, ttl="1h", max_ttl="2h")
        return grant_db(world, db), {"secretPath": db.path}
    issue = world.pki_engine(f"pki-{name}", ttl="1h")
    args = {"common_name": "m.example.com", "ttl": "30m"}
    return world.grant(name, [issue]), {"secretPath": issue, "method": "PUT", "secretArgs": args}


# Per engine: a key every reply has, and what a template makes of the reply.
ENGINE_KEYS = {"kv1": "username", "kv2": "username", "database": "username", "pki": "serial_number"}


@pytest.mark.parametrize("engine", ["kv1", "kv2", "database", "pki"])
def test_every_shape_on_every_engine_is_cut_from_one_reply_and_stable_on_remount(
    provider: ProviderClient, world: VaultWorld, postgres: Postgres, unique: str, engine: str
) -> None:
    pod, request = engine_object(world, postgres, engine, unique)
    key = ENGINE_KEYS[engine]
    objects = [
        {"objectName": "pointer", "secretKeyPath": f"/{key}", **request},
        {"objectName": "keys", "expandKeys": True, **request},
        {"objectName": "doc", "format": "json", **request},
        {"objectName": "input", "writeFile": False, **request},
        {"objectName": "rendered", "template": f"{{{{ .Objects.input.Secrets.{key} }}}}"},
        {"objectName": "own", "template": f"{{{{ .Secrets.{key} }}}}|{{{{ .Lease.Renewable }}}}", **request},
    ]
    first = provider.mount(pod, objects, role=unique)
    files = files_of(first)
    value = files["pointer"]
    assert files[f"keys/{key}"] == files["rendered"] == value  # one reply for every object
    assert files["own"].split(b"|")[0] == value
    doc = json.loads(files["doc"])  # only data: KV v2's is {data, metadata}
    assert (doc["data"] if engine == "kv2" else doc)[key].encode() == value
    assert "input" not in files
    for _ in range(2):  # KV is read again, unchanged; database and PKI replies are kept for the pod
        again = provider.mount(pod, objects, role=unique)
        assert files_of(again) == files and versions_of(again) == versions_of(first)


def test_a_response_too_large_names_its_largest_files_only(tmp_path: Path, world: VaultWorld, unique: str) -> None:
    """The message goes to the pod's events: an expandKeys object of thousands of keys made
    one of megabytes, which gRPC dropped ("metadata size exceeds hard limit"). No key's
    file is built once the files are past the limit (a reply of 99,000 keys cost a second
    of CPU and 56 MiB before): the message names the largest of those built."""
    client = start_provider(tmp_path, world, max_response_bytes=20_000)
    try:
        pod = kv2_pod(world, unique, {f"k{i:02d}": "v" * (1000 + i) for i in range(40)})
        error = refused(
            client, pod, [{"objectName": "db", "secretPath": f"secret/data/{unique}", "expandKeys": True}], unique
        )
        sizes = list(
            itertools.accumulate(1000 + i + len("db/k00") + render.RESPONSE_OVERHEAD_PER_FILE for i in range(40))
        )
        built = next(n for n, size in enumerate(sizes, 1) if size > 20_000)
        assert built < 40
        assert (
            f"the files total {sizes[built - 1]} bytes by the first {built} (the rest were not built)"
            in error.details()
        )
        assert "over the 20000-byte response limit" in error.details()
        last, tenth = built - 1, built - render.FILES_NAMED
        assert f'"db/k{last:02d}" ({1000 + last} bytes)' in error.details()
        assert f'"db/k{tenth:02d}" ({1000 + tenth} bytes)' in error.details()
        assert f'"db/k{tenth - 1:02d}"' not in error.details() and f'"db/k{built:02d}"' not in error.details()
        assert error.details().endswith(f" and {built - render.FILES_NAMED} more")
    finally:
        client.close()


def test_a_json_file_too_large_is_refused_before_it_is_built(tmp_path: Path, world: VaultWorld, unique: str) -> None:
    """`<` is six characters in Go's JSON: a 40 KB value makes a 240 KB whole response,
    refused against -max-response-bytes before it is written, naming the limit."""
    client = start_provider(tmp_path, world, max_response_bytes=100_000)
    try:
        pod = kv2_pod(world, unique, {"k": "<" * 40_000})
        path = f"secret/data/{unique}"
        for obj in (
            {"objectName": "whole", "secretPath": path},
            {"objectName": "doc", "secretPath": path, "format": "json"},
        ):
            error = refused(client, pod, [obj], unique)
            assert f"the JSON of the reply at {path} would be larger than 100000 bytes" in error.details()
        assert files_of(client.mount(pod, [{"objectName": "k", "secretPath": path, "secretKey": "k"}], role=unique))
    finally:
        client.close()
