"""An HTTP reverse proxy in front of a real OpenBao that can answer in Vault's place.

Requests pass through unchanged unless a rule matches (method and path prefix); then
the rule decides: a canned status and body, a delay before forwarding, or a dropped
connection. This is how the tests show a sealed, slow or broken Vault without mocking
Vault itself: everything that does not match still reaches the real server.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog is 5: a Mount opening ten connections at once would
    # see SYNs dropped and retried a second later, which no real Vault (Go: 4096) does.
    request_queue_size = 128


@dataclass
class Rule:
    method: str  # "*" for any
    path_prefix: str  # e.g. "/v1/auth/kubernetes/login"
    status: int | None = None  # answer with this status instead of forwarding
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    drop: bool = False  # close the connection without answering
    drip_seconds: float = 0.0  # with status: send the reply one byte at a time, this far apart
    drip_headers: bool = False  # drip the status line and headers too, not only the body
    chunked: bool = False  # with status: send the body chunked (64 KiB chunks), no Content-Length
    times: int | None = None  # apply this many times, then stop matching
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (self.method in ("*", method)) and path.startswith(self.path_prefix)


class FaultProxy:
    """`prefix`: the proxy serves Vault under that path (a gateway at https://gw/vault) and
    strips it before forwarding; anything else is 404. Every request's Authorization
    header is kept in `authorizations`."""

    def __init__(self, target_port: int, *, prefix: str = "") -> None:
        self.target_port = target_port
        self.prefix = prefix
        self.authorizations: list[str | None] = []
        self.rules: list[Rule] = []
        self.forwarded: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.authorizations.append(self.headers.get("Authorization"))
                if proxy.prefix:
                    if not self.path.startswith(proxy.prefix + "/"):
                        self.send_response(404)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.path = self.path[len(proxy.prefix) :]
                rule = proxy._match(self.command, self.path)
                if rule is not None:
                    if rule.delay_seconds:
                        time.sleep(rule.delay_seconds)
                    if rule.drop:
                        self.close_connection = True
                        self.connection.close()
                        return
                    if rule.status is not None and rule.drip_seconds:
                        self._drip(rule)
                        return
                    if rule.status is not None and rule.chunked:
                        self._chunked(rule)
                        return
                    if rule.status is not None:
                        self.send_response(rule.status)
                        for key, value in rule.headers.items():
                            self.send_header(key, value)
                        if rule.status != 204:
                            self.send_header("Content-Length", str(len(rule.body)))
                        self.end_headers()
                        if rule.status != 204:
                            self.wfile.write(rule.body)
                        return
                with proxy._lock:
                    proxy.forwarded.append((self.command, self.path))
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (its deadline): nothing to answer
                    self.close_connection = True

            def _chunked(self, rule: Rule) -> None:
                assert rule.status is not None
                self.send_response(rule.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for start in range(0, len(rule.body), 65536):
                        chunk = rule.body[start : start + 65536]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True  # the client stopped reading: as it should past a limit

            def _drip(self, rule: Rule) -> None:
                head = (
                    f"HTTP/1.1 {rule.status} OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(rule.body)}\r\n\r\n"
                ).encode()
                self.close_connection = True
                try:
                    if not rule.drip_headers:
                        self.wfile.write(head)
                        self.wfile.flush()
                        head = b""
                    for i in range(len(head) + len(rule.body)):
                        self.wfile.write((head + rule.body)[i : i + 1])
                        self.wfile.flush()
                        time.sleep(rule.drip_seconds)
                except OSError:
                    pass  # the client hung up: what the provider should do at its deadline

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_LIST = _handle

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    return rule
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
