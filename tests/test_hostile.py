"""Hostile input: a checked-in corpus of malformed Mount requests and a property test.
Every bad request gets INVALID_ARGUMENT within a second, memory stays bounded, and the
server keeps answering other pods' Mounts throughout."""

from __future__ import annotations

import base64
import contextlib
import json
import resource
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provider._proto import service_pb2
from provider.check import KNOWN_OBJECT_KEYS
from provider.config import MAX_MODE, ConfigError, VaultSettings, check_object_name, parse_mount
from tests.conftest import ProviderClient, VaultWorld, files_of

CORPUS = Path(__file__).parent / "corpus" / "hostile-mounts.jsonl"


def expand(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "".join(p if isinstance(p, str) else p["repeat"] * p["times"] for p in value["concat"])


def load_corpus() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


def test_corpus_is_large_and_varied() -> None:
    corpus = load_corpus()
    assert len(corpus) >= 500
    kinds = {entry["id"].split("-", 1)[1].split("-")[0] for entry in corpus}
    for kind in (
        "alias",
        "yaml",
        "json",
        "objects",
        "invalid",
        "nul",
        "object",
        "permission",
        "type",
        "secret",
        "shape",
        "template",
    ):
        assert kind in kinds, kind


def test_every_hostile_request_is_refused_quickly_while_others_are_served(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    world.bao.api("POST", f"kv1/{unique}", {"k": "good"})
    pod = world.grant(unique, [f"kv1/{unique}"])
    good = provider.attributes(pod, [{"objectName": "k", "secretPath": f"kv1/{unique}", "secretKey": "k"}], role=unique)
    stop = threading.Event()
    served: list[bool] = []

    def keep_mounting() -> None:
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline and len(served) < 5000:
            response = provider.raw_mount(service_pb2.MountRequest(attributes=good, target_path="/t", permission="420"))
            served.append(files_of(response) == {"k": b"good"})

    raw_mount = provider.channel.unary_unary(
        "/v1alpha1.CSIDriverProvider/Mount", response_deserializer=service_pb2.MountResponse.FromString
    )
    worker = threading.Thread(target=keep_mounting)
    worker.start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    slow: list[tuple[str, float]] = []
    wrong: list[tuple[str, str, str]] = []
    try:
        for entry in load_corpus():
            started = time.monotonic()
            try:
                if "raw_b64" in entry:
                    raw_mount(base64.b64decode(entry["raw_b64"]), timeout=10)
                else:
                    provider.raw_mount(
                        service_pb2.MountRequest(
                            attributes=expand(entry["attributes"]),
                            target_path=entry["target_path"],
                            permission=entry["permission"],
                        ),
                        timeout=10,
                    )
                wrong.append((entry["id"], "OK", ""))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    wrong.append((entry["id"], e.code().name, e.details()[:200]))
            elapsed = time.monotonic() - started
            if elapsed > 1.0:
                slow.append((entry["id"], elapsed))
    finally:
        stop.set()
        worker.join(30)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert wrong == [], "\n".join(map(str, wrong))
    assert slow == []
    assert served and all(served), f"{served.count(False)} of {len(served)} good Mounts failed"
    assert growth_mib < 150, f"peak memory grew by {growth_mib:.0f} MiB"


DEFAULTS = VaultSettings(address="https://vault:8200")
scalars = st.one_of(st.text(max_size=20), st.integers(), st.booleans(), st.none(), st.floats(allow_nan=True))


def nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


yaml_values = st.recursive(scalars, nested, max_leaves=20)
object_dicts = st.dictionaries(
    st.sampled_from([*KNOWN_OBJECT_KEYS, "other"]),
    yaml_values | st.sampled_from(["{{ .Secrets.k }}", "/a/0", "^k", "json", "pem-bundle", "{{ .Objects.o }}"]),
    max_size=9,
)


def yaml_text(value: Any) -> str:
    import yaml

    try:
        return yaml.safe_dump(value)
    except Exception:  # a value YAML cannot dump: use its repr instead
        return repr(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    objects=st.one_of(st.lists(object_dicts, max_size=5).map(yaml_text), st.text(max_size=200)),
    params=st.dictionaries(st.text(max_size=30), st.text(max_size=30), max_size=5),
    permission=st.one_of(st.integers(-5, 1000).map(str), st.text(max_size=6)),
)
def test_parser_either_accepts_a_safe_config_or_names_the_problem(
    objects: str, params: dict[str, str], permission: str
) -> None:
    attributes = json.dumps({**params, "roleName": "r", "objects": objects})
    try:
        config = parse_mount(attributes=attributes, target_path="/t", permission=permission, defaults=DEFAULTS)
    except ConfigError as e:
        assert str(e)
        return
    names = [obj.object_name for obj in config.objects]
    assert len(names) == len(set(names)) and names
    assert 0 <= config.permission <= MAX_MODE
    for obj in config.objects:
        check_object_name(obj.object_name, "property")  # raises if unsafe
        assert obj.secret_path or obj.parsed_template is not None
        assert 0 <= obj.file_permission <= MAX_MODE
        assert obj.normalized_encoding in ("utf-8", "base64", "hex")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_objects_never_crash_the_parser(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    with contextlib.suppress(ConfigError):  # anything else fails the test
        parse_mount(
            attributes=json.dumps({"roleName": "r", "objects": text}),
            target_path="/t",
            permission="420",
            defaults=DEFAULTS,
        )


@pytest.mark.parametrize("size", [10, 1000, 100_000])
def test_parse_time_is_bounded_for_large_valid_classes(size: int) -> None:
    objects = "".join(f"- {{objectName: o{i}, secretPath: p{i}}}\n" for i in range(min(size, 1000)))
    started = time.monotonic()
    parse_mount(
        attributes=json.dumps({"roleName": "r", "objects": objects, "pad": "x" * size}),
        target_path="/t",
        permission="420",
        defaults=DEFAULTS,
    )
    assert time.monotonic() - started < 1.0
