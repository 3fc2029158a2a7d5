"""A small TCP/unix-socket forwarder in front of a real server, for tests.

It listens on a unix socket or a loopback port and copies bytes both ways to a TCP
target. Used to reach OpenBao through a Vault-Agent-like unix socket, and (with its
switches) to inject delay or refuse connections in front of a real server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Forwarder:
    def __init__(
        self, target: tuple[str, int] | list[tuple[str, int]], *, unix_path: str | None = None, port: int = 0
    ) -> None:
        # Several targets: round robin per connection, skipping targets that refuse, like a
        # Kubernetes Service in front of a Vault cluster.
        self.targets = target if isinstance(target, list) else [target]
        self._next = 0
        self.unix_path = unix_path
        if unix_path:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(unix_path)
        else:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.delay_seconds = 0.0
        self.connections = 0
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="forwarder-accept", daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for s in list(self._sockets):
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), name="forwarder", daemon=True).start()

    def _connect(self) -> socket.socket | None:
        for _ in range(len(self.targets)):
            with self._lock:
                target = self.targets[self._next % len(self.targets)]
                self._next += 1
            try:
                return socket.create_connection(target, timeout=2)
            except OSError:
                continue
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream = self._connect()
        if upstream is None:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.update((client, upstream))
        threading.Thread(target=self._pipe, args=(upstream, client, False), name="forwarder", daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, delayed: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if delayed and self.delay_seconds:
                    time.sleep(self.delay_seconds)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)
