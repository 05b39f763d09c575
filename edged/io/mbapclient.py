"""A lean Modbus TCP client for the read hot path: one `asyncio.Protocol` per
TCP connection, one transaction in flight on it.

Why not pymodbus here: a request through `AsyncModbusTcpClient` builds a PDU
object, a framer call chain, a transaction record and a response object, and
costs 60-90 us of CPU; with 1000 meters woken by one boundary that CPU *is*
the spread between the first and the last request on the wire
(docs/performance.md, "Boundary reads"). Here a read request is 12 bytes
encoded once per (unit, function, address, count) with only the transaction
id patched in, the write is one `transport.write`, and a reply is cut from the
stream by its MBAP header and handed back raw: the shell checks it with
:func:`edged.core.replies.reply_problem` (the same check it applies to
pymodbus' frames) before any register is believed. pymodbus stays the client
for RTU and RTU over TCP.

Written from the Modbus Messaging on TCP/IP Implementation Guide v1.0b (3.1.3:
MBAP header = transaction id, protocol id 0, length = unit id + PDU bytes,
unit id) and the Modbus Application Protocol v1.1b3 (6.3/6.4: function 3/4
request = function, address, quantity; reply = function, byte count, data).

Nothing here raises into the caller: a timeout, a lost connection or a byte
stream that cannot be Modbus TCP (protocol id not 0, a length outside 2..254)
comes back as a :class:`edged.core.model.ReadError`; a stream that cannot be
framed is closed, since it can no longer be split into frames.
"""

from __future__ import annotations

import asyncio
import struct

import structlog

from edged.core.model import ReadError, ReadErrorKind
from edged.core.replies import ReceivedFrame

__all__ = ["MbapClientProtocol", "encode_read", "open_connection"]

log = structlog.get_logger("edged.io.mbapclient")

_HEADER = struct.Struct(">HHHB")  # transaction id, protocol id, length, unit id
_HEADER_BYTES = 7
# Length field: the unit id plus a PDU of 1..253 bytes (messaging guide 4.2).
_MIN_LENGTH = 2
_MAX_LENGTH = 254
# Everything of a read request after the transaction id: protocol id 0,
# length 6 (unit + function + address + quantity), unit, function, address,
# quantity.
_REQUEST_TAIL = struct.Struct(">HHBBHH")
_FUNCTION_CODES = {"holding": 3, "input": 4}


def encode_read(unit_id: int, function: str, address: int, count: int) -> bytes:
    """A read request's frame without its 2-byte transaction id (the caller
    prefixes it). Only functions 3 and 4 can be encoded: `function` is
    'holding' or 'input' (KeyError otherwise), so nothing else can be sent."""
    return _REQUEST_TAIL.pack(0, 6, unit_id, _FUNCTION_CODES[function], address, count)


