"""Lean floors: what a Mount cannot beat, measured with the leanest client Python has.

`http.client` on a kept-alive connection for a raw Vault read and login (no session, no
adapters, no retries), ten of them from ten threads each on its own connection, and a
no-op gRPC `Version` call. A floor measured through a heavier client flatters the ratio.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from provider import http1


class RawVault:
    """One kept-alive connection to Vault, requests as bare as they come."""

    def __init__(self, port: int) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def read(self, path: str, token: str) -> bytes:
        self._connection.request("GET", f"/v1/{path}", headers={"X-Vault-Token": token})
        response = self._connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"raw read of {path}: HTTP {response.status}")
        return body

    def login(self, role: str, jwt: str) -> str:
        body = json.dumps({"role": role, "jwt": jwt})
        self._connection.request(
            "POST", "/v1/auth/kubernetes/login", body=body, headers={"Content-Type": "application/json"}
        )
        response = self._connection.getresponse()
        reply: Any = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"raw login: HTTP {response.status}")
        return str(reply["auth"]["client_token"])

    def close(self) -> None:
        self._connection.close()


class LeanRead:
    """One kept-alive connection read with the provider's own HTTP/1.1 (provider.http1),
    no pool, deadline or retries: what a read costs the provider's client at its barest."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._connection = http1.Connection(socket.create_connection(("127.0.0.1", port), timeout=30))

    def read(self, path: str, token: str) -> bytes:
        self._connection.send(
            http1.request("GET", f"/v1/{path}", f"127.0.0.1:{self._port}", {"X-Vault-Token": token}, None)
        )
        reply = self._connection.read_reply("GET", 1 << 20)
        if reply.head.status != 200:
            raise RuntimeError(f"lean read of {path}: HTTP {reply.head.status}")
        return reply.body

    def close(self) -> None:
        self._connection.close()


class ParallelReads:
    """Ten threads, each with its own kept-alive connection, reading ten paths at once."""

    def __init__(self, port: int, paths: list[str], token: str) -> None:
        self._paths, self._token, self._port = paths, token, port
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=len(paths))
        self._clients: list[RawVault] = []
        self._lock = threading.Lock()

    def _client(self) -> RawVault:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = RawVault(self._port)
            with self._lock:
                self._clients.append(client)
        return client

    def __call__(self) -> None:
        list(self._pool.map(lambda path: self._client().read(path, self._token), self._paths))

    def close(self) -> None:
        self._pool.shutdown()
        for client in self._clients:
            client.close()


def sequential(client: RawVault, paths: list[str], token: str) -> Callable[[], None]:
    """The reference's shape: one read after another on one connection."""

    def run() -> None:
        for path in paths:
            client.read(path, token)

    return run
