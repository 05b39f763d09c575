"""Modbus links: the I/O shell around pymodbus.

A :class:`Link` is one shared line to one or more meters:

* :class:`TcpEndpoint` — a Modbus TCP host:port (a meter, or a gateway with
  several unit ids behind it): ``max_connections`` connections (default 1)
  fed from one request queue, optional quiet time between transactions;
* :class:`RtuBus` — a serial port (Modbus RTU): one transaction on the wire
  at a time, the 3.5-character inter-frame silence kept before every request;
* :class:`RtuOverTcpEndpoint` — RTU frames through a TCP serial device server,
  one transaction at a time as on the bus behind it.

:func:`build_links` groups the configured devices by port/endpoint and gives
every device its link. Each link has one :class:`edged.io.bus.BusScheduler`:
boundary reads first, in a stable order; dead units backed off; fast polls
yielding around boundaries (see that module).

**Read-only by design.** edged reads meters; it never changes them. The link
API has no write operation, and the only Modbus functions this module can put
on the wire are 3 (read holding registers) and 4 (read input registers),
chosen from :class:`edged.core.registers.ReadRequest.function`, which admits
nothing else. Configuration cannot ask for a write either.

Modbus TCP goes through edged's own lean client (:mod:`edged.io.mbapclient`:
requests encoded once, replies cut by their MBAP header; a pymodbus request
costs 60-90 us of CPU, which at a 1000-meter boundary *is* the spread); RTU
and RTU over TCP through pymodbus. Either way every reply is checked with
:func:`edged.core.replies.reply_problem` before a register is believed. A read
that finds its single-connection TCP link idle goes on the wire from the
caller's task, without the worker (:meth:`BusScheduler.direct`), and a
boundary read's first request is sent at the boundary instant itself
(:meth:`ScheduledLink.presend`).

Nothing here raises into the poller: every failed, garbled, truncated or
stalled exchange becomes a :class:`edged.core.model.ReadError` value. pymodbus'
own timeout bounds each request, and a bus-level guard timeout bounds it again
in case a broken reply leaves pymodbus waiting, so no reply can hang a bus;
the lean client's own timer bounds each TCP request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.framer.socket import FramerSocket

from edged.config.schema import (
    Device,
    RtuTransport,
    TcpTransport,
)
from edged.core.backoff import Backoff
from edged.core.model import Flag, ReadError, ReadErrorKind
from edged.core.plan import AnyTransport, LinkConfigError, LinkIdentity, check_links, link_identity
from edged.core.registers import (
    MalformedResponse,
    ReadPlan,
    ReadRequest,
    apply_plan,
    decode_response,
)
from edged.core.replies import ReceivedFrame, reply_problem
from edged.io.bus import BusScheduler, Job, Priority
from edged.io.mbapclient import MbapClientProtocol, encode_read, open_connection
from edged.io.serialdiag import SerialLine, probe_serial_port

__all__ = [
    "EXCEPTION_NAMES",
    "DeviceRead",
    "Link",
    "Priority",
    "RawRead",
    "RtuBus",
    "RtuOverTcpEndpoint",
    "ScheduledLink",
    "TcpEndpoint",
    "build_links",
    "read_device",
    "rtu_frame_gap_s",
]

log = structlog.get_logger("edged.io.modbus")

# pymodbus logs every timeout and reconnect at ERROR/WARNING through the stdlib;
# edged reports the same facts once, as structured read errors.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
# Exception answers that mean "nobody answered behind the gateway": they cost
# the gateway's own timeout, so the unit is backed off like a silent one.
_GATEWAY_NO_ANSWER = frozenset({10, 11})
# Added to a request's timeout for the bus-level guard around pymodbus.
GUARD_S = 0.5
# Inter-frame silences shorter than this (every RTU silence: 32 ms at 1200 Bd)
# are timed by polling the clock for their last millisecond (see
# _Connection._quiet); longer, configured TCP gaps need no such precision.
SPIN_BELOW_S = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class RawRead:
    """What one device's requests returned (decoded, not yet scaled).

    ``queued_s`` is how long the read waited for the line before its first
    request went out (add it to the time the read was asked for to get the
    time it was taken; negative when the request was sent at the boundary
    instant, before the read was asked for: ScheduledLink.presend);
    ``duration_s`` is its time on the wire; ``notes`` lists optional
    requests (status, clock) that failed without failing the read.
    """

    values: dict[str, int | float]
    registers: tuple[tuple[int, tuple[int, ...]], ...]
    error: ReadError | None
    queued_s: float = 0.0
    duration_s: float = 0.0
    notes: tuple[str, ...] = ()


class Link(Protocol):
    """What a poller reads through. There is deliberately no write method."""

    @property
    def name(self) -> str: ...

    async def read(
        self,
        unit_id: int,
        requests: Sequence[ReadRequest],
        *,
        priority: Priority = Priority.BOUNDARY,
        optional: Sequence[ReadRequest] = (),
        timeout_s: float | None = None,
    ) -> RawRead: ...

    def expect_boundary(self, in_s: float) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def rtu_frame_gap_s(baudrate: int, parity: str = "E", stopbits: int = 1) -> float:
    """The 3.5-character silence between RTU frames; fixed at 1.75 ms above
    19200 Bd (Modbus over serial line v1.02, 2.5.1.1)."""
    if baudrate > 19200:
        return 0.00175
    bits = 1 + 8 + (0 if parity.upper() == "N" else 1) + stopbits
    return 3.5 * bits / baudrate


@dataclass(frozen=True, slots=True)
class _Payload:
    requests: tuple[ReadRequest, ...]
    optional: tuple[ReadRequest, ...]


# pymodbus' trace_packet hook: (sending, bytes) -> bytes, called as bytes go
# out and as they come in.
PacketTrace = Callable[[bool, bytes], bytes]
# Builds a link's client; the client must call the given trace on every packet.
ClientFactory = Callable[[PacketTrace], ModbusBaseClient]


def client_factory(
    framer: FramerType,
    timeout_s: float,
    *,
    host: str = "",
    port: int = 0,
    serial: SerialLine | None = None,
) -> ClientFactory:
    """The one way edged builds a pymodbus client: over TCP (`host`, `port`)
    or a serial line, with the given framing.

    retries=0: a boundary read is not retried within the interval, it is
    recorded as failed (MISSING) and the next boundary tries again; the link
    reconnects itself (reconnect_delay=0), and every packet goes through the
    link's trace so the RTU silence is timed from the reply's last byte."""

    def factory(trace: PacketTrace) -> ModbusBaseClient:
        common: dict[str, Any] = {
            "framer": framer,
            "timeout": timeout_s,
            "retries": 0,
            "reconnect_delay": 0,
            "trace_packet": trace,
        }
        if serial is not None:
            return AsyncModbusSerialClient(
                serial.port,
                baudrate=serial.baudrate,
                bytesize=serial.bytesize,
                parity=serial.parity,
                stopbits=serial.stopbits,
                **common,
            )
        return AsyncModbusTcpClient(host, port=port, **common)

    return factory


class _Connection:
    """One pymodbus client (one TCP connection or one open serial port)."""

    def __init__(
        self,
        name: str,
        factory: ClientFactory | None,
        gap_s: float,
        diagnose: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self.name = name
        self._factory = factory
        # Why a failed connect failed, when the client does not say (serial ports).
        self._diagnose = diagnose
        self._gap_s = gap_s
        self._client: ModbusBaseClient | None = None
        self._backoff = Backoff()
        self._retry_at = 0.0
        self._last_end = 0.0  # when the line last fell silent (loop time)
        self._last_rx = 0.0  # when the client last received bytes (loop time)
        # Frames the framer cut since the current request went out, with the
        # PDU pymodbus decoded from each: the raw frame of a reply is checked
        # (function code, byte count, unit and transaction id) before its
        # registers are believed (see edged.core.replies).
        self._frames: list[tuple[Any, ReceivedFrame]] = []
        self._tid_framing = True
        self.connects = 0

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._last_rx = asyncio.get_running_loop().time()
        return data

    async def _connected(self) -> ModbusBaseClient | ReadError:
        client = self._client
        if client is not None and client.connected:
            return client
        now = asyncio.get_running_loop().time()
        if now < self._retry_at:
            return ReadError(
                ReadErrorKind.CONNECTION,
                f"{self.name} unreachable; next attempt in {self._retry_at - now:.1f}s",
            )
        if client is not None:
            client.close()
        assert self._factory is not None
        client = self._client = self._factory(self._trace)
        self._watch_frames(client)
        try:
            ok = await client.connect()
        except Exception as exc:  # pymodbus/pyserial raise a variety here
            ok = False
            log.debug("connect raised", link=self.name, error=repr(exc))
        if not ok:
            delay_s = self._backoff.failed()
            self._retry_at = now + delay_s
            reason = await self._diagnose() if self._diagnose is not None else None
            detail = f"cannot connect to {self.name}" + (f": {reason}" if reason else "")
            log.warning("modbus connect failed", link=self.name, retry_in_s=delay_s,
                        reason=reason)  # fmt: skip
            return ReadError(ReadErrorKind.CONNECTION, detail)
        if self._backoff.current_s:
            log.info("modbus connected", link=self.name)
        self._backoff.succeeded()
        self.connects += 1
        return client

    def _watch_frames(self, client: ModbusBaseClient) -> None:
        """Wrap the client's framer so every frame it cuts is kept with the
        PDU decoded from it. pymodbus keeps neither the raw function code nor
        the byte count it was sent, and matches replies only loosely."""
        ctx: Any = client.ctx
        framer: Any = ctx.framer
        decode = framer.decode
        handle = framer.handleFrame
        cut: list[ReceivedFrame] = []

        def decode_kept(data: bytes) -> tuple[int, int, int, bytes]:
            used, unit, tid, pdu = decode(data)
            if pdu:
                cut.append(ReceivedFrame(unit_id=unit, transaction_id=tid, pdu=bytes(pdu)))
            return used, unit, tid, pdu

        def handle_kept(data: bytes, exp_devid: int, exp_tid: int) -> tuple[int, Any]:
            cut.clear()
            used, pdu = handle(data, exp_devid, exp_tid)
            if pdu is not None and cut:
                self._frames.append((pdu, cut[-1]))
            return used, pdu

        framer.decode = decode_kept
        framer.handleFrame = handle_kept
        self._tid_framing = isinstance(framer, FramerSocket)

    def _frame_of(self, response: Any) -> ReceivedFrame | None:
        for pdu, frame in self._frames:
            if pdu is response:
                return frame
        return None

    async def _open(self) -> ReadError | None:
        """Connect if not connected; the error when that cannot be done now."""
        client = await self._connected()
        return client if isinstance(client, ReadError) else None

    async def run(
        self,
        unit_id: int,
        payload: _Payload,
        timeout_s: float,
        *,
        queued_s: float = 0.0,
        presented: _Sent | None = None,
    ) -> RawRead:
        """A device's requests in order; the first failure of a required one ends it.

        `queued_s` is passed through to the result; `duration_s` is measured
        from this call (one RawRead per read, not one per step). `presented`:
        the first request is already on the wire (ScheduledLink.presend)."""
        started_s = asyncio.get_running_loop().time()

        def done(
            values: dict[str, int | float],
            registers: list[tuple[int, tuple[int, ...]]],
            error: ReadError | None,
            notes: tuple[str, ...] = (),
        ) -> RawRead:
            return RawRead(
                values=values,
                registers=tuple(registers),
                error=error,
                queued_s=queued_s,
                duration_s=asyncio.get_running_loop().time() - started_s,
                notes=notes,
            )

        error = None if presented is not None else await self._open()
        if error is not None:
            return done({}, [], error)
        values: dict[str, int | float] = {}
        registers: list[tuple[int, tuple[int, ...]]] = []
        for request in payload.requests:
            if presented is not None:
                words = await self._answer(unit_id, request, presented)
                presented = None
            else:
                words = await self._exchange(unit_id, request, timeout_s)
            if isinstance(words, ReadError):
                return done(values, registers, words)
            try:
                values.update(decode_response(request, words))
            except MalformedResponse as exc:
                return done(values, registers, ReadError(ReadErrorKind.MALFORMED, str(exc)))
            registers.append((request.address, words))
        if not payload.optional:
            return done(values, registers, None)
        notes: list[str] = []
        for request in payload.optional:
            words = await self._exchange(unit_id, request, timeout_s)
            try:
                if isinstance(words, ReadError):
                    raise MalformedResponse(f"{words.kind}: {words.detail}")
                values.update(decode_response(request, words))
                registers.append((request.address, words))
            except MalformedResponse as exc:
                notes.append(f"{request.function} {request.address}+{request.count}: {exc}")
                if isinstance(words, ReadError) and words.kind is not ReadErrorKind.EXCEPTION:
                    break  # the unit went quiet or the line broke: stop here
        return done(values, registers, None, tuple(notes))

    async def _answer(
        self, unit_id: int, request: ReadRequest, sent: _Sent
    ) -> tuple[int, ...] | ReadError:
        """The checked answer to a request sent ahead (lean TCP client only)."""
        raise NotImplementedError

    async def _quiet(self) -> None:
        """Keep the inter-frame silence (RTU) / configured gap before sending,
        counted from the previous reply's last byte (see `_exchange`).

        The event loop sleeps in whole milliseconds (epoll), rounded up, which
        would stretch a 1.75 ms silence at 38400 Bd to 2-3 ms, a fifth of a
        transaction, and a 4 ms one at 9600 Bd by up to a millisecond. So a
        silence shorter than `SPIN_BELOW_S` is finished by polling the clock
        for its last millisecond (at most ~1 ms of CPU per transaction)."""
        if not self._gap_s:
            return
        loop = asyncio.get_running_loop()
        until = self._last_end + self._gap_s
        delay_s = until - loop.time()
        if delay_s <= 0:
            return
        if delay_s >= SPIN_BELOW_S:
            await asyncio.sleep(delay_s)
            return
        if delay_s > 0.001:
            await asyncio.sleep(delay_s - 0.001)
        while loop.time() < until:
            pass

    async def _exchange(
        self, unit_id: int, request: ReadRequest, timeout_s: float
    ) -> tuple[int, ...] | ReadError:
        client = self._client
        if client is None:
            return ReadError(ReadErrorKind.CONNECTION, f"{self.name}: connection closed")
        await self._quiet()
        loop = asyncio.get_running_loop()
        sent_s = loop.time()
        answered = False
        # The timeout is per device, the client per link: set it for this request.
        client.ctx.comm_params.timeout_connect = timeout_s
        # Only function 3 or 4 can be sent: ReadRequest.function admits nothing else.
        call = (
            client.read_holding_registers
            if request.function == "holding"
            else client.read_input_registers
        )
        self._frames.clear()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the
            # call in a task of its own, one more task and loop iteration per
            # request (a loop iteration, 0.1-0.2 ms, before the request goes out,
            # and the largest single cost in a profile of fast polling).
            async with asyncio.timeout(timeout_s + GUARD_S):
                response: Any = await call(request.address, count=request.count, device_id=unit_id)
            answered = True
        except TimeoutError:
            # pymodbus did not give up on its own: reset the client.
            self.close()
            return ReadError(ReadErrorKind.TIMEOUT, f"no answer within {timeout_s:g}s (bus guard)")
        except ModbusIOException as exc:
            text = _short(exc)
            kind = ReadErrorKind.TIMEOUT if "No response" in text else ReadErrorKind.MALFORMED
            # Bytes of this reply may still be under way (a slow unit behind a
            # gateway trickling its answer): they would land in the next
            # unit's transaction. A new connection starts clean.
            self.close()
            return ReadError(kind, text)
        except ConnectionException as exc:
            return ReadError(ReadErrorKind.CONNECTION, _short(exc))
        except ModbusException as exc:
            self.close()
            return ReadError(ReadErrorKind.MALFORMED, _short(exc))
        except OSError as exc:
            self.close()
            return ReadError(ReadErrorKind.CONNECTION, repr(exc))
        except Exception as exc:  # a pymodbus decoding bug must not stop the loop
            self.close()
            return ReadError(ReadErrorKind.MALFORMED, repr(exc))
        finally:
            # The silence starts with the reply's last byte, not when pymodbus
            # has finished with it (at 38400 Bd that is an eighth of the
            # silence). Without a complete reply more bytes may be under way:
            # count from now.
            answered = answered and self._last_rx >= sent_s
            self._last_end = self._last_rx if answered else loop.time()
        ctx: Any = client.ctx
        problem = reply_problem(
            self._frame_of(response),
            function=request.function,
            count=request.count,
            unit_id=unit_id,
            transaction_id=int(ctx.request_transaction_id) if self._tid_framing else None,
        )
        if problem is not None:
            # The stream can no longer be trusted to be in step: start afresh.
            self.close()
            return ReadError(ReadErrorKind.MALFORMED, problem)
        if response.isError():
            code = getattr(response, "exception_code", None)
            name = EXCEPTION_NAMES.get(code or -1, "unknown exception")
            return ReadError(
                ReadErrorKind.EXCEPTION, f"modbus exception {code} ({name})", exception_code=code
            )
        words = getattr(response, "registers", None)
        if not isinstance(words, list) or len(words) != request.count:
            got = len(words) if isinstance(words, list) else "no"
            return ReadError(
                ReadErrorKind.MALFORMED, f"expected {request.count} registers, got {got}"
            )
        return tuple(int(w) for w in words)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


# Register words of a reply, big-endian, by register count (Struct per count).
_WORDS: dict[int, struct.Struct] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sent:
    """A request sent ahead (presend): its transaction id, the future of its
    answer, when it went out (loop time) and the timeout it has."""

    transaction_id: int
    answer: asyncio.Future[ReceivedFrame | ReadError]
    protocol: MbapClientProtocol
    sent_s: float
    timeout_s: float


class _TcpConnection(_Connection):
    """One Modbus TCP connection through the lean client (edged.io.mbapclient):
    pre-encoded requests, replies cut by their MBAP header and checked with
    `reply_problem` as pymodbus' are. Same failure handling as the pymodbus
    connection: a timeout or a reply that does not answer the request closes
    the connection (bytes of it may still be under way); an exception reply
    keeps it; a failed connect is retried with backoff."""

    def __init__(self, name: str, host: str, port: int, timeout_s: float, gap_s: float) -> None:
        super().__init__(name, None, gap_s)
        self._host = host
        self._port = port
        self._connect_timeout_s = timeout_s
        self._protocol: MbapClientProtocol | None = None
        # (unit, function, address, count) -> the request frame after its
        # transaction id: encoded once, not per read.
        self._requests: dict[tuple[int, str, int, int], bytes] = {}

    async def _open(self) -> ReadError | None:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return None
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self._retry_at:
            return ReadError(
                ReadErrorKind.CONNECTION,
                f"{self.name} unreachable; next attempt in {self._retry_at - now:.1f}s",
            )
        self.close()
        opened = await open_connection(self._host, self._port, self._connect_timeout_s, self.name)
        if isinstance(opened, str):
            delay_s = self._backoff.failed()
            self._retry_at = now + delay_s
            log.warning("modbus connect failed", link=self.name, retry_in_s=delay_s,
                        reason=opened)  # fmt: skip
            return ReadError(ReadErrorKind.CONNECTION, f"cannot connect to {self.name}: {opened}")
        if self._backoff.current_s:
            log.info("modbus connected", link=self.name)
        self._backoff.succeeded()
        self._protocol = opened
        self.connects += 1
        return None

    async def _exchange(
        self, unit_id: int, request: ReadRequest, timeout_s: float
    ) -> tuple[int, ...] | ReadError:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return ReadError(ReadErrorKind.CONNECTION, f"{self.name}: connection closed")
        gap = self._gap_s
        if gap:
            await self._quiet()
            sent_s = asyncio.get_running_loop().time()
        reply = await protocol.exchange(self._tail(unit_id, request), timeout_s)
        if gap:
            # The configured gap counts from the reply's last byte.
            answered = not isinstance(reply, ReadError) and protocol.last_rx_s >= sent_s
            self._last_end = protocol.last_rx_s if answered else asyncio.get_running_loop().time()
        return self._checked(unit_id, request, reply, protocol.transaction_id)

    def _tail(self, unit_id: int, request: ReadRequest) -> bytes:
        key = (unit_id, request.function, request.address, request.count)
        tail = self._requests.get(key)
        if tail is None:
            tail = self._requests[key] = encode_read(*key)
        return tail

    def presend(
        self, unit_id: int, request: ReadRequest, timeout_s: float, now_s: float
    ) -> _Sent | None:
        """Put `request` on the wire now, if connected (and no gap is
        configured). Its timeout is armed when it is claimed (`_answer`),
        counted from now: a timer per request would double the cost of the
        send at the boundary instant."""
        protocol = self._protocol
        if protocol is None or protocol.closed or self._gap_s:
            return None
        answer = protocol.send(self._tail(unit_id, request), None)
        if isinstance(answer, ReadError):
            return None
        return _Sent(
            transaction_id=protocol.transaction_id,
            answer=answer,
            protocol=protocol,
            sent_s=now_s,
            timeout_s=timeout_s,
        )

    async def _answer(
        self, unit_id: int, request: ReadRequest, sent: _Sent
    ) -> tuple[int, ...] | ReadError:
        elapsed_s = asyncio.get_running_loop().time() - sent.sent_s
        sent.protocol.arm(sent.answer, sent.timeout_s - elapsed_s, sent.timeout_s)
        reply = await sent.answer
        if isinstance(reply, ReadError):
            self.close()
            return reply
        return self._checked(unit_id, request, reply, sent.transaction_id)

    def _checked(
        self,
        unit_id: int,
        request: ReadRequest,
        reply: ReceivedFrame | ReadError,
        transaction_id: int,
    ) -> tuple[int, ...] | ReadError:
        if isinstance(reply, ReadError):
            # A timeout: bytes of the reply may still be under way and would
            # land in the next transaction. A new connection starts clean.
            self.close()
            return reply
        problem = reply_problem(
            reply,
            function=request.function,
            count=request.count,
            unit_id=unit_id,
            transaction_id=transaction_id,
        )
        if problem is not None:
            # The stream can no longer be trusted to be in step: start afresh.
            self.close()
            return ReadError(ReadErrorKind.MALFORMED, problem)
        pdu = reply.pdu
        if pdu[0] & 0x80:
            code = pdu[1]
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            return ReadError(
                ReadErrorKind.EXCEPTION, f"modbus exception {code} ({name})", exception_code=code
            )
        words = _WORDS.get(request.count)
        if words is None:
            words = _WORDS[request.count] = struct.Struct(f">{request.count}H")
        result: tuple[int, ...] = words.unpack_from(pdu, 2)
        return result

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None


def _unresponsive(error: ReadError | None) -> bool:
    if error is None:
        return False
    if error.kind in (ReadErrorKind.TIMEOUT, ReadErrorKind.MALFORMED):
        return True
    return error.kind is ReadErrorKind.EXCEPTION and error.exception_code in _GATEWAY_NO_ANSWER


class ScheduledLink:
    """A link: a scheduler and one worker per connection."""

    kind = "link"

    def __init__(
        self,
        name: str,
        factory: ClientFactory | None,
        *,
        connections: int,
        gap_s: float,
        timeout_s: float,
        diagnose: Callable[[], Awaitable[str | None]] | None = None,
        connection: Callable[[str], _Connection] | None = None,
    ) -> None:
        """`connection` builds each connection from its name (the lean TCP
        client); without it, each is a pymodbus client from `factory`."""
        self._name = name
        self._scheduler: BusScheduler[RawRead] = BusScheduler(name, default_timeout_s=timeout_s)
        names = [name if connections == 1 else f"{name}#{i + 1}" for i in range(connections)]
        self._connections = [
            connection(n) if connection is not None else _Connection(n, factory, gap_s, diagnose)
            for n in names
        ]
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self.gap_s = gap_s
        # One lean TCP connection: a read finding the line idle and nothing
        # queued goes on the wire from the caller's task (BusScheduler.direct).
        first = self._connections[0]
        self._direct = first if isinstance(first, _TcpConnection) and connections == 1 else None
        self._line_busy = False
        self._line_free = asyncio.Event()
        # A boundary read's first request sent at the boundary instant, before
        # its poller asked for it (presend): the job, the request, what was sent.
        self._presented: tuple[Job[RawRead], ReadRequest, _Sent] | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def scheduler(self) -> BusScheduler[RawRead]:
        return self._scheduler

    def register_unit(self, unit_id: int, timeout_s: float) -> None:
        self._scheduler.register_unit(unit_id, timeout_s)

    def set_units(self, units: Sequence[tuple[int, float]]) -> None:
        """The units on this line after a config reload, in read order."""
        self._scheduler.set_units(units)

    def expect_boundary(self, in_s: float) -> None:
        self._scheduler.expect_boundary(self._scheduler.now() + in_s)

    async def read(
        self,
        unit_id: int,
        requests: Sequence[ReadRequest],
        *,
        priority: Priority = Priority.BOUNDARY,
        optional: Sequence[ReadRequest] = (),
        timeout_s: float | None = None,
    ) -> RawRead:
        """Queue a device's read and wait for it; never raises (but may be cancelled)."""
        if self._closed:
            return RawRead(
                values={},
                registers=(),
                error=ReadError(ReadErrorKind.CONNECTION, f"{self.name} is closed"),
            )
        reason = self._scheduler.admit(unit_id, priority)
        if reason is not None:
            return RawRead(
                values={},
                registers=(),
                error=ReadError(ReadErrorKind.BACKOFF, f"unit {unit_id}: {reason}"),
            )
        payload = _Payload(tuple(requests), tuple(optional))
        if self._presented is not None:
            self._expire_presented()  # one nobody claimed in time answers no read
        presented = self._presented
        if (
            presented is not None
            and presented[0].unit_id == unit_id
            and priority is Priority.BOUNDARY
            and requests
            and requests[0] is presented[1]
            and self._direct is not None
        ):
            self._presented = None
            job, _, sent = presented
            job.payload = payload
            return await self._run_direct(self._direct, job, sent)
        if self._direct is not None and not self._line_busy:
            direct = self._scheduler.direct(unit_id, priority, payload, timeout_s)
            if direct is not None:
                return await self._run_direct(self._direct, direct)
        if not self._workers:
            self._workers = [
                asyncio.get_running_loop().create_task(self._work(c), name=f"link {c.name}")
                for c in self._connections
            ]
        job = self._scheduler.submit(unit_id, priority, payload, timeout_s)
        return await job.future

    def presend(self, unit_id: int, requests: Sequence[ReadRequest]) -> bool:
        """Put a boundary read's first request on the wire now: called at the
        boundary instant itself (edged.io.clock.BoundaryWaiter.at_instant),
        before the poller wakes and asks for the read with the same
        `requests`; `read` then only waits for the answer. With a thousand
        meters the requests leave in one tight loop, a send each, instead of
        one poller step each (docs/performance.md, "Boundary reads").

        Only where the read would go on the wire at once anyway
        (BusScheduler.direct: one lean TCP connection, idle, one unit) and
        the unit is in good standing; False otherwise (the read then takes
        the ordinary way)."""
        connection = self._direct
        if (
            connection is None
            or self._line_busy
            or self._closed
            or self._presented is not None
            or not requests
            or self._scheduler.unit(unit_id).backoff.offline
        ):
            return False
        job = self._scheduler.direct(unit_id, Priority.BOUNDARY, None)
        if job is None:
            return False
        sent = connection.presend(unit_id, requests[0], job.timeout_s, job.submitted_s)
        if sent is None:
            return False
        self._line_busy = True
        self._scheduler.started(job)
        self._presented = (job, requests[0], sent)
        return True

    def _expire_presented(self) -> None:
        """Release the line from a presend nobody claimed within its timeout
        (its poller stopped, or was re-planned): checked by every other read
        and by a worker waiting for the line, so no timer is needed per send."""
        presented = self._presented
        if presented is None:
            return
        job, _, sent = presented
        if self._scheduler.now() - sent.sent_s < sent.timeout_s + GUARD_S:
            return
        self._presented = None
        sent.answer.cancel()
        # Its answer (if any) is not a read anybody records; the connection
        # starts afresh in case the reply is still under way.
        if self._direct is not None:
            self._direct.close()
        self._scheduler.finished(job, ok=False, unresponsive=False, timeout=False)
        self._line_busy = False
        self._line_free.set()

    async def _run_direct(
        self, connection: _Connection, job: Job[RawRead], presented: _Sent | None = None
    ) -> RawRead:
        scheduler = self._scheduler
        queued_s = 0.0
        if presented is None:
            self._line_busy = True
            scheduler.started(job)
        else:
            # Sent before it was asked for: the read was taken this long ago.
            queued_s = job.started_s - scheduler.now()
        raw: RawRead | None = None
        try:
            raw = await connection.run(
                job.unit_id, job.payload, job.timeout_s, queued_s=queued_s, presented=presented
            )
        finally:
            self._line_busy = False
            if raw is None:
                # Cancelled mid-exchange: a late reply must not meet the next
                # request on this connection. (A queued read's worker finishes
                # its exchange instead.)
                connection.close()
                scheduler.finished(job, ok=False, unresponsive=False, timeout=False)
            self._line_free.set()  # a worker holding a job waits for this
        self._account(job, raw)
        return raw

    def _account(self, job: Job[RawRead], raw: RawRead) -> None:
        error = raw.error
        if error is None:
            self._scheduler.finished(job, ok=True, unresponsive=False, timeout=False)
            return
        unresponsive = _unresponsive(error)
        self._scheduler.finished(
            job,
            ok=False,
            unresponsive=unresponsive,
            timeout=error.kind is ReadErrorKind.TIMEOUT,
        )
        if unresponsive:
            log.debug("unit unresponsive", link=self.name, unit=job.unit_id, error=error.detail)

    async def _work(self, connection: _Connection) -> None:
        scheduler = self._scheduler
        while True:
            job: Job[RawRead] = await scheduler.take()
            if self._line_busy:
                # A read went on the wire directly while this worker waited:
                # put the job back and choose again once the line is free
                # (something more urgent may have arrived meanwhile).
                scheduler.putback(job)
                self._line_free.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._line_free.wait(), self._scheduler.default_timeout_s + GUARD_S
                    )
                self._expire_presented()
                continue
            self._line_busy = self._direct is not None
            scheduler.started(job)
            try:
                raw = await connection.run(
                    job.unit_id,
                    job.payload,
                    job.timeout_s,
                    queued_s=job.started_s - job.submitted_s,
                )
            finally:
                self._line_busy = False
            self._account(job, raw)
            if not job.future.done():
                job.future.set_result(raw)

    def status(self) -> dict[str, Any]:
        """Figures for the gateway status payload."""
        stats = self._scheduler.stats
        return {
            "link": self.name,
            "kind": self.kind,
            "connections": len(self._connections),
            "transactions": stats.transactions,
            "failures": stats.failures,
            "timeouts": stats.timeouts,
            "skipped": stats.skipped,
            "queue": self._scheduler.depth,
            "last_spread_ms": stats.last_spread_ms,
            "max_spread_ms": stats.max_spread_ms,
            "last_wave_ms": stats.last_wave_ms,
            "last_wave_devices": stats.last_wave_devices,
            "units_offline": self._scheduler.offline_units(),
        }

    def close(self) -> None:
        """Stop the workers and close the connections (reads in flight are cancelled)."""
        self._closed = True
        if self._presented is not None:
            self._presented[2].answer.cancel()
            self._presented = None
        for task in self._workers:
            task.cancel()
        self._workers = []
        for connection in self._connections:
            connection.close()

    async def aclose(self) -> None:
        workers = list(self._workers)
        self.close()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class TcpEndpoint(ScheduledLink):
    """One Modbus TCP host:port, shared by every unit id behind it."""

    kind = "tcp"

    def __init__(
        self,
        host: str,
        port: int,
        timeout_s: float = 1.0,
        *,
        max_connections: int = 1,
        request_gap_ms: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        gap_s = request_gap_ms / 1000.0

        super().__init__(
            f"tcp://{host}:{port}",
            None,
            connections=max_connections,
            gap_s=gap_s,
            timeout_s=timeout_s,
            connection=lambda name: _TcpConnection(name, host, port, timeout_s, gap_s),
        )


class RtuOverTcpEndpoint(ScheduledLink):
    """RTU framing through a TCP serial device server: one transaction at a time."""

    kind = "rtu_over_tcp"

    def __init__(self, host: str, port: int, timeout_s: float = 1.0) -> None:
        self.host = host
        self.port = port

        super().__init__(
            f"rtu+tcp://{host}:{port}",
            client_factory(FramerType.RTU, timeout_s, host=host, port=port),
            connections=1,
            gap_s=0.0,
            timeout_s=timeout_s,
        )


class RtuBus(ScheduledLink):
    """A serial port with Modbus RTU devices on it: one transaction in flight,
    the inter-frame silence kept before each request."""

    kind = "rtu"

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "E",
        bytesize: int = 8,
        stopbits: int = 1,
        timeout_s: float = 1.0,
    ) -> None:
        self.port = port
        self.baudrate = baudrate

        line = SerialLine(
            port=port, baudrate=baudrate, bytesize=bytesize, parity=parity, stopbits=stopbits
        )

        async def diagnose() -> str | None:
            return await asyncio.to_thread(probe_serial_port, line)

        super().__init__(
            f"rtu://{port}",
            client_factory(FramerType.RTU, timeout_s, serial=line),
            connections=1,
            gap_s=rtu_frame_gap_s(baudrate, parity, stopbits),
            timeout_s=timeout_s,
            diagnose=diagnose,
        )


