"""Writes hostile-mounts.jsonl: malformed Mount requests, each of which must be refused
with INVALID_ARGUMENT. Run `python -m tests.corpus.generate` after changing it; the
output is checked in so every run tests the same corpus.

Each line is one request: {"id", "attributes" | "raw_b64", "target_path", "permission"}.
Huge strings are stored compactly as {"concat": [piece, {"repeat": unit, "times": n}]}
and expanded by the test.
"""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("hostile-mounts.jsonl")
POD = {
    "csi.storage.k8s.io/pod.name": "web",
    "csi.storage.k8s.io/pod.namespace": "team",
    "csi.storage.k8s.io/pod.uid": "0a1b2c3d-0000-4000-8000-000000000000",
    "csi.storage.k8s.io/serviceAccount.name": "app",
}
GOOD_OBJECT = "- {objectName: a, secretPath: secret/data/a, secretKey: k}\n"


def attrs(objects: Any = GOOD_OBJECT, **extra: Any) -> str:
    value: dict[str, Any] = {"roleName": "r", "objects": objects, **POD, **extra}
    return json.dumps({k: v for k, v in value.items() if v is not None})


def repeat(unit: str, times: int, prefix: str = "", suffix: str = "") -> dict[str, Any]:
    return {"concat": [prefix, {"repeat": unit, "times": times}, suffix]}


