"""HTTP exchanges (with Vault, and with the Kubernetes API): pooled, bounded, held to a deadline.

HTTP/1.1 on kept-alive connections, written and read by provider.http1 straight from the
socket. Measured here per Vault read (CPU of the reading thread against the same OpenBao,
`make bench`): provider.http1 0.09 ms, Python's http.client 0.22 ms, urllib3 0.5 ms, pycurl
0.11 ms. pycurl was tried and dropped: libcurl builds an OpenSSL context, with its own
copy of the CA store, for every connection (0.45 MiB each with one CA, 0.8 MiB with the
system's, and 2.4 to 13 ms of CPU per handshake), where one ssl.SSLContext per pool
serves every connection for 8 to 32 KiB each. A burst of 32 TLS connections to one
Vault would have cost a quarter of the DaemonSet's memory.

- A Vault address arrives parsed (address.Target): scheme, host, port or socket, path
  prefix, basic auth.
- Connections are pooled by what a connection is: scheme, host, port or socket, and TLS
  settings. Paths, user info and spelling do not make new pools, and at most MAX_POOLS
  are kept, MAX_POOLS_PER_NAMESPACE of them a namespace's own (Pools says which goes first),
  so no class can make the provider hold sockets without bound, nor close other teams'.
  Each pool has one SSLContext.
- A name is looked up within the deadline (provider.lookup).
- A connect (and a TLS handshake) is bounded by a socket timeout; after it the socket
  blocks. A socket timeout bounds each operation, not an exchange (a server dripping one
  byte a second would hold a thread as long as it likes), and costs a poll before every
  send and receive: a single watchdog thread shuts down the socket of any exchange still
  running at its deadline instead. Closing the transport cuts every exchange still running.
- The reply is read up to a size limit; a larger one is refused, not buffered.
- Nothing is taken from the environment: no proxy variables, no SSLKEYLOGFILE (TLS
  keys written to a file would expose every token). TLS verification is on
  unless the class or flags turn it off; with no CA configured, the system's trust
  store is used.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import select
import socket
import ssl
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from provider import http1, lookup, replymemory
from provider.address import Target
from provider.config import TLSConfig
from provider.tenant import TENANT

logger = logging.getLogger(__name__)

# Idle connections kept per pool: one per concurrent request we allow to one Vault.
# More may be open at once; those beyond this are closed when done.
POOL_SIZE = 32
# Pools kept at most: a node talks to a handful of Vaults; standby redirects add one per
# cluster node. Beyond this the least recently used pool is closed (Pools says which first).
MAX_POOLS = 64
# Pools one pod namespace's Mounts may keep that no other namespace uses: a class naming live
# server after live server of its own replaces its own pools, not other teams' connections.
MAX_POOLS_PER_NAMESPACE = 16
# How late the watchdog may cut an exchange past its deadline, at most: Mount deadlines
# keep a 0.5 s margin to the caller's, so 50 ms of slack costs nothing.
WATCHDOG_TICK_SECONDS = 0.05
# A connect (and TLS handshake) that the deadline cut with less time than this says
# nothing of the server: it is the caller's timeout, not a connection failure, and a
# circuit breaker shared by every class of that Vault does not count it. With more, a
# server that did not accept, or finish its handshake, is down or overloaded.
CONNECT_EVIDENCE_SECONDS = 1.0
# The least time one of a name's several addresses is given to connect, when more is left.
ADDRESS_MIN_SECONDS = 2.0
# Errors of sending on a kept-alive connection the server closed while it sat idle (a
# close before any byte of the reply is http1.Closed): a request that may be sent twice
# is sent again on a new one.
_STALE = (ConnectionResetError, BrokenPipeError)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Reply(NamedTuple):
    """What the server answered: the status, the body's bytes and the headers used."""

    status: int
    body: bytes
    location: str  # the Location header as sent, or ""
    content_type: str
    retry_after: float | None

    @classmethod
    def of(cls, reply: http1.Reply) -> Reply:
        head = reply.head
        return cls(
            status=head.status,
            body=reply.body,
            location=head.first.get("location", ""),
            content_type=head.first.get("content-type", ""),
            retry_after=_retry_after(head.first.get("retry-after")),
        )


class TransportError(Exception):
    """An exchange that did not produce a whole reply; the message never holds data."""


class NotConnected(TransportError):
    """No connection was made (refused, unresolvable, not accepted in time)."""


