"""Unusable Vault replies are clear, final errors; the provider never crashes on them."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from provider import vault
from provider.breaker import FAILURES_TO_OPEN, Breakers, State
from provider.config import TLSConfig
from provider.errors import VaultBadResponse, VaultUnreachable
from provider.vault import Endpoint, Read, VaultClient
from tests.conftest import ProviderClient, VaultWorld, files_of
from tests.fault_proxy import FaultProxy, Rule
from tests.openbao import ROOT_TOKEN, free_port

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
        (
            Rule("POST", LOGIN, status=200, body=b'{"auth":{"client_token":"hvs.%s"}}' % (b"A" * 20_000)),
            grpc.StatusCode.UNKNOWN,
            "returned a token of 20004 characters (more than 16384)",
        ),
    ],
    ids=["no-auth-block", "empty-body", "204", "not-json", "null-token", "login-403", "token-not-ascii", "token-huge"],
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


# Credentials as a gateway in front of Vault might echo them: tokens of each kind, a JWT.
ECHOED = (
    "s.PAiwIeHIv1GBInFPvyF5qPKo",
    "hvs.CAESIJ9aZmQyNjU3YjctN2Q4Ni0wNmFiLWJhZmQtYjQ2YjE0",
    "hvb.AAAAAQJ-b2tlbi1mb3ItYmF0Y2gtYWJjZGVmZ2hpams",
    "eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJlLXBhcnQ",
)


def test_credentials_echoed_by_an_upstream_never_reach_events_or_logs(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway answering 502 "upstream rejected token=…", or 400 with the login's body
    and its JWT: pod events are readable by whoever may view the namespace, and the log by
    the operators. What looks like a token or a JWT is redacted before it is quoted."""
    echo = " ".join(f"token={credential}" for credential in ECHOED).encode()
    login_echo = b'{"errors":["bad request: {\\"jwt\\":\\"%s\\"}"]}' % ECHOED[3].encode()
    for i, rule in enumerate(
        (
            Rule("GET", f"/v1/kv1/{unique}0", status=502, body=b"upstream rejected " + echo),
            Rule("POST", LOGIN, status=400, body=login_echo),
        )
    ):
        pod, objects = world.kv_pod(f"{unique}{i}")  # a pod of its own: it logs in
        proxy.clear()
        proxy.add(rule)
        with caplog.at_level(logging.DEBUG), pytest.raises(grpc.RpcError) as error:
            proxied.mount(pod, objects, role=f"{unique}{i}", timeout=10)
        assert "(redacted)" in error.value.details()
        for credential in ECHOED:
            assert credential not in error.value.details()
            assert credential[:24] not in caplog.text
        proxy.clear()
        assert files_of(proxied.mount(pod, objects, role=f"{unique}{i}")) == {"k": b"v"}


