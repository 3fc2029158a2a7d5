"""Replies read on the event loop (provider.loopio): whole replies come back and their
connections go back to the pool, blocking again; a reply that is slow, dribbled, large,
cut or framed to run to the close ends the exchange at once, without ever stalling the loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from provider import http1, loopio
from provider.address import Target
from provider.config import TLSConfig
from provider.transport import Pool, Pools
from tests.test_tls import _certificate

Script = Callable[[socket.socket], None]
BODY = b'{"data":{"k":"v"}}'
REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


class ScriptedServer:
    """Answers each request on a connection by running `script` on the socket."""

    def __init__(self, script: Script, context: ssl.SSLContext | None = None) -> None:
        self.script = script
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._context = context
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Each connection is closed by the thread serving it, also when close() came
        first: none is left for the garbage collector (a ResourceWarning in another test)."""
        with contextlib.suppress(OSError), conn:
            if self._context is not None:
                conn = self._context.wrap_socket(conn, server_side=True)
            with conn:
                with self._lock:
                    if self._closed:
                        return
                    self._open.append(conn)
                while True:
                    received = b""
                    while b"\r\n\r\n" not in received:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        received += chunk
                    self.script(conn)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            self._closed = True
            opened = list(self._open)
        for conn in opened:
            with contextlib.suppress(OSError):
                conn.close()


def replying(*parts: bytes, pause: float = 0.0) -> Script:
    def script(conn: socket.socket) -> None:
        for part in parts:
            time.sleep(pause)
            conn.sendall(part)

    return script


def closing(conn: socket.socket) -> None:
    conn.close()


def pooled(server: ScriptedServer, scheme: str = "http", tls: TLSConfig | None = None, count: int = 1) -> Pool:
    """A pool holding `count` kept-alive connections to the server."""
    pool = _opened(Pool(Target.parse(f"{scheme}://127.0.0.1:{server.port}"), tls or TLSConfig()))
    for conn in [pool.connect(5, lambda sock: None) for _ in range(count)]:
        pool.give(conn)
    return pool


_POOLS: list[Pool] = []


def _opened(pool: Pool) -> Pool:
    _POOLS.append(pool)
    return pool


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    while _POOLS:
        _POOLS.pop().close()


def request() -> bytes:
    return http1.request("GET", "/v1/kv/x", "127.0.0.1", {"X-Vault-Token": "t"}, None)


class Outcome:
    def __init__(self, replies: list[http1.Reply] | None, seconds: float, longest_stall: float) -> None:
        self.replies, self.seconds, self.longest_stall = replies, seconds, longest_stall


def exchange(pool: Pool, count: int = 1, timeout: float = 5.0, end_after: float | None = None) -> Outcome:
    """loopio.exchange on a fresh loop, with a ticker on the same loop measuring the longest
    time the loop went without running it (what a stalled loop would show)."""

    async def run() -> Outcome:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        ticks: list[float] = [time.monotonic()]
        stall = 0.0

        async def ticker() -> None:
            nonlocal stall
            while True:
                await asyncio.sleep(0.002)
                now = time.monotonic()
                stall = max(stall, now - ticks[-1])
                ticks.append(now)

        ticking = asyncio.create_task(ticker())
        if end_after is not None:
            loop.call_later(end_after, done.set_exception, RuntimeError("stopping"))
        started = time.monotonic()
        try:
            replies = await loopio.exchange(pool, [request()] * count, method="GET", timeout=timeout, done=done)
        finally:
            ticking.cancel()
        return Outcome(replies, time.monotonic() - started, stall)

    return asyncio.run(run())


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: Script, context: ssl.SSLContext | None = None) -> ScriptedServer:
        servers.append(ScriptedServer(script, context))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_whole_replies_come_back_and_their_connections_go_back_to_the_pool(
    serve: Callable[..., ScriptedServer],
) -> None:
    pool = pooled(serve(replying(REPLY[:20], REPLY[20:], pause=0.02)), count=2)
    outcome = exchange(pool, count=2)
    assert outcome.replies is not None
    assert [(reply.head.status, reply.body) for reply in outcome.replies] == [(200, BODY)] * 2
    kept = [pool.take(), pool.take()]
    assert all(conn is not None and conn.sock.gettimeout() is None for conn in kept)  # blocking again
    assert pool.take() is None
    for conn in kept:
        assert conn is not None
        conn.close()


def test_without_a_kept_alive_connection_for_each_request_nothing_is_sent(
    serve: Callable[..., ScriptedServer],
) -> None:
    sent: list[int] = []
    server = serve(lambda conn: sent.append(1))
    pool = pooled(server, count=1)
    assert exchange(pool, count=2).replies is None
    time.sleep(0.1)
    assert sent == [] and server.accepted == 1  # nothing sent, no connection made
    kept = pool.take()
    assert kept is not None  # the one it has is kept
    kept.close()


