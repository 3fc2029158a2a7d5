"""HTTP exchanges with Vault through libcurl (pycurl): pooled, bounded, held to a deadline.

Why libcurl: a Vault read is most of a Mount's CPU, and per read (thread CPU against the
same OpenBao, measured here) pycurl costs about 0.11 ms, http.client 0.26 ms and
urllib3 0.5 ms. libcurl parses the reply in C, without the GIL.

- A Vault address arrives parsed (address.Target): scheme, host, port or socket, path
  prefix, basic auth.
- Handles (each keeping its connection alive) are pooled by what a connection is:
  scheme, host, port or socket, and TLS settings. Paths, user info and spelling do not
  make new pools, and at most MAX_POOLS are kept, the least recently used closed first,
  so no class can make the provider hold sockets without bound.
- Each exchange is bounded as a whole (connect, headers and body) by libcurl's own
  timeout: a server dripping one byte a second cannot hold a thread past its deadline.
- The reply is read up to a size limit; a larger one is cut off, not buffered.
- Nothing is taken from the environment: no proxy variables, no .netrc, no cookies.
  TLS verification is on unless the class or flags turn it off; with no CA configured,
  the system's trust store (as Python's ssl module finds it) is used.
"""

from __future__ import annotations

import io
import logging
import os
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import pycurl

from provider.address import Target
from provider.config import TLSConfig

logger = logging.getLogger(__name__)

# Idle handles (connections) kept per pool: one per concurrent request we allow to one
# Vault. More may be in use at once; those beyond this are closed when done.
POOL_SIZE = 32
# Pools kept at most: a node talks to a handful of Vaults; standby redirects add one per
# cluster node. Beyond this the least recently used pool is closed.
MAX_POOLS = 64
# libcurl's errors that mean no connection was made: the request never reached Vault.
_NOT_CONNECTED = frozenset({pycurl.E_COULDNT_CONNECT, pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_RESOLVE_PROXY})
# libcurl's errors of the TLS layer: certificates, names, handshakes.
_TLS_ERRORS = frozenset(
    {
        pycurl.E_SSL_CONNECT_ERROR,
        pycurl.E_PEER_FAILED_VERIFICATION,
        pycurl.E_SSL_CERTPROBLEM,
        pycurl.E_SSL_CIPHER,
        pycurl.E_SSL_CACERT_BADFILE,
        pycurl.E_SSL_CRL_BADFILE,
        pycurl.E_SSL_ISSUER_ERROR,
        pycurl.E_SSL_ENGINE_INITFAILED,
        pycurl.E_SSL_PINNEDPUBKEYNOTMATCH,
        pycurl.E_USE_SSL_FAILED,
    }
)


class Reply(NamedTuple):
    """What Vault answered: the status, the body's bytes and the headers the client uses."""

    status: int
    body: bytes
    location: str  # the absolute URL of a Location header, or ""
    content_type: str
    retry_after: float | None


class TransportError(Exception):
    """An exchange that did not produce a whole reply; the message is libcurl's, never data."""


class NotConnected(TransportError):
    """No connection was made (refused, unresolvable, not accepted in time)."""


class TLSFailed(TransportError):
    """The TLS handshake failed: certificates, names, versions."""


class TimedOut(TransportError):
    """Connected, but the reply was not complete at the deadline."""


class TooLarge(TransportError):
    """The reply is larger than the limit; it was not read to its end."""


@dataclass(frozen=True)
class _PoolKey:
    scheme: str
    host: str
    port: int
    socket_path: str
    tls: TLSConfig


