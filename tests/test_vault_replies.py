"""Unusable Vault replies are clear, final errors; the provider never crashes on them."""

from __future__ import annotations

import time

import grpc
import pytest

from provider.config import TLSConfig
from provider.errors import VaultBadResponse
from provider.vault import Endpoint, VaultClient
from tests.conftest import ProviderClient, VaultWorld, files_of
from tests.fault_proxy import FaultProxy, Rule
from tests.openbao import ROOT_TOKEN

LOGIN = "/v1/auth/kubernetes/login"


@pytest.mark.parametrize(
    ("rule", "code", "message"),
    [
        (Rule("POST", LOGIN, status=200, body=b'{"data":{}}'), grpc.StatusCode.UNKNOWN, "returned no auth block"),
        (Rule("POST", LOGIN, status=200, body=b""), grpc.StatusCode.UNKNOWN, "returned no auth block"),
        (Rule("POST", LOGIN, status=204), grpc.StatusCode.UNKNOWN, "returned no auth block"),
        (Rule("POST", LOGIN, status=200, body=b"<html>"), grpc.StatusCode.UNKNOWN, "reply is not JSON"),
        (
            Rule("POST", LOGIN, status=200, body=b'{"auth":{"client_token":null}}'),
            grpc.StatusCode.UNKNOWN,
            "returned no auth block",
        ),
        (
            Rule(
                "POST",
                LOGIN,
                status=403,
                body=b'{"errors":["permission denied"]}',
                headers={"Content-Type": "application/json"},
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "Vault answered 403: permission denied",
        ),
        (
            Rule("POST", LOGIN, status=200, body='{"auth":{"client_token":"tok\u00e9n\u2028"}}'.encode()),
            grpc.StatusCode.UNKNOWN,
            "returned a token that cannot be sent in an HTTP header",
        ),
    ],
    ids=["no-auth-block", "empty-body", "204", "not-json", "null-token", "login-403", "token-not-ascii"],
)
def test_unusable_login_replies(
    proxied: ProviderClient,
    proxy: FaultProxy,
    world: VaultWorld,
    unique: str,
    rule: Rule,
    code: grpc.StatusCode,
    message: str,
) -> None:
    pod, objects = world.kv_pod(unique)
    proxy.add(rule)
    with pytest.raises(grpc.RpcError) as error:
        proxied.mount(pod, objects, role=unique)
    assert error.value.code() == code
    assert message in error.value.details()
    proxy.clear()
    assert files_of(proxied.mount(pod, objects, role=unique)) == {"k": b"v"}


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (204, b"", "Vault returned an empty response"),
        (200, b"", "Vault returned an empty response"),
        (200, b"[1,2", "reply is not JSON"),
        (500, b'{"errors":["internal error"]}', "Vault answered 500: internal error"),
        (503, b'{"errors":["Vault is sealed"]}', "Vault answered 503: Vault is sealed"),
    ],
    ids=["204", "empty-200", "truncated-json", "500", "sealed"],
)
def test_unusable_read_replies(
    proxied: ProviderClient,
    proxy: FaultProxy,
    world: VaultWorld,
    unique: str,
    status: int,
    body: bytes,
    message: str,
) -> None:
    pod, objects = world.kv_pod(unique)
    proxy.add(Rule("GET", f"/v1/kv1/{unique}", status=status, body=body, headers={"Content-Type": "application/json"}))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        proxied.mount(pod, objects, role=unique, timeout=3)
    assert time.monotonic() - started < 3  # a final answer before the caller's deadline, even when retrying
    assert error.value.code() == grpc.StatusCode.UNKNOWN
    assert 'object "k"' in error.value.details() and message in error.value.details()
    proxy.clear()
    assert files_of(proxied.mount(pod, objects, role=unique)) == {"k": b"v"}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_reply_over_the_body_limit_is_refused_without_being_read(
    proxy: FaultProxy, world: VaultWorld, unique: str, chunked: bool
) -> None:
    """The limit holds whether Vault says the size up front or streams an endless reply."""
    limit = 100_000
    client = VaultClient(max_body_bytes=limit)
    endpoint = Endpoint(address=proxy.url, tls=TLSConfig())
    world.bao.api("POST", f"kv1/{unique}", {"k": "v"})
    try:
        padding = b"x" * (20 * limit)
        body = b'{"data":{"k":"v"},"padding":"' + padding + b'"}'
        rule = proxy.add(Rule("GET", f"/v1/kv1/{unique}", status=200, body=body, chunked=chunked))
        with pytest.raises(VaultBadResponse, match=f"Vault's reply is larger than {limit} bytes"):
            client.read(endpoint, token=ROOT_TOKEN, method="GET", path=f"kv1/{unique}")
        assert rule.hits == 1  # refused, not retried
        # A reply at the limit is read whole; the client is fine afterwards.
        proxy.clear()
        exact = b'{"data":{"k":"' + b"y" * (limit - 17) + b'"}}'
        assert len(exact) == limit
        proxy.add(Rule("GET", f"/v1/kv1/{unique}", status=200, body=exact, chunked=chunked))
        secret = client.read(endpoint, token=ROOT_TOKEN, method="GET", path=f"kv1/{unique}")
        assert secret.data == {"k": "y" * (limit - 17)}
        proxy.clear()
        real = client.read(endpoint, token=ROOT_TOKEN, method="GET", path=f"kv1/{unique}")
        assert real.data == {"k": "v"}
    finally:
        client.close()
