"""HTTP/1.1 on one connection: a request written in one piece, its reply read from the
socket into one buffer, within limits.

Python's http.client cost 0.22 ms of the reading thread's CPU per Vault read in `make
bench`, this module 0.09 ms (the kernel's share of sending and receiving is in both). It
put a request together header by header, each header checked by two regular expressions,
and made a file object, a buffered reader and an email message for every reply. Here a
whole plain head is read with one regular-expression match (20 µs for Vault's reply).

A reply means here what it means to http.client; tests/test_http1.py holds the two to the
same bytes, split anywhere:
- a status line `HTTP/x.y NNN reason`; 100 Continue is skipped (five at most, as Go);
  HTTP/1.0 and 0.9 are 1.0.
- headers: http.client's limits (64 KiB a line, 100 lines with the empty one) and ours,
  64 KiB in all and no bare CR in a line (RFC 9112 lets a client refuse it). Plain
  `Name: value` lines are read here; a block with any other line (folded, no colon, an
  odd name) goes to the email parser, as in http.client. Each header's first value is
  kept by lower-cased name, as Go's Header.Get gives it.
- the body: none for 1xx, 204, 304 and HEAD replies; chunked; Content-Length; else up to
  the close.
- the connection stays open unless HTTP/1.1 says close, HTTP/1.0 does not say keep-alive,
  or the body runs to the close.
Stricter than http.client where it is lax: Content-Length and chunk sizes are digits
(not "+12", "1_2" or "0x1f"), a chunk ends in CRLF, a 204 or 304 has no body whatever
its headers say; bytes after a reply, or framing in doubt (RFC 9112, 6.3: a
Transfer-Encoding other than chunked alone, or beside a Content-Length; Content-Lengths
that differ) close the connection rather than answer the next request on it. All of a
reply on the wire, chunk lines and trailers too, counts against twice the body limit
plus room for its heads, and what was read is not kept.

Errors never hold data from the exchange: no header value, no body.
"""

from __future__ import annotations

import email.parser
import re
import socket
from collections.abc import Callable, Mapping
from typing import NamedTuple

# A reply's header block at most: http.client's own limits per line and in lines (the
# empty line that ends the block counted, as it counts it), and in all, ours: Vault sends
# a few hundred bytes, and the email parser costs 50 ms of CPU on 64 KiB of bare CRs.
MAX_LINE = 65536
MAX_HEADERS = 100
MAX_HEADER_BYTES = 65536
# 100 Continue replies skipped before the answer, at most (Go's client skips five).
MAX_CONTINUES = 5
# Bytes a reply's heads may take on the wire: its 100 Continues, its own head, its trailers.
_HEAD_BUDGET = (MAX_CONTINUES + 2) * (MAX_LINE + MAX_HEADER_BYTES)
# Bytes asked of the socket per read: a Vault reply usually arrives in one.
_RECV_BYTES = 65536
# Read bytes kept in front of the unread ones, at most: past this they are dropped.
_KEEP_READ_BYTES = 65536
# Chunks a chunked body may be split into: this many whatever their size, then one more
# per CHUNK_AVERAGE_BYTES of body. Each chunk line costs a few microseconds of Python (with
# the GIL held); Go's server writes a reply in chunks of about 4 KiB, while a server
# sending millions of 1-byte chunks would cost a Mount seconds of the node's CPU.
FREE_CHUNKS = 64
CHUNK_AVERAGE_BYTES = 256
# Content-Length digits at most: more is past any body limit (and past the 4300 digits
# Python turns into an int).
_MAX_LENGTH_DIGITS = 18
# A header name the email parser reads as one: visible ASCII but the colon.
_HEADER_NAME = re.compile(rb"[!-9;-~]+")
# What we send: header names are tokens; values and the path printable ASCII (a CR or LF
# would end the line and start a header of the sender's choosing).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_VALUE = re.compile(r"[^\t\x20-\x7e]")
_NOT_PATH = re.compile(r"[^\x21-\x7e]")
# A head as most servers send it, read in one look: an HTTP/1.0 or 1.1 status line with one
# space after the version and a status of three digits, plain `Name: value` header lines,
# every line ending in CRLF. Each step is certain (a name cannot hold the colon, a value
# cannot hold a CR or LF), so it runs in linear time. _FIELD takes a name and its value
# without leading blanks, as the email parser does.
_WHOLE_HEAD = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [^\r\n]*)?\r\n((?:[!-9;-~]+:[^\r\n]*\r\n)*)\r\n")
_FIELD = re.compile(r"([!-9;-~]+):[ \t]*([^\r\n]*)\r\n")
_DIGITS = re.compile(rb"[0-9]+")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_NO_BODY = frozenset({204, 304})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "accept-encoding"})


