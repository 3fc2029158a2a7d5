"""A TCP proxy holding every chunk a fixed time in each direction: Vault on another node.

    python -m bench.delay_proxy LISTEN_PORT TARGET_PORT DELAY_SECONDS

Runs in its own process so its event loop does not share a GIL with what it measures.
Prints "ready" once listening. Order within a direction is kept (equal delays fire in
the order they were scheduled).
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(65536):
            loop.call_later(delay, writer.write, data)
    except ConnectionError:
        pass
    finally:
        loop.call_later(delay, writer.close)


async def _handle(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, target: int, delay: float
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(_pipe(client_reader, upstream_writer, delay), _pipe(upstream_reader, client_writer, delay))


async def _serve(listen: int, target: int, delay: float) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, target, delay), "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    listen, target, delay = int(argv[0]), int(argv[1]), float(argv[2])
    asyncio.run(_serve(listen, target, delay))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
