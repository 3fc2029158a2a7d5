"""HTTP connections to Vault: pooled, bounded, and held to the Mount's deadline.

- A Vault address arrives parsed (address.Target): scheme, host, port or socket, path
  prefix, basic auth.
- Connection pools are keyed by what a connection is: scheme, host, port or socket, and
  TLS settings. Paths, user info and spelling do not make new pools, and at most
  MAX_POOLS are kept, the least recently used closed first, so no class can make the
  provider hold sockets without bound.
- urllib3's timeouts bound each socket operation, not an exchange: a server dripping
  one byte a second would hold a thread for as long as it likes. A single watchdog
  thread shuts down the socket of any exchange still running at its deadline, headers
  and body included.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
import urllib3.connection

from provider.address import Target
from provider.config import TLSConfig

logger = logging.getLogger(__name__)

# Connections kept per pool: one per concurrent request we allow to one Vault.
POOL_SIZE = 32
# How late the watchdog may cut an exchange past its deadline, at most: Mount deadlines
# keep a 0.5 s margin to the caller's, so 50 ms of slack costs nothing.
WATCHDOG_TICK_SECONDS = 0.05
# Pools kept at most: a node talks to a handful of Vaults; standby redirects add one per
# cluster node. Beyond this the least recently used pool is closed.
MAX_POOLS = 64


@dataclass(frozen=True)
class _PoolKey:
    scheme: str
    host: str
    port: int
    socket_path: str
    tls: TLSConfig


class _Guard:
    """One exchange's deadline and the connections it used."""

    __slots__ = ("conns", "deadline", "done", "expired", "lock")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conns: list[urllib3.connection.HTTPConnection] = []
        self.expired = False
        self.done = False
        self.lock = threading.Lock()

    def attach(self, conn: urllib3.connection.HTTPConnection) -> None:
        with self.lock:
            if self.expired:
                _cut(conn)
            elif conn not in self.conns:
                self.conns.append(conn)

    def expire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.expired = True
            for conn in self.conns:
                _cut(conn)

    def finish(self) -> bool:
        """Stop watching; True when the deadline had already cut the exchange."""
        with self.lock:
            self.done = True
            return self.expired


def _cut(conn: urllib3.connection.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        # The plain socket's shutdown, also for TLS sockets: it wakes a blocked read at
        # once, without touching the TLS object another thread is using.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()


class Watchdog:
    """One thread that cuts exchanges running past their deadlines."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Guard]] = []
        self._live = 0
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def guard(self, deadline: float) -> Iterator[_Guard]:
        """Watch the exchanges this thread makes inside the block."""
        guard = _Guard(deadline)
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="vault-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._seq), guard))
            self._live += 1
            if self._heap[0][2] is guard:
                self._cond.notify()
            if len(self._heap) > 64 and len(self._heap) > 2 * self._live:
                self._heap = [item for item in self._heap if not item[2].done]
                heapq.heapify(self._heap)
        _current.guard = guard
        try:
            yield guard
        finally:
            _current.guard = None
            guard.finish()
            with self._cond:
                self._live -= 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, guard = heapq.heappop(self._heap)
                    if not guard.done:
                        guard.expire()
                # Sleep until the earliest deadline, but never less than a tick: most guards
                # end long before their deadline, and waking for each would cost a thread
                # switch per Vault request.
                timeout = max(self._heap[0][0] - now, WATCHDOG_TICK_SECONDS) if self._heap else None
                self._cond.wait(timeout)


def _attach(conn: urllib3.connection.HTTPConnection) -> None:
    guard: _Guard | None = getattr(_current, "guard", None)
    if guard is not None:
        guard.attach(conn)


class _GuardedHTTPConnection(urllib3.connection.HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)
        super().request(*args, **kwargs)


class _UnixConnection(_GuardedHTTPConnection):
    """HTTP over a unix socket (VAULT_ADDR=unix:///path, e.g. a Vault Agent)."""

    def __init__(self, socket_path: str, **kwargs: Any) -> None:
        super().__init__("localhost", **kwargs)
        self._socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if isinstance(self.timeout, int | float):
            sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError as e:
            sock.close()
            raise urllib3.exceptions.NewConnectionError(self, f"cannot connect to {self._socket_path}: {e}") from e
        return sock


class _UnixConnectionPool(urllib3.HTTPConnectionPool):
    def __init__(self, socket_path: str, **kwargs: Any) -> None:
        super().__init__("localhost", **kwargs)
        self._socket_path = socket_path

    def _new_conn(self) -> urllib3.connection.HTTPConnection:
        return _UnixConnection(self._socket_path, timeout=self.timeout.connect_timeout)


class Pools:
    """Connection pools by what a connection is; bounded; thread-safe."""

    def __init__(self, *, max_pools: int = MAX_POOLS) -> None:
        self._max = max_pools
        self._pools: OrderedDict[_PoolKey, urllib3.HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pools)

    def get(self, target: Target, tls: TLSConfig) -> urllib3.HTTPConnectionPool:
        # TLS settings matter only to https; an http pool is one pool whatever the class set.
        key = _PoolKey(
            target.scheme,
            target.host,
            target.port,
            target.socket_path,
            tls if target.scheme == "https" else TLSConfig(),
        )
        closing: list[urllib3.HTTPConnectionPool] = []
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            pool = self._pools[key] = _build_pool(target, tls)
            while len(self._pools) > self._max:
                closing.append(self._pools.popitem(last=False)[1])
        for old in closing:
            old.close()  # in-flight requests on it finish; their connections are then dropped
        return pool

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()


def _build_pool(target: Target, tls: TLSConfig) -> urllib3.HTTPConnectionPool:
    if target.scheme == "unix":
        return _UnixConnectionPool(target.socket_path, maxsize=POOL_SIZE)
    if target.scheme == "http":
        pool = urllib3.HTTPConnectionPool(target.host, target.port, maxsize=POOL_SIZE)
        pool.ConnectionCls = _GuardedHTTPConnection
        return pool
    options: dict[str, Any] = {"maxsize": POOL_SIZE}
    if tls.skip_verify:
        options["cert_reqs"] = "CERT_NONE"
        options["assert_hostname"] = False
        # Said once here, by us, rather than by urllib3 on every request.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        logger.warning("TLS verification of Vault at %s is disabled (vaultSkipTLSVerify)", target.describe())
    else:
        options["cert_reqs"] = "CERT_REQUIRED"
        if tls.ca_cert:
            options["ca_certs"] = tls.ca_cert
        if tls.ca_directory:
            options["ca_cert_dir"] = tls.ca_directory
        if tls.server_name:
            options["server_hostname"] = tls.server_name
            options["assert_hostname"] = tls.server_name
    if tls.client_cert and tls.client_key:
        options["cert_file"] = tls.client_cert
        options["key_file"] = tls.client_key
    https = urllib3.HTTPSConnectionPool(target.host, target.port, **options)
    https.ConnectionCls = _GuardedHTTPSConnection
    return https
