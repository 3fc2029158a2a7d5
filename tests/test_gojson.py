"""JSON bytes must equal what Go's encoding/json writes for the reference provider."""

from __future__ import annotations

import json
import re
import time
import tracemalloc
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provider import gojson


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"b":1,"a":2}', b'{"a":2,"b":1}'),
        ('{"x": "<a href=\\"y\\">&</a>"}', b'{"x":"\\u003ca href=\\"y\\"\\u003e\\u0026\\u003c/a\\u003e"}'),
        ('["\\u2028\\u2029"]', b'["\\u2028\\u2029"]'),
        ("[1.50, 1e3, -0, 12345678901234567890123]", b"[1.50,1e3,-0,12345678901234567890123]"),
        ('{"nested": {"z": [true, false, null], "a": {}}}', b'{"nested":{"a":{},"z":[true,false,null]}}'),
        ('"caf\\u00e9 \\u0001 \\t\\n"', '"café \\u0001 \\t\\n"'.encode()),
    ],
    ids=["sorted-keys", "html-escapes", "line-separators", "numbers-verbatim", "nested", "unicode-and-controls"],
)
def test_round_trip_matches_go(text: str, expected: bytes) -> None:
    assert gojson.dumps(gojson.loads(text)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, "1"),
        (0.1, "0.1"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (0.000001, "0.000001"),
        (123456789.125, "123456789.125"),
        (-2.5, "-2.5"),
    ],
)
def test_floats_are_formatted_like_go(value: float, expected: str) -> None:
    assert gojson.format_float(value) == expected


def test_python_values_from_yaml_encode_like_go() -> None:
    assert gojson.dumps({"ttl": "1h", "n": 3, "f": 0.5, "ok": True, "l": [1, "a"]}) == (
        b'{"f":0.5,"l":[1,"a"],"n":3,"ok":true,"ttl":"1h"}'
    )


def test_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be encoded"):
        gojson.dumps(float("nan"))
    with pytest.raises(ValueError):
        gojson.loads("[NaN]")


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(alphabet=st.characters(min_codepoint=0x20, blacklist_categories=("Cs",)), max_size=12)
    | st.from_regex(r"-?[0-9]{1,25}(\.[0-9]{1,5})?", fullmatch=True).map(gojson.Number),
    _nested,
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(_VALUES)
def test_encoded_size_never_undercounts_what_dumps_writes(value: Any) -> None:
    """Callers refuse a file on this estimate before building it; an undercount would let a
    reply through that is larger than the limit."""
    text = gojson.dumps(value).decode("utf-8")  # the estimate counts characters, as the limits do
    assert gojson.encoded_size(value, 10**9) >= len(text)
    limit = len(text) // 2
    assert gojson.encoded_size(value, limit) > limit or limit == 0  # stops early, still over


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=30,
    )
)
def test_values_are_counted_exactly_between_few_strings_and_bounded_among_many(value: Any) -> None:
    """Between few strings every scalar and container the decoder would build is counted;
    among many, separators inside strings are counted too: never fewer."""
    raw = gojson.dumps(value)
    exact = gojson.count_values(raw, few_strings=1_000_000)
    assert exact == _values_in(value)
    assert gojson.count_values(raw, few_strings=0) >= exact


def test_counting_a_reply_of_many_keys_copies_nothing() -> None:
    """A 1 MB reply of 99,000 keys: counted in C without a piece per string (34 MiB)."""
    raw = b'{"data":{' + b",".join(b'"%d":""' % i for i in range(99_000)) + b"}}"
    tracemalloc.start()
    try:
        assert gojson.count_values(raw) == 98_999 + 2 + 1  # its commas, its braces, and one
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def _values_in(value: Any) -> int:
    """Values as count_values counts them: each scalar and container (a map's keys ride
    with their values), an empty container as two (the count bounds, it need not be exact)."""
    if isinstance(value, dict):
        return 1 + (sum(_values_in(v) for v in value.values()) if value else 1)
    if isinstance(value, list):
        return 1 + (sum(_values_in(v) for v in value) if value else 1)
    return 1


def test_counting_an_unterminated_string_full_of_escaped_quotes_is_linear() -> None:
    """Each quote in it could start a string that never ends: a scan from each would take
    minutes for a reply of a few hundred KiB (measured: 19 s for 0.4 MB)."""
    raw = b'{"a":"' + b'\\"x' * 400_000  # 1.2 MB, never closed
    started = time.process_time()
    assert gojson.count_values(raw) >= 1
    assert gojson.count_values(raw, few_strings=0) >= 1
    assert time.process_time() - started < 1.0


