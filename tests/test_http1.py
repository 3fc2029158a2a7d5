"""provider.http1 writes requests and reads replies as http.client does: the same bytes,
however the socket splits them, give the same status, headers, body and keep-alive
decision, or both refuse. Where it is stricter than http.client, it says so here."""

from __future__ import annotations

import http.client
import io
import time
import tracemalloc

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from provider import http1


class _Pieces:
    """Stands for a socket whose peer sends `data` in pieces of the given sizes (the rest
    in one), then closes; what is sent to it is kept."""

    def __init__(self, data: bytes, sizes: list[int] | None = None) -> None:
        self._data = data
        self._at = 0
        self._sizes = list(sizes or [])
        self.sent = b""

    def recv(self, limit: int) -> bytes:
        size = self._sizes.pop() if self._sizes else limit
        piece = self._data[self._at : self._at + min(size, limit)]
        self._at += len(piece)
        return piece

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def makefile(self, mode: str) -> io.BufferedReader:  # what http.client reads a reply from
        return io.BufferedReader(io.BytesIO(self._data[self._at :]))  # type: ignore[arg-type]


def _connection(data: bytes, sizes: list[int] | None = None) -> http1.Connection:
    return http1.Connection(_Pieces(data, sizes))  # type: ignore[arg-type]


# --- headers ---------------------------------------------------------------------------

# Bytes that make header lines hard: separators, blanks, line ends, non-ASCII.
_TRICKY = st.sampled_from([b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"From ", b"a", b"Content-Length", b"\xe9", b"-"])
_LINE = st.one_of(
    st.tuples(st.from_regex(rb"\A[!-9;-~]{1,12}\Z"), st.binary(max_size=20)).map(lambda nv: nv[0] + b": " + nv[1]),
    st.tuples(st.lists(_TRICKY, max_size=3), st.binary(max_size=6)).map(lambda nv: b"".join(nv[0]) + b":" + nv[1]),
    st.lists(_TRICKY, max_size=8).map(b"".join),
)
_STATUS_LINE = b"HTTP/1.1 200 OK\r\n"


def _stdlib(block: bytes) -> list[tuple[str, str]] | str:
    fp = io.BufferedReader(io.BytesIO(block))  # type: ignore[arg-type]
    try:
        return list(http.client.parse_headers(fp).items())
    except http.client.LineTooLong:
        return "LineTooLong"
    except http.client.HTTPException:
        return "refused"


def _ours(block: bytes, sizes: list[int] | None = None) -> list[tuple[str, str]] | str:
    try:
        return _connection(_STATUS_LINE + block, sizes).read_head("GET").fields
    except http1.LineTooLong:
        return "LineTooLong"
    except http1.ProtocolError:
        return "refused"


def _has_bare_cr(block: bytes) -> bool:
    """Whether a header line (before the empty one) holds a CR that does not end it."""
    for line in io.BytesIO(block):
        if line in (b"\r\n", b"\n"):
            return False
        if b"\r" in line.removesuffix(b"\n").removesuffix(b"\r"):
            return True
    return False


@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.tuples(_LINE, st.sampled_from([b"\r\n", b"\n", b""])), max_size=12),
    st.booleans(),
    st.lists(st.integers(1, 16), max_size=8),
)
@example([(b"A: b", b"\r\n"), (b"C: d", b"\r\n")], True, [])  # all at once: read in one look
@example([(b"A: b", b"\r\n"), (b"C: d", b"\r\n")], True, [19, 1])  # the block's end split
@example([(b"A: b", b"\r\n"), (b" folded", b"\r\n")], True, [])  # all at once, then the email parser
def test_headers_read_as_http_client_reads_them(
    lines: list[tuple[bytes, bytes]], ended: bool, sizes: list[int]
) -> None:
    """The same headers, or the same refusal, however the block arrives; a bare CR in a
    line is refused, where http.client's email parser splits the line there."""
    block = b"".join(line + end for line, end in lines) + (b"\r\n" if ended else b"")
    expected = _stdlib(block)
    if isinstance(expected, list) and _has_bare_cr(block):
        expected = "refused"
    assert _ours(block, sizes) == expected