def entries() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(
        name: str, attributes: Any = None, *, target_path: str = "/t", permission: str = "420", raw: bytes | None = None
    ) -> None:
        entry: dict[str, Any] = {"id": f"{len(out):03d}-{name}", "target_path": target_path, "permission": permission}
        if raw is not None:
            entry["raw_b64"] = base64.b64encode(raw).decode()
        else:
            entry["attributes"] = attributes
        out.append(entry)

    # YAML alias bombs: growing fan-out and depth.
    for fan, depth in itertools.product((2, 3, 4, 5, 9, 20), (4, 8, 12, 30, 66)):
        if fan * (depth - 1) <= 64:  # within the alias allowance: not a bomb
            continue
        lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]" for i in range(1, depth)]
        bomb = "- objectName: a\n  secretPath: p\n  secretArgs:\n" + "".join(f"    {line}\n" for line in lines)
        add(f"alias-bomb-fan{fan}-depth{depth}", attrs(bomb))
    for count in (65, 100, 1000, 10000):
        add(f"aliases-{count}", attrs(repeat("- *o\n", count, "- &o {objectName: a, secretPath: p}\n")))
    # Deep nesting: flow and block YAML, JSON attributes.
    for depth in (33, 64, 500, 5000, 100000):
        add(f"yaml-flow-depth-{depth}", attrs(repeat("[", depth, "- {objectName: a, secretPath: p, secretArgs: ", "")))
        add(f"yaml-map-depth-{depth}", attrs(repeat("{a: ", depth, "- {objectName: a, secretPath: p, secretArgs: ")))
        add(f"json-depth-{depth}", repeat("[", depth))
        add(f"json-object-depth-{depth}", repeat('{"a":', depth))
    for depth in (40, 200):
        block = "".join(f"{'  ' * i}k{i}:\n" for i in range(depth))
        add(
            f"yaml-block-depth-{depth}",
            attrs(
                "- objectName: a\n  secretPath: p\n  secretArgs:\n"
                + "".join("    " + line + "\n" for line in block.splitlines())
            ),
        )
    # Multi-megabyte strings.
    for size in (1024 * 1024 + 1, 2 * 1024 * 1024, 3 * 1024 * 1024):
        add(
            f"objects-{size}-bytes",
            {"concat": ['{"roleName": "r", "objects": "', {"repeat": "#", "times": size}, '"}']},
        )
        add(
            f"attributes-{size}-bytes",
            {
                "concat": [
                    '{"roleName": "r", "pad": "',
                    {"repeat": "x", "times": size * 2},
                    '", "objects": "- {objectName: a, secretPath: p}"}',
                ]
            },
        )
        add(f"object-name-{size}-bytes", attrs(repeat("n", size // 2, "- {objectName: ", ", secretPath: p}")))
    # Invalid UTF-8 and NUL bytes.
    for i, bad in enumerate(
        [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"abc\xfe", b"\x80" * 100]
    ):
        attributes = attrs().encode()[:-1] + b', "x": "' + bad + b'"}'
        add(f"invalid-utf8-{i}", raw=b"\x0a" + _varint(len(attributes)) + attributes + b"\x1a\x02/t\x22\x03420")
        add(f"invalid-utf8-target-{i}", raw=b"\x0a\x02{}\x1a" + _varint(len(bad)) + bad)
    for i, escape in enumerate(
        ["\\ud800", "\\udfff", "\\ud83d", "x\\udc00y", "\\udc80", "a\\ud800\\ud800", "\\udfff\\ud800"]
    ):
        add(f"lone-surrogate-value-{i}", '{"roleName": "r", "objects": "' + escape + '"}')
        add(f"lone-surrogate-key-{i}", '{"' + escape + '": "r", "objects": "- {objectName: a, secretPath: p}"}')
    for where in ("objectName", "secretPath-and-name"):
        for nul in ("a\\u0000b", "\\u0000", "a\\u0000"):
            yaml_text = (
                f'- {{objectName: "{nul}", secretPath: p}}'
                if where == "objectName"
                else f'- {{objectName: "x{nul}", secretPath: "p{nul}"}}'
            )
            add(f"nul-{where}-{nul.count('u0000')}-{len(nul)}", attrs(yaml_text))
    # Object names that escape or hide.
    names = [
        "../x",
        "../../etc/passwd",
        "a/../../b",
        "..",
        "a/..",
        "/etc/passwd",
        "/",
        "//x",
        "a//b",
        "./a",
        "a/./b",
        "a/",
        "x\u202eexe.txt",
        "zero\u200bwidth",
        "bom\ufeff",
        "bell\u0007",
        "new\nline",
        "tab\tname",
        "esc\u001b[31m",
        "rtl\u202bmark",
        "lrm\u200e",
        "soft\u00adhyphen",
        "private\ue000",
        "del\u007f",
        "x" * 256,
        ("a/" * 600) + "b",
        "",
        "\u2028",
        "\u2029",
        "word\u2060joiner",
        "interlinear\ufff9",
        "nel\u0085",
        "mongolian\u180e",
        "isolate\u2066",
        "isolate\u2067",
        "isolate\u2068",
        "pop\u2069",
        "inhibit\u206a",
        "shape\u206c",
        "digits\u206f",
        "anchor\ufffa",
        "terminator\ufffb",
        "tag\U000e0001",
    ]
    for name in names:
        add(
            f"object-name-{name.encode('unicode_escape').decode()[:24]}",
            attrs(f"- {{objectName: {json.dumps(name)}, secretPath: p}}"),
        )
        add(
            f"object-name-block-{name.encode('unicode_escape').decode()[:24]}",
            attrs(f"- objectName: {json.dumps(name)}\n  secretPath: p\n  secretKey: k\n"),
        )
        add(
            f"object-name-second-{name.encode('unicode_escape').decode()[:24]}",
            attrs(f"- {{objectName: ok, secretPath: p}}\n- {{objectName: {json.dumps(name)}, secretPath: p}}\n"),
        )
    # Modes out of range.
    for permission in (
        "512",
        "-1",
        "1e3",
        "0x1ff",
        '"420"',
        "",
        "9999999999999999999",
        "420.5",
        "null",
        "true",
        "[420]",
        "{}",
        "0644",
        "04 20",
        "NaN",
        "Infinity",
        "-0.0",
        "1000",
        "777",
        "4294967296",
        "511.0",
        "5e2",
        "+420",
        "0420",
        "420 421",
        '""',
    ):
        add(f"permission-{permission}", attrs(), permission=permission)
    for mode in (
        "01000",
        "-1",
        "0o1000",
        "rw-r--r--",
        "1.5",
        "[1]",
        "{a: 1}",
        "0x200",
        "512",
        "99999999999999999999",
        "true",
        "'0644'",
        "1e2",
        "0b1000000000",
        ".inf",
        "0999",
        "0o7777",
        "65536",
        "1_000",
        "2e3",
        "-511",
        "+01000",
    ):
        add(f"file-permission-{mode}", attrs(f"- {{objectName: a, secretPath: p, filePermission: {mode}}}"))
    # Wrong types everywhere.
    for document in (
        "[]",
        "1",
        "null",
        "true",
        '"text"',
        "[1, 2]",
        '[{"roleName": "r"}]',
        "3.5",
        "{}",
        '{"roleName": "r",}',
        "{'roleName': 'r'}",
        '{"a" "b"}',
        '{"a": "b"',
        '{"a": "\\x41"}',
        '{"a": tru}',
        '{"a": "b"}}',
        "\ufeff{}",
    ):
        add(f"attributes-{document}", document)
    for key in (
        "roleName",
        "objects",
        "vaultAddress",
        "vaultNamespace",
        "audience",
        "vaultSkipTLSVerify",
        "vaultKubernetesMountPath",
        "vaultCACertPath",
        "csi.storage.k8s.io/pod.uid",
        "csi.storage.k8s.io/serviceAccount.tokens",
        "vaultTLSServerName",
        "vaultAuthMountPath",
        "csi.storage.k8s.io/pod.name",
        "csi.storage.k8s.io/pod.namespace",
        "csi.storage.k8s.io/serviceAccount.name",
    ):
        for value in (1, None, True, [], {}, 2.5, ["x"], {"a": "b"}):
            if value is None:
                add(f"type-{key}-null", json.dumps({"roleName": "r", "objects": GOOD_OBJECT, **POD, key: None}))
            else:
                add(
                    f"type-{key}-{type(value).__name__}-{json.dumps(value)}",
                    json.dumps({"roleName": "r", "objects": GOOD_OBJECT, **POD, key: value}),
                )
    for objects in (
        "a: b",
        "42",
        "'just text'",
        "true",
        "{objectName: a}",
        "- 1",
        "- [a, b]",
        "- null",
        "- 'x'",
        "- - objectName: a",
        "---\n- a\n---\n- b",
        "[]",
        "",
        "~",
        "- {}",
    ):
        add(f"objects-shape-{objects[:20]}", attrs(objects))
        if objects.startswith("- "):
            add(f"objects-shape-after-good-{objects[:20]}", attrs(GOOD_OBJECT + objects))
    for missing in (
        "- {objectName: x}",
        "- {objectName: x, secretPath: ''}",
        "- {objectName: x, secretPath: ~}",
        "- {objectName: x, secretpath: p}",
        "- {ObjectName: x, secretPath: p}",
        "- {objectname: x, secretPath: p}",
        "- {secretPath: p, secretKey: k}",
    ):
        add(f"missing-{missing[3:30]}", attrs(missing))
    for spelling in ("a", '"a"', "'a'"):
        add(
            f"duplicate-spelling-{spelling}",
            attrs(f"- {{objectName: a, secretPath: p}}\n- {{objectName: {spelling}, secretPath: q}}"),
        )
    fields = {
        "objectName": ("[a]", "{a: b}", "~"),
        "secretPath": ("[a]", "{a: b}", "~", "''"),
        "secretKey": ("[a]", "{a: b}"),
        "method": (
            "[GET]",
            "{a: b}",
            "DELETE",
            "PATCH",
            "TRACE",
            "get put",
            "CONNECT",
            "OPTIONS",
            "HEAD",
            "PROPFIND",
            "POST PUT",
            "G E T",
        ),
        "encoding": (
            "[utf-8]",
            "rot13",
            "base32",
            "utf-16",
            "{a: b}",
            "ascii",
            "latin1",
            "UTF8",
            "utf_8",
            "base-64",
            "b64",
            "hex16",
            "' hex'",
        ),
        "secretArgs": (
            "[1, 2]",
            "text",
            "42",
            "{1: a}",
            "{a: .nan}",
            "{a: .inf}",
            "{a: [1, {b: -.inf}]}",
            "{? [1, 2] : x}",
            "{a: [.nan]}",
            "{a: {b: {c: .inf}}}",
            "[]",
            "''",
            "0",
        ),
    }
    for field, values in fields.items():
        for value in values:
            base = {"objectName": "a", "secretPath": "p"}
            if field == "encoding":  # without secretKey, encoding is unused and ignored (as in the reference)
                base["secretKey"] = "k"
            body = ", ".join(f"{k}: {v}" for k, v in base.items() if k != field)
            add(f"field-{field}-{value[:16]}", attrs(f"- {{{body}, {field}: {value}}}"))
    # Huge secretArgs.
    for count in (10001, 50000, 200000):
        add(
            f"secret-args-list-{count}",
            attrs(repeat("1, ", count, "- {objectName: a, secretPath: p, secretArgs: {l: [", "1]}}")),
        )
        add(
            f"secret-args-nested-{count}",
            attrs(repeat("[1, 2], ", count // 2, "- {objectName: a, secretPath: p, secretArgs: {l: [", "1]}}")),
        )

    # File-shaping fields: conflicts, malformed values, hostile templates (all refused at parse).
    def obj(extra: str, name: str = "a", path: str = "secretPath: secret/data/a, ") -> str:
        return f"- {{objectName: {name}, {path}{extra}}}\n"

    for extra in (
        "secretKey: k, secretKeyPath: /k",
        "secretKey: k, expandKeys: true",
        "secretKeyPath: /k, format: json",
        "expandKeys: true, format: pem-bundle",
        "template: x, secretKey: k",
        "template: x, encoding: base64",
        "template: x, format: json",
        "includeKeys: x",
        "excludeKeys: x, expandKeys: false",
    ):
        add(f"shape-conflict-{extra.split(':')[0]}-{len(out)}", attrs(obj(extra)))
    for value in ("k", "a/b", "~", "/a~2", "/~", "/a~x/b"):
        add(f"shape-pointer-{value}", attrs(obj(f"secretKeyPath: {json.dumps(value)}")))
    for value in ("yes", "1", "[true]", "{a: b}", '"true"', "null"):
        add(f"shape-bool-{value}", attrs(obj(f"expandKeys: {value}")))
        add(f"shape-writefile-{value}", attrs(obj(f"writeFile: {value}")))
    for value in ("(", "[z-a]", "a{2,1}", "\\", "(?<!x)y", "a" * 257, "(a+)+" * 60):
        add(f"shape-regex-{len(out)}", attrs(obj(f"expandKeys: true, includeKeys: {json.dumps(value)}")))
    for value in ("pem", "JSON", "yaml", "pem_bundle", "[json]"):
        add(f"shape-format-{value}", attrs(obj(f"format: {value}")))
    templates = [
        "{{",
        "{{ if }}",
        "{{ end }}",
        "{{ range .x }}",
        "{{ .Objects.nope.Secrets }}",
        "{{ .Foo }}",
        "{{ exec }}",
        "{{ call .x }}",
        '{{ template "a" }}',
        '{{ define "a" }}{{ template "a" }}{{ end }}',
        "{{ break }}",
        "{{ 1x }}",
        "{{ /* open",
        "{{ .a | }}",
        "{{ (((1 }}",
    ]
    for index, template in enumerate(templates):
        add(f"template-syntax-{index}", attrs(obj(f'template: "{template}"', path="")))
    add("template-no-path-secrets", attrs(obj('template: "{{ .Secrets.k }}"', path="")))
    add("template-nested-ifs", attrs(obj('template: "' + "{{ if 1 }}" * 60 + "{{ end }}" * 60 + '"')))
    add("template-nested-parens", attrs(obj('template: "{{ ' + "(" * 60 + "1" + ")" * 60 + ' }}"')))
    add("template-too-large", attrs(repeat("x", 70_000, '- {objectName: a, template: "', '"}')))
    add("template-unknown-objects-10k", attrs(obj('template: "' + "{{ .Objects.n }}" * 10_000 + '"', path="")))
    add("template-no-path-no-template", attrs("- {objectName: a, writeFile: false}\n"))
    # Missing and duplicate pieces, bad combinations.
    add("no-target-path", attrs(), target_path="")
    add("no-role", json.dumps({"objects": GOOD_OBJECT, **POD}))
    add("empty-role", attrs(roleName=""))
    add("no-objects", json.dumps({"roleName": "r", **POD}))
    add("empty-attributes", "")
    add("both-mount-paths", attrs(vaultKubernetesMountPath="a", vaultAuthMountPath="b"))
    for skip in ("yes", "no", "on", "2", "TRUE ", " true", "tRUE", "enabled", ""):
        add(f"skip-tls-{skip}", attrs(vaultSkipTLSVerify=skip))
    for count in (2, 3, 50):
        add(f"duplicate-names-{count}", attrs("".join("- {objectName: same, secretPath: p}\n" for _ in range(count))))
    for count in (1001, 1500, 5000):
        add(f"too-many-objects-{count}", attrs(repeat("- {objectName: o, secretPath: p}\n", count)))
    for tokens in ("{", "[]", "nope", '{"vault": ', '{"vault": {"token": "a"'):
        add(f"tokens-json-{tokens}", attrs(**{"csi.storage.k8s.io/serviceAccount.tokens": tokens}))
    for i, text in enumerate(
        [
            "- objectName: a\n secretPath: p",
            "- {objectName: a, secretPath: p",
            "- a: b: c",
            "\t- objectName: a",
            "- !!python/object:os.system {}",
            "- !!binary 'not base64'",
            "- {objectName: a, objectName: b, secretPath: p}",
            "%YAML 1.3\n---\n- a",
            "- &a {objectName: a, secretPath: p}\n- *b",
            "- {<<: [*x], objectName: a}",
            "@reserved",
            "`reserved",
            "- 'unterminated",
            '- "bad \\q escape"',
            "- {objectName: a, secretPath: p}\n  extra: indentation",
            "- objectName: a\n    secretPath: p",
            "-objectName: a",
            "- [objectName, a]",
            "- objectName: |\n  x\n secretPath: p",
        ]
    ):
        add(f"yaml-syntax-{i}", attrs(text))
    # Requests an alias repeats in many objects, each made anew: a query of many values, a
    # long path, large secretArgs (bounded per class, aliases expanded).

    def aliased(head: str, unit: str, times: int, tail: str, alias: str, count: int) -> dict[str, Any]:
        """Object o0 (its large value `unit` * `times`, anchored), then o1.. naming `alias`."""
        others = "".join(f"- {{objectName: o{i}, {alias}}}\n" for i in range(1, count))
        return repeat(unit, times, "- {objectName: o0, " + head, tail + others)

    add("aliased-query-values", attrs(aliased('secretPath: &p "kv/x?', "a&", 6_000, 'a"}\n', "secretPath: *p", 10)))
    add("aliased-long-path", attrs(aliased("secretPath: &p kv/", "x", 40_000, "}\n", "secretPath: *p", 8)))
    pki = "method: POST, secretPath: pki/issue/web, secretArgs: "
    add("aliased-secret-args", attrs(aliased(pki + "&a {big: ", "y", 200_000, "}}\n", pki + "*a", 7)))
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def main() -> None:
    lines = [json.dumps(entry, ensure_ascii=True) for entry in entries()]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} requests to {OUT}")


if __name__ == "__main__":
    main()
