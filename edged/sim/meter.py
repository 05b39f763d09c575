"""Modbus meter simulator: TCP, RTU on a serial line or pty, RTU over TCP.

A :class:`SimulatedMeter` is one Modbus unit with a register map of points:

* :class:`CounterPoint` — an energy pulse counter driven by a load,
  ``counts = initial_counts + load_kw * elapsed_h / kwh_per_count`` evaluated
  when a request is received, wrapped modulo ``rollover``;
* :class:`StaticPoint` — a fixed value (settable at runtime);
* :class:`ClockPoint` — the meter's own clock, epoch seconds, with an offset;
* :class:`StatusPoint` — a uint16 status bit field.

A :class:`MeterServer` serves several units (``{unit_id: SimulatedMeter}``)
over any number of transports and injects faults per unit. It is written on
raw asyncio instead of pymodbus' server because it has to send deliberately
broken replies and take a serial line's time (requests and replies) at its
baud rate.

Unknown unit ids: over Modbus TCP (MBAP) the server answers like a gateway,
exception 11 "gateway target device failed to respond", by default (pass
``unknown_unit=UnknownUnitPolicy.SILENT`` or ``CLOSE`` to change that); over
RTU (serial or TCP) it stays silent, as a slave on a shared bus must. A unit
with the ``offline`` fault is handled exactly like an unknown unit. On TCP,
unit ids 0 and 255 address the only meter when the server has exactly one
(real TCP meters answer to them).

CLI::

    python -m edged.sim.meter --port 5020 --units 1,2,3 --load-kw 1000 \
        --kwh-per-count 0.144 [--scenario file.yaml] [--rtu pty|/dev/ttyX]

prints one ``listening <transport> <address> ...`` line per transport and
runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import logging
import math
import os
import random
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from types import TracebackType
from typing import Self

from edged.sim.faults import Fault, FaultKind
from edged.sim.modbus_frames import (
    MBAP_HEADER_BYTES,
    DataType,
    ExceptionCode,
    ModbusError,
    Order,
    RtuRequestAssembler,
    char_time_s,
    encode_value,
    exception_pdu,
    frame_gap_s,
    mbap_frame,
    parse_mbap_header,
    parse_read_request,
    read_response_pdu,
    rtu_frame,
)
from edged.sim.scenario import (
    Action,
    ActionKind,
    ScenarioError,
    due_actions,
    load_scenario,
    next_due_s,
    order_actions,
    parse_action_flag,
)
from edged.sim.signals import until_signalled

log = logging.getLogger("edged.sim.meter")

NowFn = Callable[[], float]

DEFAULT_ROLLOVER = 2**32
# Where the default (PMC-1-like) meter exposes its clock and status word. These
# are simulator conventions, not PMC-1 facts: the PMC-1 map only fixes the
# channel-1 pulse count at holding register 0.
DEFAULT_CLOCK_REGISTER = 100
DEFAULT_STATUS_REGISTER = 102


class Table(StrEnum):
    HOLDING = "holding"  # read with function 3
    INPUT = "input"  # read with function 4


def _check_address(address: int, data_type: DataType) -> None:
    if not 0 <= address <= 0x10000 - data_type.register_count:
        raise ValueError(f"address {address} does not fit {data_type} in 0..65535")


@dataclass(frozen=True, kw_only=True)
class CounterPoint:
    """An energy pulse counter advancing with ``load_kw``."""

    address: int = 0
    name: str = "channel1"
    table: Table = Table.HOLDING
    data_type: DataType = DataType.UINT32
    word_order: Order = "big"
    byte_order: Order = "big"
    kwh_per_count: float = 0.144
    initial_counts: int = 0
    load_kw: float = 1000.0
    rollover: int = DEFAULT_ROLLOVER

    def __post_init__(self) -> None:
        _check_address(self.address, self.data_type)
        if not (math.isfinite(self.kwh_per_count) and self.kwh_per_count > 0):
            raise ValueError("kwh_per_count must be a positive number")
        if not math.isfinite(self.load_kw):
            raise ValueError("load_kw must be finite")
        if self.rollover < 1:
            raise ValueError("rollover must be positive")
        if self.initial_counts < 0:
            raise ValueError("initial_counts must not be negative")

    @property
    def register_count(self) -> int:
        return self.data_type.register_count


@dataclass(frozen=True, kw_only=True)
class StaticPoint:
    """A value that only changes when told to (:meth:`SimulatedMeter.set_static`)."""

    name: str
    address: int
    value: int | float
    table: Table = Table.HOLDING
    data_type: DataType = DataType.UINT16
    word_order: Order = "big"
    byte_order: Order = "big"

    def __post_init__(self) -> None:
        _check_address(self.address, self.data_type)

    @property
    def register_count(self) -> int:
        return self.data_type.register_count


@dataclass(frozen=True, kw_only=True)
class ClockPoint:
    """The meter's clock: floor(now + clock offset) as epoch seconds."""

    address: int = DEFAULT_CLOCK_REGISTER
    name: str = "clock"
    table: Table = Table.HOLDING
    data_type: DataType = DataType.UINT32
    word_order: Order = "big"
    byte_order: Order = "big"

    def __post_init__(self) -> None:
        _check_address(self.address, self.data_type)

    @property
    def register_count(self) -> int:
        return self.data_type.register_count


