"""A bound AF_UNIX datagram socket collecting sd_notify messages."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path


@contextlib.asynccontextmanager
async def datagrams(path: Path, arrived: asyncio.Event | None = None) -> AsyncIterator[list[bytes]]:
    """Every datagram sent to `path`, collected in the background (`arrived`,
    if given, is set on each)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    got: list[bytes] = []
    loop = asyncio.get_running_loop()

    async def receive() -> None:
        while True:
            got.append(await loop.sock_recv(sock, 4096))
            if arrived is not None:
                arrived.set()

    task = asyncio.create_task(receive())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