@pytest.mark.parametrize(
    "script",
    [
        replying(*[bytes([byte]) for byte in REPLY], pause=0.003),  # more receives than LOOP_ARRIVALS
        replying(b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20000),  # past LOOP_REPLY_BYTES
        replying(b"HTTP/1.1 200 OK\r\n\r\n" + BODY),  # runs to the close: cannot be read here
        replying(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),  # cut short, then silent
        closing,  # closed while idle: the stale connection of a restarted Vault
        replying(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),  # framing refused
        # An interim reply, the final one after it: the connection must not go back to the
        # pool with a reply still coming (the next user, maybe another pod, would read it).
        replying(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", REPLY, pause=0.05),
    ],
    ids=["dribbled", "too-large", "to-the-close", "cut-short", "closed", "bad-framing", "interim"],
)
def test_a_reply_that_cannot_be_read_whole_at_once_ends_the_exchange_without_stalling_the_loop(
    serve: Callable[..., ScriptedServer], script: Script
) -> None:
    pool = pooled(serve(script))
    outcome = exchange(pool, timeout=0.5)
    assert outcome.replies == [None]
    assert outcome.longest_stall < 0.1
    assert pool.take() is None  # its connection closed


def test_a_chunked_reply_is_read_once_it_has_ended(serve: Callable[..., ScriptedServer]) -> None:
    """Go's server sends a reply past 2 KiB in chunks; each piece here ends like the whole."""
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (BODY[:5], BODY[5:12], BODY[12:]))
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pool = pooled(serve(replying(head + chunked[:9], chunked[9:] + b"0\r\n\r\n", pause=0.02)))
    outcome = exchange(pool)
    assert outcome.replies is not None and outcome.replies[0] is not None and outcome.replies[0].body == BODY


def test_a_chunked_reply_of_many_tiny_chunks_is_not_parsed_on_the_loop(serve: Callable[..., ScriptedServer]) -> None:
    """Parsing a thousand 1-byte chunks costs milliseconds of the loop: a thread reads it."""
    chunks = b"1\r\nx\r\n" * 1500 + b"0\r\n\r\n"
    pool = pooled(serve(replying(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)))
    assert exchange(pool).replies == [None]  # whole and valid: parsed, it would be read