@dataclass(frozen=True, kw_only=True)
class StatusPoint:
    """A uint16 status bit field (alarm, tamper, low battery… as the test likes)."""

    address: int = DEFAULT_STATUS_REGISTER
    name: str = "status"
    table: Table = Table.HOLDING
    initial_bits: int = 0

    def __post_init__(self) -> None:
        _check_address(self.address, DataType.UINT16)
        if not 0 <= self.initial_bits <= 0xFFFF:
            raise ValueError("status bits are a uint16")

    @property
    def register_count(self) -> int:
        return 1


Point = CounterPoint | StaticPoint | ClockPoint | StatusPoint


def _exact(value: float) -> Fraction:
    # Via the shortest decimal repr: 0.144 is the decimal 0.144 here, not the
    # nearest binary float, so 1010.304 kW for 900 s at 0.144 kWh/count is
    # exactly 1754 counts instead of 1753.999… floored to 1753.
    return Fraction(repr(float(value)))


class _Counter:
    """Counter state: a base (counts, time) and a load; reads integrate from it."""

    def __init__(self, point: CounterPoint, start_s: float) -> None:
        self.point = point
        self._base_counts = Fraction(point.initial_counts)
        self._base_time_s = _exact(start_s)
        self._load_kw = _exact(point.load_kw)
        self._kwh_per_count = _exact(point.kwh_per_count)
        self._latest_s = self._base_time_s

    @property
    def load_kw(self) -> float:
        return float(self._load_kw)

    def _effective_s(self, now_s: float) -> Fraction:
        # Pulses already counted stay counted: if the time source steps back,
        # the counter holds until time passes the latest instant it has seen.
        self._latest_s = max(self._latest_s, _exact(now_s))
        return self._latest_s

    def exact_counts(self, now_s: float) -> Fraction:
        elapsed_s = self._effective_s(now_s) - self._base_time_s
        return self._base_counts + self._load_kw * elapsed_s / (3600 * self._kwh_per_count)

    def counts(self, now_s: float) -> int:
        return math.floor(self.exact_counts(now_s)) % self.point.rollover

    def set_load(self, load_kw: float, now_s: float) -> None:
        if not math.isfinite(load_kw):
            raise ValueError("load_kw must be finite")
        # Re-base so the energy so far is kept, fractional pulse included.
        self._base_counts = self.exact_counts(now_s)
        self._base_time_s = self._effective_s(now_s)
        self._load_kw = _exact(load_kw)

    def set_counts(self, counts: int, now_s: float) -> None:
        if counts < 0:
            raise ValueError("counts must not be negative")
        self._base_counts = Fraction(counts)
        self._base_time_s = self._effective_s(now_s)


