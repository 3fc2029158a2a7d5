"""Vault over HTTP: the only module that talks to Vault.

One connection pool per Vault address and TLS configuration is shared by all Mounts;
the token and namespace travel as headers on each request, never as pool state, so a
token cannot leak from one pod's request into another's. Every failure leaves this
module as one of provider.errors' Vault errors.

It speaks Vault's plain HTTP API (login, read, lease renew and revoke) with Vault's own
headers (X-Vault-Token, X-Vault-Namespace, X-Vault-Request) through provider.transport
(HTTP/1.1 of our own, kept-alive). hvac, the Python Vault client, is kept for tests and
the demo: through its requests adapter a read costs about five times the CPU, and a
Mount of many objects is bound by exactly that.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from provider import gojson, http1, loopio, replymemory
from provider.address import Target
from provider.breaker import PROBE_TIMEOUT_SECONDS, Breaker, Breakers, EndpointKey
from provider.config import TLSConfig
from provider.errors import (
    VaultBadResponse,
    VaultCircuitOpen,
    VaultError,
    VaultLoginDenied,
    VaultNotFound,
    VaultPermissionDenied,
    VaultUnreachable,
    truncate,
)
from provider.metrics import Metrics
from provider.transport import (
    CONNECT_EVIDENCE_SECONDS,
    NoRoom,
    NotConnected,
    NotHTTP,
    NotLookedUp,
    Reply,
    Request,
    TimedOut,
    TLSFailed,
    TooLarge,
    Transport,
    TransportError,
    host_of,
)

logger = logging.getLogger(__name__)

# A Vault token's length at most: service tokens are about 100 characters, batch tokens a
# few hundred. A class may name any address, and a login answering megabytes per token would
# have the token cache (a thousand entries) hold gigabytes.
MAX_TOKEN_CHARS = 16 * 1024
# A request is given at most this long when the caller set no tighter deadline: the
# reference provider's Vault client default.
DEFAULT_TIMEOUT = 30.0
# Reads are safe to repeat; writes may create credentials (PKI issue, DB creds on POST).
IDEMPOTENT_METHODS = frozenset({"GET", "LIST", "HEAD"})
# Answers worth retrying a read on: rate limited, and a Vault sealed, failing over, or
# behind a load balancer that lost it.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Answers that prove Vault did not act on a write: rate limited, sealed or no active node.
REFUSED_STATUSES = frozenset({429, 503})
# Backoff: 100 ms doubling to 1 s, jittered. Retries stop at the Mount deadline, and
# after 20 s at most: a Raft election takes about 13 s, a longer outage is an outage.
BASE_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 1.0
MAX_RETRY_SECONDS = 20.0
# Do not start an attempt with less time than this left before the deadline.
MIN_ATTEMPT_SECONDS = 0.2
# Values (numbers, strings, lists, maps) decoded from one reply at most: far more than a
# secret holds, and about 6 MiB once decoded. A reply can hold far more per byte (an
# 8 MiB "[0,0,...]" is 4 million values, 250 MiB decoded), so it is counted first.
MAX_REPLY_VALUES = 100_000
# Revocations a secrets engine failed to carry out are tried this many times in all.
REVOKE_ATTEMPTS = 3
# Largest Vault reply read by default: twice the default gRPC reply limit (a whole-response
# file can be about as large as the reply it comes from).
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where a request goes: the Vault address, its TLS settings and the namespace."""

    address: str
    tls: TLSConfig
    namespace: str = ""

    @functools.cached_property
    def target(self) -> Target:
        """The parsed address; raises VaultBadResponse naming what is wrong with it."""
        try:
            return Target.parse(self.address)
        except ValueError as e:  # parse_mount refuses these first; this is the last guard
            raise VaultBadResponse(f"the Vault address is invalid: {e}") from None

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.address, self.tls, self.namespace))

    def __hash__(self) -> int:
        """Computed once: endpoints are shared (mount.endpoint_of), and the keys of the
        token and lease caches hash theirs on every lookup."""
        return self._hash

    @functools.cached_property
    def key(self) -> EndpointKey:
        """Its breaker's and bulkhead's key: from the same parse its connections use."""
        return EndpointKey(address=self.target.key(), namespace=self.namespace)