def test_a_head_with_bare_line_feeds_is_not_read_on_the_loop(serve: Callable[..., ScriptedServer]) -> None:
    """http1 reads such a head, but its first CRLF CRLF may then sit at the end of a body of
    thousands of chunks, which the count of chunk lines would not see."""
    chunks = b"1\nx\r\n" * 2000 + b"0\r\n\r\n"  # its first CRLF CRLF: the very end
    pool = pooled(serve(replying(b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n" + chunks)))
    outcome = exchange(pool)
    assert outcome.replies == [None] and outcome.seconds < 1  # whole and valid: parsed, it would be read


def test_a_failed_send_closes_every_connection_taken(serve: Callable[..., ScriptedServer]) -> None:
    pool = pooled(serve(replying(REPLY)), count=2)
    taken = [pool.take(), pool.take()]
    assert taken[0] is not None and taken[1] is not None
    real = taken[1].sock
    taken[1].sock = cast(socket.socket, _RefusingSend(real))
    for conn in taken:
        pool.give(conn)
    assert exchange(pool, count=2).replies == [None, None]
    assert pool.take() is None and real.fileno() == -1  # both closed, none kept


class _RefusingSend:
    """A socket whose send fails (a server that closed it between the pool's check and the send)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: bytes) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_a_reply_read_whole_is_kept_when_another_is_not(serve: Callable[..., ScriptedServer]) -> None:
    answered = iter([replying(REPLY), replying(REPLY[:30])])
    pool = pooled(serve(lambda conn: next(answered)(conn)), count=2)
    outcome = exchange(pool, count=2, timeout=0.3)
    assert outcome.replies is not None and sorted(reply is None for reply in outcome.replies) == [False, True]
    kept = pool.take()
    assert kept is not None and pool.take() is None  # the whole one's connection, not the cut one's
    kept.close()


def test_a_dribbled_reply_is_given_up_after_a_few_receives_not_at_the_deadline(
    serve: Callable[..., ScriptedServer],
) -> None:
    pool = pooled(serve(replying(*[bytes([byte]) for byte in REPLY], pause=0.01)))
    outcome = exchange(pool, timeout=5)
    assert outcome.replies == [None] and outcome.seconds < 1


def test_the_timeout_ends_the_wait(serve: Callable[..., ScriptedServer]) -> None:
    pool = pooled(serve(replying(REPLY, pause=2)))
    outcome = exchange(pool, timeout=0.2)
    assert outcome.replies == [None] and 0.15 < outcome.seconds < 1
    assert pool.take() is None


def test_done_set_from_outside_ends_the_wait_with_its_error(serve: Callable[..., ScriptedServer]) -> None:
    pool = pooled(serve(replying(REPLY, pause=2)))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stopping"):
        exchange(pool, timeout=5, end_after=0.1)
    assert time.monotonic() - started < 1
    assert pool.take() is None


def test_bytes_after_the_reply_close_its_connection(serve: Callable[..., ScriptedServer]) -> None:
    pool = pooled(serve(replying(REPLY + b"HTTP/1.1 200 OK\r\n")))
    outcome = exchange(pool)
    assert outcome.replies is not None and outcome.replies[0].body == BODY
    assert pool.take() is None  # not trusted with another request


def tls_context(directory: Path) -> ssl.SSLContext:
    """A server context whose certificate, for 127.0.0.1, directory/ca.pem signed."""
    _certificate(directory, "server", issuer=_certificate(directory, "ca"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem", directory / "server-key.pem")
    return context


def kv_reply(size: int) -> tuple[bytes, bytes]:
    """A body of about `size` bytes, and a whole reply carrying it."""
    body = b'{"data":{"k":"%s"}}' % (b"v" * size)
    return body, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def tls_pool(port: int, directory: Path, body: bytes, count: int) -> Pool:
    """A pool of `count` TLS connections, each past a first exchange, as on a thread: TLS
    1.3 session tickets arrive after the handshake, and a connection with unread bytes is
    not taken from the pool."""
    pool = _opened(Pool(Target.parse(f"https://127.0.0.1:{port}"), TLSConfig(ca_cert=str(directory / "ca.pem"))))
    for conn in [pool.connect(5, lambda sock: None) for _ in range(count)]:
        conn.send(request())
        assert conn.read_reply("GET", 1 << 20).body == body
        pool.give(conn)
    return pool


def test_tls_replies_are_read_on_the_loop_too(serve: Callable[..., ScriptedServer], tmp_path: Path) -> None:
    # A large reply in many TLS records, sent in pieces: decrypted bytes the socket no
    # longer signals are taken at once.
    body, reply = kv_reply(12000)
    server = serve(replying(reply[:5000], reply[5000:], pause=0.02), tls_context(tmp_path))
    pool = tls_pool(server.port, tmp_path, body, count=2)
    for _ in range(3):
        outcome = exchange(pool, count=2)
        assert outcome.replies is not None and [r.body for r in outcome.replies if r is not None] == [body, body]
    # A TLS server that goes silent is cut by the timeout like any other.
    server.script = replying(reply, pause=2)
    assert exchange(pool, timeout=0.2).replies == [None]


class DrippingForwarder:
    """Forwards to a server, and once `drip` is set, sends what the server answers one
    byte per TCP segment: TLS records arriving in pieces."""

    def __init__(self, port: int) -> None:
        self.drip = False
        self._upstream = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                with self._lock:  # none opened after close() is left open
                    self._open.append(client)
                    if self._closed:
                        client.close()
                        return
                server = socket.create_connection(("127.0.0.1", self._upstream))
                with self._lock:
                    self._open.append(server)
                    if self._closed:
                        server.close()
                        return
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
                threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if answers and self.drip:
                    for byte in data:
                        sink.sendall(bytes([byte]))
                        time.sleep(0.001)
                else:
                    sink.sendall(data)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            self._closed = True
            opened = list(self._open)
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.close()


def test_tls_records_dripped_segment_by_segment_are_given_up_after_a_few_wakeups(
    serve: Callable[..., ScriptedServer], tmp_path: Path
) -> None:
    body, reply = kv_reply(1500)
    forwarder = DrippingForwarder(serve(replying(reply), tls_context(tmp_path)).port)
    try:
        pool = tls_pool(forwarder.port, tmp_path, body, count=1)
        forwarder.drip = True
        outcome = exchange(pool, timeout=5)
        assert outcome.replies == [None] and outcome.seconds < 1  # dripped whole, it would take 2 s
    finally:
        forwarder.close()


def test_a_pool_found_for_the_loop_counts_as_used(serve: Callable[..., ScriptedServer]) -> None:
    """Pools are kept least recently used first out; one the loop alone uses must not look idle."""
    pools = Pools(max_pools=2)
    targets = [Target.parse(f"http://127.0.0.1:{port}") for port in (1, 2, 3)]
    try:
        pools.get(targets[0], TLSConfig())
        pools.get(targets[1], TLSConfig())
        assert pools.find(targets[0], TLSConfig()) is not None
        pools.get(targets[2], TLSConfig())  # one must go: the least recently used
        assert pools.find(targets[0], TLSConfig()) is not None
        assert pools.find(targets[1], TLSConfig()) is None
    finally:
        pools.close()
