"""Health and metrics over HTTP: /health/live, /health/ready and /metrics.

Liveness never calls upstream: it checks that the socket file the driver dials is still
the one this process serves (a deleted or replaced socket means a restart is the fix).
Readiness dials that path afresh and asks Version, at most once per
READY_CACHE_SECONDS, so a probe storm costs nothing.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from provider.metrics import Metrics

logger = logging.getLogger(__name__)

# kubelet probes every few seconds; one real check per second is plenty.
READY_CACHE_SECONDS = 1.0


class ReadinessCheck:
    """Caches the result of an expensive readiness probe for a short time."""

    def __init__(self, probe: Callable[[], bool], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._ready = False

    def __call__(self) -> bool:
        with self._lock:
            now = self._clock()
            if now - self._checked_at >= READY_CACHE_SECONDS:
                try:
                    self._ready = self._probe()
                except Exception:  # a probe failure means "not ready", never a crash
                    logger.debug("readiness probe failed", exc_info=True)
                    self._ready = False
                self._checked_at = now
            return self._ready


def parse_address(address: str) -> tuple[str, int]:
    """':8080' -> ('', 8080): every address, IPv4 and IPv6; '[::1]:8080' -> ('::1', 8080);
    'host:port' -> (host, port). Go's net.Listen reads -health-addr the same way."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"-health-addr must be host:port, [ipv6]:port or :port, got {address!r}")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"-health-addr has an unclosed IPv6 bracket: {address!r}")
    return host.strip("[]"), int(port)


class _HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        host, port = address
        # IPv6 when the host is one, or when none is given and the kernel has IPv6: then
        # the socket takes IPv4 too (IPV6_V6ONLY off), as Go's ":8080" does.
        self.dual_stack = not host and socket.has_ipv6 and _ipv6_works()
        if ":" in host or self.dual_stack:
            self.address_family = socket.AF_INET6
        super().__init__((host or ("::" if self.dual_stack else "0.0.0.0"), port), handler)

    def server_bind(self) -> None:
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


def create_health_server(
    address: str, *, ready: Callable[[], bool], metrics: Metrics, live: Callable[[], bool] = lambda: True
) -> ThreadingHTTPServer:
    """Build (and bind, not serve) the health and metrics HTTP server. `live` must be cheap
    and local (it never calls upstream); `ready` may be costly (cache it)."""

    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health/live":
                ok = live()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"not live\n", "text/plain")
            elif path == "/health/ready":
                ok = ready()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"not ready\n", "text/plain")
            elif path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("health %s", format % args)

    return _HealthServer(parse_address(address), Handler)