def test_header_block_limits() -> None:
    """http.client's: 100 lines (the empty one counted) of 64 KiB; ours: 64 KiB in all."""
    lines = [b"X-%d: v\r\n" % i for i in range(http1.MAX_HEADERS)]
    assert _ours(b"".join(lines[:-1]) + b"\r\n") == _stdlib(b"".join(lines[:-1]) + b"\r\n") != "refused"
    assert _ours(b"".join(lines) + b"\r\n") == _stdlib(b"".join(lines) + b"\r\n") == "refused"
    long = b"X: " + b"v" * http1.MAX_LINE + b"\r\n\r\n"
    assert _ours(long) == _stdlib(long) == "LineTooLong"
    half = b"X: " + b"v" * (http1.MAX_HEADER_BYTES // 2) + b"\r\n"
    assert isinstance(_stdlib(half * 2 + b"\r\n"), list)
    assert _ours(half * 2 + b"\r\n") == "refused"


@pytest.mark.parametrize("extra", [0, 1])
def test_a_line_is_at_most_64_kib_with_its_end(extra: int) -> None:
    status = b"HTTP/1.1 200 " + b"O" * (http1.MAX_LINE - 15 + extra) + b"\r\n"
    theirs = http.client.HTTPResponse(_Replay(status))  # type: ignore[arg-type]
    if extra:
        with pytest.raises(http.client.LineTooLong):
            theirs.begin()
        with pytest.raises(http1.LineTooLong):
            _connection(status).read_reply("GET", max_body_bytes=10)
    else:
        theirs.begin()
        assert _connection(status).read_reply("GET", max_body_bytes=10).head.status == theirs.status == 200


@pytest.mark.parametrize(
    "line",
    [
        b"X:" + b" \r" * 30000 + b"\n",  # the email parser takes each CR for a line: 5 s for 99 of these
        b"X:" + b" \t" * 30000 + b"\rY\n",  # blanks, then a CR: backtracking bait
        b" " + b"v" * 60000 + b"\n",  # folded lines go to the email parser: 40 ms for 98 of these
        b"X" * 600 + b"\n",  # no colon: the whole block goes to the email parser
        b"X" * 600 + b": " + b"v" * 20 + b"\n",
        b"X: " + b"v" * 600 + b"\r\n",  # plain: read in one look
    ],
    ids=["bare-crs", "blanks-then-cr", "folded", "no-colon", "long-name", "plain"],
)
@pytest.mark.parametrize("sizes", [None, [1] * 2000], ids=["at-once", "dripped"])
def test_a_header_block_built_to_cost_is_read_or_refused_at_once(line: bytes, sizes: list[int] | None) -> None:
    """A gateway (any class may name one) fills the header block with what parsers choke on."""
    block = b"A: b\r\n" + line * (http1.MAX_HEADERS - 2) + b"\r\n"
    started = time.process_time()
    _ours(block, sizes)
    assert time.process_time() - started < 0.02


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
    ["close", "keep-alive", "Keep-Alive, Close", "chunked", "Chunked", "gzip, chunked", "12", "-1", "x", ""]
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
    first, as Go's Header.Get gives it) agree with http.client's reading of the same reply."""
    block = f"{version} {status} X\r\n".encode() + b"".join(f"{n}: {v}\r\n".encode() for n, v in headers) + b"\r\n"
    theirs = http.client.HTTPResponse(_Replay(block))  # type: ignore[arg-type]
    theirs.begin()
    ours = _connection(block).read_head("GET")
    assert (ours.chunked, ours.length) == (theirs.chunked, theirs.length)
    assert ours.will_close == (theirs.will_close or _framing_in_doubt(headers))
    for name, _ in headers:
        assert ours.first.get(name.lower()) == theirs.headers.get(name)
    assert ours.first.get("location") == theirs.headers.get("Location")


def _framing_in_doubt(headers: list[tuple[str, str]]) -> bool:
    """RFC 9112, 6.3: the body is read as http.client reads it, but the connection is not
    trusted with another exchange."""
    encodings = [v for n, v in headers if n.lower() == "transfer-encoding"]
    lengths = {v for n, v in headers if n.lower() == "content-length"}
    return (
        len(encodings) > 1
        or any(e.lower() != "chunked" for e in encodings)
        or bool(encodings and lengths)
        or (len(lengths) > 1)
    )


@pytest.mark.parametrize(
    "headers",
    [
        [b"Transfer-Encoding: gzip, chunked", b"Content-Length: 2"],
        [b"Transfer-Encoding: identity", b"Content-Length: 2"],
        [b"Transfer-Encoding: foo", b"Transfer-Encoding: chunked", b"Content-Length: 2"],
        [b"Content-Length: 2", b"Content-Length: 40"],
    ],
    ids=["gzip-chunked", "identity", "two-encodings", "two-lengths"],
)
def test_a_reply_whose_framing_is_in_doubt_closes_its_connection(headers: list[bytes]) -> None:
    """A gateway that frames a body two ways may have meant the other: what follows the
    body could be the start of the next reply, with another pod's secret in it."""
    reply = _connection(b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\nok").read_reply(
        "GET", max_body_bytes=1000
    )
    assert (reply.body, reply.will_close) == (b"ok", True)


# --- whole replies -----------------------------------------------------------------------

_PLAIN_HEADER = st.tuples(
    st.sampled_from(["Content-Type", "Date", "X-Vault-Thing", "Connection", "Keep-Alive"]),
    st.sampled_from(["application/json", "close", "keep-alive", "x y", ""]),
)


@st.composite
def _replies(draw: st.DrawFn) -> tuple[bytes, str, bool]:
    """A well-formed reply (body framed by length, chunks or the close) and the method it
    answers, maybe after a 100 Continue, maybe cut anywhere."""
    method = draw(st.sampled_from(["GET", "GET", "HEAD"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    status = draw(st.sampled_from([200, 200, 204, 304, 307, 404, 503]))
    reason = draw(st.sampled_from([" OK", " Not Found", "", " "]))
    headers = draw(st.lists(_PLAIN_HEADER, max_size=4))
    body = draw(st.binary(max_size=200))
    no_body = status in (204, 304) or method == "HEAD"
    framing = draw(st.sampled_from(["length", "none"] if no_body else ["length", "chunked", "close"]))
    payload = b""
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload = b"" if no_body else body
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "Chunked"]))))
        sizes = draw(st.lists(st.integers(1, 60), max_size=8))
        rest = body
        for size in sizes:
            if not rest:
                break
            extension = draw(st.sampled_from([b"", b";name=value", b" "]))
            digits = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(rest[:size])
            payload += digits.encode() + extension + b"\r\n" + rest[:size] + b"\r\n"
            rest = rest[size:]
        if rest:
            payload += b"%x\r\n%s\r\n" % (len(rest), rest)
        payload += b"0\r\n" + b"".join(draw(st.lists(st.just(b"X-Trailer: t\r\n"), max_size=2))) + b"\r\n"
    elif framing == "close":
        payload = body
    head = f"{version} {status}{reason}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    reply = head.encode() + payload
    if draw(st.booleans()):
        reply = b"HTTP/1.1 100 Continue\r\n\r\n" + reply
    cut = draw(st.integers(0, 4)) == 0
    if cut:  # anywhere
        reply = reply[: draw(st.integers(0, max(len(reply) - 1, 0)))]
    return reply, method, cut