def test_a_kv_v2_path_without_data_says_what_vault_warns(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    """OpenBao answers a KV v2 read without data/ 404 with no errors and a warning that
    says what to fix: the Mount's error carries it, not "no error text"."""
    world.bao.api("POST", f"secret/data/{unique}", {"data": {"k": "v"}})
    pod = world.grant(unique, [f"secret/{unique}", f"secret/data/{unique}"])
    with pytest.raises(grpc.RpcError) as error:
        provider.mount(pod, [{"objectName": "k", "secretPath": f"secret/{unique}", "secretKey": "k"}], role=unique)
    assert "Invalid path for a versioned K/V secrets engine" in error.value.details()
    assert "no error text" not in error.value.details()


def test_a_revocation_the_secrets_engine_failed_is_tried_again(
    proxy: FaultProxy, world: VaultWorld, unique: str
) -> None:
    """PostgreSQL refuses concurrent DROP ROLEs ("tuple concurrently updated"), and Vault
    answers the revocation 400 "failed to revoke entry": a lease read ahead by racing Mounts
    of one pod was left alive. It is tried again; other refusals are not."""
    issue = world.pki_engine(f"pki-{unique}", generate_lease=True)
    lease_id = world.bao.api("PUT", issue, {"common_name": "a.example.com"})["lease_id"]
    failed = b'{"errors":["failed to revoke entry: resp: (*logical.Response)(nil) err: tuple concurrently updated"]}'
    proxy.add(Rule("PUT", "/v1/sys/leases/revoke", status=400, body=failed, times=2))
    client = VaultClient()
    try:
        endpoint = Endpoint(address=proxy.url, tls=TLSConfig())
        client.revoke_lease(endpoint, token=ROOT_TOKEN, lease_id=lease_id, deadline=time.monotonic() + 10)
        assert proxy.rules[0].hits == 2
        with pytest.raises(Exception, match="invalid lease"):
            world.bao.api("PUT", "sys/leases/lookup", {"lease_id": lease_id})
        proxy.clear()
        proxy.add(Rule("PUT", "/v1/sys/leases/revoke", status=400, body=b'{"errors":["invalid lease"]}'))
        with pytest.raises(VaultBadResponse, match="invalid lease"):
            client.revoke_lease(endpoint, token=ROOT_TOKEN, lease_id=lease_id, deadline=time.monotonic() + 10)
        assert proxy.rules[0].hits == 1
    finally:
        client.close()


def test_a_lone_surrogate_in_a_reply_is_written_as_the_reference_writes_it(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str
) -> None:
    """A reply with "\\ud800" (no Vault writes one; any address can) was an INTERNAL error
    with a traceback logged on every Mount. Go decodes it as U+FFFD, and so do we."""
    pod, objects = world.kv_pod(unique)
    body = b'{"data":{"k":"\\ud800v"}}'
    proxy.add(Rule("GET", f"/v1/kv1/{unique}", status=200, body=body, headers={"Content-Type": "application/json"}))
    whole = [{"objectName": "whole", "secretPath": f"kv1/{unique}"}]
    assert files_of(proxied.mount(pod, objects, role=unique)) == {"k": "\ufffdv".encode()}
    assert "\ufffdv".encode() in files_of(proxied.mount(pod, whole, role=unique))["whole"]


@pytest.mark.parametrize(
    ("pad", "reads"),
    [(b'"' + b"x" * 1000 + b'"', 1), (b'"' + b"x" * 70_000 + b'"', 2), (b"[" + b",".join([b"0"] * 2000) + b"]", 2)],
    ids=["kept", "too-large-to-keep", "too-many-values-to-keep"],
)
def test_a_leased_reply_too_large_to_keep_is_read_again_not_kept(
    proxied: ProviderClient, proxy: FaultProxy, world: VaultWorld, unique: str, pad: bytes, reads: int
) -> None:
    """A class may name any address: leases padded with megabytes were kept whole (150 MiB
    for ten one-byte files). Past 64 KiB of weight (its JSON, and 64 bytes per value: 2,000
    zeros are 4 KiB of JSON and 128 KiB in memory) a leased reply is served, and not kept."""
    pod, objects = world.kv_pod(unique)
    body = b'{"lease_id":"db/creds/%s","lease_duration":3600,"data":{"k":"v","pad":%s}}' % (unique.encode(), pad)
    rule = Rule("GET", f"/v1/kv1/{unique}", status=200, body=body, headers={"Content-Type": "application/json"})
    proxy.add(rule)
    for _ in range(2):
        assert files_of(proxied.mount(pod, objects, role=unique)) == {"k": b"v"}
    assert rule.hits == reads


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


class _RawServer:
    """A loopback server that answers each request with `answer(path, token)` bytes (or
    holds the connection when it returns None): a gateway misbehaving in front of Vault."""

    def __init__(self, answer: Callable[[str, str], bytes | None]) -> None:
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                self._held.append(conn)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):  # a TLS hello is no request line
            reader = conn.makefile("rb")
            while line := reader.readline():
                path, token = line.split()[1].decode(), ""
                while (header := reader.readline()) not in (b"\r\n", b""):
                    if header.lower().startswith(b"x-vault-token:"):
                        token = header.split(b":", 1)[1].strip().decode()
                reply = self._answer(path, token)
                if reply is None:
                    return  # hold: never answer
                conn.sendall(reply)

    def close(self) -> None:
        self._listener.close()
        for conn in self._held:
            conn.close()


