"""Requests sent and their replies read on the event loop, without a thread: for a warm
Mount whose replies are most likely the ones it remembers (mount.Mounter.mount_on_loop).

Handing a Mount to a thread and its answer back to the loop costs a warm 1-object Mount
about a tenth of its time here (two thread wake-ups and the lock between them); a reply
read here costs an epoll registration instead. Nothing in this module waits: it only
uses connections a pool keeps alive (no connect, no name lookup, no TLS handshake), sends
each request in one non-blocking send, and reads what arrives when it arrives. Anything
ends the exchange at once, and what it did not read goes to a thread the usual way: a
request that does not leave in one send, a connection found closed, a reply that is not
whole within LOOP_REPLY_BYTES, LOOP_ARRIVALS receives of data or LOOP_WAKEUPS wake-ups in
all (CPU on the loop is every Mount's: a server dripping a reply byte by byte, or TLS
records segment by segment, may not hold it), an interim (1xx) reply, a reply framed to
run to the close. The Mount's deadline ends the wait, and so does `done` set from outside
(shutdown).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Sequence
from typing import cast

from provider import http1
from provider.transport import Pool

# Bytes a reply may take on the wire when read on the loop: a remembered Mount's replies
# hold at most mount.REMEMBERED_BYTES, and Vault's headers about 300 bytes.
LOOP_REPLY_BYTES = 16 * 1024
# Receives of data a reply may take on the loop; a reply is parsed again on each (from its
# start). Vault's reply to a KV read arrives whole in one, or a few over a real network.
LOOP_ARRIVALS = 8
# Wake-ups a reply may take on the loop in all: over TLS, each piece of a record not yet
# whole wakes the loop without giving data.
LOOP_WAKEUPS = 4 * LOOP_ARRIVALS
# CRLFs a chunked body read on the loop may hold: Go's server writes a reply past 2 KiB in
# chunks of about 4 KiB, so a real one has a few; a thousand 1-byte chunks would cost the
# loop milliseconds to parse.
LOOP_CHUNK_LINES = 64


class Incomplete(Exception):
    """The bytes received so far end before the reply does."""


class Received:
    """A socket stand-in over the bytes received so far, for http1.Connection to read a
    reply from: it stops where they end instead of waiting for more."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def recv(self, size: int) -> bytes:
        if not self._data:
            raise Incomplete()
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk


class _Exchange:
    """One request on one kept-alive connection, its reply read as it arrives."""

    __slots__ = ("arrivals", "body_at", "conn", "length", "received", "reply", "sock", "wakeups")

    def __init__(self, conn: http1.Connection) -> None:
        self.conn = conn
        self.sock: socket.socket = conn.sock
        self.received = bytearray()
        self.arrivals = 0
        self.wakeups = 0
        self.body_at = 0  # where the body starts, once the head is in
        self.length: int | None = None  # the body's length; -1 when chunked
        self.reply: http1.Reply | None = None

    def receive(self, method: str) -> bool | None:
        """Take what arrived: True once the reply is whole, None if it cannot be read here."""
        self.wakeups += 1
        if self.wakeups > LOOP_WAKEUPS:
            return None
        room = LOOP_REPLY_BYTES + 1 - len(self.received)  # at least 1: a larger reply ended the read
        try:
            chunk = self.sock.recv(room)
            # TLS may hold decrypted bytes the socket no longer signals: take them now.
            while chunk and len(chunk) < room and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                more = self.sock.recv(room - len(chunk))
                if not more:
                    break
                chunk += more
        except (BlockingIOError, ssl.SSLWantReadError):
            return False  # a TLS record not yet whole
        except (OSError, ValueError):  # reset, TLS alert, or recv of 0 bytes asked
            return None
        self.arrivals += 1
        if not chunk:  # closed: a stale connection, or a reply running to the close
            return None
        self.received += chunk
        if len(self.received) > LOOP_REPLY_BYTES:
            return None
        whole = self._whole(method)
        if whole is False and self.arrivals >= LOOP_ARRIVALS:
            return None
        return whole

    def _whole(self, method: str) -> bool | None:
        """Whether the bytes received are the whole reply (None: not one to read here). A
        reply is parsed whole when its head first arrives (most arrive whole at once); if
        it is not whole yet, its head says when to parse again: once its Content-Length is
        in, or once a chunked body ends like a whole one."""
        if self.length is None:
            end = self.received.find(b"\r\n\r\n")
            if end < 0:
                return False
            if self.received.count(b"\n", 0, end) != self.received.count(b"\r\n", 0, end):
                return None  # a line ending in a bare LF: the head's end, and the body's lines, not where they seem
            self.body_at = end + 4
        elif self.length >= 0:
            if len(self.received) < self.body_at + self.length:
                return False
        elif not self.received.endswith(b"\r\n\r\n"):  # the last chunk, and the trailers' end
            return False
        if self.received.count(b"\r\n", self.body_at) > LOOP_CHUNK_LINES:
            return None
        try:
            reply = _reading(self.received).read_reply(method, LOOP_REPLY_BYTES)
        except Incomplete:
            return self._framing(method) if self.length is None else False
        except (http1.Closed, http1.ProtocolError, http1.TooLarge):
            return None
        if reply.head.status < 200:  # an interim reply (103): the final one is still to come
            return None
        self.reply = reply
        return True

    def _framing(self, method: str) -> bool | None:
        """Learn from the head how the body ends (False: wait for it; None: not here)."""
        try:
            head = _reading(self.received[: self.body_at]).read_head(method)
        except (Incomplete, http1.Closed, http1.ProtocolError, http1.TooLarge):
            return None  # Incomplete: a 100 Continue before it
        if head.status < 200 or (head.length is None and not head.chunked):
            return None  # an interim reply, or one running to the close
        self.length = -1 if head.chunked or head.length is None else head.length
        return False