class NotLookedUp(TransportError):
    """The server's name was not looked up (provider.lookup refused): a limit of the caller's
    namespace or of the node, not the server's failure."""


class TLSFailed(TransportError):
    """The TLS layer failed: certificates, names, handshakes, alerts."""


class NotHTTP(TransportError):
    """The server answered, but not in HTTP/1.x: another protocol listens there."""


class TimedOut(TransportError):
    """Connected, but the reply was not complete at the deadline."""


class TooLarge(TransportError):
    """The reply is larger than the limit; it was not read to its end."""


class NoRoom(TransportError):
    """The Mount the reply was read for has no room left to hold it (replymemory); it was
    not read to its end."""


class _PoolKey(NamedTuple):  # a tuple: made and hashed for every request
    scheme: str
    host: str
    port: int
    socket_path: str
    tls: TLSConfig


_NO_TLS = TLSConfig()


class Pool:
    """Idle connections to one place with one TLS configuration, most recent first."""

    def __init__(self, target: Target, tls: TLSConfig, *, size: int = POOL_SIZE) -> None:
        self._target = target
        self._tls = tls
        self._context = _context(tls) if target.scheme == "https" else None
        self.host = host_of(target)
        self._idle: list[http1.Connection] = []
        self._lent = 0  # connections taken or made for an exchange, not yet given back or dropped
        self._size = size
        self._lock = threading.Lock()
        self._closed = False
        self.maker = TENANT.get()  # the pod namespace whose Mount made it: its share counts it
        self.shared = False  # another namespace's Mounts used it too

    @property
    def holds_nothing(self) -> bool:
        """No connection kept, none in use (read without the lock: a hint for eviction)."""
        return not self._idle and self._lent <= 0

    def take(self) -> http1.Connection | None:
        """A connection kept alive from an earlier exchange, or None. It is lent: give it
        back, or drop it."""
        while True:
            with self._lock:  # lent before it leaves the idle list: holds_nothing is read unlocked
                if not self._idle:
                    return None
                self._lent += 1
                conn = self._idle.pop()
            if _usable(conn):
                return conn
            self.drop(conn)  # the server closed it while idle

    def give(self, conn: http1.Connection) -> None:
        """A lent connection back, fit for another exchange."""
        with self._lock:  # idle before it stops being lent: holds_nothing is read unlocked
            if not self._closed and len(self._idle) < self._size:
                self._idle.append(conn)
                self._lent -= 1
                return
            self._lent -= 1
        conn.close()

    def drop(self, conn: http1.Connection) -> None:
        """A lent connection closed: unfit for another exchange."""
        with self._lock:
            self._lent -= 1
        conn.close()

    def close(self) -> None:
        """Close idle connections; those in use are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def connect(self, timeout: float, on_socket: Callable[[socket.socket], None]) -> http1.Connection:
        """A new connection within `timeout` seconds, lent as take() lends; `on_socket` sees
        the socket before a TLS handshake, so that the handshake is held to the deadline too.
        TLS checks the certificate against vaultTLSServerName when set, while the connection
        and the Host header go to the address, as Go's client does."""
        conn = self._connect(timeout, on_socket)
        with self._lock:
            self._lent += 1
        return conn

    def _connect(self, timeout: float, on_socket: Callable[[socket.socket], None]) -> http1.Connection:
        target = self._target
        if target.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(target.socket_path)
                sock.settimeout(None)  # the watchdog holds the exchange to its deadline
            except OSError:
                sock.close()
                raise
            return http1.Connection(sock)
        sock = _connect_tcp(target.host, target.port, time.monotonic() + timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                # Wrapping detaches the plain socket: watch the TLS one, then shake hands.
                sock = self._context.wrap_socket(
                    sock, server_hostname=self._tls.server_name or target.host, do_handshake_on_connect=False
                )
                on_socket(sock)
                sock.do_handshake()
            sock.settimeout(None)  # the watchdog holds the exchange to its deadline
        except BaseException:
            sock.close()
            raise
        return http1.Connection(sock)


def _connect_tcp(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to the first of host's addresses that accepts one by the deadline.
    socket.create_connection gives each address the whole timeout: a name with three
    addresses that drop SYNs held a Mount's thread three times its deadline, and one such
    address before a healthy one took all of it. As Go's dialer does, each address gets an
    equal share of what is left, at least ADDRESS_MIN_SECONDS of it. The name lookup is held
    to the deadline too (provider.lookup)."""
    addresses = lookup.addresses(host, port, deadline - time.monotonic())
    error: OSError | None = None
    for index, (family, kind, proto, _, address) in enumerate(addresses):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        share = max(remaining / (len(addresses) - index), min(ADDRESS_MIN_SECONDS, remaining))
        try:  # a family the node cannot open (IPv6 turned off) is one more address that failed
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            error = e
            continue
        try:
            sock.settimeout(share)
            sock.connect(address)
        except OSError as e:
            sock.close()
            error = e
            continue
        return sock
    if time.monotonic() >= deadline or error is None:
        raise TimeoutError("no connection before the deadline") from error
    raise error


def host_of(target: Target) -> str:
    """The Host header of requests to target: "localhost" for a unix socket, as http.client
    and Go send it."""
    return http1.host_header(target.host, target.port, _DEFAULT_PORTS.get(target.scheme, 0))


def _usable(conn: http1.Connection) -> bool:
    """A kept-alive connection with nothing to read: not closed by the server meanwhile."""
    sock = conn.sock
    poller = select.poll()  # not select(): it fails on descriptors past 1024
    try:
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _context(tls: TLSConfig) -> ssl.SSLContext:
    """One pool's TLS context: the class's CA (or the system's), its client
    certificate; verification on unless it says skip."""
    if tls.skip_verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        # Only the CA the class names, as Vault's own client does; else the system's.
        context = ssl.create_default_context(cafile=tls.ca_cert or None, capath=tls.ca_directory or None)
        context.keylog_filename = None  # type: ignore[assignment]  # never TLS keys to a file (SSLKEYLOGFILE)
    if tls.client_cert and tls.client_key:
        context.load_cert_chain(tls.client_cert, tls.client_key)
    return context


class Pools:
    """Pools by what a connection is; bounded; thread-safe.

    A pool counts against the pod namespace whose Mount made it (tenant.TENANT) until
    another namespace's Mount uses it too. A namespace keeps at most `per_namespace` pools
    of its own: past that, its own least recently used one goes, one holding no connection
    first. Past the node's `max_pools`, the least recently used pool holding no connection
    (none idle, none lent) goes; failing that, one of those of the namespace keeping the
    most of its own; failing that, the least recently used. The one just made never goes. So
    a class naming dead address after dead address, or live server after live server,
    replaces its own pools, not the kept-alive connections of other teams (each of their
    next requests would pay a new connection and TLS handshake)."""

    def __init__(
        self, *, max_pools: int = MAX_POOLS, per_namespace: int = MAX_POOLS_PER_NAMESPACE, service: str = "Vault"
    ) -> None:
        self._max = max_pools
        self._per_namespace = per_namespace
        self._service = service
        self._pools: OrderedDict[_PoolKey, Pool] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pools)

    def find(self, target: Target, tls: TLSConfig) -> Pool | None:
        """The pool for target and tls if there is one; never makes one (loading a CA store
        takes tens of milliseconds: not on the event loop)."""
        key = _pool_key(target, tls)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._used(key, pool)
            return pool

    def get(self, target: Target, tls: TLSConfig) -> Pool:
        """The pool for target and tls; raises TLSFailed when the TLS files cannot be loaded."""
        key = _pool_key(target, tls)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._used(key, pool)
                return pool
        try:
            made = Pool(target, key.tls)  # outside the lock: loading a CA store takes a while
        except (ssl.SSLError, OSError, ValueError) as e:
            raise TLSFailed(f"cannot load the TLS files{_named_files(key.tls)}: {_describe(e)}") from None
        closing: list[Pool] = []
        with self._lock:
            pool = self._pools.setdefault(key, made)
            self._used(key, pool)
            if pool is made:
                closing = self._make_room(made)
        for old in closing:
            old.close()  # in-flight requests on it finish; their connections are then closed
        if pool is made and target.scheme == "https" and tls.skip_verify:
            logger.warning("TLS verification of %s at %s is disabled", self._service, target.describe())
        return pool

    def _used(self, key: _PoolKey, pool: Pool) -> None:
        """Under the lock: pool is in use by this context's namespace."""
        self._pools.move_to_end(key)  # not the least recently used
        if not pool.shared and pool.maker != TENANT.get():
            pool.shared = True  # no longer counted against its maker's share

    def _make_room(self, made: Pool) -> list[Pool]:
        """Under the lock: the pools to close now that `made` is kept (see the class)."""
        others = [(key, pool) for key, pool in self._pools.items() if pool is not made]
        own = [(key, pool) for key, pool in others if pool.maker == made.maker and not pool.shared]
        victims: list[_PoolKey] = []
        if len(own) >= self._per_namespace:
            victims.append(next((key for key, pool in own if pool.holds_nothing), own[0][0]))
        while len(self._pools) - len(victims) > self._max:
            left = [(key, pool) for key, pool in others if key not in victims]
            victim = next((key for key, pool in left if pool.holds_nothing), None)
            if victim is None:
                kept = Counter(pool.maker for _, pool in left if not pool.shared)
                most = max(kept.values(), default=0)
                victim = next((key for key, pool in left if not pool.shared and kept[pool.maker] == most), left[0][0])
            victims.append(victim)
        return [self._pools.pop(key) for key in victims]

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()


def _pool_key(target: Target, tls: TLSConfig) -> _PoolKey:
    # TLS settings matter only to https; an http pool is one pool whatever the class set.
    return _PoolKey(
        target.scheme, target.host, target.port, target.socket_path, tls if target.scheme == "https" else _NO_TLS
    )


class Transport:
    """Sends one HTTP request and reads its reply; thread-safe."""

    def __init__(self, *, max_body_bytes: int, max_pools: int = MAX_POOLS, service: str = "Vault") -> None:
        """`service` names the server in what the transport logs."""
        self._max_body_bytes = max_body_bytes
        self.pools = Pools(max_pools=max_pools, service=service)
        self._watchdog = _Watchdog()

    def close(self) -> None:
        self.pools.close()
        self._watchdog.close()

    def send(
        self,
        target: Target,
        tls: TLSConfig,
        method: str,
        url_path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float,
        *,
        replayable: bool,
    ) -> Reply:
        """`url_path` is the path and query. The whole exchange ends within `timeout`
        seconds. A kept-alive connection the server closed while idle is met before any
        reply: a `replayable` request is then sent again on a new connection; any other
        (a write that may create credentials) fails rather than risk being sent twice."""
        request = Request(target, tls, method, url_path, body, headers, timeout, replayable)
        guard = self._watchdog.watch(time.monotonic() + timeout)
        try:
            exchange = self._start(request, guard, self.pools.get(target, tls))
            outcome = exchange if isinstance(exchange, TransportError) else self._outcome(request, exchange)
        finally:
            guard.finish()
        if isinstance(outcome, TransportError):
            raise outcome
        return outcome

    def send_many(self, requests: list[Request]) -> list[Reply | TransportError]:
        """Each request's reply (or failure), in order. All are sent before any reply is
        read, each on its own connection, so from one thread they take about one round
        trip, not one each; each keeps its own deadline."""
        now = time.monotonic()  # one clock for the batch: its connects never add up past a deadline
        guards: dict[float, _Guard] = {}  # one per deadline: a batch's requests mostly share theirs
        pools: dict[tuple[int, int], Pool | TransportError] = {}  # by target and TLS: mostly one
        started: list[_Exchange | TransportError] = []
        try:
            try:
                for request in requests:
                    deadline = now + request.timeout
                    guard = guards.get(deadline)
                    if guard is None:
                        guard = guards[deadline] = self._watchdog.watch(deadline)
                    place = (id(request.target), id(request.tls))  # alive while requests holds them
                    pool = pools.get(place)
                    if pool is None:
                        pool = pools[place] = self._pool(request)
                    started.append(pool if isinstance(pool, TransportError) else self._start(request, guard, pool))
            except BaseException:  # a defect, or no memory: the requests already sent are not read
                for exchange in started:
                    if isinstance(exchange, _Exchange):
                        exchange.guard.release(exchange.conn.sock)
                        exchange.pool.drop(exchange.conn)
                raise
            return self._finish_all(requests, started)
        finally:
            for guard in guards.values():
                guard.finish()

    def _finish_all(
        self, requests: list[Request], started: list[_Exchange | TransportError]
    ) -> list[Reply | TransportError]:
        return [
            exchange if isinstance(exchange, TransportError) else self._outcome(request, exchange)
            for request, exchange in zip(requests, started, strict=True)
        ]

    def _outcome(self, request: Request, exchange: _Exchange) -> Reply | TransportError:
        try:
            return self._finish_one(request, exchange)
        except TransportError as e:
            return e
        except Exception:  # a defect of ours: this request fails, a batch's others are still read
            logger.exception("reading a reply from %s failed unexpectedly", request.target.describe())
            return TransportError("the reply could not be read (an internal error, logged)")

    def _finish_one(self, request: Request, exchange: _Exchange) -> Reply:
        """The reply to a sent request; sent again on a new connection when a kept-alive
        one turns out closed and the request may be (replayable)."""
        try:
            return self._finish(exchange, request.method)
        except _Stale:
            if not (exchange.reused and request.replayable):
                raise TransportError("the connection was closed before a reply") from None
        again = self._start(request, exchange.guard, exchange.pool, fresh=True)
        if isinstance(again, TransportError):
            raise again
        try:
            return self._finish(again, request.method)
        except _Stale:
            raise TransportError("the connection was closed before a reply") from None

    def _pool(self, request: Request) -> Pool | TransportError:
        try:
            return self.pools.get(request.target, request.tls)
        except TransportError as e:
            return e

    def _start(self, request: Request, guard: _Guard, pool: Pool, *, fresh: bool = False) -> _Exchange | TransportError:
        """Connect (or take a kept-alive connection from pool) and send the request, by
        the guard's deadline."""
        deadline = guard.deadline
        try:
            data = http1.request(request.method, request.url_path, pool.host, request.headers, request.body)
        except ValueError as e:
            return TransportError(str(e))
        conn = None if fresh else pool.take()
        reused = conn is not None
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or guard.expired:  # expired early: the transport was closed
                raise TimedOut("no time left before the deadline")
            if conn is None:
                try:
                    conn = pool.connect(remaining, guard.attach)
                except lookup.LookupRefused as e:  # the namespace's (or node's) limit, not the server's failure
                    raise NotLookedUp(str(e)) from None
                except (OSError, ValueError) as e:  # ValueError: a name TLS cannot carry
                    if guard.expired or isinstance(e, TimeoutError):  # cut, or slow: nothing was sent
                        if remaining < CONNECT_EVIDENCE_SECONDS:
                            # The Mount's own deadline ended it: no sign the server is down.
                            raise TimedOut(f"no connection within the {remaining:.2f}s left") from None
                        if isinstance(e, lookup.LookupTimedOut):
                            raise NotConnected(str(e)) from None
                        raise NotConnected(f"no connection within {remaining:.1f}s") from None
                    if isinstance(e, ssl.SSLError | ValueError):
                        raise TLSFailed(_describe(e)) from None
                    raise NotConnected(_describe(e)) from None
            guard.attach(conn.sock)
            try:
                conn.send(data)
            except _STALE:
                if guard.expired:
                    raise TimedOut("the deadline passed") from None
                if reused and request.replayable and not fresh:
                    guard.release(conn.sock)
                    pool.drop(conn)
                    return self._start(request, guard, pool, fresh=True)
                raise TransportError("the connection was closed before a reply") from None
            except OSError as e:
                raise self._failure(e, guard) from None
        except TransportError as e:
            if conn is not None:
                guard.release(conn.sock)
                pool.drop(conn)
            return e
        return _Exchange(pool=pool, conn=conn, reused=reused, guard=guard)

    def _finish(self, exchange: _Exchange, method: str) -> Reply:
        """Read the reply to a sent request; raises _Stale when a kept-alive connection
        turns out closed before any byte of it."""
        conn, guard = exchange.conn, exchange.guard
        keep = False
        try:
            try:
                reply = conn.read_reply(method, self._max_body_bytes, _count_body)
            except replymemory.NoRoom as e:
                raise NoRoom(str(e)) from None
            except http1.Closed:  # before any byte of the reply; a reset later is a failure
                if guard.expired:
                    raise TimedOut("the deadline passed") from None
                raise _Stale() from None
            except http1.TooLarge:
                raise TooLarge(f"the reply is larger than {self._max_body_bytes} bytes") from None
            except http1.NotHTTP as e:
                if guard.expired:
                    raise TimedOut("the deadline passed") from None
                raise NotHTTP(str(e)) from None
            except (http1.ProtocolError, OSError) as e:
                raise self._failure(e, guard) from None
            head = reply.head
            if head.status < 200:  # 100 is skipped: the final reply would follow
                raise TransportError(f"an interim reply (HTTP {head.status}) where the answer belongs")
            if guard.expired:
                raise TimedOut("the deadline passed")
            keep = not reply.will_close
            return Reply.of(reply)
        finally:
            if guard.release(conn.sock) and keep:  # no later cut reaches whoever takes the connection next
                exchange.pool.give(conn)
            else:
                exchange.pool.drop(conn)

    @staticmethod
    def _failure(error: Exception, guard: _Guard) -> TransportError:
        if guard.expired or isinstance(error, TimeoutError):
            return TimedOut("the deadline passed")
        if isinstance(error, ssl.SSLError):
            return TLSFailed(_describe(error))
        return TransportError(_describe(error))


class Request(NamedTuple):
    """One HTTP request: where, how, and within how many seconds."""

    target: Target
    tls: TLSConfig
    method: str
    url_path: str  # path and query
    body: bytes | None
    headers: dict[str, str]
    timeout: float
    replayable: bool  # safe to send again when a kept-alive connection was found closed


@dataclass(slots=True)
class _Exchange:
    """A request sent, its reply not yet read."""

    pool: Pool
    conn: http1.Connection
    reused: bool
    guard: _Guard


class _Stale(Exception):
    """A kept-alive connection was found closed before any reply."""


def _count_body(size: int) -> None:
    """A reply's body counted against the Mount it is read for, if any: its bytes, their
    text while it is decoded (json decodes bytes to a str first), and the strings it
    decodes to."""
    replymemory.count(3 * size)


def _named_files(tls: TLSConfig) -> str:
    """Which files the TLS settings name (ssl does not say which one failed): the message
    says what to fix, never what a file holds."""
    named = [
        f"{parameter} {path}"
        for parameter, path in (
            ("vaultCACertPath", tls.ca_cert),
            ("vaultCADirectory", tls.ca_directory),
            ("vaultTLSClientCertPath", tls.client_cert),
            ("vaultTLSClientKeyPath", tls.client_key),
        )
        if path
    ]
    return f" ({', '.join(named)})" if named else ""


def _describe(error: BaseException) -> str:
    """The error's own words: 'Connection refused', not its repr."""
    if isinstance(error, OSError) and error.strerror and not isinstance(error, ssl.SSLError):
        return error.strerror
    return str(error) or type(error).__name__


def _retry_after(header: str | None) -> float | None:
    try:
        return max(float(header), 0.0) if header else None
    except ValueError:
        return None


class _Guard:
    """A deadline and the sockets of the exchanges held to it (a batch's, mostly one)."""

    __slots__ = ("deadline", "done", "expired", "lock", "socks")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.socks: set[socket.socket] = set()
        self.expired = False
        self.done = False
        self.lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        """Watch sock (a TLS one before its handshake: that is held to the deadline too)."""
        with self.lock:
            self.socks.add(sock)
            if self.expired:
                _cut(sock)

    def expire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.expired = True
            for sock in self.socks:
                _cut(sock)

    def finish(self) -> None:
        with self.lock:
            self.done = True

    def release(self, sock: socket.socket) -> bool:
        """Stop watching sock (it goes back to a pool, or is closed); False if it was cut."""
        with self.lock:
            self.socks.discard(sock)
            return not self.expired


def _cut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for TLS sockets: it wakes a blocked read at once,
    # without touching the TLS object another thread is using.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """One thread that cuts exchanges running past their deadlines."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Guard]] = []
        self._compacted = 0  # the heap's size after the last compaction
        self._seq = itertools.count()
        # A plain lock, taken as itself on the hot path (watch() is on every request: a
        # Condition's own `with` is Python code); the condition waits and wakes over it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, deadline: float) -> _Guard:
        guard = _Guard(deadline)
        with self._lock:
            if self._closed:
                guard.expire()  # nothing would cut it later: it fails at once
                return guard
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="http-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._seq), guard))
            if self._heap[0][2] is guard:
                self._cond.notify()
            if len(self._heap) > max(64, 2 * self._compacted):  # most guards end long before their deadline
                self._heap = [item for item in self._heap if not item[2].done]
                heapq.heapify(self._heap)
                self._compacted = len(self._heap)
        return guard

    def close(self) -> None:
        """Stop, cutting every exchange still running: its socket blocks, and nothing
        else would end it."""
        with self._cond:
            self._closed = True
            running, self._heap = self._heap, []
            self._cond.notify()
        for _, _, guard in running:
            guard.expire()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, guard = heapq.heappop(self._heap)
                    guard.expire()
                # Sleep until the earliest deadline, but never less than a tick: most guards
                # end long before their deadline, and waking for each would cost a thread
                # switch per request.
                timeout = max(self._heap[0][0] - now, WATCHDOG_TICK_SECONDS) if self._heap else None
                self._cond.wait(timeout)