def _json_reply(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


def test_an_interim_reply_never_leaves_its_answer_for_the_next_request() -> None:
    """A gateway sending 103 Early Hints before the real reply: the 103 fails that read,
    and the connection is not kept, so the next read (another pod's token) gets its own."""

    def answer(path: str, token: str) -> bytes:
        late = _json_reply({"data": {"path": path, "for_token": token}})
        return b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n" + late

    server = _RawServer(answer)
    client = VaultClient()
    endpoint = Endpoint(address=f"http://127.0.0.1:{server.port}", tls=TLSConfig())
    try:
        with pytest.raises(VaultUnreachable, match=r"an interim reply \(HTTP 103\)"):
            client.read(endpoint, token="token-a", method="GET", path="team-a/db", deadline=time.monotonic() + 1)
        for token, path in (("token-b", "team-b/app"), ("token-c", "team-c/x")):
            try:
                secret = client.read(endpoint, token=token, method="GET", path=path, deadline=time.monotonic() + 1)
            except VaultUnreachable:
                continue  # refused again: fine, as long as nobody gets another's reply
            assert secret.data == {"path": f"/v1/{path}", "for_token": token}
    finally:
        client.close()
        server.close()


def test_reads_sent_together_share_one_deadline() -> None:
    """Sixteen reads to a server that accepts the TLS connections and never answers: the
    batch ends at its deadline, not sixteen deadlines later (one handshake after another)."""
    server = _RawServer(lambda path, token: None)
    client = VaultClient()
    endpoint = Endpoint(address=f"https://127.0.0.1:{server.port}", tls=TLSConfig(skip_verify=True))
    try:
        started = time.monotonic()
        answers = client.send_reads(
            endpoint,
            token="t",
            reads=[Read("GET", f"kv/{i}", None) for i in range(16)],
            deadline=started + 1.5,
        )
        elapsed = time.monotonic() - started
        # Cut at the deadline, with no time left to ask again: each is the error the Mount
        # reports (no answer, or no connection: the handshakes were cut too).
        assert all(isinstance(answer, VaultUnreachable) for answer in answers), answers
        assert all(
            f"GET kv/{i}: " in str(answer) and f"Vault at https://127.0.0.1:{server.port}" in str(answer)
            for i, answer in enumerate(answers)
        )
        assert any(
            "did not answer within 1." in str(answer) or "no connection within" in str(answer) for answer in answers
        )
        assert elapsed < 2.5, f"a batch with a 1.5 s deadline took {elapsed:.1f} s"
    finally:
        client.close()
        server.close()


def test_a_read_sent_ahead_is_cut_only_when_no_time_is_left() -> None:
    """A read that Vault did not answer within the client's timeout, with time left before
    the deadline, goes the usual way (None), which tries again; only past the deadline is it
    the Mount's error."""
    asked: list[str] = []

    def answer(path: str, token: str) -> bytes | None:
        asked.append(path)
        return None if len(asked) == 1 else _json_reply({"data": {"k": "v"}})

    server = _RawServer(answer)
    client = VaultClient(timeout=0.4)  # -vault-timeout shorter than what is left of the Mount
    endpoint = Endpoint(address=f"http://127.0.0.1:{server.port}", tls=TLSConfig())
    try:
        deadline = time.monotonic() + 0.6  # 0.2 s left after the attempt: little, but some
        assert client.send_reads(endpoint, token="t", reads=[Read("GET", "kv/x", None)], deadline=deadline) == [None]
        secret = client.read(endpoint, token="t", method="GET", path="kv/x", deadline=time.monotonic() + 5)
        assert secret.data == {"k": "v"} and asked == ["/v1/kv/x", "/v1/kv/x"]
    finally:
        client.close()
        server.close()


def test_reads_sent_together_to_a_vault_that_refuses_count_once_for_the_breaker() -> None:
    """Ten reads of one Mount refused at once are one look at a down Vault, not ten: the
    breaker stays closed, and the reads then retried one by one count as before."""
    breakers = Breakers()
    client = VaultClient(breakers=breakers)
    endpoint = Endpoint(address=f"http://127.0.0.1:{free_port()}", tls=TLSConfig())
    try:
        answers = client.send_reads(
            endpoint,
            token="t",
            reads=[Read("GET", f"kv/{i}", None) for i in range(10)],
            deadline=time.monotonic() + 5,
        )
        assert answers == [None] * 10
        breaker = breakers.peek(endpoint.key)
        assert breaker is not None and breaker.state is State.CLOSED
        for _ in range(FAILURES_TO_OPEN - 1):  # and it still counts: a few more such batches open it
            client.send_reads(endpoint, token="t", reads=[Read("GET", "kv/x", None)], deadline=time.monotonic() + 5)
        assert breaker.state is State.OPEN
    finally:
        client.close()


def test_a_vault_answering_numbers_past_int64_costs_its_own_mount_nothing_more(
    provider: ProviderClient, world: VaultWorld, unique: str
) -> None:
    """A class may name any address: a server answering a login and two reads with a
    lease_duration of 1e200000 (exactly converted, 2.4 s of GIL each, stalling every pod).
    Go's int64 is where the reference's decoding ends too: the numbers are clamped there."""
    huge = b"1e200000"

    def answer(path: str, token: str) -> bytes:
        if path.endswith("/login"):
            body = b'{"auth":{"client_token":"hostile","lease_duration":%s,"renewable":false}}' % huge
        else:
            body = b'{"lease_id":"kv/lease","lease_duration":%s,"renewable":false,"data":{"k":"v"}}' % huge
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    server = _RawServer(answer)
    pod = world.kube.add_pod("team", f"hostile-{unique}", "app")
    objects = [{"objectName": f"o{i}", "secretPath": f"kv/{unique}/{i}", "secretKey": "k"} for i in range(2)]
    try:
        started = time.process_time()
        response = provider.mount(pod, objects, role=unique, vaultAddress=f"http://127.0.0.1:{server.port}")
        assert files_of(response) == {"o0": b"v", "o1": b"v"}
        assert time.process_time() - started < 1.0  # this process serves the Mount: its CPU is the Mount's
    finally:
        server.close()


def test_retry_jitter_leaves_the_random_modules_state_alone() -> None:
    """Mount threads retrying (for seconds after their test, at times) draw their jitter from
    a generator of their own: code sharing the process may rely on the random module's state
    (Hypothesis failed a property test when a leftover retry moved it mid-example)."""
    state = random.getstate()
    delays = [vault._backoff(attempt, None) for attempt in range(1, 6)]
    assert random.getstate() == state
    assert len(set(delays)) > 1 and all(delay > 0 for delay in delays)