class SimulatedMeter:
    """One Modbus unit: points, runtime state and the faults set on it.

    ``now_s`` is the meter's time source (default ``time.time``); counters
    start counting at ``start_s`` (default: ``now_s()`` at construction).
    With ``fill_gaps`` unmapped registers below the highest mapped one read
    as 0 (like many meters); without, they answer exception 2.
    """

    def __init__(
        self,
        points: Sequence[Point],
        *,
        now_s: NowFn = time.time,
        start_s: float | None = None,
        fill_gaps: bool = False,
    ) -> None:
        self.now_s = now_s
        self.fill_gaps = fill_gaps
        self.points = tuple(points)
        start = now_s() if start_s is None else start_s
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise ValueError(f"point names must be unique: {names}")
        if sum(isinstance(p, ClockPoint) for p in self.points) > 1:
            raise ValueError("a meter has at most one clock point")
        if sum(isinstance(p, StatusPoint) for p in self.points) > 1:
            raise ValueError("a meter has at most one status point")
        self._maps: dict[Table, dict[int, tuple[Point, int]]] = {t: {} for t in Table}
        for point in self.points:
            table_map = self._maps[point.table]
            for index in range(point.register_count):
                address = point.address + index
                if address in table_map:
                    other = table_map[address][0].name
                    raise ValueError(f"{point.name} overlaps {other} at {point.table} {address}")
                table_map[address] = (point, index)
        self._counters = {
            p.name: _Counter(p, start) for p in self.points if isinstance(p, CounterPoint)
        }
        self._static = {p.name: p.value for p in self.points if isinstance(p, StaticPoint)}
        status = [p for p in self.points if isinstance(p, StatusPoint)]
        self._status_bits = status[0].initial_bits if status else 0
        self.clock_offset_s = 0.0
        self._faults: dict[FaultKind, tuple[Fault, float | None]] = {}
        # Receive time of every request served, for tests asserting read timing.
        self.request_times_s: deque[float] = deque(maxlen=10_000)

    @classmethod
    def pmc1(
        cls,
        *,
        load_kw: float = 1000.0,
        kwh_per_count: float = 0.144,
        initial_counts: int = 0,
        address: int = 0,
        table: Table = Table.HOLDING,
        data_type: DataType = DataType.UINT32,
        word_order: Order = "big",
        byte_order: Order = "big",
        rollover: int = DEFAULT_ROLLOVER,
        clock_address: int | None = DEFAULT_CLOCK_REGISTER,
        status_address: int | None = DEFAULT_STATUS_REGISTER,
        now_s: NowFn = time.time,
        start_s: float | None = None,
    ) -> SimulatedMeter:
        """The default meter: a PMC-1-like pulse counter, channel 1 at holding
        register 0 (uint32, big-endian), 0.144 kWh per count, 1000 kW, plus a
        clock (uint32 epoch s) and a status word at simulator-chosen registers."""
        points: list[Point] = [
            CounterPoint(
                address=address,
                table=table,
                data_type=data_type,
                word_order=word_order,
                byte_order=byte_order,
                kwh_per_count=kwh_per_count,
                initial_counts=initial_counts,
                load_kw=load_kw,
                rollover=rollover,
            )
        ]
        if clock_address is not None:
            points.append(ClockPoint(address=clock_address))
        if status_address is not None:
            points.append(StatusPoint(address=status_address))
        return cls(points, now_s=now_s, start_s=start_s)

    # -- counters ----------------------------------------------------------

    @property
    def counter_names(self) -> tuple[str, ...]:
        return tuple(self._counters)

    def _counters_for(self, point: str | None) -> list[_Counter]:
        if point is None:
            return list(self._counters.values())
        try:
            return [self._counters[point]]
        except KeyError:
            raise KeyError(f"no counter point {point!r} (have {self.counter_names})") from None

    def _counter(self, point: str | None) -> _Counter:
        counters = self._counters_for(point)
        if not counters:
            raise KeyError("this meter has no counter points")
        return counters[0]

    def counts(self, point: str | None = None, now_s: float | None = None) -> int:
        """Counter value (first counter when ``point`` is None)."""
        return self._counter(point).counts(self.now_s() if now_s is None else now_s)

    def load_kw(self, point: str | None = None) -> float:
        """Load of a counter (first counter when ``point`` is None)."""
        return self._counter(point).load_kw

    def set_load(self, load_kw: float, point: str | None = None) -> None:
        """Change the load from now on (all counters when ``point`` is None)."""
        now = self.now_s()
        for counter in self._counters_for(point):
            counter.set_load(load_kw, now)

    def set_counts(self, counts: int, point: str | None = None) -> None:
        """Reset the counter (to 0 or a value) or jump it, e.g. near the rollover."""
        now = self.now_s()
        for counter in self._counters_for(point):
            counter.set_counts(counts, now)

    # -- status, clock, static ---------------------------------------------

    @property
    def status_bits(self) -> int:
        return self._status_bits

    @status_bits.setter
    def status_bits(self, bits: int) -> None:
        if not 0 <= bits <= 0xFFFF:
            raise ValueError("status bits are a uint16")
        self._status_bits = bits

    def meter_clock_s(self, now_s: float | None = None) -> float:
        return (self.now_s() if now_s is None else now_s) + self.clock_offset_s

    def set_meter_clock(self, epoch_s: float) -> None:
        """Set the meter clock to read ``epoch_s`` now (a dead-battery restart)."""
        self.clock_offset_s = epoch_s - self.now_s()

    def set_static(self, name: str, value: int | float) -> None:
        if name not in self._static:
            raise KeyError(f"no static point {name!r}")
        self._static[name] = value

    # -- faults --------------------------------------------------------------

    def set_fault(self, fault: Fault, *, for_s: float | None = None) -> None:
        """Switch a fault on, for ``for_s`` seconds of meter time or until cleared.

        One fault per kind; different kinds combine (delay + split, say).
        """
        until_s = None if for_s is None else self.now_s() + for_s
        self._faults[fault.kind] = (fault, until_s)

    def clear_faults(self, kind: FaultKind | None = None) -> None:
        if kind is None:
            self._faults.clear()
        else:
            self._faults.pop(kind, None)

    def active_faults(self, now_s: float | None = None) -> dict[FaultKind, Fault]:
        now = self.now_s() if now_s is None else now_s
        for kind, (_, until_s) in list(self._faults.items()):
            if until_s is not None and now >= until_s:
                del self._faults[kind]
        return {kind: fault for kind, (fault, _) in self._faults.items()}

    # -- scenario actions ------------------------------------------------------

    def check_action(self, action: Action) -> None:
        """Raise ScenarioError if ``action`` names something this meter lacks."""
        if action.point is not None and action.point not in self._counters:
            raise ScenarioError(
                f"{action.source}: unit {action.unit} has no counter {action.point!r} "
                f"(has {', '.join(self._counters) or 'none'})"
            )

    def apply(self, action: Action) -> None:
        kind = action.kind
        if action.fault is not None:
            self.set_fault(action.fault, for_s=action.for_s)
        elif kind is ActionKind.CLEAR:
            self.clear_faults(action.clear)
        elif kind in (ActionKind.RESET, ActionKind.JUMP_TO):
            self.set_counts(int(action.value or 0), action.point)
        elif kind is ActionKind.LOAD and action.value is not None:
            self.set_load(action.value, action.point)
        elif kind is ActionKind.STATUS_BITS:
            self.status_bits = int(action.value or 0)
        elif kind is ActionKind.CLOCK_OFFSET:
            self.clock_offset_s = float(action.value or 0.0)
        elif kind is ActionKind.DEAD_BATTERY and action.value is not None:
            self.set_meter_clock(action.value)
        else:  # pragma: no cover - parse_action guarantees the fields
            raise ValueError(f"cannot apply {action}")

    # -- registers -------------------------------------------------------------

    def _encode(self, point: Point, now_s: float) -> tuple[int, ...]:
        if isinstance(point, CounterPoint):
            counts = self._counters[point.name].counts(now_s)
            value: int | float = float(counts) if point.data_type.is_float else counts
            return encode_value(value, point.data_type, point.word_order, point.byte_order)
        if isinstance(point, StaticPoint):
            return encode_value(
                self._static[point.name], point.data_type, point.word_order, point.byte_order
            )
        if isinstance(point, ClockPoint):
            seconds = math.floor(self.meter_clock_s(now_s))
            return encode_value(seconds, point.data_type, point.word_order, point.byte_order)
        return (self._status_bits,)

    def read_registers(
        self, table: Table, address: int, count: int, now_s: float | None = None
    ) -> tuple[int, ...]:
        """Registers as one consistent snapshot at ``now_s``; ModbusError(2) if
        the range touches an unmapped register."""
        now = self.now_s() if now_s is None else now_s
        table_map = self._maps[table]
        top = max(table_map, default=-1)
        encoded: dict[str, tuple[int, ...]] = {}
        registers = []
        for register in range(address, address + count):
            hit = table_map.get(register)
            if hit is None:
                if self.fill_gaps and register <= top:
                    registers.append(0)
                    continue
                raise ModbusError(
                    ExceptionCode.ILLEGAL_DATA_ADDRESS, f"{table} register {register} unmapped"
                )
            point, index = hit
            if point.name not in encoded:
                encoded[point.name] = self._encode(point, now)
            registers.append(encoded[point.name][index])
        return tuple(registers)

    def handle_pdu(self, pdu: bytes, now_s: float | None = None) -> bytes:
        """Answer one request PDU with a response or exception PDU."""
        function_code = pdu[0] if pdu else 0
        try:
            request = parse_read_request(pdu)
            table = Table.HOLDING if request.function_code == 3 else Table.INPUT
            registers = self.read_registers(table, request.address, request.count, now_s)
        except ModbusError as exc:
            return exception_pdu(function_code, exc.code)
        return read_response_pdu(function_code, registers)