class Pool:
    """Idle libcurl handles for one kind of connection, most recently used first."""

    def __init__(self, target: Target, tls: TLSConfig, *, size: int = POOL_SIZE) -> None:
        self._options = _connection_options(target, tls)
        self._idle: list[pycurl.Curl] = []
        self._size = size
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> pycurl.Curl:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return pycurl.Curl()

    def give(self, handle: pycurl.Curl, *, reusable: bool = True) -> None:
        with self._lock:
            if reusable and not self._closed and len(self._idle) < self._size:
                self._idle.append(handle)
                return
        handle.close()

    def configure(self, handle: pycurl.Curl) -> None:
        """Every option a request needs before its own: after reset, from scratch."""
        handle.reset()
        for option, value in self._options:
            handle.setopt(option, value)

    def close(self) -> None:
        """Close idle handles; handles in use are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for handle in idle:
            handle.close()


class Pools:
    """Pools by what a connection is; bounded; thread-safe."""

    def __init__(self, *, max_pools: int = MAX_POOLS) -> None:
        self._max = max_pools
        self._pools: OrderedDict[_PoolKey, Pool] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pools)

    def get(self, target: Target, tls: TLSConfig) -> Pool:
        # TLS settings matter only to https; an http pool is one pool whatever the class set.
        key = _PoolKey(
            target.scheme,
            target.host,
            target.port,
            target.socket_path,
            tls if target.scheme == "https" else TLSConfig(),
        )
        closing: list[Pool] = []
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            pool = self._pools[key] = Pool(target, key.tls)
            while len(self._pools) > self._max:
                closing.append(self._pools.popitem(last=False)[1])
        for old in closing:
            old.close()  # in-flight requests on it finish; their handles are then closed
        if target.scheme == "https" and tls.skip_verify:
            logger.warning("TLS verification of Vault at %s is disabled (vaultSkipTLSVerify)", target.describe())
        return pool

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()


class Transport:
    """Sends one HTTP request and reads its reply; thread-safe."""

    def __init__(self, *, max_body_bytes: int, max_pools: int = MAX_POOLS) -> None:
        self._max_body_bytes = max_body_bytes
        self.pools = Pools(max_pools=max_pools)

    def close(self) -> None:
        self.pools.close()

    def send(
        self,
        target: Target,
        tls: TLSConfig,
        method: str,
        url_path: str,
        body: bytes | None,
        headers: list[str],
        timeout: float,
        *,
        replayable: bool,
    ) -> Reply:
        """`url_path` is the path and query; `headers` are "Name: value" lines. The whole
        exchange ends within `timeout` seconds.

        libcurl sends a request again, on a new connection, when a kept-alive one dies
        before any reply; a request that is not `replayable` (a write that may create
        credentials) therefore goes on a new connection, where it never does that."""
        pool = self.pools.get(target, tls)
        handle = pool.take()
        reusable = False
        # libcurl writes into it from C, and stops the transfer at the limit (a larger
        # Content-Length at once; a chunked reply when it gets there).
        buffer = io.BytesIO()
        try:
            pool.configure(handle)
            handle.setopt(pycurl.URL, _origin(target, tls) + url_path)
            handle.setopt(pycurl.HTTPHEADER, headers)
            handle.setopt(pycurl.WRITEFUNCTION, buffer.write)
            handle.setopt(pycurl.MAXFILESIZE_LARGE, self._max_body_bytes)
            handle.setopt(pycurl.TIMEOUT_MS, max(int(timeout * 1000), 1))
            if not replayable:
                handle.setopt(pycurl.FRESH_CONNECT, 1)
            if method != "GET" or body is not None:
                handle.setopt(pycurl.POSTFIELDS, body or b"")
                if method != "POST":
                    handle.setopt(pycurl.CUSTOMREQUEST, method)
            try:
                handle.perform()
            except pycurl.error as e:
                raise _failure(handle, e, timeout=timeout, limit=self._max_body_bytes) from None
            reply = Reply(
                status=handle.getinfo(pycurl.RESPONSE_CODE),
                body=buffer.getvalue(),
                location=handle.getinfo(pycurl.REDIRECT_URL) or "",
                content_type=handle.getinfo(pycurl.CONTENT_TYPE) or "",
                retry_after=_retry_after(handle),
            )
            reusable = True
            return reply
        finally:
            handle.setopt(pycurl.WRITEFUNCTION, _discard)  # the handle keeps no reference to the reply
            pool.give(handle, reusable=reusable)


def _failure(handle: pycurl.Curl, error: pycurl.error, *, timeout: float, limit: int) -> TransportError:
    """libcurl's error as what it means for the request."""
    code = error.args[0] if error.args else 0
    message = str(error.args[1]) if len(error.args) > 1 else str(error)
    if code == pycurl.E_FILESIZE_EXCEEDED:
        return TooLarge(f"the reply is larger than {limit} bytes")
    if code in _NOT_CONNECTED:
        errno = handle.getinfo(pycurl.OS_ERRNO)
        return NotConnected(os.strerror(errno) if errno else message)
    if code == pycurl.E_OPERATION_TIMEDOUT:
        reused = handle.getinfo(pycurl.NUM_CONNECTS) == 0
        if not reused and not handle.getinfo(pycurl.CONNECT_TIME):
            return NotConnected(f"no connection within {timeout:.1f}s")
        return TimedOut(message)
    if code in _TLS_ERRORS or (code in (pycurl.E_RECV_ERROR, pycurl.E_SEND_ERROR) and "alert" in message):
        # A TLS 1.3 server refuses a client certificate after the handshake: an alert at
        # the first read, which is still the TLS settings' failure, not the network's.
        return TLSFailed(message)
    return TransportError(message)


