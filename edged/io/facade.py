"""The facade: a Modbus TCP server through which other masters read edged's devices.

edged stays the one master on each bus; SCADA, an EMS or a PLC connect here
instead of to the meter (docs/multimaster.md). Built on asyncio streams with
edged's own MBAP framing (:mod:`edged.core.mbap`), not on pymodbus' server, so
every malformed frame, limit and exception answer is decided here:

* a header that is not Modbus TCP closes the connection; a well-framed request
  that cannot be served gets its exception (unknown unit id 0x0B, oversized or
  wrong-length read 0x03, address overflow 0x02, any write or other function
  0x01);
* clients outside ``allow`` and connections beyond ``max_connections`` are
  closed at once; a connection silent for ``idle_timeout`` is closed;
* each client address has a request rate (token bucket) and a queue of
  pass-through reads; beyond either it is answered 0x06 (busy) at once, so a
  flooding master is told to back off and the others are still served.

Two answer modes per device:

* ``cache``: blocks polled by edged on the device's link at fast-poll priority
  (so they yield to boundary reads) at their own rate; a read inside a block
  younger than ``max_age`` is answered from it, an older block answers 0x0B
  (never stale data), a read outside every block 0x02;
* ``pass_through``: the read is queued on the device's link below boundary
  reads and fast polls (:class:`edged.io.bus.Priority.PASS_THROUGH`; the bus
  holds it back around boundaries like a fast poll); identical reads in flight
  from several masters share one bus transaction; no answer within
  ``answer_within`` (or a device edged knows to be down) answers 0x0B.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from edged.config.schema import Facade, FacadeBlock, FacadeDevice
from edged.core import mbap
from edged.core.mbap import ExceptionCode, FrameError, MbapHeader, ReadPdu
from edged.core.model import ReadErrorKind
from edged.core.registers import Point, ReadRequest
from edged.io.bus import Priority
from edged.io.modbus import Link, RawRead

log = structlog.get_logger("edged.io.facade")

# Queue waits kept per client for its p99.
WAIT_SAMPLES = 1000
# Client addresses remembered for the status (the oldest forgotten beyond).
MAX_CLIENTS = 256
# A frame whose header has arrived must be complete within this.
BODY_TIMEOUT_S = 5.0
# Answers one connection may have under way before its next frame is read.
MAX_PIPELINE = 64

# (link, unit id on it) of a configured device, or None when it is not running.
Resolver = Callable[[str], tuple[Link, int] | None]


@dataclass(slots=True)
class TokenBucket:
    """Requests per second with a burst of one second's worth (times passed in)."""

    rate: float
    tokens: float = -1.0
    last_s: float = 0.0

    def take(self, now_s: float) -> bool:
        if self.tokens < 0:  # first request
            self.tokens, self.last_s = self.rate, now_s
        self.tokens = min(self.rate, self.tokens + (now_s - self.last_s) * self.rate)
        self.last_s = now_s
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def p99(samples: Sequence[float]) -> float | None:
    """Nearest-rank 99th percentile."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass(slots=True, kw_only=True)
class ClientStats:
    """What one client address did (all its connections)."""

    connections: int = 0
    requests: int = 0
    exceptions: int = 0
    busy: int = 0  # of the exceptions, 0x06 answers (rate or queue)
    bytes_in: int = 0
    bytes_out: int = 0
    pending: int = 0  # pass-through reads waiting for the bus now
    waits_s: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))
    bucket: TokenBucket = field(default_factory=lambda: TokenBucket(1.0))

    def status(self, address: str) -> dict[str, Any]:
        wait = p99(self.waits_s)
        return {
            "client": address,
            "connections": self.connections,
            "requests": self.requests,
            "exceptions": self.exceptions,
            "busy": self.busy,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "queue_wait_p99_ms": None if wait is None else round(wait * 1000.0, 3),
        }


@dataclass(slots=True, kw_only=True)
class _Block:
    config: FacadeBlock
    words: tuple[int, ...] | None = None
    at_s: float = -math.inf  # loop time of the last good poll
    polls: int = 0
    failures: int = 0

    def covers(self, table: str, address: int, count: int) -> bool:
        c = self.config
        return (
            c.function == table and c.address <= address and address + count <= c.address + c.count
        )


@dataclass(slots=True)
class _Target:
    entry: FacadeDevice
    blocks: list[_Block]


def _request(table: str, address: int, count: int) -> ReadRequest:
    """A raw read: one uint16 point anchors the request (RawRead.registers has the words)."""
    function: Literal["holding", "input"] = "holding" if table == "holding" else "input"
    point = Point(name=f"r{address}", function=function, address=address, data_type="uint16")
    return ReadRequest(function=function, address=address, count=count, points=(point,))


def _words(raw: RawRead, count: int) -> tuple[int, ...] | None:
    if raw.error is not None or len(raw.registers) != 1:
        return None
    words = raw.registers[0][1]
    return words if len(words) == count else None


def error_code(raw: RawRead) -> ExceptionCode | int:
    """The exception a master gets for a failed bus read: the device's own
    exception is passed on; anything that meant no answer is 0x0B."""
    error = raw.error
    if error is not None and error.kind is ReadErrorKind.EXCEPTION and error.exception_code:
        return error.exception_code
    return ExceptionCode.GATEWAY_TARGET_FAILED


class FacadeServer:
    def __init__(
        self,
        settings: Facade,
        resolve: Resolver,
        unit_of: Callable[[str], int | None],
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`resolve(device_id)`: its link and unit id now (links change on reload);
        `unit_of(device_id)`: its configured unit id (the default upstream id)."""
        self.settings = settings
        self._resolve = resolve
        self._clock = clock
        self._networks = [ipaddress.ip_network(n, strict=False) for n in settings.allow]
        self._targets: list[dict[int, _Target]] = []
        for listener in settings.listeners:
            units: dict[int, _Target] = {}
            for entry in listener.devices:
                unit = entry.unit_id if entry.unit_id is not None else unit_of(entry.device)
                if unit is None:
                    raise ValueError(f"facade: no device {entry.device!r}")
                if unit in units:  # check-config says so with file:line
                    raise ValueError(f"facade: unit id {unit} twice on one listener")
                units[unit] = _Target(entry, [_Block(config=b) for b in entry.blocks])
            self._targets.append(units)
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._pollers: list[asyncio.Task[None]] = []
        self._in_flight: dict[tuple[int, int, str, int, int], asyncio.Task[RawRead]] = {}
        self.clients: dict[str, ClientStats] = {}
        self.open_connections = 0
        self.rejected_connections = 0
        self.closed_malformed = 0
        self.bus_reads = 0  # pass-through transactions put on a link
        self.shared_reads = 0  # pass-through answers that joined one in flight
        self.ports: list[int] = []

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> list[int]:
        """Bind every listener and start polling the cached blocks; the bound ports."""
        for n, listener in enumerate(self.settings.listeners):
            server = await asyncio.start_server(
                functools.partial(self._accept, listener=n), listener.host, listener.port
            )
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.ports.append(port)
            log.info("facade listening", host=listener.host, port=port,
                     devices=len(listener.devices))  # fmt: skip
        loop = asyncio.get_running_loop()
        for units in self._targets:
            for target in units.values():
                for block in target.blocks:
                    self._pollers.append(
                        loop.create_task(self._poll_block(target.entry.device, block),
                                         name=f"facade:{target.entry.device}:{block.config.address}")
                    )  # fmt: skip
        return self.ports

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in self._pollers:
            task.cancel()
        # Closing a connection ends its task (its read sees the end of the
        # stream); a task cancelled instead is reported by asyncio's stream
        # machinery as an error, so cancelling is only the fallback.
        for writer in list(self._writers):
            writer.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)
        for task in list(self._connections):
            task.cancel()
        for task in self._pollers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        self._pollers.clear()

    # -- cache ------------------------------------------------------------------

    async def _poll_block(self, device_id: str, block: _Block) -> None:
        """Keep one block fresh on an absolute schedule (skipping overrun ticks)."""
        every_s = block.config.every
        request = _request(block.config.function, block.config.address, block.config.count)
        next_s = self.now()
        while True:
            resolved = self._resolve(device_id)
            if resolved is not None:
                link, unit = resolved
                raw = await link.read(unit, (request,), priority=Priority.FAST)
                block.polls += 1
                words = _words(raw, block.config.count)
                if words is None:
                    block.failures += 1
                else:
                    # The moment the registers were read, not when the answer came.
                    block.words, block.at_s = words, self.now() - raw.duration_s
            next_s += every_s
            now_s = self.now()
            if next_s < now_s:
                next_s += every_s * (math.floor((now_s - next_s) / every_s) + 1)
            await asyncio.sleep(next_s - now_s)

    def _from_cache(self, target: _Target, pdu: ReadPdu) -> tuple[int, ...] | int:
        now_s = self.now()
        covering = [b for b in target.blocks if b.covers(pdu.table, pdu.address, pdu.count)]
        if not covering:
            return ExceptionCode.ILLEGAL_DATA_ADDRESS
        fresh = [
            b for b in covering if b.words is not None and now_s - b.at_s <= target.entry.max_age
        ]
        if not fresh:
            return ExceptionCode.GATEWAY_TARGET_FAILED
        block = max(fresh, key=lambda b: b.at_s)
        assert block.words is not None
        start = pdu.address - block.config.address
        return block.words[start : start + pdu.count]

    # -- pass-through -----------------------------------------------------------

    async def _pass_through(
        self, target: _Target, pdu: ReadPdu, client: ClientStats
    ) -> tuple[int, ...] | int:
        resolved = self._resolve(target.entry.device)
        if resolved is None:
            return ExceptionCode.GATEWAY_PATH_UNAVAILABLE
        if client.pending >= self.settings.client_queue:
            return ExceptionCode.SERVER_DEVICE_BUSY
        link, unit = resolved
        key = (id(link), unit, pdu.table, pdu.address, pdu.count)
        task = self._in_flight.get(key)
        if task is None:
            request = _request(pdu.table, pdu.address, pdu.count)
            task = asyncio.get_running_loop().create_task(
                link.read(unit, (request,), priority=Priority.PASS_THROUGH)
            )
            self._in_flight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
            self.bus_reads += 1
        else:
            self.shared_reads += 1
        client.pending += 1
        asked_s = self.now()
        try:
            # shield: a master giving up must not cancel a read others share.
            raw = await asyncio.wait_for(asyncio.shield(task), self.settings.answer_within)
        except TimeoutError:
            client.waits_s.append(self.now() - asked_s)
            return ExceptionCode.GATEWAY_TARGET_FAILED
        finally:
            client.pending -= 1
        # This master's wait for the line (a shared read may have been queued
        # before it asked): its answer time less the transaction itself.
        client.waits_s.append(max(0.0, self.now() - asked_s - raw.duration_s))
        words = _words(raw, pdu.count)
        return words if words is not None else error_code(raw)

    def _done(self, key: tuple[int, int, str, int, int], _task: asyncio.Task[RawRead]) -> None:
        self._in_flight.pop(key, None)

    # -- connections ------------------------------------------------------------

    def _client(self, address: str) -> ClientStats:
        stats = self.clients.get(address)
        if stats is None:
            if len(self.clients) >= MAX_CLIENTS:
                idle = [a for a, s in self.clients.items() if s.connections == 0]
                if idle:
                    del self.clients[idle[0]]
            stats = self.clients[address] = ClientStats(bucket=TokenBucket(self.settings.max_rate))
        return stats

    def _allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener: int
    ) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        allowed = self._allowed(address)
        if not allowed or self.open_connections >= self.settings.max_connections:
            self.rejected_connections += 1
            reason = "not allowed" if not allowed else "max_connections"
            log.info("facade connection refused", client=address, reason=reason)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        self.open_connections += 1
        client = self._client(address)
        client.connections += 1
        try:
            await self._serve(reader, writer, listener, client, address)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            client.connections -= 1
            self._connections.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener: int,
        client: ClientStats,
        address: str,
    ) -> None:
        """Frames in; each answered by its own task (a master may pipeline, and
        a cached answer need not wait behind a pass-through one)."""
        answers: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    head = await asyncio.wait_for(
                        reader.readexactly(mbap.MBAP_HEADER_BYTES), self.settings.idle_timeout
                    )
                except TimeoutError:
                    log.debug("facade connection idle; closed", client=address)
                    return
                except asyncio.IncompleteReadError:
                    return
                try:
                    header = mbap.parse_header(head)
                    body = await asyncio.wait_for(
                        reader.readexactly(header.pdu_bytes), BODY_TIMEOUT_S
                    )
                except (FrameError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    self.closed_malformed += 1
                    log.info("facade frame malformed; connection closed", client=address,
                             error=str(exc) or type(exc).__name__)  # fmt: skip
                    return
                client.requests += 1
                client.bytes_in += len(head) + len(body)
                if len(answers) >= MAX_PIPELINE:
                    # A master that sends without reading: stop reading it
                    # until an answer is out (TCP pushes back on it).
                    await asyncio.wait(answers, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.get_running_loop().create_task(
                    self._answer(writer, listener, client, header, body)
                )
                answers.add(task)
                task.add_done_callback(answers.discard)
        finally:
            for task in answers:
                task.cancel()

    async def _answer(
        self,
        writer: asyncio.StreamWriter,
        listener: int,
        client: ClientStats,
        header: MbapHeader,
        body: bytes,
    ) -> None:
        function = body[0] & 0x7F if body else 0
        answer: tuple[int, ...] | int
        try:
            answer = await self._decide(listener, client, header, body)
        except Exception:  # a bug must cost one answer, not the server
            log.exception("facade request failed", unit=header.unit_id, function=function)
            answer = ExceptionCode.SERVER_DEVICE_FAILURE
        if isinstance(answer, int):
            client.exceptions += 1
            if answer == ExceptionCode.SERVER_DEVICE_BUSY:
                client.busy += 1
            frame = mbap.exception_response(header, function, answer)
        else:
            frame = mbap.read_response(header, function, answer)
        client.bytes_out += len(frame)
        try:
            writer.write(frame)
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass  # the master went away; nothing to answer

    async def _decide(
        self, listener: int, client: ClientStats, header: MbapHeader, body: bytes
    ) -> tuple[int, ...] | int:
        """The registers to answer with, or the exception code."""
        if not body:
            return ExceptionCode.ILLEGAL_FUNCTION
        if not client.bucket.take(self.now()):
            return ExceptionCode.SERVER_DEVICE_BUSY
        target = self._targets[listener].get(header.unit_id)
        if target is None:
            return ExceptionCode.GATEWAY_TARGET_FAILED
        pdu = mbap.parse_pdu(body)
        if isinstance(pdu, mbap.RefusedPdu):
            return pdu.code
        if target.entry.mode == "cache":
            return self._from_cache(target, pdu)
        return await self._pass_through(target, pdu, client)

    # -- status -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now_s = self.now()
        blocks = []
        for units in self._targets:
            for unit, target in units.items():
                for block in target.blocks:
                    age = None if block.words is None else round(now_s - block.at_s, 3)
                    blocks.append({"device": target.entry.device, "unit_id": unit,
                                   "function": block.config.function,
                                   "register": block.config.address, "count": block.config.count,
                                   "age_s": age, "polls": block.polls,
                                   "failures": block.failures})  # fmt: skip
        return {
            "listeners": [
                {"host": lst.host, "port": port, "devices": len(lst.devices)}
                for lst, port in zip(self.settings.listeners, self.ports, strict=False)
            ],
            "connections": self.open_connections,
            "rejected_connections": self.rejected_connections,
            "closed_malformed": self.closed_malformed,
            "pass_through_reads": self.bus_reads,
            "pass_through_shared": self.shared_reads,
            "blocks": blocks,
            "clients": [s.status(a) for a, s in self.clients.items()],
        }
