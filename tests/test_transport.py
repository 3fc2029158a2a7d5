"""Replies as gateways in front of Vault send them are read whole, through the transport;
a reply the reader refuses fails that read only. How replies are read: test_http1.py."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from provider import http1, transport
from provider.address import Target
from provider.breaker import FAILURES_TO_OPEN, Breakers, EndpointKey
from provider.config import TLSConfig
from provider.errors import ProviderError, VaultUnreachable
from provider.vault import Endpoint, VaultClient
from tests.test_vault_replies import _RawServer


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


@pytest.mark.parametrize(
    ("bad", "refusal"),
    [
        (_reply("200 OK", [b"X-%d: v" % i for i in range(http1.MAX_HEADERS)], b""), "got more than 100 headers"),
        # Python refuses to read 4300 digits as an int; that ValueError once escaped the transport.
        (_reply("200 OK", [b"Content-Length: " + b"9" * 5000], b"ok"), "Content-Length is out of range"),
    ],
    ids=["too-many-headers", "content-length-past-int"],
)
def test_a_reply_the_reader_refuses_fails_that_read_only(bad: bytes, refusal: str) -> None:
    good = _reply("200 OK", [b"Content-Length: %d" % len(_BODY)], _BODY)
    server = _RawServer(lambda path, token: bad if path.endswith("bad") else good)
    client = VaultClient()
    endpoint = Endpoint(address=f"http://127.0.0.1:{server.port}", tls=TLSConfig())
    try:
        with pytest.raises(VaultUnreachable, match=refusal):
            client.read(endpoint, token="t", method="GET", path="kv/bad", deadline=time.monotonic() + 2)
        secret = client.read(endpoint, token="t", method="GET", path="kv/x", deadline=time.monotonic() + 2)
        assert secret.data == {"k": "v"}
    finally:
        client.close()
        server.close()


def test_a_defect_reading_one_reply_fails_that_request_and_the_batch_reads_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception in reading (a bug of ours) is logged with its traceback and
    fails its own request; the batch's other replies are still read, each connection closed
    or kept as its reply said."""
    server = _RawServer(lambda path, token: _reply("200 OK", [b"Content-Length: %d" % len(_BODY)], _BODY))
    sender = transport.Transport(max_body_bytes=1 << 20)
    target = Target.parse(f"http://127.0.0.1:{server.port}")
    read_reply = http1.Connection.read_reply
    calls = iter(range(100))

    def first_fails(
        self: http1.Connection, method: str, max_body_bytes: int, count: Callable[[int], None] | None = None
    ) -> http1.Reply:
        if next(calls) == 0:
            raise RuntimeError("a defect")
        return read_reply(self, method, max_body_bytes, count)

    monkeypatch.setattr(http1.Connection, "read_reply", first_fails)
    requests = [
        transport.Request(target, TLSConfig(), "GET", f"/v1/kv/{i}", None, {}, 5.0, replayable=True) for i in range(3)
    ]
    try:
        with caplog.at_level(logging.ERROR, logger="provider.transport"):
            outcomes = sender.send_many(requests)
        assert isinstance(outcomes[0], transport.TransportError) and "internal error" in str(outcomes[0])
        assert [o.body for o in outcomes[1:] if isinstance(o, transport.Reply)] == [_BODY, _BODY]
        assert "a defect" in caplog.text
        assert isinstance(sender.send_many(requests[:1])[0], transport.Reply)  # and the transport goes on
    finally:
        sender.close()
        server.close()


def test_a_reply_reset_midway_is_not_sent_again() -> None:
    """Only a kept-alive connection closed before any byte of the reply is stale; a reset
    after the server began to answer means it acted, and a login sent twice makes two tokens."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            received.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            received.append(conn.recv(65536))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            time.sleep(0.2)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # a reset, mid-body
            listener.settimeout(1)
            again, _ = listener.accept()  # a replay would arrive here
            received.append(again.recv(65536))
            again.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nagain")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    sender = transport.Transport(max_body_bytes=1 << 20)
    target = Target.parse(f"http://127.0.0.1:{port}")
    login = ("POST", "/v1/auth/kubernetes/login", b"{}", {}, 5.0)
    try:
        assert sender.send(target, TLSConfig(), *login, replayable=True).body == b"ok"
        with pytest.raises(transport.TransportError, match="reset"):
            sender.send(target, TLSConfig(), *login, replayable=True)
        server.join(3)
        assert len(received) == 2
    finally:
        sender.close()
        listener.close()


def _silent_server() -> tuple[socket.socket, list[socket.socket], threading.Thread]:
    """A listener that accepts and never answers (nor speaks TLS), and what it accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    return listener, held, server