class UnknownUnitPolicy(StrEnum):
    """What Modbus TCP (MBAP) does with a unit id it does not serve (or offline)."""

    GATEWAY_EXCEPTION = "gateway_exception"  # exception 11, like a TCP/RTU gateway
    SILENT = "silent"  # no answer: the client times out
    CLOSE = "close"  # drop the TCP connection, like a meter that lost power


Send = Callable[[bytes], Awaitable[None]]
Wrap = Callable[[int, bytes], bytes]


# asyncio waits in whole milliseconds (epoll), rounded up, and a wake-up can be
# a few hundred microseconds late on a loaded machine: a deadline is slept
# towards coarsely until this close, then the clock is polled.
SPIN_S = 0.0015


async def sleep_until(deadline_s: float) -> None:
    """Return at event-loop time ``deadline_s``, not up to a millisecond after.

    Polls the clock for the last `SPIN_S` (CPU the simulator spends so that a
    paced frame ends when the line says, at 38400 Bd a character is 0.29 ms).
    The loop keeps running other callbacks meanwhile."""
    loop = asyncio.get_running_loop()
    coarse_s = deadline_s - loop.time() - SPIN_S
    if coarse_s > 0:
        await asyncio.sleep(coarse_s)
    # A clock poll, not a wait for an event (no one would set it): sleep(0)
    # lets the loop run other callbacks between looks.
    while loop.time() < deadline_s:  # noqa: ASYNC110
        await asyncio.sleep(0)


