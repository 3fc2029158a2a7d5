"""Replies as gateways in front of Vault send them are read whole, through the transport;
a reply the reader refuses fails that read only. How replies are read: test_http1.py."""

from __future__ import annotations

import json
import time

import pytest

from provider import http1
from provider.config import TLSConfig
from provider.errors import VaultUnreachable
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


def test_a_reply_with_too_many_headers_fails_that_read_only() -> None:
    crowded = _reply("200 OK", [b"X-%d: v" % i for i in range(http1.MAX_HEADERS)], b"")
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