def _within(seconds: float, call: Callable[[], object]) -> object:
    """call()'s outcome (or error), failing the test if it takes longer than `seconds`: a
    socket blocks, so a cut that does not come would otherwise hang the test."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds}s"
    return outcome[0]


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_silent_server_is_cut_at_the_deadline_and_when_the_transport_closes(scheme: str) -> None:
    """Sockets block once connected: the watchdog alone ends an exchange, a TLS handshake
    included. Every exchange of a batch is cut at the deadline the batch shares, and
    closing the transport cuts one still running (at shutdown, a Mount on a dead Vault must
    not hold the process); a request after the close fails before it connects."""
    listener, held, server = _silent_server()
    sender = transport.Transport(max_body_bytes=1 << 20)
    target = Target.parse(f"{scheme}://127.0.0.1:{listener.getsockname()[1]}")
    tls = TLSConfig(skip_verify=True)
    # Over TLS the handshake never ends: nothing was sent, so the request was never made. Cut
    # with under CONNECT_EVIDENCE_SECONDS left, that is the caller's timeout, not a failure to
    # connect (a breaker does not count it); with more, it is.
    short = 0.3
    assert short < transport.CONNECT_EVIDENCE_SECONDS
    cut: type[transport.TransportError] = transport.TimedOut
    long_cut: type[transport.TransportError] = transport.TimedOut if scheme == "http" else transport.NotConnected
    try:
        batch = [transport.Request(target, tls, "GET", f"/v1/kv/{i}", None, {}, short, True) for i in range(3)]
        started = time.monotonic()
        outcomes = _within(5, lambda: sender.send_many(batch))
        assert isinstance(outcomes, list) and isinstance(outcomes[0], cut), outcomes
        assert time.monotonic() - started < short + 4 * transport.WATCHDOG_TICK_SECONDS + 0.3
        if scheme == "http":
            assert all(isinstance(o, cut) for o in outcomes), outcomes
        else:  # a batch connects one at a time: a handshake that never ends takes its time
            assert all(isinstance(o, transport.TimedOut) and "no time left" in str(o) for o in outcomes[1:])
        connected = len(outcomes) if scheme == "http" else 1
        _wait_for(lambda: len(held) == connected)

        long = threading.Thread(
            target=lambda: outcomes.append(
                _within(5, lambda: sender.send(target, tls, "GET", "/", None, {}, 30.0, replayable=True))
            ),
            daemon=True,
        )
        long.start()
        _wait_for(lambda: len(held) == connected + 1)  # connected, and waiting on the server
        time.sleep(0.1)
        closed = time.monotonic()
        sender.close()
        long.join(5)
        assert time.monotonic() - closed < 1.0
        assert isinstance(outcomes[-1], long_cut) and "no time left" not in str(outcomes[-1]), outcomes[-1]
        after = _within(5, lambda: sender.send(target, tls, "GET", "/after", None, {}, 30.0, replayable=True))
        assert isinstance(after, transport.TimedOut) and "no time left" in str(after)
        time.sleep(0.1)
        assert len(held) == connected + 1  # it never connected
    finally:
        sender.close()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        server.join(2)
        for conn in held:
            conn.close()


def test_tls_files_that_cannot_be_loaded_are_named(tmp_path: Path) -> None:
    """`cannot load the TLS files: No such file or directory` left the user to guess which:
    the message names the file the system names, else the parameters that name files."""
    pools = transport.Pools()
    target = Target.parse("https://127.0.0.1:8200")
    missing = str(tmp_path / "nonexistent" / "ca.pem")
    with pytest.raises(
        transport.TLSFailed, match=f"cannot load the TLS files \\(vaultCACertPath {re.escape(missing)}\\)"
    ):
        pools.get(target, TLSConfig(ca_cert=missing))
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(transport.TLSFailed) as error:
        pools.get(target, TLSConfig(ca_cert=str(garbage), client_cert=str(garbage), client_key=str(garbage)))
    assert f"vaultCACertPath {garbage}" in str(error.value) and "not a certificate" not in str(error.value)


class _SilentTLS:
    """Accepts TCP connections on loopback and never says a word: a TLS handshake with it
    lasts until the client gives up."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port = self._server.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-tls", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self._held.append(self._server.accept()[0])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._server.close()