async def paced_write(
    write: Callable[[bytes], None],
    data: bytes,
    char_s: float | None,
    *,
    start_s: float = 0.0,
) -> None:
    """Write ``data`` no faster than a UART at ``char_s`` seconds per character.

    The first byte starts on the wire now, or at loop time ``start_s`` if that
    is later (a reply to a request whose last byte is still on its way). Byte
    k is handed over when it would have finished on the wire, at
    start + (k + 1) * char_s: the bytes due by each event-loop wake-up in a
    batch, and the rest at the frame's end to the microsecond (an absolute
    deadline from the byte count, not a sum of millisecond sleeps), so a frame
    takes as long as it would on a real line and no longer.
    """
    if not char_s:
        write(data)
        return
    loop = asyncio.get_running_loop()
    start = max(loop.time(), start_s)
    end = start + len(data) * char_s
    sent = 0
    while (now := loop.time()) < end - SPIN_S:
        on_wire = max(0, int((now - start) / char_s))
        if on_wire > sent:
            write(data[sent:on_wire])
            sent = on_wire
        await asyncio.sleep(min(start + (sent + 1) * char_s, end - SPIN_S) - now)
    await sleep_until(end)
    write(data[sent:])


class _SerialLine:
    """One serial device (or pty end) served with RTU framing.

    Both directions take the line's time. A reply starts on the wire no
    earlier than the request's last byte would have arrived (its first byte's
    arrival + length * character time; zero turnaround after that) and is
    paced by `paced_write`: a pty hands the master's bytes over at once,
    which no serial line does, and a slave cannot answer what it has not
    received yet. On a real port the bytes come at that pace anyway and the
    wait is (almost) nil.
    """

    def __init__(
        self,
        server: MeterServer,
        fd: int,
        owned_fds: Sequence[int],
        baudrate: int,
        parity: str,
        stopbits: int,
    ) -> None:
        self._server = server
        self._fd = fd
        self._owned_fds = tuple(owned_fds)
        self.char_s = char_time_s(baudrate, parity, stopbits)
        self._gap_s = frame_gap_s(baudrate, parity, stopbits)
        self._assembler = RtuRequestAssembler()
        self._frames: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._rx_from_s = 0.0  # when the frame being received began to arrive
        self._reply_from_s = 0.0  # when the request being answered is off the wire
        self._silence_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._worker = self._loop.create_task(self._serve_frames(), name="rtu-serial")
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            if exc.errno != errno.EIO:
                log.warning("serial read failed: %s", exc)
        if not data:
            # EIO/EOF: the other end of a pty is closed. The fd stays readable,
            # so stop watching it for a moment instead of spinning.
            self._loop.remove_reader(self._fd)
            self._retry_timer = self._loop.call_later(
                0.05, self._loop.add_reader, self._fd, self._readable
            )
            return
        if not self._assembler.pending:  # a new frame; it cannot start before the last ended
            self._rx_from_s = max(self._loop.time(), self._rx_from_s)
        self._received(self._assembler.feed(data))
        if self._silence_timer is not None:
            self._silence_timer.cancel()
        self._silence_timer = self._loop.call_later(self._gap_s, self._silence)

    def _silence(self) -> None:
        self._silence_timer = None
        self._received(self._assembler.silence())

    def _received(self, frames: list[bytes]) -> None:
        now_s = self._loop.time()
        for frame in frames:
            on_wire_until_s = max(now_s, self._rx_from_s + len(frame) * self.char_s)
            self._frames.put_nowait((frame, on_wire_until_s))
            self._rx_from_s = on_wire_until_s  # a frame right behind starts there

    async def _serve_frames(self) -> None:
        # One frame at a time: an RTU bus is half duplex, master-driven.
        while True:
            frame, self._reply_from_s = await self._frames.get()
            try:
                await self._server.serve_rtu_frame(frame, self.send)
            except Exception:
                log.exception("serving RTU frame %s", frame.hex())

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError:  # BlockingIOError included
                # A line never blocks the sender: bytes nobody reads are lost.
                return
            view = view[written:]

    async def send(self, data: bytes) -> None:
        await paced_write(self._write, data, self.char_s, start_s=self._reply_from_s)

    async def close(self) -> None:
        for timer in (self._silence_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        self._loop.remove_reader(self._fd)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        for fd in self._owned_fds:
            with contextlib.suppress(OSError):
                os.close(fd)


_BAUD_CONSTANTS = {
    rate: getattr(termios, f"B{rate}")
    for rate in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400)
    if hasattr(termios, f"B{rate}")
}


def _configure_raw(fd: int, baudrate: int, parity: str, stopbits: int) -> None:
    """Raw 8-bit mode; on a real port also baud, parity and stop bits."""
    tty.setraw(fd, termios.TCSANOW)
    attrs = termios.tcgetattr(fd)
    cflag = attrs[2] & ~(termios.PARENB | termios.PARODD | termios.CSTOPB)
    if parity.upper() == "E":
        cflag |= termios.PARENB
    elif parity.upper() == "O":
        cflag |= termios.PARENB | termios.PARODD
    if stopbits == 2:
        cflag |= termios.CSTOPB
    attrs[2] = cflag | termios.CLOCAL | termios.CREAD
    if (speed := _BAUD_CONSTANTS.get(baudrate)) is not None:
        attrs[4] = attrs[5] = speed
    try:
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error:
        # Some kernels' ptys reject PARENB with EINVAL (so must pyserial
        # clients on a pty use parity N there). Parity means nothing on a pty;
        # keep the rest. Pacing still counts the configured parity bit.
        attrs[2] &= ~(termios.PARENB | termios.PARODD)
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, attrs)