def _read_by_stdlib(reply: bytes, method: str) -> tuple[int, bytes, list[tuple[str, str]], bool] | str:
    response = http.client.HTTPResponse(_Replay(reply), method=method)  # type: ignore[arg-type]
    try:
        response.begin()
        body = response.read()
    except (http.client.HTTPException, ValueError):
        return "refused"
    return response.status, body, list(response.headers.items()), response.will_close


def _read_by_us(reply: bytes, method: str, sizes: list[int]) -> tuple[int, bytes, list[tuple[str, str]], bool] | str:
    try:
        read = _connection(reply, sizes).read_reply(method, max_body_bytes=1 << 20)
    except (http1.ProtocolError, http1.Closed):
        return "refused"
    return read.head.status, read.body, read.head.fields, read.will_close


@settings(max_examples=800, deadline=None)
@given(_replies(), st.lists(st.integers(1, 40), max_size=30))
@example((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", False), [])
@example((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", "GET", False), [1] * 60)
@example((b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nto the end", "GET", False), [])
@example((b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", "GET", True), [])
@example((b"HTTP/1.1 200", "HEAD", True), [])
@example((b"", "GET", True), [])
def test_replies_read_as_http_client_reads_them(reply: tuple[bytes, str, bool], sizes: list[int]) -> None:
    """Status, body and headers: the same as http.client's, or both refuse. The connection
    is kept as http.client would keep it, except after a reply the server cut short: we
    saw it close, http.client does not look."""
    data, method, cut = reply
    ours, theirs = _read_by_us(data, method, sizes), _read_by_stdlib(data, method)
    if isinstance(ours, tuple) and isinstance(theirs, tuple):
        assert ours[:3] == theirs[:3]
        assert ours[3] == theirs[3] or (cut and ours[3])
    elif cut and _cut_in_its_status_line(data):
        assert ours == "refused"  # http.client reads what it got of it; we know it was cut
    else:
        assert ours == theirs


def _cut_in_its_status_line(data: bytes) -> bool:
    """Whether the final reply's status line was cut before its line end."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    rest = data[len(interim) :] if data.startswith(interim) else data
    return bool(rest) and b"\n" not in rest


@pytest.mark.parametrize(
    ("reply", "refusal"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n", "not hexadecimal"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n" + b"o" * 16 + b"\r\n0\r\n\r\n", "hexadecimal"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n", "does not end in CRLF"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n", "cut short"),
        (b"HTTP/1.1 0200 OK\r\n\r\n", "status"),
        (b"HTTP/2 200 OK\r\n\r\n", "version"),
        (b"SSH-2.0-OpenSSH\r\n", "status line"),
        (b"HTTP/1.1 200", "cut short in its status line"),
    ],
    ids=[
        "0x-size",
        "underscore-size",
        "chunk-without-crlf",
        "no-last-chunk",
        "four-digit-status",
        "http2",
        "not-http",
        "cut-status-line",
    ],
)
def test_what_http_client_lets_pass_is_refused(reply: bytes, refusal: str) -> None:
    with pytest.raises(http1.ProtocolError, match=refusal):
        _connection(reply).read_reply("GET", max_body_bytes=1000)


@pytest.mark.parametrize(
    ("reply", "other_protocol"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", True),
        (b"HTTP/2 200 OK\r\n\r\n", True),
        (b"-ERR unknown command\r\n", True),
        (b"HTT", False),
        (b"HTTP/1.1 ", False),
        (b"HTTP/1.1 200", False),
        (b"HTTP/1.1 0200 OK\r\n\r\n", False),
    ],
)
def test_only_a_whole_first_line_of_another_protocol_is_not_http(reply: bytes, other_protocol: bool) -> None:
    # NotHTTP is not retried (the address is wrong); a reply cut short is (the next try may
    # get all of it), however little of it came.
    with pytest.raises(http1.ProtocolError) as refused:
        _connection(reply).read_reply("GET", max_body_bytes=1000)
    assert isinstance(refused.value, http1.NotHTTP) is other_protocol


@pytest.mark.parametrize("length", ["+2", "1_0", " 0x2", "2, 2"])
def test_a_content_length_that_is_not_digits_leaves_the_body_to_the_close(length: str) -> None:
    """http.client takes "+2" and "1_0" for numbers (Python's int); Go refuses them. We read
    the body to the close, and keep no connection whose framing is in doubt."""
    reply = _connection(f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\nabcdefghijkl".encode()).read_reply(
        "GET", max_body_bytes=1000
    )
    assert (reply.body, reply.will_close) == (b"abcdefghijkl", True)


def test_a_content_length_too_long_to_be_a_number_is_refused() -> None:
    """Python refuses to read 4300 digits as an int; that ValueError escaped the transport."""
    with pytest.raises(http1.ProtocolError, match="Content-Length is out of range"):
        _connection(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nok").read_reply("GET", 1000)
    assert (
        _connection(b"HTTP/1.1 200 OK\r\nContent-Length: 000000000000000002\r\n\r\nok").read_reply("GET", 1000).body
        == b"ok"
    )


def test_what_a_reply_takes_from_the_socket_is_bounded_by_its_limit() -> None:
    """Chunk extensions, chunk lines and 100 Continues do not count as body: a server
    sending them without end is refused once the reply has taken twice its limit and room
    for its heads, and what was read is not kept."""
    chunk = b"1;" + b"x" * 60000 + b"\r\nA\r\n"
    endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 200  # 12 MB
    connection = _connection(endless, [len(chunk) + 1] * 200)  # each piece ends inside the next chunk
    tracemalloc.start()
    try:
        with pytest.raises(http1.TooLarge):
            connection.read_reply("GET", max_body_bytes=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    continues = b"HTTP/1.1 100 Continue\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    read = _connection(continues * http1.MAX_CONTINUES + answer).read_reply("GET", max_body_bytes=1000)
    assert read.body == b"ok"
    with pytest.raises(http1.ProtocolError, match="interim replies"):
        _connection(continues * (http1.MAX_CONTINUES + 1) + answer).read_reply("GET", max_body_bytes=1000)


def test_a_body_in_tiny_chunks_is_refused_before_it_costs_the_cpu() -> None:
    """Each chunk line costs Python work with the GIL held: a body may take FREE_CHUNKS
    chunks of any size, then one per CHUNK_AVERAGE_BYTES; a server sending a million
    1-byte chunks (within twice the body limit on the wire) is refused after a few dozen."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    tiny = head + b"1\r\nx\r\n" * 1_000_000 + b"0\r\n\r\n"
    peer = _Pieces(tiny)
    with pytest.raises(http1.ProtocolError, match="more than 64 chunks for 65 bytes"):
        http1.Connection(peer).read_reply("GET", max_body_bytes=8 << 20)  # type: ignore[arg-type]
    assert peer._at <= http1._RECV_BYTES  # refused within its first read
    # As many chunks as the body has CHUNK_AVERAGE_BYTES, and FREE_CHUNKS more, are read.
    size = http1.CHUNK_AVERAGE_BYTES
    count = http1.FREE_CHUNKS + 500
    body = bytes(range(256)) * (size // 256)
    many = head + (b"%x\r\n%s\r\n" % (size, body)) * count + b"0\r\n\r\n"
    assert _connection(many).read_reply("GET", max_body_bytes=8 << 20).body == body * count
    half = size // 2  # refused at chunk 2 * FREE_CHUNKS + 1
    smaller = head + (b"%x\r\n%s\r\n" % (half, body[:half])) * count + b"0\r\n\r\n"
    with pytest.raises(http1.ProtocolError, match=f"more than {2 * http1.FREE_CHUNKS} chunks"):
        _connection(smaller).read_reply("GET", max_body_bytes=8 << 20)


def test_bytes_after_a_reply_close_the_connection() -> None:
    """http.client leaves them for the next reply to start with; a second reply that
    nobody asked for must never answer the next pod's request."""
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother"
    reply = _connection(smuggled).read_reply("GET", max_body_bytes=1000)
    assert (reply.body, reply.will_close) == (b"ok", True)
    kept = _connection(smuggled[:40]).read_reply("GET", max_body_bytes=1000)
    assert (kept.body, kept.will_close) == (b"ok", False)


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_a_reply_without_a_body_has_none_whatever_its_headers_say(status: bytes) -> None:
    """http.client would read chunks after a 204 that says it is chunked (RFC 9110: a 204
    or 304 ends with its headers); the next reply on the connection is not one of them."""
    reply = b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    read = _connection(reply).read_reply("GET", max_body_bytes=1000)
    assert (read.body, read.will_close) == (b"", False)


def test_a_connection_closed_before_any_byte_is_told_apart() -> None:
    """That is a kept-alive connection the server dropped while idle: safe to send a read again."""
    with pytest.raises(http1.Closed):
        _connection(b"").read_reply("GET", max_body_bytes=1000)
    with pytest.raises(http1.ProtocolError):
        _connection(b"H").read_reply("GET", max_body_bytes=1000)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_body_over_the_limit_is_refused_before_it_is_read(framing: str) -> None:
    body = b"x" * 5000
    head = {
        "length": b"Content-Length: 5000\r\n",
        "chunked": b"Transfer-Encoding: chunked\r\n",
        "close": b"Connection: close\r\n",
    }[framing]
    payload = b"1388\r\n" + body + b"\r\n0\r\n\r\n" if framing == "chunked" else body
    with pytest.raises(http1.TooLarge):  # in pieces
        _connection(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + payload, [100] * 100).read_reply(
            "GET", max_body_bytes=4999
        )
    with pytest.raises(http1.TooLarge):  # all at once, the close right after
        _connection(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + payload, [100] * 100).read_reply(
            "GET", max_body_bytes=4999
        )
    assert _connection(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + payload).read_reply("GET", 5000).body == body


# --- requests ----------------------------------------------------------------------------

_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["GET", "POST", "PUT", "LIST", "DELETE"]),
    st.from_regex(r"\A/[!-~]{0,30}\Z"),
    st.sampled_from([("127.0.0.1", 8200), ("vault.example", 80), ("::1", 8200), ("büro.example", 8200)]),
    st.dictionaries(st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z"), _VALUE, max_size=4),
    st.one_of(st.none(), st.binary(max_size=40)),
)
def test_requests_are_written_as_http_client_writes_them(
    method: str, url: str, address: tuple[str, int], headers: dict[str, str], body: bytes | None
) -> None:
    if any(name.lower() in ("host", "accept-encoding", "content-length") for name in headers):
        return  # those are the client's own
    socket = _Pieces(b"")
    connection = http.client.HTTPConnection(*address)
    connection.sock = socket  # type: ignore[assignment]
    connection.request(method, url, body=body, headers=headers)
    ours = http1.request(method, url, http1.host_header(*address, 80), headers, body)
    assert ours == socket.sent


@pytest.mark.parametrize(
    ("url", "headers", "refusal"),
    [
        ("/v1/a b", {}, "request path"),
        ("/v1/a\r\nX-Injected: 1", {}, "request path"),
        ("/v1/é", {}, "request path"),
        ("/v1/a", {"X-Vault-Namespace": "team\r\nX-Vault-Token: stolen"}, "X-Vault-Namespace"),
        ("/v1/a", {"X-Vault-Token": "tok\x00"}, "X-Vault-Token"),
        ("/v1/a", {"X-Vault-Token": "tøk"}, "X-Vault-Token"),
        ("/v1/a", {"X Bad": "v"}, "not an HTTP token"),
        ("/v1/a", {"Host": "elsewhere"}, "the client's to write"),
        ("/v1/a", {"Content-Length": "0"}, "the client's to write"),
    ],
)
def test_what_a_request_cannot_carry_is_refused_without_its_value(
    url: str, headers: dict[str, str], refusal: str
) -> None:
    with pytest.raises(ValueError, match=refusal) as error:
        http1.request("GET", url, "vault:8200", headers, None)
    for value in headers.values():
        assert value not in str(error.value)


def test_a_host_that_would_start_a_header_is_refused() -> None:
    with pytest.raises(ValueError, match="host"):
        http1.request("GET", "/v1/a", "vault\r\nX-Injected: 1", {}, None)