def _discard(data: bytes) -> None:
    return None


def _retry_after(handle: pycurl.Curl) -> float | None:
    seconds = handle.getinfo(pycurl.RETRY_AFTER)
    return float(seconds) if isinstance(seconds, int) and seconds > 0 else None


def _origin(target: Target, tls: TLSConfig) -> str:
    """The URL's scheme and authority: the TLS server name when one is set (SNI and
    verification use it; CONNECT_TO sends the connection to the real address)."""
    if target.scheme == "unix":
        return "http://localhost"
    host = tls.server_name if target.scheme == "https" and tls.server_name else target.host
    host = f"[{host}]" if ":" in host else host
    return f"{target.scheme}://{host}:{target.port}"


def _connection_options(target: Target, tls: TLSConfig) -> list[tuple[int, Any]]:
    options: list[tuple[int, Any]] = [
        (pycurl.NOSIGNAL, 1),
        (pycurl.NOPROGRESS, 1),
        (pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS),
        (pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1),
        (pycurl.PROXY, ""),  # never a proxy from the environment
        (pycurl.PATH_AS_IS, 1),  # the path as the class wrote it, as Go sends it
        (pycurl.FOLLOWLOCATION, 0),  # redirects are the client's decision
        (pycurl.NETRC, pycurl.NETRC_IGNORED),
    ]
    if target.scheme == "unix":
        options.append((pycurl.UNIX_SOCKET_PATH, target.socket_path))
        return options
    if target.scheme != "https":
        return options
    if tls.server_name:
        host = f"[{target.host}]" if ":" in target.host else target.host
        options.append((pycurl.CONNECT_TO, [f"{tls.server_name}:{target.port}:{host}:{target.port}"]))
    if tls.skip_verify:
        options += [(pycurl.SSL_VERIFYPEER, 0), (pycurl.SSL_VERIFYHOST, 0)]
    else:
        options += [(pycurl.SSL_VERIFYPEER, 1), (pycurl.SSL_VERIFYHOST, 2)]
        if tls.ca_cert or tls.ca_directory:  # only what the class names, as Vault's client does
            options += [(pycurl.CAINFO, tls.ca_cert or None), (pycurl.CAPATH, tls.ca_directory or None)]
        else:
            options += _system_trust()
    if tls.client_cert and tls.client_key:
        options += [(pycurl.SSLCERT, tls.client_cert), (pycurl.SSLKEY, tls.client_key)]
    return options


def _system_trust() -> list[tuple[int, Any]]:
    """The trust store OpenSSL's defaults name (SSL_CERT_FILE and SSL_CERT_DIR included),
    where present: the wheel's libcurl was built on another system and may look elsewhere."""
    paths = ssl.get_default_verify_paths()
    options: list[tuple[int, Any]] = []
    if paths.cafile:
        options.append((pycurl.CAINFO, paths.cafile))
    if paths.capath:
        options.append((pycurl.CAPATH, paths.capath))
    return options
