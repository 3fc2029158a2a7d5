"""Health and metrics over HTTP: /health/live, /health/ready and /metrics.

Liveness never calls upstream. Readiness asks our own gRPC socket for Version, at
most once per READY_CACHE_SECONDS, so a probe storm costs nothing.
"""

from __future__ import annotations

import logging
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
    """':8080' -> ('0.0.0.0', 8080); 'host:port' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"-health-addr must be host:port or :port, got {address!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def create_health_server(address: str, *, ready: Callable[[], bool], metrics: Metrics) -> ThreadingHTTPServer:
    """Build (and bind, not serve) the health and metrics HTTP server."""

    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health/live":
                self._reply(200, b"ok\n", "text/plain")
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

    server = ThreadingHTTPServer(parse_address(address), Handler)
    server.daemon_threads = True
    return server
