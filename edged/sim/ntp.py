"""A small NTP server for tests: answers with its local time plus an offset.

``python -m edged.sim.ntp --port P --offset S [--unreachable] [--unsynced]
[--control FILE]``

It answers client (mode 3) requests of NTP versions 1-4 with a server
(mode 4) reply in the request's version, stratum 1, whose receive and
transmit timestamps are ``now + offset_s``; a client therefore measures an
offset of ``offset_s``. ``unsynced`` answers with stratum 16 and leap
indicator 3 (alarm), as a server that lost its reference does;
``unreachable`` drops every request. All three are attributes that tests
change at runtime; a server in another process is steered through its
control file (``--control FILE``): a JSON object such as
``{"offset": -3.0, "unreachable": false, "unsynced": false}`` (or just a
number, the offset), re-read whenever it changes, so an integration test can
step true time backward or forward, or silence the server, while edged runs:

    echo '{"offset": -3.0}' > ntp.control   # true time steps 3 s back
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from edged.sim.signals import until_signalled

log = logging.getLogger("edged.sim.ntp")

NTP_EPOCH_OFFSET_S = 2_208_988_800  # 1900-01-01 to 1970-01-01
NTP_PACKET_BYTES = 48
MODE_CLIENT = 3
MODE_SERVER = 4
STRATUM_PRIMARY = 1
STRATUM_UNSYNCHRONIZED = 16
LEAP_ALARM = 3  # "clock not synchronized"
_PACKET = struct.Struct(">BBbbII4sQQQQ")


def to_ntp_timestamp(unix_s: float) -> int:
    """64-bit NTP timestamp (32.32 fixed point since 1900)."""
    ntp_s = unix_s + NTP_EPOCH_OFFSET_S
    seconds = math.floor(ntp_s)
    fraction = min(int((ntp_s - seconds) * 2**32), 2**32 - 1)
    return ((seconds % 2**32) << 32) | fraction


def from_ntp_timestamp(timestamp: int) -> float:
    return (timestamp >> 32) + (timestamp & 0xFFFFFFFF) / 2**32 - NTP_EPOCH_OFFSET_S


def build_reply(
    request: bytes, receive_s: float, transmit_s: float, *, unsynced: bool = False
) -> bytes | None:
    """The mode-4 reply to ``request``, or None when it is not a client request.

    ``receive_s``/``transmit_s`` are the (offset) unix times the server
    claims; the client's transmit timestamp is echoed as the originate
    timestamp, which is how the client matches reply to request.
    """
    if len(request) < NTP_PACKET_BYTES:
        return None
    first = request[0]
    version, mode = (first >> 3) & 0x7, first & 0x7
    if mode != MODE_CLIENT or not 1 <= version <= 4:
        return None
    poll = request[2]
    client_transmit = int.from_bytes(request[40:48], "big")
    if unsynced:
        leap, stratum, ref_id, reference = LEAP_ALARM, STRATUM_UNSYNCHRONIZED, b"INIT", 0
        root_dispersion = 0xFFFF_FFFF
    else:
        # Stratum 1 with a local reference; last "set" a few seconds ago.
        leap, stratum, ref_id = 0, STRATUM_PRIMARY, b"LOCL"
        reference = to_ntp_timestamp(receive_s - 16)
        root_dispersion = 0x0000_0010  # ~0.25 ms in 16.16 seconds
    return _PACKET.pack(
        (leap << 6) | (version << 3) | MODE_SERVER,
        stratum,
        poll if 4 <= poll <= 17 else 6,
        -20,  # precision 2**-20 s
        0,  # root delay
        root_dispersion,
        ref_id,
        reference,
        client_transmit,
        to_ntp_timestamp(receive_s),
        to_ntp_timestamp(transmit_s),
    )


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: NtpServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        # The transport is the one start() got back (on 3.11 the selector's
        # datagram transport is not a DatagramTransport subclass to narrow to).
        reply = self._server.answer(data)
        if reply is not None and (transport := self._server._transport) is not None:
            transport.sendto(reply, addr)


class NtpServer:
    """UDP NTP server on asyncio; ``offset_s``, ``unsynced`` and ``unreachable``
    may be changed while it runs."""

    def __init__(
        self,
        offset_s: float = 0.0,
        *,
        unsynced: bool = False,
        unreachable: bool = False,
        now_s: Callable[[], float] = time.time,
        control: Path | None = None,
    ) -> None:
        self.offset_s = offset_s
        self.unsynced = unsynced
        self.unreachable = unreachable
        self.now_s = now_s
        self.answered = 0
        self.dropped = 0
        self.control = control
        self._control_seen: tuple[int, int] | None = None
        self._transport: asyncio.DatagramTransport | None = None

    def read_control(self) -> None:
        """Apply the control file if it changed since last read (see the module doc)."""
        if self.control is None:
            return
        try:
            stat = self.control.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
            if seen == self._control_seen:
                return
            text = self.control.read_text()
        except OSError:
            return
        try:
            data = json.loads(text)
        except ValueError:
            log.warning("control file %s is not JSON: %r", self.control, text)
            return
        self._control_seen = seen
        if isinstance(data, int | float) and not isinstance(data, bool):
            data = {"offset": data}
        if not isinstance(data, dict):
            log.warning("control file %s: expected an object or a number", self.control)
            return
        if "offset" in data:
            self.offset_s = float(data["offset"])
        if "unreachable" in data:
            self.unreachable = bool(data["unreachable"])
        if "unsynced" in data:
            self.unsynced = bool(data["unsynced"])
        log.info("control: offset=%s unreachable=%s unsynced=%s",
                 self.offset_s, self.unreachable, self.unsynced)  # fmt: skip

    def answer(self, request: bytes) -> bytes | None:
        self.read_control()
        if self.unreachable:
            self.dropped += 1
            return None
        receive_s = self.now_s() + self.offset_s
        reply = build_reply(
            request, receive_s, self.now_s() + self.offset_s, unsynced=self.unsynced
        )
        if reply is None:
            self.dropped += 1
        else:
            self.answered += 1
        return reply

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and serve; returns the bound port (``port=0``: a free one)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(host, port)
        )
        self._transport = transport
        bound: int = transport.get_extra_info("sockname")[1]
        return bound

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edged.sim.ntp", description="NTP test server with an offset."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="UDP port (default 0: a free one)")
    parser.add_argument("--offset", type=float, default=0.0, help="seconds added to local time")
    parser.add_argument("--unreachable", action="store_true", help="drop every request")
    parser.add_argument("--unsynced", action="store_true", help="answer stratum 16, leap 3")
    parser.add_argument(
        "--control",
        type=Path,
        default=None,
        help='JSON file re-read when it changes: {"offset": S, "unreachable": B, "unsynced": B}',
    )
    return parser


async def _run(args: argparse.Namespace) -> int:
    server = NtpServer(
        args.offset, unsynced=args.unsynced, unreachable=args.unreachable, control=args.control
    )
    try:
        port = await server.start(args.host, args.port)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"listening ntp {args.host}:{port} offset={args.offset}", flush=True)
    try:
        await until_signalled()
    finally:
        await server.stop()
    print("stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