@settings(max_examples=300, deadline=None)
@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=-(2**63) + 1, max_value=2**63 - 1))
def test_numbers_within_int64_are_truncated_exactly(value: Decimal) -> None:
    text = str(value)
    assert gojson.Number(text).as_int() == int(Decimal(text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e200000", gojson.INT64_MAX),
        ("-1e999999999", gojson.INT64_MIN),
        ("9223372036854775808", gojson.INT64_MAX),
        ("9.3e18", gojson.INT64_MAX),
        ("1" * 100_000, gojson.INT64_MAX),
        ("1e-99999999", 0),
    ],
)
def test_numbers_past_int64_are_clamped_at_once(text: str, expected: int) -> None:
    """A Vault address may be anyone's: a lease_duration of 1e200000 took 2.4 s of GIL to
    convert exactly (1e1000000 a minute), stalling every pod's Mount on the node."""
    started = time.process_time()
    assert gojson.Number(text).as_int() == expected
    assert time.process_time() - started < 0.05


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
)
def test_bytes_are_decoded_in_the_encoding_json_detects(encoding: str) -> None:
    """Vault's replies start with "{" in UTF-8 and skip the detection; any other text is
    read as json.loads reads it."""
    for text in ('{"k": "café", "n": 1}', '{"k": "v"}', "{}", '["x"]', '"s"', "7"):
        data = text.encode(encoding)
        assert gojson.loads(data) == json.loads(data, parse_int=gojson.Number, parse_float=gojson.Number)


def test_invalid_utf8_after_a_brace_fails_as_json_loads_fails() -> None:
    for data in (b'{"k": "\xff"}', b"{\xc3", b"{"):
        with pytest.raises(ValueError) as ours:
            gojson.loads(data)
        with pytest.raises(ValueError) as theirs:
            json.loads(data)
        assert type(ours.value) is type(theirs.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"k": "\\ud800v"}', {"k": "\ufffdv"}),  # a lone escape
        (b'{"k": "a\\udfffb", "\\udc00": ["\\ud83d"]}', {"k": "a\ufffdb", "\ufffd": ["\ufffd"]}),
        (b'{"k": "\\ud83d\\ude00"}', {"k": "\U0001f600"}),  # a pair is one character
        (b'{"k": "\\uD83D\\uDE00", "m": "\\uDBFF\\uDFFF"}', {"k": "\U0001f600", "m": "\U0010ffff"}),
        (b'{"k": "\\udc00\\udc01", "h": "\\ud800\\ud801"}', {"k": "\ufffd\ufffd", "h": "\ufffd\ufffd"}),
        (b'{"k": "\\\\ud800"}', {"k": "\\ud800"}),  # an escaped backslash, then letters
        (b'{"k": "\\\\ud800\\udc00"}', {"k": "\\ud800\ufffd"}),  # ... then a lone low escape
        (b'{"k": "\\\\\\ud800"}', {"k": "\\\ufffd"}),  # an escaped backslash, then an escape
        (b'{"k": "\xed\xa0\x80z"}', {"k": "\ufffd\ufffd\ufffdz"}),  # UTF-8 bytes: one per byte, as Go
        (b'{"k": "\\u003c\\u00e9"}', {"k": "<\u00e9"}),
    ],
    ids=[
        "lone",
        "nested-and-keys",
        "pair",
        "pair-upper",
        "two-lows-two-highs",
        "escaped-backslash",
        "escaped-backslash-then-low",
        "backslash-then-escape",
        "utf8-bytes",
        "other-escapes",
    ],
)
def test_a_lone_surrogate_decodes_as_go_decodes_it(data: bytes, expected: object) -> None:
    """Go's decoder makes a lone surrogate U+FFFD; Python's keeps it, and a string holding
    one cannot be written as UTF-8: a reply with "\\ud800" failed the Mount as INTERNAL and
    logged a traceback on every Mount."""
    assert gojson.loads(data) == expected
    assert gojson.dumps(gojson.loads(data))  # writable


def test_a_lone_surrogate_costs_a_reply_no_second_walk() -> None:
    """The first fix rebuilt the decoded reply in Python (8 times the decode for 100,000
    values); the escape is now replaced in the text before it is decoded."""
    items = b",".join([b'{"a":"x"}'] * 99_000)
    plain, lone = b'{"data":[' + items + b"]}", b'{"data":[' + items + b',"\\ud800"]}'
    started = time.process_time()
    gojson.loads(plain)
    decode = time.process_time() - started
    started = time.process_time()
    assert gojson.loads(lone)["data"][-1] == "\ufffd"
    assert time.process_time() - started < 3 * decode + 0.02


_LONE = re.compile("[\ud800-\udfff]")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(st.sampled_from('\\u"d8c0a\ud800\udbff\udc00\udfff\U0001f600é'), max_size=12), max_size=4),
    st.booleans(),
)
def test_any_string_decodes_with_only_its_lone_surrogates_replaced(values: list[str], escaped: bool) -> None:
    """Whatever json writes (escaped or not; backslashes, letters like an escape's, and
    surrogates anywhere), gojson reads what json reads, except a lone surrogate: U+FFFD,
    one per byte when it came as UTF-8 bytes, as Go's decoder reads it."""
    data = json.dumps({"v": values}, ensure_ascii=escaped).encode("utf-8", "surrogatepass")
    if escaped:  # json joins a pair of escapes into one character; a lone one stays
        joined = [v.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass") for v in values]
        expected = [_LONE.sub("\ufffd", value) for value in joined]
    else:
        expected = [_LONE.sub("\ufffd" * 3, value) for value in values]
    assert gojson.loads(data) == {"v": expected}
