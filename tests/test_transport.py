"""The transport reads a reply's headers as http.client does, without its email parser,
and refuses header blocks that would cost too much to read."""

from __future__ import annotations

import http.client
import io
import json
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from provider import transport
from provider.config import TLSConfig
from provider.errors import VaultUnreachable
from provider.vault import Endpoint, VaultClient
from tests.test_vault_replies import _RawServer

# Bytes that make header lines hard: separators, blanks, line ends, non-ASCII.
_TRICKY = st.sampled_from([b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"From ", b"a", b"Content-Length", b"\xe9", b"-"])
_LINE = st.one_of(
    st.tuples(st.from_regex(rb"\A[!-9;-~]{1,12}\Z"), st.binary(max_size=20)).map(lambda nv: nv[0] + b": " + nv[1]),
    st.tuples(st.lists(_TRICKY, max_size=3), st.binary(max_size=6)).map(lambda nv: b"".join(nv[0]) + b":" + nv[1]),
    st.lists(_TRICKY, max_size=8).map(b"".join),
)


def _stdlib(block: bytes) -> list[tuple[str, str]] | str:
    fp = io.BufferedReader(io.BytesIO(block))  # type: ignore[arg-type]
    try:
        return list(http.client.parse_headers(fp).items())
    except http.client.HTTPException as e:
        return type(e).__name__


def _ours(block: bytes) -> list[tuple[str, str]] | str:
    fp = io.BufferedReader(io.BytesIO(block))  # type: ignore[arg-type]
    try:
        return list(transport._header_message(transport._header_lines(fp)).items())
    except http.client.HTTPException as e:
        return type(e).__name__


def _has_bare_cr(block: bytes) -> bool:
    """Whether a header line (before the empty one) holds a CR that does not end it."""
    for line in io.BytesIO(block):
        if line in (b"\r\n", b"\n"):
            return False
        if b"\r" in line.removesuffix(b"\n").removesuffix(b"\r"):
            return True
    return False


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(_LINE, st.sampled_from([b"\r\n", b"\n", b""])), max_size=12), st.booleans())
def test_headers_read_as_http_client_reads_them(lines: list[tuple[bytes, bytes]], ended: bool) -> None:
    """The same headers, or the same refusal; a bare CR in a line is refused, where
    http.client's email parser splits the line there."""
    block = b"".join(line + end for line, end in lines) + (b"\r\n" if ended else b"")
    expected = _stdlib(block)
    if isinstance(expected, list) and _has_bare_cr(block):
        expected = "HTTPException"
    assert _ours(block) == expected


