"""A minimal MQTT 5 broker for tests: accepts a connection, answers QoS 1
publishes with a PUBACK whose reason code the test chooses per topic, and
records what it accepted. Only what edged's publisher sends is understood
(CONNECT, PUBLISH, SUBSCRIBE, PINGREQ, DISCONNECT), written from the MQTT 5.0
specification (OASIS, 2019), sections 2.1-2.2 and 3.1-3.14."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

# (topic) -> PUBACK reason code; 0 accepts
Decide = Callable[[str], int]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def _read_varint(reader: asyncio.StreamReader) -> int:
    value, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7


def _skip_varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


class FakeMqtt5Broker:
    def __init__(self, decide: Decide) -> None:
        self.decide = decide
        self.accepted: list[tuple[str, bytes]] = []
        self.refused: list[tuple[str, int]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                body = await reader.readexactly(await _read_varint(reader))
                kind = first >> 4
                if kind == 1:  # CONNECT -> CONNACK: no session, success, no properties
                    writer.write(bytes((0x20, 3, 0, 0, 0)))
                elif kind == 3:  # PUBLISH
                    qos = (first >> 1) & 3
                    length = int.from_bytes(body[0:2], "big")
                    topic = body[2 : 2 + length].decode()
                    at = 2 + length
                    packet_id = body[at : at + 2]
                    if qos:
                        at += 2
                    props, at = _skip_varint(body, at)
                    payload = body[at + props :]
                    code = self.decide(topic)
                    if code:
                        self.refused.append((topic, code))
                    else:
                        self.accepted.append((topic, payload))
                    if qos == 1:
                        writer.write(bytes((0x40, 4)) + packet_id + bytes((code, 0)))
                elif kind == 8:  # SUBSCRIBE -> SUBACK granting QoS 1
                    packet_id = body[0:2]
                    props, at = _skip_varint(body, 2)
                    at += props
                    codes = bytearray()
                    while at < len(body):
                        length = int.from_bytes(body[at : at + 2], "big")
                        at += 2 + length + 1
                        codes.append(1)
                    rest = packet_id + b"\x00" + bytes(codes)
                    writer.write(bytes((0x90,)) + _varint(len(rest)) + rest)
                elif kind == 12:  # PINGREQ
                    writer.write(bytes((0xD0, 0)))
                elif kind == 14:  # DISCONNECT
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