class MbapClientProtocol(asyncio.Protocol):
    """One Modbus TCP connection to a server (a meter or a gateway).

    `exchange` sends one pre-encoded request and waits for the frame that
    answers it (or a `ReadError`); the caller sends one request at a time.
    A frame that arrives while nothing is pending (a reply after its request
    gave up) is dropped: it answers nothing still being asked.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self._name = name
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[ReceivedFrame | ReadError] | None = None
        # The pending request's timeout, cancelled where its answer is set
        # (not from a done-callback: that would cost a loop callback per read).
        self._timer: asyncio.TimerHandle | None = None
        self._tid = 0
        self.closed = False
        self.last_rx_s = 0.0  # loop time of the last bytes received
        self.dropped = 0  # frames that arrived with no request pending

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        reason = f": {exc!r}" if exc is not None else " (closed by the server)"
        self._answer(ReadError(ReadErrorKind.CONNECTION, f"{self._name}: connection lost{reason}"))

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost follows

    def data_received(self, data: bytes) -> None:
        self.last_rx_s = self._loop.time()
        buffer = self._buffer
        if not buffer and len(data) >= _HEADER_BYTES:
            # The common case, one whole reply in one segment: no buffering.
            tid, protocol_id, length, unit_id = _HEADER.unpack_from(data)
            if (
                protocol_id == 0
                and _MIN_LENGTH <= length <= _MAX_LENGTH
                and len(data) == 6 + length
            ):
                self._deliver(ReceivedFrame(unit_id, tid, data[_HEADER_BYTES:]))
                return
        buffer += data
        while len(buffer) >= _HEADER_BYTES:
            tid, protocol_id, length, unit_id = _HEADER.unpack_from(buffer)
            if protocol_id != 0:
                self._broken(f"reply with MBAP protocol id {protocol_id}, not Modbus (0)")
                return
            if not _MIN_LENGTH <= length <= _MAX_LENGTH:
                self._broken(f"reply with MBAP length {length}, outside 2..254")
                return
            end = 6 + length
            if len(buffer) < end:
                return  # the rest of the frame is still under way
            frame = ReceivedFrame(unit_id, tid, bytes(buffer[_HEADER_BYTES:end]))
            del buffer[:end]
            self._deliver(frame)

    # -- requests ----------------------------------------------------------------

    async def exchange(self, tail: bytes, timeout_s: float) -> ReceivedFrame | ReadError:
        """Send one request (`tail` from :func:`encode_read`) under a fresh
        transaction id and wait up to `timeout_s` for a frame."""
        sent = self.send(tail, timeout_s)
        if isinstance(sent, ReadError):
            return sent
        return await sent

    def send(
        self, tail: bytes, timeout_s: float | None
    ) -> asyncio.Future[ReceivedFrame | ReadError] | ReadError:
        """Put one request on the wire now; the future of its answer (a frame,
        or a ReadError after `timeout_s`). Nothing else may be sent until it
        is done. `timeout_s` None: no timer yet, the caller arms one later
        (:meth:`arm`) or cancels the future."""
        transport = self._transport
        if transport is None or self.closed:
            return ReadError(ReadErrorKind.CONNECTION, f"{self._name}: not connected")
        # 1..65535: a reply carrying transaction id 0 never matches (some
        # servers answer 0 whatever was asked).
        tid = self._tid = self._tid % 0xFFFF + 1
        if self._timer is not None:  # left by a request its caller abandoned
            self._timer.cancel()
            self._timer = None
        waiter: asyncio.Future[ReceivedFrame | ReadError] = self._loop.create_future()
        self._waiter = waiter
        transport.write(tid.to_bytes(2, "big") + tail)
        if timeout_s is not None:
            self.arm(waiter, timeout_s, timeout_s)
        return waiter

    def arm(
        self, waiter: asyncio.Future[ReceivedFrame | ReadError], in_s: float, timeout_s: float
    ) -> None:
        """Time `waiter` out in `in_s` (the request's `timeout_s` minus the
        time it has been on the wire already)."""
        if waiter.done() or waiter is not self._waiter:
            return
        self._timer = self._loop.call_later(max(in_s, 0.0), _expire, waiter, timeout_s)

    @property
    def transaction_id(self) -> int:
        """The transaction id of the last request sent."""
        return self._tid

    def close(self) -> None:
        self.closed = True
        self._buffer.clear()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- internals -----------------------------------------------------------------

    def _deliver(self, frame: ReceivedFrame) -> None:
        # A done waiter (answered, timed out or cancelled) answers nothing more.
        if self._waiter is None or self._waiter.done():
            self.dropped += 1
            log.debug("unsolicited modbus frame dropped", link=self._name,
                      transaction_id=frame.transaction_id)  # fmt: skip
            return
        self._settled()
        self._waiter.set_result(frame)

    def _answer(self, error: ReadError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._settled()
            self._waiter.set_result(error)

    def _settled(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _broken(self, detail: str) -> None:
        """The stream cannot be split into frames any more: fail what is
        pending and close (the link reconnects on its next request)."""
        self._answer(ReadError(ReadErrorKind.MALFORMED, detail))
        self.close()


def _expire(waiter: asyncio.Future[ReceivedFrame | ReadError], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_result(ReadError(ReadErrorKind.TIMEOUT, f"no answer within {timeout_s:g}s"))


async def open_connection(
    host: str, port: int, timeout_s: float, name: str
) -> MbapClientProtocol | str:
    """A connected protocol, or why the connection could not be made."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            _, protocol = await loop.create_connection(
                lambda: MbapClientProtocol(loop, name), host, port
            )
    except TimeoutError:
        return f"no connection within {timeout_s:g}s"
    except OSError as exc:
        return exc.strerror or repr(exc)
    return protocol