def _reading(received: bytearray) -> http1.Connection:
    """http1 reading from the bytes received so far."""
    return http1.Connection(cast(socket.socket, Received(bytes(received))))


async def exchange(
    pool: Pool,
    requests: Sequence[bytes],
    *,
    method: str,
    timeout: float,
    done: asyncio.Future[bool],
) -> list[http1.Reply | None] | None:
    """Each request's reply, read on the running loop over connections `pool` keeps
    alive, or None for each one not read whole (see the module's docstring: the first
    that cannot be ends them all) within `timeout` seconds; None for all when the pool has
    not a kept-alive connection for each (nothing is sent then). Setting `done` (a result
    or an exception) from outside ends the wait: its exception is raised here. Each
    connection goes back to the pool if its reply left it fit for another, else is closed."""
    conns = [pool.take() for _ in requests]
    if None in conns:  # nothing sent: they go back as they were
        for conn in conns:
            if conn is not None:
                pool.give(conn)
        return None
    exchanges = [_Exchange(conn) for conn in conns if conn is not None]
    loop = asyncio.get_running_loop()
    watched: list[int] = []
    timer = None
    try:
        for each, data in zip(exchanges, requests, strict=True):
            each.sock.setblocking(False)
            try:
                if each.sock.send(data) != len(data):
                    return [None] * len(exchanges)
            except (OSError, ValueError):  # closed while idle, or a TLS write that would wait
                return [None] * len(exchanges)
        waiting = len(exchanges)

        def readable(each: _Exchange, fd: int) -> None:
            nonlocal waiting
            if done.done():
                return
            whole = each.receive(method)
            if whole is None:
                done.set_result(False)
            elif whole:
                loop.remove_reader(fd)
                watched.remove(fd)
                waiting -= 1
                if waiting == 0:
                    done.set_result(True)

        for each in exchanges:
            fd = each.sock.fileno()
            loop.add_reader(fd, readable, each, fd)
            watched.append(fd)
        timer = loop.call_later(max(timeout, 0.0), _end, done)
        await done
        return [each.reply for each in exchanges]
    finally:
        if timer is not None:
            timer.cancel()
        for fd in watched:
            loop.remove_reader(fd)
        for each in exchanges:
            if each.reply is not None and not each.reply.will_close and _blocking(each.sock):
                pool.give(each.conn)
            else:
                pool.drop(each.conn)


def _end(done: asyncio.Future[bool]) -> None:
    if not done.done():
        done.set_result(False)


def _blocking(sock: socket.socket) -> bool:
    """Put the socket back in blocking mode, as the pool's other users expect; False if it
    is no longer fit for it."""
    try:
        sock.settimeout(None)
    except OSError:
        return False
    return True
