"""Parsing and validating a Mount's SecretProviderClass parameters."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from provider.config import (
    MAX_CLASS_BODY_BYTES,
    MAX_CLASS_PATH_CHARS,
    MAX_QUERY_VALUES,
    ConfigError,
    TLSConfig,
    VaultSettings,
    _parse_permission,
    parse_mount,
    parse_objects,
)

DEFAULTS = VaultSettings(address="https://vault:8200", auth_mount="kubernetes", namespace="ns-default")
ONE_OBJECT = "- objectName: a\n  secretPath: secret/data/a\n"


def mount(attributes: dict[str, Any] | str, *, target_path: str = "/target", permission: str = "420") -> Any:
    text = attributes if isinstance(attributes, str) else json.dumps(attributes)
    return parse_mount(attributes=text, target_path=target_path, permission=permission, defaults=DEFAULTS)


def test_parameters_override_settings() -> None:
    config = mount(
        {
            "roleName": "r",
            "objects": ONE_OBJECT,
            "vaultAddress": "https://other:8200",
            "vaultNamespace": "team",
            "vaultAuthMountPath": "/k8s-east/",
            "vaultSkipTLSVerify": "true",
            "vaultCACertPath": "/ca.pem",
            "vaultTLSServerName": "vault.internal",
            "unknownKey": "ignored",
        }
    )
    assert config.vault_address == "https://other:8200"
    assert config.vault_namespace == "team"
    assert config.auth_mount == "k8s-east"
    assert config.tls == TLSConfig(ca_cert="/ca.pem", server_name="vault.internal", skip_verify=True)


def test_settings_apply_when_parameters_are_absent() -> None:
    config = mount({"roleName": "r", "objects": ONE_OBJECT})
    assert (config.vault_address, config.vault_namespace, config.auth_mount) == (
        "https://vault:8200",
        "ns-default",
        "kubernetes",
    )
    assert config.tls.skip_verify is False
    assert config.permission == 0o644


def test_token_for_the_audience_is_taken_from_the_driver() -> None:
    tokens = {"vault": {"token": "jwt-vault"}, "other": {"token": "jwt-other"}}
    base = {"roleName": "r", "objects": ONE_OBJECT, "csi.storage.k8s.io/serviceAccount.tokens": json.dumps(tokens)}
    assert mount(base).pod.token == "jwt-vault"
    assert mount({**base, "audience": "other"}).pod.token == "jwt-other"
    assert mount({**base, "audience": "missing"}).pod.token == ""
    assert "jwt-vault" not in repr(mount(base))


@pytest.mark.parametrize(
    ("attributes", "target_path", "permission", "message"),
    [
        ({"roleName": "r", "objects": ONE_OBJECT}, "", "420", "missing target path"),
        ({"objects": ONE_OBJECT}, "/t", "420", "missing 'roleName'"),
        ({"roleName": "r"}, "/t", "420", "no objects"),
        ({"roleName": "r", "objects": "[]"}, "/t", "420", "no objects"),
        ({"roleName": "r", "objects": "a: b"}, "/t", "420", "must be a YAML list"),
        ({"roleName": "r", "objects": "- [unclosed"}, "/t", "420", "'objects' is not valid YAML"),
        ("{not json", "/t", "420", "attributes are not valid JSON"),
        ('{"roleName": 3}', "/t", "420", "not a string: 'roleName'"),
        ("[1]", "/t", "420", "must be a JSON object"),
        ({"roleName": "r", "objects": ONE_OBJECT}, "/t", "512", "permission must be a decimal file mode"),
        ({"roleName": "r", "objects": ONE_OBJECT}, "/t", "-1", "permission must be"),
        ({"roleName": "r", "objects": ONE_OBJECT}, "/t", "abc", "permission must be"),
        (
            {"roleName": "r", "objects": ONE_OBJECT, "vaultSkipTLSVerify": "yes"},
            "/t",
            "420",
            "'vaultSkipTLSVerify' in SecretProviderClass parameters must be a boolean",
        ),
        (
            {"roleName": "r", "objects": ONE_OBJECT, "vaultKubernetesMountPath": "a", "vaultAuthMountPath": "b"},
            "/t",
            "420",
            "set only one of 'vaultKubernetesMountPath' and 'vaultAuthMountPath'",
        ),
        (
            {"roleName": "r", "objects": ONE_OBJECT, "csi.storage.k8s.io/serviceAccount.tokens": "{"},
            "/t",
            "420",
            "serviceAccount.tokens is not valid JSON",
        ),
        (
            {"roleName": "r", "objects": ONE_OBJECT, "vaultTLSServerName": "localhost/"},
            "/t",
            "420",
            "'vaultTLSServerName' must be a DNS name or an IP address",
        ),
        (
            {"roleName": "r", "objects": ONE_OBJECT, "vaultNamespace": "\u00e9quipe"},
            "/t",
            "420",
            "'vaultNamespace' must be printable ASCII",
        ),
    ],
    ids=[
        "no-target-path",
        "no-role",
        "no-objects",
        "empty-objects",
        "objects-not-list",
        "bad-yaml",
        "bad-json",
        "non-string-attribute",
        "attributes-not-object",
        "mode-too-big",
        "mode-negative",
        "mode-not-number",
        "bad-bool",
        "both-mount-paths",
        "bad-tokens-json",
        "server-name-not-a-name",
        "namespace-not-ascii",
    ],
)
def test_invalid_requests_name_what_to_fix(
    attributes: dict[str, Any] | str, target_path: str, permission: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mount(attributes, target_path=target_path, permission=permission)


def test_role_and_objects_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as error:
        mount({"objects": ONE_OBJECT}, target_path="")
    assert "missing target path" in str(error.value)
    assert "missing 'roleName'" in str(error.value)


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ("- objectName: /etc/passwd\n  secretPath: p", "objectName must be a relative path"),
        ("- objectName: ../../x\n  secretPath: p", "must not contain '..'"),
        ("- objectName: a/../../x\n  secretPath: p", "must not contain '..'"),
        ('- objectName: "a\\u202eb"\n  secretPath: p', "control or invisible"),
        ('- objectName: "a\\0b"\n  secretPath: p', "control or invisible"),
        ("- objectName: a//b\n  secretPath: p", "empty or '.'"),
        ("- secretPath: p", "objectName is required"),
        ("- objectName: a", "secretPath is required"),
        ("- objectName: a\n  secretPath: p\n  secretKey: k\n  encoding: rot13", "encoding 'rot13' is not supported"),
        ("- objectName: a\n  secretPath: p\n  method: DELETE", "method 'DELETE' is not supported"),
        ("- objectName: a\n  secretPath: p\n  filePermission: 01000", "filePermission must be a file mode"),
        ("- objectName: a\n  secretPath: p\n  filePermission: -1", "filePermission must be"),
        ("- objectName: a\n  secretPath: p\n  filePermission: rw", "filePermission must be"),
        ("- objectName: a\n  secretPath: p\n  secretArgs: [1]", "secretArgs must be a map"),
        ("- objectName: a\n  secretPath: p\n  secretArgs: {x: .nan}", "cannot hold .inf or .nan"),
        ("- objectName: a\n  secretPath: p\n  secretArgs: {1: x}", "keys must be strings"),
        ("- objectName: [a]\n  secretPath: p", "objectName must be a string"),
        ("- objectName: a\n  objectName: b\n  secretPath: p", "set more than once"),
        ("- just-a-string", "must be a map"),
    ],
    ids=[
        "absolute",
        "dotdot",
        "dotdot-inside",
        "bidi-override",
        "nul",
        "empty-segment",
        "no-name",
        "no-path",
        "bad-encoding",
        "delete-method",
        "mode-too-big",
        "mode-negative",
        "mode-not-int",
        "args-not-map",
        "args-nan",
        "args-int-key",
        "name-not-scalar",
        "duplicate-key",
        "object-not-map",
    ],
)
def test_invalid_objects_name_the_object_and_the_field(objects: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_objects(objects)


def test_duplicate_object_names_are_all_listed() -> None:
    objects = "\n".join(f"- {{objectName: {n}, secretPath: p}}" for n in ["a", "b", "a", "c", "b"])
    with pytest.raises(ConfigError, match='used more than once: "a", "b"'):
        parse_objects(objects)


def test_yaml_is_read_like_go_yaml_v3() -> None:
    (obj,) = parse_objects(
        "- objectName: on\n"
        "  secretPath: yes\n"
        "  secretKey: 2024-01-01\n"
        "  filePermission: 0644\n"
        "  encoding: Base64\n"
        "  secretArgs: {a: 0o17, b: no, c: true, d: 1_000, e: 1.5, f: ~, g: 2024-01-01, h: 08}\n"
    )
    assert (obj.object_name, obj.secret_path, obj.secret_key) == ("on", "yes", "2024-01-01")
    assert obj.file_permission == 0o644
    assert obj.normalized_encoding == "base64"
    assert obj.secret_args == {
        "a": 15,
        "b": "no",
        "c": True,
        "d": 1000,
        "e": 1.5,
        "f": None,
        "g": "2024-01-01",
        "h": 8.0,
    }


def test_octal_spellings_agree() -> None:
    modes = [
        parse_objects(f"- {{objectName: a, secretPath: p, filePermission: {m}}}")[0].file_permission
        for m in ("0640", "0o640", "416")
    ]
    assert modes == [0o640, 0o640, 0o640]


def test_scalars_become_strings_like_yaml_v3() -> None:
    (obj,) = parse_objects("- {objectName: 123, secretPath: p, secretKey: true, method: put}")
    assert (obj.object_name, obj.secret_key, obj.http_method) == ("123", "true", "PUT")


def test_alias_bombs_are_refused_while_reading() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)
    )
    with pytest.raises(ConfigError, match="alias"):
        parse_objects("- objectName: x\n  secretPath: p\n  secretArgs:\n    " + bomb.replace("\n", "\n    "))


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(ConfigError, match="nested deeper"):
        parse_objects("- objectName: x\n  secretPath: p\n  secretArgs: " + "[" * 100 + "]" * 100)


def test_size_limits_are_enforced() -> None:
    with pytest.raises(ConfigError, match="'objects' is larger than"):
        parse_objects("#" * (1024 * 1024 + 1))
    with pytest.raises(ConfigError, match="attributes are larger than"):
        mount('{"x": "' + "a" * (2 * 1024 * 1024) + '"}')


def test_anchors_used_a_few_times_still_work() -> None:
    objects = parse_objects(
        "- &base {objectName: a, secretPath: p, secretArgs: {ttl: 1h}}\n- {<<: *base, objectName: b}\n"
    )
    assert [o.object_name for o in objects] == ["a", "b"]
    assert objects[1].secret_args == {"ttl": "1h"}


@settings(max_examples=500, deadline=None)
@example("0")
@example("0420")
@example("012")
@example("00")
@example("٤٢٠")
@example("9" * 5000)
@given(st.one_of(st.text(max_size=6), st.integers(min_value=-10, max_value=1000).map(str)))
def test_a_permission_is_read_as_json_reads_it(permission: str) -> None:
    """The driver's permission is a JSON number: read as json.loads reads it (a quicker path
    for plain digits must agree), a file mode from 0 to 0777 or a ConfigError."""
    try:
        value: Any = json.loads(permission)
    except ValueError:
        value = None
    wanted = value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777 else None
    try:
        assert _parse_permission(permission) == wanted
    except ConfigError:
        assert wanted is None


def test_a_classs_query_values_are_bounded_in_all_aliases_expanded() -> None:
    """Each query value becomes objects in every request made from it: a class holds at most
    MAX_QUERY_VALUES in all its secretPath queries, counted per object (an alias repeats
    them), and is told how many it holds."""
    query = "&".join(f"v{i}" for i in range(MAX_QUERY_VALUES // 10))
    fits = (
        "- {objectName: o0, secretPath: &p "
        + f"kv/x?{query}"
        + "}\n"
        + "".join(f"- {{objectName: o{i}, secretPath: *p}}\n" for i in range(1, 10))
    )
    assert len(parse_objects(fits)) == 10
    with pytest.raises(ConfigError, match=f"hold {MAX_QUERY_VALUES + MAX_QUERY_VALUES // 10} parameters in all"):
        parse_objects(fits + "- {objectName: o10, secretPath: *p}\n")
    with pytest.raises(ConfigError, match=f"at most {MAX_QUERY_VALUES} are allowed"):
        parse_objects(
            yaml.safe_dump([{"objectName": "o", "secretPath": "kv/x?" + "&" * MAX_QUERY_VALUES}], width=10**9)
        )


def test_what_a_classs_requests_are_made_of_is_bounded_in_all_aliases_expanded() -> None:
    """An alias repeats a secretPath or secretArgs in up to 64 objects, each making its own
    request: the class's paths and its requests' bodies are bounded in all, and the error
    names the object to look at."""
    long_path = "kv/" + "x" * (MAX_CLASS_PATH_CHARS // 8 - 3)
    paths = (
        "- {objectName: first, secretPath: &p "
        + long_path
        + "}\n"
        + "".join(f"- {{objectName: o{i}, secretPath: *p}}\n" for i in range(1, 8))
    )
    assert len(parse_objects(paths)) == 8  # just within
    with pytest.raises(ConfigError, match=r"secretPath values hold \d+ characters in all .* in object \"first\""):
        parse_objects(paths + "- {objectName: o8, secretPath: *p}\n")
    args = "{big: " + "y" * (MAX_CLASS_BODY_BYTES // 8) + "}"
    bodies = (
        "- {objectName: first, method: POST, secretPath: pki/issue/web, secretArgs: &a "
        + args
        + "}\n"
        + "".join(
            f"- {{objectName: o{i}, method: POST, secretPath: pki/issue/web, secretArgs: *a}}\n" for i in range(1, 7)
        )
    )
    assert len(parse_objects(bodies)) == 7
    with pytest.raises(ConfigError, match=r"request bodies of more than 1048576 bytes in all .* at object \"o7\""):
        parse_objects(bodies + "- {objectName: o7, method: POST, secretPath: pki/issue/web, secretArgs: *a}\n")
    queries = yaml.safe_dump(
        [{"objectName": "few", "secretPath": "kv/a?x=1"}, {"objectName": "many", "secretPath": "kv/b?" + "&" * 10_000}],
        width=10**9,
    )
    with pytest.raises(ConfigError, match=r"the most are in object \"many\""):
        parse_objects(queries)