class MeterServer:
    """Serves ``{unit_id: SimulatedMeter}`` over Modbus TCP, RTU and RTU over TCP.

    ``now_s`` drives scenario timing; each meter has its own time source.
    ``seed`` makes garbage replies reproducible.
    """

    def __init__(
        self,
        meters: Mapping[int, SimulatedMeter],
        *,
        unknown_unit: UnknownUnitPolicy = UnknownUnitPolicy.GATEWAY_EXCEPTION,
        now_s: NowFn = time.time,
        seed: int | None = None,
    ) -> None:
        for unit_id in meters:
            if not 0 <= unit_id <= 255:
                raise ValueError(f"unit id {unit_id} is not 0..255")
        self.meters: dict[int, SimulatedMeter] = dict(meters)
        self.unknown_unit = unknown_unit
        self.now_s = now_s
        self._random = random.Random(seed)
        self._tcp_servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._serial_lines: list[_SerialLine] = []
        self._scenario_tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- transports -------------------------------------------------------------

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve Modbus TCP (MBAP); returns the bound port (``port=0``: a free one)."""
        return await self._listen(self._mbap_connection, host, port)

    async def start_rtu_over_tcp(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        baudrate: int | None = None,
        parity: str = "N",
        stopbits: int = 1,
    ) -> int:
        """Serve RTU frames (CRC, no MBAP) over TCP, as a serial device server
        does. With ``baudrate`` replies are paced as on that serial line."""
        char_s = char_time_s(baudrate, parity, stopbits) if baudrate else None
        # Without a line speed there is no character time; 20 ms of quiet ends
        # a frame whose length cannot be told from its function code.
        gap_s = frame_gap_s(baudrate, parity, stopbits) if baudrate else 0.02
        handler = functools.partial(self._rtu_tcp_connection, char_s=char_s, gap_s=gap_s)
        return await self._listen(handler, host, port)

    async def _listen(
        self,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        host: str,
        port: int,
    ) -> int:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            except asyncio.CancelledError:
                # Only stop() cancels these tasks. Ending normally matters on
                # Python 3.11, whose streams callback logs a traceback for a
                # cancelled connection task (fixed in 3.12).
                pass
            finally:
                self._connections.discard(task)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        server = await asyncio.start_server(tracked, host, port)
        self._tcp_servers.append(server)
        bound_port: int = server.sockets[0].getsockname()[1]
        return bound_port

    async def start_rtu(
        self, device: str | int, *, baudrate: int = 9600, parity: str = "E", stopbits: int = 1
    ) -> None:
        """Serve RTU on a serial device path, or on an already open fd (e.g. the
        master side of ``os.openpty()``; the server uses a duplicate, so the
        caller still owns and closes its fd)."""
        if isinstance(device, int):
            fd = os.dup(device)
        else:
            fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        os.set_blocking(fd, False)
        with contextlib.suppress(termios.error):
            _configure_raw(fd, baudrate, parity, stopbits)
        self._serial_lines.append(_SerialLine(self, fd, [fd], baudrate, parity, stopbits))

    async def start_rtu_pty(
        self, *, baudrate: int = 9600, parity: str = "E", stopbits: int = 1
    ) -> str:
        """Create a pty pair, serve RTU on its master side and return the path of
        the slave side (``/dev/pts/N``) for the client (pyserial opens a path).

        The server keeps its own fd on the slave open so the master never sees
        EIO while the client reconnects, and sets it raw so no byte (0x0a, 0x11,
        0x13…) is translated or echoed before the client configures it.
        """
        master, slave = os.openpty()
        _configure_raw(slave, baudrate, parity, stopbits)
        os.set_blocking(master, False)
        self._serial_lines.append(
            _SerialLine(self, master, [master, slave], baudrate, parity, stopbits)
        )
        return os.ttyname(slave)

    async def stop(self) -> None:
        for task in list(self._scenario_tasks):
            task.cancel()
        for server in self._tcp_servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        for server in self._tcp_servers:
            await server.wait_closed()
        await asyncio.gather(*self._connections, *self._scenario_tasks, return_exceptions=True)
        for line in self._serial_lines:
            await line.close()
        self._tcp_servers.clear()
        self._serial_lines.clear()

    # -- connections --------------------------------------------------------------

    async def _mbap_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        while True:
            header = parse_mbap_header(await reader.readexactly(MBAP_HEADER_BYTES))
            if header.protocol_id != 0 or not 2 <= header.length <= 254:
                # The byte stream cannot be resynchronised: close, as devices do.
                log.warning("bad MBAP header %s, closing connection", header)
                return
            pdu = await reader.readexactly(header.pdu_bytes)
            wrap = functools.partial(mbap_frame, header.transaction_id)
            if not await self._serve(header.unit_id, pdu, wrap, send, gateway=True):
                return

    async def _rtu_tcp_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        char_s: float | None,
        gap_s: float,
    ) -> None:
        async def send(data: bytes) -> None:
            await paced_write(writer.write, data, char_s)
            await writer.drain()

        assembler = RtuRequestAssembler()
        while True:
            if assembler.pending:
                try:
                    data = await asyncio.wait_for(reader.read(512), gap_s)
                except TimeoutError:
                    data = None
            else:
                data = await reader.read(512)
            if data == b"":
                return
            frames = assembler.silence() if data is None else assembler.feed(data)
            for frame in frames:
                await self.serve_rtu_frame(frame, send)

    # -- requests -------------------------------------------------------------------

    async def serve_rtu_frame(self, frame: bytes, send: Send) -> None:
        """Answer one CRC-checked RTU request frame (address + PDU + CRC)."""
        unit_id = frame[0]
        if unit_id == 0:
            return  # broadcast: never answered
        await self._serve(unit_id, frame[1:-2], rtu_frame, send, gateway=False)

    def _route(self, unit_id: int, gateway: bool) -> SimulatedMeter | None:
        if (meter := self.meters.get(unit_id)) is not None:
            return meter
        if gateway and unit_id in (0, 255) and len(self.meters) == 1:
            return next(iter(self.meters.values()))
        return None

    async def _serve(
        self, unit_id: int, pdu: bytes, wrap: Wrap, send: Send, *, gateway: bool
    ) -> bool:
        """Answer (or not) one request; False asks the caller to drop the connection."""
        meter = self._route(unit_id, gateway)
        # The values are taken when the request arrives, as a meter latches
        # them, so a delayed reply still carries the boundary-time count.
        now = meter.now_s() if meter is not None else 0.0
        faults = meter.active_faults(now) if meter is not None else {}
        if meter is None or FaultKind.OFFLINE in faults:
            if not gateway or self.unknown_unit is UnknownUnitPolicy.SILENT:
                return True
            if self.unknown_unit is UnknownUnitPolicy.CLOSE:
                return False
            code = ExceptionCode.GATEWAY_TARGET_FAILED_TO_RESPOND
            await send(wrap(unit_id, exception_pdu(pdu[0] if pdu else 0, code)))
            return True

        meter.request_times_s.append(now)
        if FaultKind.SILENT in faults:
            return True
        if (exception := faults.get(FaultKind.EXCEPTION)) is not None:
            reply = exception_pdu(pdu[0] if pdu else 0, exception.code)
        else:
            reply = meter.handle_pdu(pdu, now)
        frame = wrap(unit_id, reply)
        if (delay := faults.get(FaultKind.DELAY)) is not None:
            await asyncio.sleep(delay.delay_s)
        if FaultKind.GARBAGE in faults:
            frame = self._random.randbytes(len(frame))
        elif FaultKind.TRUNCATED in faults:
            frame = frame[: max(1, len(frame) // 2)]
        if (split := faults.get(FaultKind.SPLIT)) is not None and len(frame) > 1:
            pieces = min(split.pieces, len(frame))
            bounds = [len(frame) * i // pieces for i in range(pieces + 1)]
            for i in range(pieces):
                if i:
                    await asyncio.sleep(split.pause_s)
                await send(frame[bounds[i] : bounds[i + 1]])
        else:
            await send(frame)
        return True

    # -- scenarios ------------------------------------------------------------------

    def _targets(self, action: Action) -> list[SimulatedMeter]:
        if action.unit is None:
            return list(self.meters.values())
        return [self.meters[action.unit]]

    def check_actions(self, actions: Iterable[Action]) -> None:
        """Raise ScenarioError for actions naming units or counters not served."""
        for action in actions:
            if action.unit is not None and action.unit not in self.meters:
                raise ScenarioError(
                    f"{action.source}: unit {action.unit} is not simulated "
                    f"(units: {', '.join(map(str, sorted(self.meters)))})"
                )
            for meter in self._targets(action):
                meter.check_action(action)

    def apply(self, action: Action) -> None:
        """Apply one scenario action now (its ``at_s`` is not looked at)."""
        log.info("scenario %s: %s unit=%s", action.source, action.kind.value, action.unit)
        for meter in self._targets(action):
            meter.apply(action)

    def start_scenario(self, actions: Sequence[Action]) -> asyncio.Task[None]:
        """Run ``actions`` relative to now (``now_s``); the task ends after the last."""
        self.check_actions(actions)
        task = asyncio.get_running_loop().create_task(
            self._run_scenario(order_actions(actions)), name="scenario"
        )
        self._scenario_tasks.add(task)
        task.add_done_callback(self._scenario_tasks.discard)
        return task

    async def _run_scenario(self, actions: tuple[Action, ...]) -> None:
        start_s = self.now_s()
        done_s = -math.inf
        while True:
            elapsed_s = self.now_s() - start_s
            for action in due_actions(actions, done_s, elapsed_s):
                self.apply(action)
            done_s = elapsed_s
            if (next_s := next_due_s(actions, done_s)) is None:
                return
            # Capped so a time source that jumps (tests) is noticed promptly.
            await asyncio.sleep(min(max(next_s - elapsed_s, 0.0), 0.25))


# ------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------


def _units(text: str) -> list[int]:
    try:
        units = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--units wants ids like 1,2,3, got {text!r}") from None
    if not units or any(not 1 <= u <= 247 for u in units):
        raise argparse.ArgumentTypeError("unit ids are 1..247")
    return units


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edged.sim.meter",
        description="Simulated Modbus energy meters (TCP, RTU, RTU over TCP) with faults.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, help="Modbus TCP port (0 = free port; default 5020 unless --rtu)"
    )
    parser.add_argument("--units", type=_units, default=[1], help="unit ids, e.g. 1,2,3")
    parser.add_argument("--load-kw", type=float, default=1000.0)
    parser.add_argument("--kwh-per-count", type=float, default=0.144)
    parser.add_argument("--initial-counts", type=int, default=0)
    parser.add_argument("--rollover", type=int, default=DEFAULT_ROLLOVER)
    parser.add_argument("--register", type=int, default=0, help="counter start register")
    parser.add_argument("--table", choices=[t.value for t in Table], default="holding")
    parser.add_argument("--type", choices=[t.value for t in DataType], default="uint32")
    parser.add_argument("--word-order", choices=["big", "little"], default="big")
    parser.add_argument("--byte-order", choices=["big", "little"], default="big")
    parser.add_argument("--clock-register", type=int, default=DEFAULT_CLOCK_REGISTER)
    parser.add_argument("--status-register", type=int, default=DEFAULT_STATUS_REGISTER)
    parser.add_argument(
        "--unknown-unit",
        choices=[p.value for p in UnknownUnitPolicy],
        default=UnknownUnitPolicy.GATEWAY_EXCEPTION.value,
        help="Modbus TCP answer to unknown/offline unit ids",
    )
    parser.add_argument("--scenario", help="YAML scenario file")
    parser.add_argument(
        "--action",
        action="append",
        default=[],
        metavar="SPEC",
        help="scenario action, e.g. at=12s,unit=1,action=silent,for=15s (repeatable)",
    )
    parser.add_argument("--rtu", metavar="DEVICE", help="serial device path, or 'pty'")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--parity", choices=["N", "E", "O"], default="E")
    parser.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    parser.add_argument("--rtu-over-tcp-port", type=int, help="also serve RTU framing over TCP")
    parser.add_argument("--seed", type=int, help="seed for garbage replies")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


async def _run(args: argparse.Namespace) -> int:
    actions: list[Action] = []
    try:
        if args.scenario:
            actions.extend(load_scenario(args.scenario))
        actions.extend(parse_action_flag(spec) for spec in args.action)
        meters = {
            unit: SimulatedMeter.pmc1(
                load_kw=args.load_kw,
                kwh_per_count=args.kwh_per_count,
                initial_counts=args.initial_counts,
                address=args.register,
                table=Table(args.table),
                data_type=DataType(args.type),
                word_order=args.word_order,
                byte_order=args.byte_order,
                rollover=args.rollover,
                clock_address=args.clock_register if args.clock_register >= 0 else None,
                status_address=args.status_register if args.status_register >= 0 else None,
            )
            for unit in args.units
        }
    except (ScenarioError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    server = MeterServer(meters, unknown_unit=UnknownUnitPolicy(args.unknown_unit), seed=args.seed)
    units = ",".join(map(str, args.units))
    port = args.port
    if port is None and not args.rtu and args.rtu_over_tcp_port is None:
        port = 5020
    try:
        if port is not None:
            bound = await server.start_tcp(args.host, port)
            print(f"listening tcp {args.host}:{bound} units={units}", flush=True)
        if args.rtu_over_tcp_port is not None:
            bound = await server.start_rtu_over_tcp(args.host, args.rtu_over_tcp_port)
            print(f"listening rtu-over-tcp {args.host}:{bound} units={units}", flush=True)
        if args.rtu:
            line = f"{args.baudrate} 8{args.parity}{args.stopbits}"
            if args.rtu == "pty":
                path = await server.start_rtu_pty(
                    baudrate=args.baudrate, parity=args.parity, stopbits=args.stopbits
                )
            else:
                path = args.rtu
                await server.start_rtu(
                    path, baudrate=args.baudrate, parity=args.parity, stopbits=args.stopbits
                )
            print(f"listening rtu {path} {line} units={units}", flush=True)
        if actions:
            server.start_scenario(actions)
    except (OSError, ScenarioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        await server.stop()
        return 2

    try:
        await until_signalled()
    finally:
        await server.stop()
    print("stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