def test_a_connect_the_mounts_own_deadline_cuts_short_is_not_the_endpoints_failure() -> None:
    # A class whose Mounts start with little time left must not open the breaker that every
    # class of that Vault shares; a connect given a second or more that does not finish does
    # count.
    server = _SilentTLS()
    breakers = Breakers()
    client = VaultClient(breakers=breakers)
    endpoint = Endpoint(address=f"https://127.0.0.1:{server.port}", tls=TLSConfig())
    key = EndpointKey.of(endpoint.address)
    try:
        for _ in range(FAILURES_TO_OPEN + 1):
            with pytest.raises(VaultUnreachable, match="did not answer within"):
                client.read(endpoint, token="t", method="GET", path="kv/x", deadline=time.monotonic() + 0.2)
        assert breakers.peek(key) is None  # made only to record a failure: none was
        with pytest.raises(VaultUnreachable, match="cannot reach Vault"):
            started = time.monotonic()
            client.read(endpoint, token="t", method="GET", path="kv/x", deadline=started + 1.2)
        assert breakers.peek(key) is not None
    finally:
        client.close()
        server.close()


def _syn_dropping_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback listener whose accept queue is full: the kernel drops further SYNs, so a
    connect to it waits out its timeout (a blackholed Vault)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    with socket.socket() as probe, pytest.raises(TimeoutError):  # the premise: it does drop them
        probe.settimeout(0.5)
        probe.connect(listener.getsockname())
    return listener, fillers


def _resolving(monkeypatch: pytest.MonkeyPatch, name: str, addresses: list[tuple[str, int]]) -> None:
    """The node's resolver answers `name` with these IPv4 addresses, in this order."""
    system = socket.getaddrinfo

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == name:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", address) for address in addresses]
        return system(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


def test_a_name_with_several_dead_addresses_is_tried_within_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # socket.create_connection gave each address the whole timeout: three addresses that
    # drop SYNs held a Mount's thread three times its deadline (the watchdog cuts a plain
    # connect only through the socket's timeout).
    listener, fillers = _syn_dropping_listener()
    port = listener.getsockname()[1]
    _resolving(monkeypatch, "vault.several.example", [listener.getsockname()] * 3)
    client = VaultClient()
    endpoint = Endpoint(address=f"http://vault.several.example:{port}", tls=TLSConfig())
    try:
        started = time.monotonic()
        with pytest.raises(VaultUnreachable, match="no connection within"):
            client.read(endpoint, token="t", method="GET", path="kv/x", deadline=started + 1.5)
        assert time.monotonic() - started < 1.5 + 0.5
    finally:
        client.close()
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize("location", ["http://[::zz/v1/kv/x", "http://[::1/v1/kv/x", "http://vault:99999/v1/kv/x"])
def test_a_redirect_to_a_location_that_cannot_be_read_is_a_vault_error_not_a_crash(location: str) -> None:
    # urlsplit raised ValueError for "http://[::zz/": it escaped every `except ProviderError`
    # (a Mount's INTERNAL error; the revocation sweep stopped for every namespace after it).
    redirect = _reply("307 Temporary Redirect", [b"Location: " + location.encode(), b"Content-Length: 0"], b"")
    server = _RawServer(lambda path, token: redirect)
    client = VaultClient()
    endpoint = Endpoint(address=f"http://127.0.0.1:{server.port}", tls=TLSConfig())
    try:
        with pytest.raises(ProviderError, match="307"):
            client.read(endpoint, token="t", method="GET", path="kv/x", deadline=time.monotonic() + 2)
    finally:
        client.close()
        server.close()


def test_a_dead_address_before_a_healthy_one_leaves_it_time_to_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    # One SYN-dropping address took the whole deadline, and the healthy one after it was
    # never tried: each address now gets an equal share, at least ADDRESS_MIN_SECONDS.
    listener, fillers = _syn_dropping_listener()
    server = _RawServer(lambda path, token: _reply("200 OK", [b"Content-Length: %d" % len(_BODY)], _BODY))
    _resolving(monkeypatch, "vault.mixed.example", [listener.getsockname(), ("127.0.0.1", server.port)])
    client = VaultClient()
    endpoint = Endpoint(address=f"http://vault.mixed.example:{server.port}", tls=TLSConfig())
    try:
        started = time.monotonic()
        secret = client.read(endpoint, token="t", method="GET", path="kv/x", deadline=started + 3)
        assert secret.data == {"k": "v"}
        assert time.monotonic() - started < transport.ADDRESS_MIN_SECONDS + 0.5
    finally:
        client.close()
        server.close()
        for filler in fillers:
            filler.close()
        listener.close()