@dataclass(frozen=True, kw_only=True, slots=True)
class Login:
    """A Vault token from a login, with the lifetime Vault gave it."""

    token: str = field(repr=False)
    accessor: str = field(repr=False)
    lease_duration: int
    renewable: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Secret:
    """A Vault reply to a read, its numbers kept exactly as sent (gojson.Number)."""

    body: Mapping[str, Any] = field(repr=False)
    # A 2xx reply that is not JSON (pki/ca_chain, pki/ca/pem answer PEM text): its bytes,
    # passed through to the file; body is then empty.
    raw: bytes | None = field(default=None, repr=False)

    @property
    def data(self) -> Any:
        return self.body.get("data")

    @property
    def lease_id(self) -> str:
        value = self.body.get("lease_id")
        return value if isinstance(value, str) else ""

    @property
    def lease_duration(self) -> int:
        value = self.body.get("lease_duration")
        return value.as_int() if isinstance(value, gojson.Number) else 0

    @property
    def renewable(self) -> bool:
        return self.body.get("renewable") is True


class VaultClient:
    """Sends Vault requests for many pods; thread-safe."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        metrics: Metrics | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        breakers: Breakers | None = None,
    ) -> None:
        self._timeout = timeout
        self._breakers = breakers
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics
        self._metric_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._transport = Transport(max_body_bytes=max_body_bytes)

    def close(self) -> None:
        self._transport.close()

    def login(self, endpoint: Endpoint, *, mount: str, role: str, jwt: str, deadline: float | None = None) -> Login:
        """Log in with a service-account JWT (kubernetes or jwt auth)."""
        path = f"auth/{mount}/login"
        status, body = self._send(
            endpoint,
            "POST",
            path,
            token="",
            # Encoded here, in C: a request body needs no Go-shaped JSON (gojson.dumps).
            json_body=json.dumps({"role": role, "jwt": jwt}, separators=(",", ":")).encode(),
            deadline=deadline,
            operation="login",
            repeatable=True,
        )
        if status in (400, 401, 403):
            raise VaultLoginDenied(_vault_says(status, body), status=status)
        _raise_for_status("POST", path, status, body)
        if isinstance(body, RawBody):
            raise VaultBadResponse(f"login at {path}: Vault's reply is not JSON (HTTP {status})", status=status)
        auth = body.get("auth") if isinstance(body, dict) else None
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            raise VaultBadResponse(f"login at {path} returned no auth block (HTTP {status})", status=status)
        if not (token.isascii() and token.isprintable()):  # never cached: no request could carry it
            raise VaultBadResponse(f"login at {path} returned a token that cannot be sent in an HTTP header")
        if len(token) > MAX_TOKEN_CHARS:  # never cached: a token cache of them would hold gigabytes
            raise VaultBadResponse(
                f"login at {path} returned a token of {len(token)} characters (more than {MAX_TOKEN_CHARS})"
            )
        assert isinstance(auth, dict)
        duration = auth.get("lease_duration")
        accessor = auth.get("accessor")
        return Login(
            token=token,
            accessor=accessor if isinstance(accessor, str) and len(accessor) <= MAX_TOKEN_CHARS else "",
            lease_duration=duration.as_int() if isinstance(duration, gojson.Number) else 0,
            renewable=auth.get("renewable") is True,
        )

    def read(
        self,
        endpoint: Endpoint,
        *,
        token: str,
        method: str,
        path: str,
        params: Mapping[str, list[str]] | None = None,
        json_body: Mapping[str, Any] | bytes | None = None,
        deadline: float | None = None,
        operation: str = "read",
    ) -> Secret:
        """Send one secret request (`path` without /v1/) and return the reply."""
        status, body = self._send(
            endpoint,
            method,
            path,
            token=token,
            params=params,
            json_body=json_body,
            deadline=deadline,
            operation=operation,
        )
        return _secret(method, path, status, body, operation)

    def send_reads(
        self, endpoint: Endpoint, *, token: str, reads: list[Read], deadline: float
    ) -> list[Reply | VaultUnreachable | None]:
        """One attempt at each read (GET or LIST), all sent before any reply is read, so
        a Mount's reads from one thread take about one round trip, with no thread
        hand-offs. Each answer is Vault's reply, not yet decoded (answer() decodes it: a
        caller that has seen the same bytes before may skip that), or None when that
        attempt settled nothing (no connection, a status worth retrying, a redirect): send
        that one again with read(), which retries and follows. A read that found no
        connection, or no answer, before the deadline is that error: what the Mount reports,
        where read() would only say no time was left."""
        if self._breaker(endpoint).refusal() is not None:
            return [None] * len(reads)
        timeout = min(self._timeout, deadline - time.monotonic())
        if timeout <= MIN_ATTEMPT_SECONDS:
            return [None] * len(reads)
        target, tls = endpoint.target, endpoint.tls
        headers = _read_headers(endpoint, token)  # one dict for the batch: nothing changes it
        requests = [
            Request(target, tls, read.method, target.prefix + read.url, None, headers, timeout, True) for read in reads
        ]
        started = time.monotonic()
        outcomes = self._transport.send_many(requests)
        elapsed = time.monotonic() - started
        no_time_left = deadline <= time.monotonic()  # as read() would refuse to try again
        replies: list[Reply | VaultUnreachable | None] = []
        # The batch is one look at Vault: it tells the breaker once, not once per read.
        unreachable: NotConnected | None = None
        answered = False
        labels: dict[str, int] = {}
        for read, outcome in zip(reads, outcomes, strict=True):
            if isinstance(outcome, TransportError):
                labels["error"] = labels.get("error", 0) + 1
                if isinstance(outcome, NotConnected):
                    unreachable = unreachable or outcome
                if no_time_left and isinstance(outcome, TimedOut):
                    replies.append(
                        VaultUnreachable(
                            f"{read.method} {read.path}: Vault at {target.describe()} did not answer within "
                            f"{timeout:.1f}s"
                        )
                    )
                elif no_time_left and isinstance(outcome, NotConnected):
                    replies.append(VaultUnreachable(f"{read.method} {read.path}: {_cannot_reach(target, outcome)}"))
                else:
                    replies.append(None)
                continue
            label = str(outcome.status)
            labels[label] = labels.get(label, 0) + 1
            answered = True
            if not settles(outcome):
                replies.append(None)
            else:
                replies.append(outcome)
        for label, count in labels.items():
            self._count("read", label, elapsed, count)
        if answered:
            self._breaker(endpoint).record_success()
        elif unreachable is not None:
            self._breaker(endpoint, failed=True).record_failure(_cannot_reach(endpoint.target, unreachable))
        return replies

    async def send_reads_on_loop(
        self, endpoint: Endpoint, *, token: str, around: AroundToken, deadline: float, done: asyncio.Future[bool]
    ) -> list[Reply | None] | None:
        """The reads `around` was made for (mount.MountPlan.around_token), sent with this
        token on the running event loop, waiting for nothing but the replies
        (provider.loopio): each one's reply (whatever its status: see settles()), or None
        for one not read whole there (slow, large, cut: a thread sends it again); None for
        all when nothing was sent (no pool or kept-alive connection for each read yet: a
        thread makes them). `done` set from outside ends the wait."""
        if self._breaker(endpoint).refusal() is not None:
            return None
        timeout = min(self._timeout, deadline - time.monotonic())
        pool = self._transport.pools.find(endpoint.target, endpoint.tls)
        if timeout <= MIN_ATTEMPT_SECONDS or pool is None:
            return None
        method = around.method
        requests = around.with_token(token)
        if requests is None:
            return None
        started = time.monotonic()
        replies = await loopio.exchange(pool, requests, method=method, timeout=timeout, done=done)
        if replies is None:
            return None
        elapsed = time.monotonic() - started
        answers = [Reply.of(read) if read is not None else None for read in replies]
        for answer in answers:
            self._count("read", str(answer.status) if answer is not None else "error", elapsed)
        if answers.count(None) < len(answers):
            self._breaker(endpoint).record_success()
        return answers

    def answer(self, read: Read, reply: Reply) -> Secret | VaultError:
        """A reply from send_reads decoded: the Secret, or the error it means."""
        try:
            status, body, _ = self._decoded(read.method, read.path, reply)
            return _secret(read.method, read.path, status, body, "read")
        except VaultError as e:
            return e

    def renew_lease(
        self, endpoint: Endpoint, *, token: str, lease_id: str, increment: int, deadline: float | None = None
    ) -> Secret:
        """Renew a lease; the reply carries the new lease_duration."""
        return self.read(
            endpoint,
            token=token,
            method="PUT",
            path="sys/leases/renew",
            json_body={"lease_id": lease_id, "increment": increment},
            deadline=deadline,
            operation="renew",
        )

    def lease_alive(self, endpoint: Endpoint, *, token: str, lease_id: str, deadline: float | None = None) -> bool:
        """Whether Vault still holds a lease (sys/leases/lookup, which Vault's default
        policy allows every token): False when it answers that the lease is invalid
        (revoked, by itself or with the token that issued it, or expired). Raises
        VaultPermissionDenied when the token may not look it up, or is no longer valid."""
        try:
            self.read(
                endpoint,
                token=token,
                method="PUT",
                path="sys/leases/lookup",
                json_body={"lease_id": lease_id},
                deadline=deadline,
                operation="lookup",
            )
        except VaultBadResponse as e:
            if e.status == 400:  # "invalid lease"
                return False
            raise
        return True

    def revoke_lease(self, endpoint: Endpoint, *, token: str, lease_id: str, deadline: float | None = None) -> None:
        """Revoke a lease. A revocation the secrets engine failed to carry out (Vault's 400
        "failed to revoke entry": PostgreSQL refuses concurrent DROP ROLEs with "tuple
        concurrently updated") is tried again, REVOKE_ATTEMPTS times in all, while time is left."""
        for attempt in range(1, REVOKE_ATTEMPTS + 1):
            status, body = self._send(
                endpoint,
                "PUT",
                "sys/leases/revoke",
                token=token,
                json_body={"lease_id": lease_id},
                deadline=deadline,
                operation="revoke",
            )
            failed_to_revoke = status == 400 and "failed to revoke" in _vault_says(status, body)
            delay = _backoff(attempt, None)
            if not failed_to_revoke or attempt == REVOKE_ATTEMPTS:
                break
            if deadline is not None and time.monotonic() + delay + MIN_ATTEMPT_SECONDS > deadline:
                break
            logger.warning("vault PUT sys/leases/revoke: %s; trying again in %.2fs", _vault_says(status, body), delay)
            time.sleep(delay)
        _raise_for_status("PUT", "sys/leases/revoke", status, body)

    def revoke_self(self, endpoint: Endpoint, *, token: str, deadline: float | None = None) -> None:
        status, body = self._send(
            endpoint, "POST", "auth/token/revoke-self", token=token, deadline=deadline, operation="revoke"
        )
        _raise_for_status("POST", "auth/token/revoke-self", status, body)

    def probe(self, endpoint: Endpoint, *, deadline: float) -> None:
        """One request, no retry: does Vault at endpoint answer at all? Any HTTP status
        counts; raises VaultUnreachable when the connection fails. A Mount left with
        under CONNECT_EVIDENCE_SECONDS (it waited for a bulkhead) gives the probe back
        untried: its failure would say nothing of Vault, and would keep the breaker every
        class of that Vault shares open; the next Mount probes."""
        if deadline - time.monotonic() < CONNECT_EVIDENCE_SECONDS:
            self._breaker(endpoint).give_back_probe()
            raise VaultUnreachable(f"no time left to probe Vault at {endpoint.target.describe()}")
        deadline = min(deadline, time.monotonic() + PROBE_TIMEOUT_SECONDS)
        try:
            self._attempt(
                endpoint, "GET", "sys/health", token="", params=None, json_body=None, deadline=deadline, replayable=True
            )
        except (_TLSFailure, _NotVault):
            self._breaker(endpoint).record_success()  # it answered; TLS or the address is the class's problem
        except _NotSent:
            raise  # counted by _attempt
        except NameNotLookedUp:
            self._breaker(endpoint).give_back_probe()  # this namespace's limit says nothing of Vault
            raise
        except VaultUnreachable as e:
            self._breaker(endpoint, failed=True).record_failure(str(e))  # connected, but no answer in time
            raise

    def _count(self, operation: str, label: str, seconds: float, attempts: int = 1) -> None:
        """Attempts in the metrics: their outcome (HTTP status or "error") and duration."""
        if self._metrics is None:
            return
        # The labelled children, looked up once: operations are few, labels HTTP statuses.
        children = self._metric_children.get((operation, label))
        if children is None:
            children = self._metric_children[(operation, label)] = (
                self._metrics.vault_requests.labels(operation, label),
                self._metrics.vault_duration.labels(operation),
            )
        children[0].inc(attempts)
        for _ in range(attempts):
            children[1].observe(seconds)

    def _breaker(self, endpoint: Endpoint, *, failed: bool = False) -> Breaker | _NoBreaker:
        """The endpoint's breaker; made only to record a failure (an endpoint that never
        failed needs none, and a lookup must not let a class fill the registry)."""
        if self._breakers is None:
            return _NO_BREAKER
        breaker = self._breakers.get(endpoint.key) if failed else self._breakers.peek(endpoint.key)
        return _NO_BREAKER if breaker is None else breaker

    def _attempt(self, endpoint: Endpoint, method: str, path: str, **request: Any) -> _Reply:
        """One exchange (the keyword arguments of _exchange), its outcome told to the
        endpoint's breaker."""
        try:
            reply = self._exchange(endpoint, method, path, **request)
        except _RedirectNotSent:
            self._breaker(endpoint).record_success()  # a standby answered; its leader is gone
            raise
        except _NotSent as e:
            self._breaker(endpoint, failed=True).record_failure(str(e))
            raise
        self._breaker(endpoint).record_success()
        return reply

    def _send(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        *,
        token: str,
        params: Mapping[str, list[str]] | None = None,
        json_body: Mapping[str, Any] | bytes | None = None,
        deadline: float | None = None,
        operation: str,
        repeatable: bool = False,
    ) -> tuple[int, Any]:
        """Send with retries: reads on any transient failure, writes only when Vault surely
        did not act (connection refused, 429, 503), all inside the deadline.

        `repeatable` marks a write that is safe to repeat: a login, whose duplicate token
        is never used and expires on its own. Secret writes (a PKI issue, database
        credentials by POST) are never repeated once they may have reached Vault.
        """
        first = time.monotonic()
        deadline = first + self._timeout if deadline is None else deadline
        idempotent = repeatable or method in IDEMPOTENT_METHODS
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            label = "error"
            retry_after: float | None = None
            try:
                reply = self._attempt(
                    endpoint,
                    method,
                    path,
                    token=token,
                    params=params,
                    json_body=json_body,
                    deadline=deadline,
                    replayable=idempotent,
                )
                label = str(reply.status)
                retryable = reply.status in (RETRY_STATUSES if idempotent else REFUSED_STATUSES)
                retry_after = reply.retry_after
                failure: VaultUnreachable | None = None
            except VaultUnreachable as e:
                # A certificate Vault's client refused, a server speaking another protocol, or
                # a name lookup refused for lookups still stalled, is the same a second later:
                # say so now.
                retryable = (idempotent or isinstance(e, _NotSent)) and not isinstance(
                    e, _TLSFailure | _NotVault | NameNotLookedUp
                )
                failure = e
            finally:
                self._count(operation, label, time.monotonic() - started)
            if not retryable:
                if failure is not None:
                    raise failure
                return reply.status, reply.body
            delay = _backoff(attempt, retry_after)
            now = time.monotonic()
            if failure is not None:
                # The endpoint's breaker opened meanwhile (this failure or others'): stop
                # retrying too, as every new Mount to it already does, and free the thread.
                refusal = self._breaker(endpoint).refusal()
                if refusal is not None:
                    raise refusal
            if now + delay + MIN_ATTEMPT_SECONDS > deadline or now + delay - first > MAX_RETRY_SECONDS:
                if failure is not None:
                    raise failure
                return reply.status, reply.body
            logger.warning(
                "vault %s %s failed (attempt %d, %s); retrying in %.2fs",
                method,
                path,
                attempt,
                failure or f"HTTP {reply.status}",
                delay,
            )
            time.sleep(delay)

    def _exchange(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        *,
        token: str,
        params: Mapping[str, list[str]] | None,
        json_body: Mapping[str, Any] | bytes | None,
        deadline: float | None,
        replayable: bool,
    ) -> _Reply:
        timeout = self._timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise VaultUnreachable(f"{method} {path}: no time left before the Mount deadline")
        url, data, headers = _request_parts(endpoint, method, path, token, params, json_body)
        target = endpoint.target
        for hop_count in range(MAX_REDIRECTS + 1):
            try:
                reply = self._roundtrip(target, endpoint.tls, method, url, data, headers, timeout, path, replayable)
            except _NotSent as e:
                if hop_count:  # the endpoint answered; the node it sent us to did not
                    raise _RedirectNotSent(
                        f"{e} (Vault at {endpoint.target.describe()} redirected there: a standby naming an active "
                        "node that is down, as during an election)"
                    ) from None
                raise
            except _NotVault as e:
                if hop_count:  # the class's address is Vault's; the node it sent us to is not
                    raise _NotVault(
                        f"{method} {path}: Vault at {endpoint.target.describe()} redirected to {target.describe()}, "
                        f"which does not answer as Vault does ({e.cause}): check the api_addr of Vault's nodes",
                        cause=e.cause,
                    ) from None
                raise
            if not _redirect(reply):
                break
            # A standby sends writes to the active node; follow, as Vault's own client does,
            # but only on the same scheme (never from https to http) and without credentials.
            try:  # a Location urlsplit cannot read (http://[::zz/) is not followed
                hop = urlsplit(reply.location)
                if hop.scheme != target.scheme or not hop.hostname:
                    break
                target = Target.parse(f"{hop.scheme}://{hop.netloc.rpartition('@')[2]}")
            except ValueError:
                break
            url = (hop.path or "/") + (f"?{hop.query}" if hop.query else "")
            logger.debug("vault %s %s redirected to %s", method, path, target.describe())
        return self._decoded(method, path, reply)

    def _decoded(self, method: str, path: str, reply: Reply) -> _Reply:
        """A reply's body decoded: JSON (its values counted first), raw bytes for a
        successful reply that is not JSON, text for a failed one."""
        status, raw = reply.status, reply.body
        logger.debug("vault %s %s -> %d (%d bytes)", method, path, status, len(raw))
        if not raw or raw.isspace():  # not strip(): that would copy a large body
            return _Reply(status, None, reply.retry_after)
        if len(raw) > 2 * MAX_REPLY_VALUES and gojson.count_values(raw) > MAX_REPLY_VALUES:
            raise VaultBadResponse(
                f"{method} {path}: Vault's reply holds more than {MAX_REPLY_VALUES} values; refusing to decode it",
                status=status,
            )
        replymemory.count(replymemory.VALUE_BYTES * replymemory.values_at_most(raw))
        try:
            return _Reply(status, gojson.loads(raw), reply.retry_after)
        except (ValueError, RecursionError):
            if 200 <= status < 300:
                if "json" in reply.content_type.lower():
                    raise VaultBadResponse(
                        f"{method} {path}: Vault's reply is not JSON (HTTP {status})", status=status
                    ) from None
                return _Reply(status, RawBody(raw), reply.retry_after)  # PEM from pki/ca_chain and the like
            return _Reply(status, raw.decode("utf-8", "replace"), reply.retry_after)

    def _roundtrip(
        self,
        target: Target,
        tls: TLSConfig,
        method: str,
        url: str,
        data: bytes | None,
        headers: dict[str, str],
        timeout: float,
        path: str,
        replayable: bool,
    ) -> Reply:
        """One HTTP exchange; its failures as the Vault errors callers and breakers know."""
        if target.authorization:  # the address's user info, for its own host only
            headers = {**headers, "Authorization": target.authorization}
        try:
            return self._transport.send(target, tls, method, url, data, headers, timeout, replayable=replayable)
        except TooLarge:
            raise VaultBadResponse(
                f"{method} {path}: Vault's reply is larger than {self._max_body_bytes} bytes"
            ) from None
        except NotConnected as e:
            raise _NotSent(_cannot_reach(target, e)) from None
        except NotLookedUp as e:
            raise NameNotLookedUp(_cannot_reach(target, e)) from None
        except TimedOut:
            raise VaultUnreachable(
                f"{method} {path}: Vault at {target.describe()} did not answer within {timeout:.1f}s"
            ) from None
        except NoRoom as e:
            raise replymemory.NoRoom(f"{method} {path}: {e}") from None
        except NotHTTP as e:
            raise _NotVault(
                f"{method} {path}: the server at {target.describe()} does not answer as Vault does ({e}): "
                "check the Vault address (the class's vaultAddress, else the provider's default): its scheme, "
                "host and port must be those of Vault's API",
                cause=str(e),
            ) from None
        except TLSFailed as e:
            hint = ""
            # A TLS 1.3 server refuses a missing client certificate after the handshake: an
            # alert, or (as Python's ssl often reports it) the connection closed mid-protocol.
            if not tls.client_cert and any(sign in str(e) for sign in ("certificate required", "EOF occurred")):
                hint = " (if it requires a client certificate: set vaultTLSClientCertPath and vaultTLSClientKeyPath)"
            raise _TLSFailure(f"TLS to Vault at {target.describe()} failed: {truncate(str(e))}{hint}") from None
        except TransportError as e:
            raise VaultUnreachable(_cannot_reach(target, e)) from None


@dataclass(frozen=True, slots=True)
class Read:
    """One of several reads sent together (send_reads)."""

    method: str  # GET or LIST
    path: str  # without /v1/
    params: Mapping[str, list[str]] | None
    # The URL's path and query after the address's own prefix, escaped once: a Mount's
    # reads are made once per parse (mount.MountPlan) and sent on every Mount.
    url: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", _url_after_prefix(self.path, self.params))


# Stands for the token in requests made once for many Mounts (AroundToken): random, so
# that no path or header a class writes can hold it.
_TOKEN_MARK = "token-" + secrets.token_hex(16)


@dataclass(frozen=True)
class AroundToken:
    """A batch of reads' request bytes before and after the token, made once with a kept
    plan (mount.MountPlan) for every batch of the same reads its warm Mounts send on the
    loop: each batch only puts its token in between. Holds no token. `parts` is None for
    requests that could not be made (a namespace or path HTTP cannot carry): with_token
    then sends nothing, and a thread's requests say what is wrong. The reads share one
    method (GET or LIST), which reading their replies needs."""

    method: str
    parts: tuple[tuple[bytes, bytes], ...] | None

    @classmethod
    def of(cls, endpoint: Endpoint, reads: Sequence[Read]) -> AroundToken:
        """ValueError for reads that do not share one method."""
        methods = {read.method for read in reads}
        if len(methods) != 1:
            raise ValueError("the reads sent together on the loop share one method")
        method = methods.pop()
        mark = _TOKEN_MARK.encode("ascii")
        try:
            target = endpoint.target
            headers = _read_headers(endpoint, _TOKEN_MARK)
            host = host_of(target)
            made = [http1.request(method, target.prefix + read.url, host, headers, None) for read in reads]
        except (ValueError, VaultBadResponse):
            return cls(method=method, parts=None)
        split = [request.split(mark) for request in made]
        parts = tuple((pair[0], pair[1]) for pair in split) if all(len(pair) == 2 for pair in split) else None
        return cls(method=method, parts=parts)

    def size(self) -> int:
        """Bytes it holds in memory (a kept plan's weight counts them)."""
        held = sys.getsizeof(self) + sys.getsizeof(self.parts)
        for pair in self.parts or ():
            held += sys.getsizeof(pair) + sys.getsizeof(pair[0]) + sys.getsizeof(pair[1])
        return held

    def with_token(self, token: str) -> list[bytes] | None:
        """The requests with this token; None when they cannot be sent."""
        if self.parts is None or not token or not (token.isascii() and token.isprintable()):
            return None  # as _header_value refuses it
        value = token.encode("ascii")
        return [before + value + after for before, after in self.parts]


def _request_parts(
    endpoint: Endpoint,
    method: str,
    path: str,
    token: str,
    params: Mapping[str, list[str]] | None,
    json_body: Mapping[str, Any] | bytes | None,
) -> tuple[str, bytes | None, dict[str, str]]:
    """A Vault request's URL (path and query), body and headers."""
    headers = _headers(endpoint, token)
    data = json_body if isinstance(json_body, bytes) or json_body is None else gojson.dumps(json_body)
    if data is not None:
        headers["Content-Type"] = "application/json"
    return endpoint.target.prefix + _url_after_prefix(path, params), data, headers


def _headers(endpoint: Endpoint, token: str) -> dict[str, str]:
    """The headers of every request with this token: Vault's own."""
    # X-Vault-Request guards against SSRF, as Vault's own clients send it.
    headers = {"X-Vault-Request": "true"}
    if token:
        headers["X-Vault-Token"] = _header_value(token, "token")
    if endpoint.namespace:
        headers["X-Vault-Namespace"] = _header_value(endpoint.namespace, "namespace")
    return headers


def _read_headers(endpoint: Endpoint, token: str) -> dict[str, str]:
    """A batch of reads' headers: Vault's, and the address's user info as _roundtrip sends it."""
    headers = _headers(endpoint, token)
    if endpoint.target.authorization:
        headers["Authorization"] = endpoint.target.authorization
    return headers


def _url_after_prefix(path: str, params: Mapping[str, list[str]] | None) -> str:
    """/v1/ and the path, escaped as Go escapes it, and the query."""
    url = "/v1/" + quote(path, safe=_PATH_SAFE)
    return url + "?" + urlencode(params, doseq=True) if params else url


def _secret(method: str, path: str, status: int, body: Any, operation: str) -> Secret:
    """A decoded reply as a Secret, or the error its status means."""
    _raise_for_status(method, path, status, body)
    if isinstance(body, RawBody):
        if operation != "read":
            raise VaultBadResponse(f"{method} {path}: Vault's reply is not JSON (HTTP {status})", status=status)
        return Secret(body={}, raw=body.data)
    if not isinstance(body, dict):
        raise VaultBadResponse(f"{method} {path}: Vault returned an empty response (HTTP {status})", status=status)
    return Secret(body=_enveloped(body))


def settles(reply: Reply) -> bool:
    """Whether a reply is Vault's answer to its request: not a status worth retrying, nor
    a redirect to another node."""
    return not (reply.status in RETRY_STATUSES or _redirect(reply))


def _redirect(reply: Reply) -> bool:
    """Whether the reply sends the request elsewhere (a standby to its active node)."""
    return reply.status in (307, 308) and bool(reply.location)


def _cannot_reach(target: Target, error: TransportError) -> str:
    return f"cannot reach Vault at {target.describe()}: {truncate(str(error))}"


def _header_value(value: str, what: str) -> str:
    """A value bound for an HTTP header: printable ASCII only (a line break would start a
    header of its own; other characters have no agreed encoding)."""
    if not (value.isascii() and value.isprintable()):
        raise VaultBadResponse(f"the Vault {what} holds characters that cannot be sent in an HTTP header")
    return value


class RawBody(NamedTuple):
    """A successful reply that is not JSON."""

    data: bytes


class _Reply(NamedTuple):
    status: int
    body: Any
    retry_after: float | None


class _NotSent(VaultUnreachable):
    """No connection (refused, unresolvable, not accepted in time): the request never
    reached Vault, so any retry is safe, and the endpoint's breaker counts it."""


class _RedirectNotSent(_NotSent):
    """Vault at the endpoint redirected (a standby to its active node), and the node it
    named refused: during an election. Safe to retry; not the endpoint's failure."""


class NameNotLookedUp(VaultUnreachable):
    """Vault's name was not looked up (provider.lookup refused: too many of the namespace's
    lookups wait for DNS): the namespace's limit, not Vault's failure. Not retried; no
    breaker counts it, and the revocation sweep does not take the endpoint for silent."""


class _TLSFailure(VaultUnreachable):
    """The TLS handshake failed: a matter of the class's TLS settings, not of reachability."""


class _NotVault(VaultUnreachable):
    """The server at the address answered in another protocol: a matter of the address,
    which asking again will not change. `cause`: what was wrong with its reply."""

    def __init__(self, message: str, *, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class _NoBreaker:
    def record_success(self) -> None:
        pass

    def record_failure(self, error: str) -> None:
        pass

    def refusal(self) -> VaultCircuitOpen | None:
        return None

    def give_back_probe(self) -> None:
        pass


_NO_BREAKER = _NoBreaker()


# The jitter's own generator: Mount threads retrying never move the random module's shared
# state (which code in the same process, property tests among it, may rely on).
_JITTER = random.Random()


def _backoff(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with equal jitter; at least what Vault asked for (Retry-After)."""
    ceiling: float = min(MAX_BACKOFF_SECONDS, BASE_BACKOFF_SECONDS * 2.0 ** (attempt - 1))
    delay = ceiling / 2 + _JITTER.uniform(0, ceiling / 2)
    return max(delay, retry_after) if retry_after is not None else delay


# Redirects followed per request: a standby points at the active node, which answers.
MAX_REDIRECTS = 2
# Characters left as they are in a request path, as Go's url.URL.EscapedPath leaves them.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


# The fields of Go's api.Secret: a reply that sets none of them is not in Vault's envelope.
_ENVELOPE_FIELDS = ("request_id", "lease_id", "lease_duration", "renewable", "data", "warnings", "auth", "wrap_info")


def _enveloped(body: dict[str, Any]) -> dict[str, Any]:
    """A reply as the reference sees it. Some endpoints answer without Vault's envelope
    (identity/oidc/.well-known/keys is {"keys": [...]}); Go's api.ParseSecret then puts
    the whole map into data, so secretKey looks into it."""
    for name in _ENVELOPE_FIELDS:
        value = body.get(name)
        if value is not None and value != "" and value is not False and not _is_zero_number(value):
            return body
    return {"data": body} if body else body


def _is_zero_number(value: Any) -> bool:
    return isinstance(value, gojson.Number) and value.text in ("0", "-0")


def _vault_says(status: int, body: Any) -> str:
    """Vault's own error text, truncated, for a message; its warnings when it gave no
    errors (a KV v2 path read without data/ is a 404 whose warning says so)."""
    errors = body.get("errors") if isinstance(body, dict) else None
    warnings = body.get("warnings") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors:
        text = "; ".join(str(e) for e in errors)
    elif isinstance(warnings, list) and warnings:
        text = "; ".join(str(w) for w in warnings)
    elif isinstance(body, str):
        text = body
    else:
        text = "no error text"
    return f"Vault answered {status}: {truncate(text)}"


def _raise_for_status(method: str, path: str, status: int, body: Any) -> None:
    if 200 <= status < 300:
        return
    message = f"{method} {path}: {_vault_says(status, body)}"
    error_class: type[VaultError] = VaultBadResponse
    if status == 403:
        error_class = VaultPermissionDenied
    elif status == 404:
        error_class = VaultNotFound
    elif status in (429, 502, 503, 504):
        error_class = VaultUnreachable
    raise error_class(message, status=status)