# ------------------------------------------------------------------------------
# Grouping devices into links


def build_links(
    devices: Iterable[Device], reuse: Mapping[LinkIdentity, ScheduledLink] | None = None
) -> dict[str, ScheduledLink]:
    """One link per serial port / TCP endpoint, keyed by device id.

    Devices are registered on their link in the order given (the config
    order), which is the order their boundary reads go on the wire. A link in
    `reuse` with the same identity is kept (a config reload: its connection
    and per-unit backoff carry on) and its units are replaced. Raises
    :class:`LinkConfigError` when devices sharing a port disagree on its
    settings (baud rate, parity, TCP connections …).
    """
    devices = list(devices)
    problems = check_links(devices)
    if problems:
        raise LinkConfigError("; ".join(problems))
    by_identity: dict[LinkIdentity, ScheduledLink] = {}
    units: dict[LinkIdentity, list[tuple[int, float]]] = {}
    links: dict[str, ScheduledLink] = {}
    for device in devices:
        transport = device.transport
        identity = link_identity(transport)
        link = by_identity.get(identity)
        if link is None:
            link = (reuse or {}).get(identity) or _new_link(transport)
            by_identity[identity] = link
        if any(unit == transport.unit_id for unit, _ in units.get(identity, ())):
            log.info("two devices read one unit", device=device.id, unit=transport.unit_id)
        units.setdefault(identity, []).append((transport.unit_id, transport.timeout))
        links[device.id] = link
    for identity, link in by_identity.items():
        link.set_units(units[identity])
    return links


