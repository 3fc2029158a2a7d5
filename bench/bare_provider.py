"""The barest Mount Python can serve: what the provider's shape costs before any of its work.

A grpc.aio server on a unix socket whose Mount reads its paths from Vault with
`http.client`, all requests sent on kept-alive connections (one each) before any reply is
read, and answers each body as a file: no class parsing, login, cache, versions, metrics
or logs. With `thread` the read runs on a worker thread handed the job
the way the provider hands a Mount (one future, one call back to the loop); with `loop`
it blocks the event loop (no thread, which a real provider cannot afford); `lean` is
`thread` reading with the provider's own HTTP/1.1 (provider.http1), leaner than http.client;
`aio` reads on the event loop without blocking it (non-blocking sockets, asyncio's
sock_sendall and sock_recv, the reply parsed by provider.http1): what a provider that
answered warm Mounts on its loop, with no thread hand-off, could reach at best. The bench
measures it like the provider: the gap between the two is what Python and grpcio charge
for a Mount's shape, the gap to the provider what the provider's own work costs.

Run: python -m bench.bare_provider SOCKET VAULT_PORT thread|loop|lean|aio
Mount attributes: {"paths": [...], "token": ...}; with `lean` or `aio`, {"paths": [...], "jwt": ...}
is the bare cold Mount: a kubernetes login with the pod's token first, then the reads
(with `aio`, on the loop: what a provider answering cold Mounts there could reach).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio

from provider import http1
from provider._proto import service_pb2, service_pb2_grpc
from provider.loopio import Incomplete, Received


class BareProvider(service_pb2_grpc.CSIDriverProviderServicer):
    def __init__(self, vault_port: int, mode: str) -> None:
        self._port = vault_port
        self._mode = mode
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=4)

    def _read(self, attributes: str) -> list[bytes]:
        parsed = json.loads(attributes)
        paths: list[str] = parsed["paths"]
        if self._mode == "lean":
            token = self._login_lean(parsed["jwt"]) if "jwt" in parsed else parsed["token"]
            return self._read_lean(paths, token)
        connections: list[http.client.HTTPConnection] = self._local.__dict__.setdefault("connections", [])
        while len(connections) < len(paths):
            connections.append(http.client.HTTPConnection("127.0.0.1", self._port, timeout=30))
        used = connections[: len(paths)]
        for connection, path in zip(used, paths, strict=True):
            connection.request("GET", f"/v1/{path}", headers={"X-Vault-Token": parsed["token"]})
        return [connection.getresponse().read() for connection in used]

    def _read_lean(self, paths: list[str], token: str) -> list[bytes]:
        """The same reads with the provider's own HTTP/1.1 (provider.http1)."""
        connections: list[http1.Connection] = self._local.__dict__.setdefault("lean", [])
        while len(connections) < len(paths):
            connections.append(http1.Connection(socket.create_connection(("127.0.0.1", self._port), timeout=30)))
        used = connections[: len(paths)]
        host = f"127.0.0.1:{self._port}"
        for connection, path in zip(used, paths, strict=True):
            connection.send(http1.request("GET", f"/v1/{path}", host, {"X-Vault-Token": token}, None))
        return [connection.read_reply("GET", 1 << 20).body for connection in used]

    def _login_lean(self, jwt: str) -> str:
        """A cold Mount's login (the bench role, kubernetes auth) with provider.http1: the
        bare cold Mount logs in with the pod's token, then reads."""
        connections: list[http1.Connection] = self._local.__dict__.setdefault("lean", [])
        if not connections:
            connections.append(http1.Connection(socket.create_connection(("127.0.0.1", self._port), timeout=30)))
        body = json.dumps({"role": "bench", "jwt": jwt}).encode()
        headers = {"Content-Type": "application/json"}
        connections[0].send(
            http1.request("POST", "/v1/auth/kubernetes/login", f"127.0.0.1:{self._port}", headers, body)
        )
        reply = json.loads(connections[0].read_reply("POST", 1 << 20).body)
        return str(reply["auth"]["client_token"])

    async def _read_aio(self, attributes: str) -> list[bytes]:
        """The reads on the loop: all sent, then each reply received as it arrives (a
        Vault reply arrives whole in one receive on loopback; a longer one is received on)."""
        parsed = json.loads(attributes)
        paths: list[str] = parsed["paths"]
        loop = asyncio.get_running_loop()
        connections: list[socket.socket] = self.__dict__.setdefault("aio", [])
        while len(connections) < len(paths):
            connection = socket.create_connection(("127.0.0.1", self._port), timeout=30)
            connection.setblocking(False)
            connections.append(connection)
        used = connections[: len(paths)]
        host = f"127.0.0.1:{self._port}"
        token = parsed.get("token")
        if "jwt" in parsed:  # the bare cold Mount on the loop: its login first, as with `lean`
            body = json.dumps({"role": "bench", "jwt": parsed["jwt"]}).encode()
            login = http1.request("POST", "/v1/auth/kubernetes/login", host, {"Content-Type": "application/json"}, body)
            await loop.sock_sendall(used[0], login)
            token = str(json.loads(await _reply_aio(loop, used[0], "POST"))["auth"]["client_token"])
        for connection, path in zip(used, paths, strict=True):
            request = http1.request("GET", f"/v1/{path}", host, {"X-Vault-Token": token}, None)
            await loop.sock_sendall(connection, request)
        return [await _reply_aio(loop, connection, "GET") for connection in used]

    async def Version(self, request: Any, context: Any) -> service_pb2.VersionResponse:
        return service_pb2.VersionResponse(version="v1alpha1", runtime_name="bare", runtime_version="0")

    async def Mount(self, request: Any, context: Any) -> service_pb2.MountResponse:
        if self._mode == "aio":
            bodies = await self._read_aio(request.attributes)
        elif self._mode == "loop":
            bodies = self._read(request.attributes)
        else:
            loop = asyncio.get_running_loop()
            answer: asyncio.Future[list[bytes]] = loop.create_future()

            def job() -> None:
                outcome = self._read(request.attributes)
                loop.call_soon_threadsafe(answer.set_result, outcome)

            self._executor.submit(job)
            bodies = await answer
        names = [f"secret-{i}" for i in range(len(bodies))]
        return service_pb2.MountResponse(
            files=[
                service_pb2.File(path=name, mode=0o644, contents=body) for name, body in zip(names, bodies, strict=True)
            ],
            object_version=[service_pb2.ObjectVersion(id=name, version="0") for name in names],
        )


async def _reply_aio(loop: asyncio.AbstractEventLoop, connection: socket.socket, method: str) -> bytes:
    """A reply's body, received on the loop until it is whole."""
    received = b""
    while True:
        received += await loop.sock_recv(connection, 65536)
        try:
            return http1.Connection(Received(received)).read_reply(method, 1 << 20).body  # type: ignore[arg-type]
        except Incomplete:
            continue


async def serve(socket: str, vault_port: int, mode: str) -> None:
    server = grpc.aio.server()
    service_pb2_grpc.add_CSIDriverProviderServicer_to_server(BareProvider(vault_port, mode), server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
