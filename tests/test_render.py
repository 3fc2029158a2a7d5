"""render.py in process: what templates may cost, and what is remembered between Mounts."""

from __future__ import annotations

import gc
import resource
import time

import pytest

from provider import config, gotemplate, render, versions
from provider.config import SecretObject, parse_objects
from provider.errors import ConfigError

ENV = """
- {objectName: cfg, secretPath: secret/data/app/config, writeFile: false}
- objectName: .env
  template: "{{ range $k, $v := .Objects.cfg.Secrets }}{{ $k }}={{ $v }}\\n{{ end }}"
"""


def reply(keys: int) -> render.ObjectData:
    data = {f"K{i}": "v" for i in range(keys)}
    return render.ObjectData(path="secret/data/app/config", body={"data": {"data": data, "metadata": {}}})


def mount(objects: tuple[SecretObject, ...], keys: int, tenant: object) -> list[str]:
    files, failures = render.mount_files(objects, {objects[0]: reply(keys)}, namespace="ns", tenant=tenant)
    assert not files or not failures
    return [str(error) for _, error in failures]


def test_a_class_over_its_limits_fails_fast_for_its_tenant_only() -> None:
    objects = parse_objects(ENV + "# over-limit test\n")
    assert "steps" in mount(objects, 30_000, tenant="attacker")[0]
    started = time.monotonic()
    assert "not rendered again for" in mount(objects, 30_000, tenant="attacker")[0]
    assert time.monotonic() - started < 0.05
    # Another tenant with the same objects text (so the same parse) renders its own data.
    assert mount(objects, 2, tenant="victim") == []


def test_running_out_of_cpu_time_is_not_remembered() -> None:
    objects = parse_objects(ENV + "# cpu test\n")
    limits = gotemplate.Limits(seconds=0.0001)
    original = render.TemplateBudget.limits
    try:
        render.TemplateBudget.limits = lambda self: limits  # type: ignore[method-assign]
        assert "of CPU" in mount(objects, 5_000, tenant="t")[0]
    finally:
        render.TemplateBudget.limits = original  # type: ignore[method-assign]
    assert mount(objects, 5_000, tenant="t") == []


def test_versions_do_not_keep_evicted_objects_alive() -> None:
    gc.collect()
    before = len(versions._OBJECT_JSON)
    for i in range(50):
        obj = SecretObject(object_name=f"t{i}", template="{{ 1 }}" * 100)
        versions.object_json(obj)
    del obj
    gc.collect()
    assert len(versions._OBJECT_JSON) == before


def test_the_parse_cache_counts_template_trees_not_only_their_text() -> None:
    text = ENV.replace("{{ $k }}={{ $v }}", "{{ $k }}={{ $v }}" * 400)
    parsed = parse_objects(text)
    assert config.template_weight(parsed) > 10 * len(text)


def test_a_class_cannot_spend_more_than_its_token_budget_on_templates() -> None:
    template = "{{ 1 }}" * 3000  # 6,000 tokens each
    objects = "".join(f"- {{objectName: t{i}, template: '{template}'}}\n" for i in range(4))
    with pytest.raises(ConfigError, match=r"more than 20000 tokens|more than 10000 tokens"):
        parse_objects(objects)


def test_the_memo_recognises_a_class_too_large_for_the_parse_cache() -> None:
    padding = "{{ 1 }}" * 2700  # ~5,400 tokens: weighs more than the parse cache keeps
    text = (
        "- objectName: spin\n  template: '{{ range $i := 40000 }}{{ $i }}{{ $i }}{{ end }}'\n"
        f"- objectName: pad\n  template: '{padding}'\n"
    )
    timings = []
    for _ in range(3):
        objects = parse_objects(text)  # parsed anew each time: new objects
        started = time.monotonic()
        _, failures = render.mount_files(objects, {}, namespace="ns", tenant="t")
        timings.append(time.monotonic() - started)
        assert failures
    assert timings[1] < 0.05 and timings[2] < 0.05, timings


def test_a_reply_nested_too_deeply_fails_its_object_not_the_mount() -> None:
    deep: object = "x"
    for _ in range(3000):
        deep = [deep]
    objects = parse_objects("- {objectName: whole, secretPath: p}\n- {objectName: k, secretPath: p, secretKey: k}")
    data = render.ObjectData(path="p", body={"data": {"k": "v", "deep": deep}})
    files, failures = render.mount_files(objects, {objects[0]: data, objects[1]: data})
    assert [f.path for f in files] == ["k"]
    assert [(name, type(error).__name__) for name, error in failures] == [("whole", "VaultBadResponse")]


def test_a_json_file_too_large_is_refused_before_it_is_built() -> None:
    objects = parse_objects("- {objectName: whole, secretPath: p}\n- {objectName: doc, secretPath: p, format: json}")
    data = render.ObjectData(path="p", body={"data": {"k": "<" * (2 * 1024 * 1024)}})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    files, failures = render.mount_files(objects, {o: data for o in objects}, max_bytes=4 * 1024 * 1024)
    assert not files and {name for name, _ in failures} == {"whole", "doc"}
    assert all("would be larger than 4194304 bytes" in str(error) for _, error in failures)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before < 20


def test_an_expand_keys_object_with_a_deep_name_costs_no_more_per_key() -> None:
    """A valid objectName 495 levels deep over 2,000 keys cost 1.2 s of CPU per Mount: each
    key's path was checked whole, character by character, and walked up level by level."""
    deep = "/".join(["a"] * 495)
    objects = parse_objects(f"- {{objectName: '{deep}', secretPath: p, expandKeys: true}}")
    data = render.ObjectData(path="p", body={"data": {f"k{i:05d}": "" for i in range(2000)}})
    started = time.thread_time()
    files, failures = render.mount_files(objects, {objects[0]: data})
    assert len(files) == 2000 and not failures
    assert time.thread_time() - started < 0.4


def test_an_expanded_key_is_checked_as_a_file_name() -> None:
    objects = parse_objects("- {objectName: db, secretPath: p, expandKeys: true}")
    for key, message in [("..", "'..'"), ("k\u200b", "invisible"), ("x" * 256, "too long"), (".", "'.' path")]:
        data = render.ObjectData(path="p", body={"data": {key: "v"}})
        _, failures = render.mount_files(objects, {objects[0]: data})
        assert len(failures) == 1 and message in str(failures[0][1]), key
    long_name = "/".join(["n" * 254] * 4)  # 1,019 bytes: the key takes it past 1,020
    objects = parse_objects(f"- {{objectName: '{long_name}', secretPath: p, expandKeys: true}}")
    _, failures = render.mount_files(objects, {objects[0]: render.ObjectData(path="p", body={"data": {"key": "v"}})})
    assert len(failures) == 1 and "too long for a file name" in str(failures[0][1])