def _new_link(transport: AnyTransport) -> ScheduledLink:
    if isinstance(transport, TcpTransport):
        return TcpEndpoint(
            transport.host,
            transport.port,
            transport.timeout,
            max_connections=transport.max_connections,
            request_gap_ms=transport.request_gap_ms,
        )
    if isinstance(transport, RtuTransport):
        return RtuBus(
            transport.port,
            baudrate=transport.baudrate,
            parity=transport.parity,
            bytesize=transport.bytesize,
            stopbits=transport.stopbits,
            timeout_s=transport.timeout,
        )
    return RtuOverTcpEndpoint(transport.host, transport.port, transport.timeout)


# ------------------------------------------------------------------------------
# Reading one device


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRead:
    """One device read, scaled: what the poller turns into a `Read`."""

    values: Mapping[str, int | float]
    flags: frozenset[Flag]
    meter_clock_offset_s: float | None
    registers: tuple[tuple[int, tuple[int, ...]], ...]
    error: ReadError | None
    queued_s: float
    duration_s: float
    notes: tuple[str, ...]
    # power-of-ten exponent per scale-registered value (PlanResult.scale_factors)
    scale_factors: Mapping[str, int] = field(default_factory=dict)


async def read_device(
    link: Link,
    unit_id: int,
    plan: ReadPlan,
    *,
    priority: Priority = Priority.BOUNDARY,
    reference_s: float | None = None,
) -> DeviceRead:
    """Read ``plan`` through ``link`` and apply it (scaling, status, clock).

    ``reference_s`` is the reference time (epoch s) at which the read was
    asked for; the meter clock is compared with it plus the time the read
    queued for the line.
    """
    raw = await link.read(unit_id, plan.requests, priority=priority, optional=plan.optional)
    if raw.error is not None:
        return DeviceRead(
            values={},
            flags=frozenset(),
            meter_clock_offset_s=None,
            registers=raw.registers,
            error=raw.error,
            queued_s=raw.queued_s,
            duration_s=raw.duration_s,
            notes=raw.notes,
        )
    at_s = None if reference_s is None else reference_s + raw.queued_s
    result = apply_plan(plan, raw.values, at_s)
    return DeviceRead(
        values=result.values,
        flags=result.flags,
        meter_clock_offset_s=result.meter_clock_offset_s,
        registers=raw.registers,
        error=None,
        queued_s=raw.queued_s,
        duration_s=raw.duration_s,
        notes=raw.notes + result.problems,
        scale_factors=result.scale_factors,
    )


def _short(exc: Exception) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text.replace("Modbus Error: ", "")[:200]