def test_header_block_limits() -> None:
    """http.client's: 100 lines (the empty one counted) of 64 KiB; ours: 64 KiB in all."""
    lines = [b"X-%d: v\r\n" % i for i in range(transport.MAX_HEADERS)]
    assert _ours(b"".join(lines[:-1]) + b"\r\n") == _stdlib(b"".join(lines[:-1]) + b"\r\n") != "HTTPException"
    assert _ours(b"".join(lines) + b"\r\n") == _stdlib(b"".join(lines) + b"\r\n") == "HTTPException"
    long = b"X: " + b"v" * transport.MAX_HEADER_LINE + b"\r\n\r\n"
    assert _ours(long) == _stdlib(long) == "LineTooLong"
    half = b"X: " + b"v" * (transport.MAX_HEADER_BYTES // 2) + b"\r\n"
    assert isinstance(_stdlib(half * 2 + b"\r\n"), list)
    assert _ours(half * 2 + b"\r\n") == "HTTPException"


@pytest.mark.parametrize(
    "line",
    [
        b"X:" + b" \r" * 30000 + b"\n",  # the email parser takes each CR for a line: 5 s for 99 of these
        b"X:" + b" \t" * 30000 + b"\rY\n",  # blanks, then a CR: backtracking bait
        b" " + b"v" * 60000 + b"\n",  # folded lines go to the email parser: 40 ms for 98 of these
        b"X" * 600 + b"\n",  # no colon: the whole block goes to the email parser
        b"X" * 600 + b": " + b"v" * 20 + b"\n",
    ],
    ids=["bare-crs", "blanks-then-cr", "folded", "no-colon", "long-name"],
)
def test_a_header_block_built_to_cost_is_read_or_refused_at_once(line: bytes) -> None:
    """A gateway (any class may name one) fills the header block with what parsers choke on."""
    block = b"A: b\r\n" + line * (transport.MAX_HEADERS - 2) + b"\r\n"
    started = time.process_time()
    _ours(block)
    assert time.process_time() - started < 0.01


class _Replay:
    """Stands for a socket whose reply is `data` (all http.client reads is its makefile)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self._data))  # type: ignore[arg-type]


_FRAMING = st.sampled_from(
    [
        *("Connection", "connection", "Keep-Alive", "Proxy-Connection", "Content-Length", "Transfer-Encoding"),
        *("Location", "location", "Retry-After", "Content-Type"),
    ]
)
_FRAMING_VALUE = st.sampled_from(
    ["close", "keep-alive", "Keep-Alive, Close", "chunked", "Chunked", "12", "-1", "x", ""]
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["HTTP/1.0", "HTTP/1.1"]),
    st.sampled_from(["200", "204", "307", "404"]),
    st.lists(st.tuples(_FRAMING, _FRAMING_VALUE), max_size=6),
)
@example("HTTP/1.0", "200", [("Proxy-Connection", "keep-alive")])
@example("HTTP/1.0", "200", [("Keep-Alive", "x"), ("Content-Length", "12")])
@example("HTTP/1.0", "200", [("connection", "Keep-Alive, Close")])
@example("HTTP/1.1", "200", [("Connection", "Keep-Alive, Close"), ("Connection", "close")])
@example("HTTP/1.1", "200", [("Location", "a"), ("location", "b")])
def test_reply_framing_as_http_client_reads_it(version: str, status: str, headers: list[tuple[str, str]]) -> None:
    """Whether the connection closes, chunking, the length and each header's value (its
    first, as Go's Header.Get gives it) agree with http.client's reading of the same reply;
    these headers are looked up without its HTTPMessage."""
    block = f"{version} {status} X\r\n".encode() + b"".join(f"{n}: {v}\r\n".encode() for n, v in headers) + b"\r\n"
    theirs = http.client.HTTPResponse(_Replay(block))  # type: ignore[arg-type]
    ours = transport._Response(_Replay(block))  # type: ignore[arg-type]
    theirs.begin()
    ours.begin()
    assert (ours.will_close, ours.chunked, ours.length) == (theirs.will_close, theirs.chunked, theirs.length)
    for name, _ in headers:
        assert ours.header(name.lower()) == theirs.headers.get(name)
    assert ours.header("location") == theirs.headers.get("Location")


def _reply(status: str, headers: list[bytes], body: bytes) -> bytes:
    return b"HTTP/1.1 " + status.encode() + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


_BODY = json.dumps({"data": {"k": "v"}}).encode()


@pytest.mark.parametrize(
    "reply",
    [
        _reply("200 OK", [b"content-type:application/json", b"CONTENT-LENGTH:   %d" % len(_BODY)], _BODY),
        _reply(
            "200 OK",
            [b"Content-Type: application/json;", b"\tcharset=utf-8", b"Content-Length: %d" % len(_BODY)],
            _BODY,
        ),
        _reply(
            "200 OK",
            [b"Content-Type: application/json", b"Transfer-Encoding: chunked"],
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(_BODY), _BODY),
        ),
        b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY),
        _reply("200 OK", [b"Content-Length: %d" % len(_BODY), b"Connection: close"], _BODY),
    ],
    ids=["no-blanks-any-case", "folded-header", "chunked", "http-1.0", "connection-close"],
)
def test_replies_with_unusual_headers_are_read_whole(reply: bytes) -> None:
    """Go's server never sends these, but a gateway in front of Vault may."""
    server = _RawServer(lambda path, token: reply)
    client = VaultClient()
    endpoint = Endpoint(address=f"http://127.0.0.1:{server.port}", tls=TLSConfig())
    try:
        for _ in range(3):  # and again, on a kept connection or a new one as the reply said
            secret = client.read(endpoint, token="t", method="GET", path="kv/x", deadline=time.monotonic() + 2)
            assert secret.data == {"k": "v"}
    finally:
        client.close()
        server.close()


def test_a_reply_with_too_many_headers_fails_that_read_only() -> None:
    crowded = _reply("200 OK", [b"X-%d: v" % i for i in range(transport.MAX_HEADERS)], b"")
    good = _reply("200 OK", [b"Content-Length: %d" % len(_BODY)], _BODY)
    server = _RawServer(lambda path, token: crowded if path.endswith("crowded") else good)
    client = VaultClient()
    endpoint = Endpoint(address=f"http://127.0.0.1:{server.port}", tls=TLSConfig())
    try:
        with pytest.raises(VaultUnreachable, match="got more than 100 headers"):
            client.read(endpoint, token="t", method="GET", path="kv/crowded", deadline=time.monotonic() + 2)
        secret = client.read(endpoint, token="t", method="GET", path="kv/x", deadline=time.monotonic() + 2)
        assert secret.data == {"k": "v"}
    finally:
        client.close()
        server.close()