class ProtocolError(Exception):
    """The reply is not HTTP/1.1 as it may be read; the message names what, never data."""


class LineTooLong(ProtocolError):
    """A status, header or chunk-size line longer than MAX_LINE."""


class NotHTTP(ProtocolError):
    """The reply does not begin as an HTTP/1.x reply does: the server speaks another
    protocol (or another HTTP), so asking it again would get the same."""


class Closed(Exception):
    """The server closed the connection before any byte of the reply: a kept-alive
    connection it closed while idle."""


class TooLarge(Exception):
    """The body is larger than the limit; it was not read to its end."""


class Head(NamedTuple):
    """A reply's status line and headers, and how its body is framed."""

    status: int
    fields: list[tuple[str, str]]  # every header as sent, in order
    first: dict[str, str]  # each header's first value by lower-cased name
    chunked: bool
    length: int | None  # the body's length, when it is known before reading it
    will_close: bool


class Reply(NamedTuple):
    head: Head
    body: bytes
    will_close: bool  # the connection cannot carry another exchange


def request(method: str, url: str, host: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
    """One request's bytes, as http.client writes them: `url` is the path and query,
    `host` the Host header. ValueError when a part cannot be sent as it is."""
    if _TOKEN.fullmatch(method) is None:
        raise ValueError("the request method is not an HTTP token")
    if not url or _NOT_PATH.search(url):
        raise ValueError("the request path holds characters HTTP cannot carry")
    if not host or _NOT_PATH.search(host):
        raise ValueError("the request's host holds characters HTTP cannot carry")
    length = f"Content-Length: {len(body or b'')}\r\n" if body is not None or method in _BODY_METHODS else ""
    head = (
        f"{method} {url} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n{length}{_header_lines(headers)}\r\n"
    )
    return head.encode("ascii") + body if body else head.encode("ascii")


# The last header lines written, by the headers they were written from: the reads of a
# Mount send the same headers (its token), which are then checked once, not once per read.
_last_header_lines: tuple[tuple[tuple[str, str], ...], str] = ((), "")


def _header_lines(headers: Mapping[str, str]) -> str:
    """The headers as lines, each ending in CRLF; ValueError for one that cannot be sent."""
    global _last_header_lines
    fields = tuple(headers.items())
    last = _last_header_lines
    if fields == last[0]:
        return last[1]
    lines = []
    for name, value in fields:
        if _TOKEN.fullmatch(name) is None:
            raise ValueError("a request header's name is not an HTTP token")
        if name.lower() in _OWN_HEADERS:
            raise ValueError(f"the request header {name} is the client's to write")
        if _NOT_VALUE.search(value):
            raise ValueError(f"the request header {name} holds characters HTTP cannot carry")
        lines.append(f"{name}: {value}\r\n")
    written = "".join(lines)
    _last_header_lines = (fields, written)
    return written


def host_header(host: str, port: int, default_port: int) -> str:
    """The Host header for a host and port, as http.client writes it."""
    name = host if host.isascii() else host.encode("idna").decode("ascii")
    if ":" in name:
        name = f"[{name}]"
    return name if port == default_port else f"{name}:{port}"


class Connection:
    """One HTTP connection's socket and what was read from it but not yet used."""

    __slots__ = ("_buffer", "_ended", "_pos", "_unread_budget", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._pos = 0  # where the unread bytes start
        self._ended = False  # the server closed its side
        self._unread_budget = _HEAD_BUDGET  # bytes the current reply may still take from the socket

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self, method: str, max_body_bytes: int, count: Callable[[int], None] | None = None) -> Reply:
        """The reply to the request sent; raises Closed, ProtocolError, TooLarge or the
        socket's OSError. All of the reply on the wire (its heads, chunk lines and
        trailers too) is held to the body limit plus room for its framing. `count` is
        told the body's size as it grows, before it is read (and may raise to stop it)."""
        self._unread_budget = _HEAD_BUDGET + 2 * max_body_bytes  # the body, and as much for its chunk lines
        head = self.read_head(method)
        body = self._body(head, max_body_bytes, count or _uncounted)
        leftover = self._pos < len(self._buffer)
        self._buffer.clear()
        self._pos = 0
        return Reply(head, body, head.will_close or leftover or self._ended)

    def read_head(self, method: str) -> Head:
        """The status line and headers of the next reply (100 Continue skipped)."""
        if self._pos == len(self._buffer):
            try:
                if not self._fill():
                    raise Closed()
            except (ConnectionResetError, BrokenPipeError):
                raise Closed() from None
        whole = _WHOLE_HEAD.match(self._buffer, self._pos, self._pos + MAX_HEADER_BYTES)
        if whole is not None and whole[2] != b"100" and whole[3].count(b"\n") < MAX_HEADERS:
            # The common case read at once: the whole head arrived, within the limits, every
            # line ends in CRLF, every header is a plain `Name: value` line.
            self._pos = whole.end()
            version = 10 if whole[1] == b"0" else 11
            status = int(whole[2])
            fields = _FIELD.findall(whole[3].decode("iso-8859-1"))
        else:
            for _ in range(MAX_CONTINUES + 1):
                version_text, status = _status_line(self._line())
                if status != 100:
                    break
                self._header_lines()
            else:
                raise ProtocolError(f"more than {MAX_CONTINUES} interim replies (100 Continue)")
            if version_text in ("HTTP/1.0", "HTTP/0.9"):
                version = 10
            elif version_text.startswith("HTTP/1."):
                version = 11
            else:
                raise NotHTTP("the reply's HTTP version is not 1.x")
            fields = _header_fields(self._header_lines())
        first = {name.lower(): value for name, value in reversed(fields)}  # the first of a name wins
        chunked = first.get("transfer-encoding", "").lower() == "chunked"
        will_close = _will_close(version, first)
        length: int | None = None
        declared = first.get("content-length")
        if declared and not chunked:
            digits = declared.strip(" \t").encode("iso-8859-1")
            if len(digits) > _MAX_LENGTH_DIGITS and _DIGITS.fullmatch(digits):
                raise ProtocolError("the reply's Content-Length is out of range")
            length = int(digits) if _DIGITS.fullmatch(digits) else None
        if status in _NO_BODY or status < 200 or method == "HEAD":
            length = 0
        if not will_close and not chunked and length is None:
            will_close = True  # the body runs to the close
        # Doubt needs a Transfer-Encoding or a header sent twice (first holds one per name).
        if not will_close and ("transfer-encoding" in first or len(first) < len(fields)) and _in_doubt(fields):
            will_close = True  # read as http.client reads it, but not trusted with another exchange
        return Head(status, fields, first, chunked, length, will_close)

    def _body(self, head: Head, max_bytes: int, count: Callable[[int], None]) -> bytes:
        if head.length == 0:  # 1xx, 204, 304, HEAD: no body, whatever the headers say
            return b""
        if head.chunked:
            return self._chunked(max_bytes, count)
        if head.length is not None:
            if head.length > max_bytes:
                raise TooLarge()
            count(head.length)
            return self._take(head.length)
        counted = 0
        while True:  # to the close
            held = len(self._buffer) - self._pos
            if held > max_bytes:
                raise TooLarge()
            count(held - counted)
            counted = held
            if not self._fill():
                return self._take(held)

    def _chunked(self, max_bytes: int, count: Callable[[int], None]) -> bytes:
        body = bytearray()
        chunks = 0
        while True:
            line = self._line()
            if not line:
                raise ProtocolError("the reply was cut short")
            size = line.split(b";", 1)[0].strip(b" \t\r\n")
            if _HEX.fullmatch(size) is None:
                raise ProtocolError("a chunk's size is not hexadecimal")
            left = int(size, 16)
            if left == 0:
                break
            if len(body) + left > max_bytes:
                raise TooLarge()
            chunks += 1
            if chunks > FREE_CHUNKS + (len(body) + left) // CHUNK_AVERAGE_BYTES:
                raise ProtocolError(
                    f"the reply is split into more than {chunks - 1} chunks for {len(body) + left} bytes "
                    f"(at most {FREE_CHUNKS}, then one per {CHUNK_AVERAGE_BYTES} bytes)"
                )
            count(left)
            body += self._take(left)
            if self._take(2) != b"\r\n":
                raise ProtocolError("a chunk of the reply does not end in CRLF")
        self._header_lines()  # the trailers, read and dropped
        return bytes(body)

    def _take(self, count: int) -> bytes:
        """The next `count` bytes; ProtocolError if the connection ends first."""
        while len(self._buffer) - self._pos < count:
            if not self._fill():
                raise ProtocolError("the reply was cut short")
        start = self._pos
        self._pos += count
        with memoryview(self._buffer) as view:  # one copy, not a bytearray slice and then its bytes
            return bytes(view[start : self._pos])

    def _line(self) -> bytes:
        """The next line with its LF, or what is left when the connection ends; a line
        is at most MAX_LINE bytes (with its LF), as http.client reads it."""
        searched = 0  # bytes past the line's start already searched for its end
        while True:
            end = self._buffer.find(b"\n", self._pos + searched, self._pos + MAX_LINE)
            if end >= 0:
                start, self._pos = self._pos, end + 1
                return bytes(self._buffer[start : self._pos])
            searched = len(self._buffer) - self._pos
            if searched > MAX_LINE:
                raise LineTooLong(f"a line of the reply is longer than {MAX_LINE} bytes")
            if not self._fill():
                start, self._pos = self._pos, len(self._buffer)
                return bytes(self._buffer[start:])

    def _header_lines(self) -> list[bytes]:
        """The header lines up to the empty one (or the end), within the limits."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = self._line()
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise ProtocolError(f"the reply's headers are larger than {MAX_HEADER_BYTES} bytes")
            lines.append(line)
            if len(lines) > MAX_HEADERS:
                raise ProtocolError(f"got more than {MAX_HEADERS} headers")
            if line in (b"\r\n", b"\n", b""):
                return lines[:-1]

    def _fill(self) -> bool:
        """Read what the socket has; False once the server has closed its side."""
        if self._ended:
            return False
        if self._unread_budget <= 0:
            raise TooLarge()
        data = self.sock.recv(min(_RECV_BYTES, self._unread_budget))
        if not data:
            self._ended = True
            return False
        self._unread_budget -= len(data)
        if self._pos >= _KEEP_READ_BYTES or self._pos == len(self._buffer):
            del self._buffer[: self._pos]  # what was read is not kept: chunk lines, trailers
            self._pos = 0
        self._buffer += data
        return True


def _uncounted(size: int) -> None:
    """A reply read for no one in particular: nobody counts its size."""


def _status_line(line: bytes) -> tuple[str, int]:
    """The version and status of a status line, as http.client reads them."""
    if not line:
        raise ProtocolError("the connection was closed before the status line")
    if not line.endswith(b"\n"):  # closed within it: cut short, whatever came of it
        raise ProtocolError("the reply was cut short in its status line")
    text = line.decode("iso-8859-1")
    parts = text.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise NotHTTP("the reply does not start with an HTTP status line")
    code = parts[1].encode("iso-8859-1")
    if len(code) != 3 or _DIGITS.fullmatch(code) is None or code.startswith(b"0"):
        raise ProtocolError("the reply's status is not a number from 100 to 999")
    return parts[0], int(code)


def _header_fields(lines: list[bytes]) -> list[tuple[str, str]]:
    """The header lines as http.client.parse_headers reads them, without its email parser
    for plain `Name: value` lines."""
    texts = [
        line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith((b"\n", b"\r")) else line for line in lines
    ]
    if any(b"\r" in text for text in texts):
        raise ProtocolError("a header line of the reply holds a bare CR")
    fields: list[tuple[str, str]] = []
    for text in texts:
        name, colon, value = text.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            message = email.parser.Parser().parsestr(b"".join(lines).decode("iso-8859-1"))
            return [(name, str(value)) for name, value in message.items()]
        fields.append((name.decode("ascii"), value.lstrip(b" \t").decode("iso-8859-1")))
    return fields


def _in_doubt(fields: list[tuple[str, str]]) -> bool:
    """Whether the body's framing is in doubt (RFC 9112, 6.3): a Transfer-Encoding other
    than chunked alone, or beside a Content-Length; Content-Lengths that differ."""
    encodings = [value for name, value in fields if name.lower() == "transfer-encoding"]
    lengths = {value.strip(" \t") for name, value in fields if name.lower() == "content-length"}
    if encodings:
        return len(encodings) > 1 or encodings[0].lower() != "chunked" or bool(lengths)
    return len(lengths) > 1


def _will_close(version: int, first: Mapping[str, str]) -> bool:
    """http.client's rule: HTTP/1.1 stays open unless told to close; 1.0 only when told to
    keep alive."""
    connection = first.get("connection", "").lower()
    if version == 11:
        return "close" in connection
    if first.get("keep-alive") or "keep-alive" in connection:
        return False
    return "keep-alive" not in first.get("proxy-connection", "").lower()
