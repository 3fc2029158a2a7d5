"""JSON as Go's encoding/json writes it, so files match the reference provider's bytes.

Go differs from Python's json module in ways a mounted file shows: output is compact,
map keys are sorted, ``<``, ``>``, ``&``, U+2028 and U+2029 are escaped as ``\\u003c``
etc., and the reference decodes Vault's replies with ``UseNumber`` so every number is
written back exactly as Vault sent it. ``loads`` keeps numbers as :class:`Number` for
that; ``dumps`` writes Go's bytes for decoded JSON and for values read from YAML.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from json.encoder import encode_basestring as _encode_basestring
from typing import Any

# Characters Go's encoder escapes although JSON does not require it (HTML safety, and
# the two line terminators JavaScript treats as newlines).
_GO_EXTRA_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_ESCAPE_TABLE = str.maketrans(_GO_EXTRA_ESCAPES)
_GO_EXTRA = re.compile("[" + "".join(_GO_EXTRA_ESCAPES) + "]")


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


class Number:
    """A JSON number kept as the exact text Vault sent (Go's json.Number)."""

    __slots__ = ("_zero", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._zero: bool | None = None

    def is_zero(self) -> bool:
        """Whether the number is zero (a template's `if` asks), read off its digits once:
        converting a number of millions of digits (a Vault address may be anyone's) took
        56 ms each time, with the GIL held, and a template can ask thousands of times."""
        if self._zero is None:
            digits = self.text.removeprefix("-")
            # JSON writes no leading zeros: only 0, 0.ddd and their exponents start with 0.
            self._zero = digits[:1] == "0" and not digits.partition("e")[0].partition("E")[0].strip("0.")
        return self._zero

    def __repr__(self) -> str:
        return f"Number({self.text})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Number) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def as_int(self) -> int:
        """The number as an int: a fractional or exponent form truncated, and held within
        Go's int64, as the reference decodes it (beyond, it is clamped: converting 1e1000000
        exactly would hold the GIL for a minute, and a Vault address may be anyone's)."""
        if len(self.text) < 19:
            with contextlib.suppress(ValueError):
                return int(self.text)
        value = Decimal(self.text)
        if value.adjusted() >= 19:  # 10**19 and beyond: past int64
            return INT64_MAX if value > 0 else INT64_MIN
        return max(min(int(value), INT64_MAX), INT64_MIN)


def loads(text: str | bytes | bytearray) -> Any:
    """Decode JSON, keeping numbers as :class:`Number` (their exact text). What
    json.loads does, with one decoder made once rather than one per call, except that a
    lone surrogate in a string is U+FFFD, as Go decodes it."""
    utf8_bytes = False
    if isinstance(text, bytes | bytearray):
        # A JSON object's "{" then a byte that is not NUL is UTF-8 to json.detect_encoding
        # (no BOM starts with "{", UTF-16 and 32 put a NUL beside it): every Vault reply.
        utf8 = text[:1] == b"{" and text[1:2] != b"\x00"
        encoding = "utf-8" if utf8 else json.detect_encoding(text)
        utf8_bytes = encoding == "utf-8"
        text = text.decode(encoding, "surrogatepass")
    elif text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    if not text.isascii() and _SURROGATE.search(text):
        # Surrogates written in UTF-8 bytes (json.loads decodes them, "surrogatepass"); Go
        # makes each of a surrogate's three bytes U+FFFD.
        text = _SURROGATE.sub("\ufffd" * 3 if utf8_bytes else "\ufffd", text)
    if "\\u" in text and _ESCAPED_SURROGATE.search(text):
        text = _ESCAPED_SURROGATE.sub(_pair_or_replacement, text)
    return _DECODER.decode(text)


# A surrogate as itself, and as an escape (the backslashes before it counted: an even run
# is escaped backslashes, not an escape), a high one with the low escape after it if any.
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(r"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})?")


def _pair_or_replacement(match: re.Match[str]) -> str:
    """A lone surrogate's escape made U+FFFD's, as Go decodes it (a string holding a lone
    surrogate cannot be written as UTF-8: a reply with "\\ud800" failed the Mount as an
    internal error); a pair, which json decodes to one character, as it is."""
    backslashes, code, low = match.group(1), match.group(2), match.group(3) or ""
    if len(backslashes) % 2 == 0:  # not an escape: escaped backslashes, then the letters
        return backslashes + "u" + code + (_ESCAPED_SURROGATE.sub(_pair_or_replacement, low) if low else "")
    if low and code[1] in "89abAB":
        return match.group(0)  # a high surrogate and its low one: one character
    replaced = backslashes + "ufffd"
    return replaced + ("\\ufffd" if low else "")  # a low escape after a low one is lone too


# A JSON string literal, escapes included, or an unterminated one up to the end: that
# also matches, so a scan never restarts from each quote inside it (quadratic time).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.DOTALL)


def count_values(raw: bytes, *, few_strings: int = 10_000) -> int:
    """How many values (scalars and containers) a JSON document holds, counted without
    decoding it: separators and openers outside strings. Decoding costs about 60 bytes
    of memory per value whatever its size in the text, so a reply is bounded by this
    count before it is decoded, not only by its bytes.

    With at most `few_strings` strings the text between them is counted in place, exactly;
    with more, separators and openers inside strings are counted too: a bound, not the
    count, but one pass in C with no copy. (Blanking the strings with a regular expression
    took 34 MiB for a 1 MB reply of 99,000 keys: a piece per string, then the join.)"""
    if raw.count(b'"') <= 2 * few_strings:
        total, start = 1, 0
        for string in _STRING.finditer(raw):
            total += _structure(raw, start, string.start())
            start = string.end()
        return total + _structure(raw, start, len(raw))
    return _structure(raw, 0, len(raw)) + 1


def _structure(raw: bytes, start: int, end: int) -> int:
    return raw.count(b",", start, end) + raw.count(b"[", start, end) + raw.count(b"{", start, end)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_int=Number, parse_float=Number, parse_constant=_reject_constant)


# What encoded_size deletes to count the characters JSON writes as \u00XX escapes.
_ESCAPED_CONTROLS = dict.fromkeys([*range(0x20), 0x2028, 0x2029])


def encoded_size(value: Any, limit: int) -> int:
    """At least how many characters dumps(value) writes, without writing it: a walk that
    counts what each string's escapes add (<, > and & become six characters) and stops
    once past `limit`, so a caller can refuse what is too large before building it.
    Never under the real size (a property test holds it to that)."""
    total = 0
    pending = [value]
    while pending and total <= limit:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item) + 2 + 5 * (item.count("<") + item.count(">") + item.count("&"))
            total += item.count('"') + item.count("\\")
            if not item.isprintable():  # control characters (and U+2028/9) become \u00XX
                total += 5 * (len(item) - len(item.translate(_ESCAPED_CONTROLS)))
        elif isinstance(item, Mapping):
            total += 2 + 2 * len(item)  # braces, and a colon and a comma per entry
            for key, element in item.items():
                pending.append(str(key))
                pending.append(element)
        elif isinstance(item, Sequence) and not isinstance(item, bytes | bytearray):
            total += 2 + len(item)
            pending.extend(item)
        elif isinstance(item, Number):
            total += len(item.text)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 2  # its decimal digits, and a sign
        else:
            total += 24  # null, booleans, a float's shortest digits
    return total


def dumps(value: Any) -> bytes:
    """Encode as Go's json.Marshal would (compact, sorted keys, HTML-safe escapes)."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts).encode("utf-8")


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(encode_string(value))
    elif isinstance(value, Number):
        out.append(value.text)
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(format_float(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for index, key in enumerate(sorted(value, key=str)):
            if index:
                out.append(",")
            out.append(encode_string(str(key)))
            out.append(":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode_string(text: str) -> str:
    """A JSON string literal the way Go writes it."""
    encoded = _encode_basestring(text)  # what json.dumps(text, ensure_ascii=False) calls
    # Translating is per character: only for a string that holds one of those characters.
    return encoded.translate(_ESCAPE_TABLE) if _GO_EXTRA.search(encoded) else encoded


def format_float(value: float) -> str:
    """A float64 the way Go's encoding/json formats it.

    Go writes the shortest digits that round-trip, in plain notation for magnitudes in
    [1e-6, 1e21) and in exponent notation otherwise, with a one-digit negative exponent
    ("1e-7", not "1e-07").
    """
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"unsupported value: {value!r} cannot be encoded as JSON")
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        sign = exponent[0]
        digits = exponent[1:].lstrip("0") or "0"
        if len(digits) == 1 and sign == "-":
            return f"{mantissa}e-{digits}"
        return f"{mantissa}e{sign}{digits.zfill(2)}"
    text = format(Decimal(repr(value)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "-0" if text == "-0" else text
