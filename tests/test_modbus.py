"""Links over Modbus TCP: register plans from device config, the gateway queue,
dead-unit backoff, fast-poll priority, and a fuzz of broken replies."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged.config.schema import Device
from edged.core.model import Flag, ReadErrorKind
from edged.core.plan import (
    LinkConfigError,
    check_links,
    plan_device,
)
from edged.core.registers import apply_plan, m10k
from edged.io.bus import Priority, UnitBackoff
from edged.io.modbus import (
    RtuOverTcpEndpoint,
    TcpEndpoint,
    build_links,
    read_device,
)
from edged.sim.faults import Fault
from edged.sim.meter import MeterServer, SimulatedMeter, StaticPoint, UnknownUnitPolicy
from edged.sim.modbus_frames import DataType, crc16_modbus

TIMEOUT_S = 0.15


def device(**overrides: Any) -> Device:
    data: dict[str, Any] = {
        "id": "d1",
        "transport": {"type": "tcp", "host": "127.0.0.1", "port": 502, "unit_id": 1},
        "channels": [{"name": "energy", "register": 0}],
    }
    data.update(overrides)
    return Device.model_validate(data)


# ---------------------------------------------------------------------------
# Plans from device config (pure)


def test_coalescing_follows_the_device_max_gap() -> None:
    channels = [
        {"name": "a", "register": 0},
        {"name": "b", "register": 2},
        {"name": "c", "register": 10},  # 6 unused registers after b
        {"name": "d", "register": 40},
        {"name": "e", "register": 7, "function": "input", "type": "uint16"},
    ]
    spans = {
        gap: [
            (r.function, r.address, r.count)
            for r in plan_device(device(channels=channels, max_gap=gap)).boundary.requests
        ]
        for gap in (8, 0)
    }
    assert spans[8] == [("holding", 0, 12), ("holding", 40, 2), ("input", 7, 1)]
    assert spans[0] == [("holding", 0, 4), ("holding", 10, 2), ("holding", 40, 2), ("input", 7, 1)]


def test_scale_register_status_and_clock_join_the_plan() -> None:
    d = device(
        channels=[{"name": "wh", "register": 0, "scale_register": 4}],
        status={"register": 20, "bits": {0: "DEVICE_ERROR", 3: "POWER_FAIL"}},
        clock={"format": "epoch", "register": 22},
    )
    plan = plan_device(d).boundary
    # the scale factor is needed for the value: required and merged; status and
    # clock are optional and read in their own request (never fail the energy)
    assert [(r.address, r.count) for r in plan.requests] == [(0, 5)]
    assert [(r.address, r.count) for r in plan.optional] == [(20, 4)]
    decoded = {"wh": 12345, "_sf.holding.4": -2, "_status.holding.20": 0b1001,
               "_clock.epoch": 1_000_000_050}  # fmt: skip
    result = apply_plan(plan, decoded, reference_s=1_000_000_000.0)
    assert result.values == {"wh": 123.45}
    assert result.flags == {Flag.DEVICE_ERROR, Flag.POWER_FAIL, Flag.CLOCK_ERROR}
    assert result.meter_clock_offset_s == 50.0
    within = apply_plan(plan, {**decoded, "_clock.epoch": 1_000_000_003}, 1_000_000_000.0)
    assert Flag.CLOCK_ERROR not in within.flags
    # sf = -32768 is SunSpec's "not implemented": no value rather than a wrong one
    assert apply_plan(plan, {**decoded, "_sf.holding.4": -32768}).values == {}


def test_ct_vt_fold_into_energy_and_power_but_not_frequency() -> None:
    d = device(
        ct_ratio=200,
        vt_ratio=100,
        channels=[{"name": "e", "register": 0, "multiplier": 0.144, "scale": 0.1}],
        measurements={
            "every": "1s",
            "points": [
                {"name": "p", "register": 10, "type": "int16", "unit": "kW", "scale": 0.01},
                {"name": "i", "register": 11, "type": "uint16", "unit": "A", "scale": 0.1},
                {"name": "v", "register": 12, "type": "uint16", "unit": "V"},
                {"name": "f", "register": 13, "type": "uint16", "unit": "Hz", "offset": 40},
                {"name": "raw", "register": 14, "type": "uint16", "unit": "kW", "ratios": "none"},
            ],
        },
    )
    # 0.144 kWh/count x 0.1 x 200 x 100 = 288 kWh/count, exactly
    assert d.channels[0].multiplier == 288.0
    plan = plan_device(d)
    assert plan.measure_every_s == 1.0
    assert plan.measurements is not None
    values = apply_plan(plan.measurements, {"p": -150, "i": 52, "v": 110, "f": 10, "raw": 7}).values
    assert values == {"p": -30000.0, "i": 1040.0, "v": 11000, "f": 50.0, "raw": 7}
    # counters stay exact integer counts: the engine applies the multiplier
    assert apply_plan(plan.boundary, {"e": 1754}).values == {"e": 1754}


def test_order_codes_and_m10k() -> None:
    d = device(channels=[{"name": "e", "register": 0, "order": "CDAB"}])
    assert (d.channels[0].word_order, d.channels[0].byte_order) == ("little", "big")
    with pytest.raises(ValueError, match="contradicts"):
        device(channels=[{"name": "e", "register": 0, "order": "CDAB", "word_order": "big"}])
    assert m10k((1234 << 16) | 5678, signed=False) == 12_345_678
    assert m10k(struct.unpack(">i", struct.pack(">hh", -12, -34))[0], signed=True) == -120_034
    m = device(channels=[{"name": "e", "register": 0, "type": "int32", "encoding": "m10k"}])
    assert apply_plan(plan_device(m).boundary, {"e": (7 << 16) | 9}).values == {"e": 70_009}


def test_an_invalid_m10k_pair_records_no_value() -> None:
    """The low register of an M10K pair holds the value modulus 10000 (0..9999,
    or -9999..0 with a negative high register). ION 8650 meters were seen
    publishing low words above 9999 in an M10K register: no value, a problem."""
    m = device(channels=[{"name": "e", "register": 0, "type": "int32", "encoding": "m10k"}])
    plan = plan_device(m).boundary
    assert apply_plan(plan, {"e": (747 << 16) | 9_999}).values == {"e": 7_479_999}
    for words in ((747, 10_000), (0x7FFF, 0xFFFF), (0, 0x8001)):
        raw = struct.unpack(">i", struct.pack(">HH", *words))[0]
        result = apply_plan(plan, {"e": raw})
        assert result.values == {}, words
        assert result.problems == ("e: not implemented or invalid (value or scale factor)",)
    # A negative high register with a positive low one is no pair either.
    mixed = struct.unpack(">i", struct.pack(">hh", -12, 34))[0]
    assert apply_plan(plan, {"e": mixed}).values == {}
    negative = struct.unpack(">i", struct.pack(">hh", -12, -34))[0]
    assert apply_plan(plan, {"e": negative}).values == {"e": -120_034}


def test_datetime4_and_ymdhms_clocks() -> None:
    when = datetime(2026, 11, 21, 0, 15, 7, tzinfo=UTC)
    words4 = {"_clock.0": 26, "_clock.1": (11 << 8) | 21, "_clock.2": (0 << 8) | 15,
              "_clock.3": 7_250}  # fmt: skip
    plan4 = plan_device(device(clock={"format": "datetime4", "register": 100})).boundary
    assert apply_plan(plan4, {"energy": 1, **words4}).meter_clock_s == when.timestamp() + 0.25
    plan6 = plan_device(device(clock={"format": "ymdhms", "register": 100})).boundary
    words6 = {f"_clock.{i}": v for i, v in enumerate((2026, 11, 21, 0, 15, 7))}
    assert apply_plan(plan6, {"energy": 1, **words6}).meter_clock_s == when.timestamp()
    nonsense = apply_plan(plan6, {"energy": 1, **words6, "_clock.1": 13}, when.timestamp())
    assert Flag.CLOCK_ERROR in nonsense.flags
    assert nonsense.problems


def test_status_flags_must_be_edged_flags() -> None:
    with pytest.raises(ValueError, match="POWER_FAIL"):
        device(status={"register": 1, "bits": {0: "NOT_A_FLAG"}})


def test_links_group_devices_by_endpoint_and_port() -> None:
    def dev(i: int, transport: dict[str, Any]) -> Device:
        return device(id=f"d{i}", transport=transport)

    tcp = {"type": "tcp", "host": "10.0.0.5", "port": 502}
    rtu = {"type": "rtu", "port": "/dev/ttyS1", "baudrate": 19200}
    devices = [
        dev(1, {**tcp, "unit_id": 1}),
        dev(2, {**tcp, "unit_id": 2}),
        dev(3, {**rtu, "unit_id": 1}),
        dev(4, {**rtu, "unit_id": 2}),
        dev(5, {"type": "rtu_over_tcp", "host": "10.0.0.9", "port": 4001, "unit_id": 1}),
    ]
    links = build_links(devices)
    assert links["d1"] is links["d2"]
    assert links["d3"] is links["d4"]
    assert len({id(link) for link in links.values()}) == 3
    assert links["d3"].name == "rtu:///dev/ttyS1"
    clash = [*devices, dev(6, {**rtu, "baudrate": 9600, "unit_id": 3})]
    assert check_links(clash)
    assert "d3 and d6" in check_links(clash)[0]
    with pytest.raises(LinkConfigError):
        build_links(clash)


# ---------------------------------------------------------------------------
# Backoff (pure)


def test_unit_backoff_skips_exponentially_more_boundaries() -> None:
    backoff = UnitBackoff(max_skip=4, max_backoff_s=1e9)
    pattern = []
    now = 0.0
    for _ in range(16):
        now += 1
        if backoff.admit(Priority.BOUNDARY, now) is not None:
            pattern.append("-")
        else:
            pattern.append("x")
            backoff.record(ok=False, unresponsive=True, now_s=now)
    # fails (moved to the back), fails, skips 1, fails, skips 2, fails, skips 4,
    # fails, skips 4 (capped) …
    assert "".join(pattern) == "xx-x--x----x----"
    assert backoff.admit(Priority.FAST, now) is not None  # fast polls never probe it
    backoff.record(ok=True, unresponsive=False, now_s=now)
    assert backoff.admit(Priority.FAST, now) is None
    # an exception reply is an answer, not a dead unit
    backoff.record(ok=False, unresponsive=False, now_s=now)
    assert not backoff.offline


# ---------------------------------------------------------------------------
# TCP gateway end to end


class CountingProxy:
    """Forwards TCP to the simulator and counts the connections it accepts."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.accepted = 0
        self.open = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(4096):
                dst.write(data)
                await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[MeterServer, dict[int, SimulatedMeter], int]]:
    meters = {u: SimulatedMeter.pmc1(initial_counts=1000 * u) for u in (1, 2, 3)}
    async with MeterServer(meters) as server:
        yield server, meters, await server.start_tcp()


def three_units(port: int, **transport: Any) -> list[Device]:
    return [
        device(
            id=f"unit{u}",
            transport={
                "type": "tcp",
                "host": "127.0.0.1",
                "port": port,
                "unit_id": u,
                "timeout": TIMEOUT_S,
                **transport,
            },
            status={"register": 102, "bits": {0: "DEVICE_ERROR"}},
            clock={"register": 100},
        )
        for u in (1, 2, 3)
    ]


@pytest.mark.integration
async def test_three_units_share_one_tcp_connection(
    gateway: tuple[MeterServer, dict[int, SimulatedMeter], int],
) -> None:
    _server, meters, port = gateway
    proxy = CountingProxy(port)
    devices = three_units(await proxy.start())
    links = build_links(devices)
    plans = [plan_device(d) for d in devices]
    meters[2].status_bits = 1
    try:
        for _ in range(3):
            now_s = datetime.now(UTC).timestamp()
            reads = await asyncio.gather(
                *(
                    read_device(links[d.id], p.unit_id, p.boundary, reference_s=now_s)
                    for d, p in zip(devices, plans, strict=True)
                )
            )
            assert [r.error for r in reads] == [None, None, None]
            assert [r.values["energy"] // 1000 for r in reads] == [1, 2, 3]
            assert [r.flags for r in reads] == [frozenset(), {Flag.DEVICE_ERROR}, frozenset()]
            assert all(abs(r.meter_clock_offset_s or 99) < 2 for r in reads)
        assert (proxy.accepted, proxy.open) == (1, 1)
        status = links["unit1"].status()
        assert status["transactions"] == 9
        assert status["last_wave_devices"] == 3
        # served in config order, one after another
        assert status["last_spread_ms"] is not None
        assert status["last_spread_ms"] < 100
        firsts = [meters[u].request_times_s[-2] for u in (1, 2, 3)]
        assert firsts == sorted(firsts)
    finally:
        links["unit1"].close()
        await proxy.stop()


@pytest.mark.integration
async def test_max_connections_opens_parallel_connections(
    gateway: tuple[MeterServer, dict[int, SimulatedMeter], int],
) -> None:
    _server, meters, port = gateway
    proxy = CountingProxy(port)
    devices = three_units(await proxy.start(), max_connections=2)
    links = build_links(devices)
    for meter in meters.values():
        meter.set_fault(Fault.delay(0.05))
    try:
        plan = plan_device(device()).boundary  # one transaction per read
        start = asyncio.get_running_loop().time()
        reads = await asyncio.gather(
            *(read_device(links[d.id], d.transport.unit_id, plan) for d in devices)
        )
        took = asyncio.get_running_loop().time() - start
        assert [r.error for r in reads] == [None, None, None]
        assert proxy.accepted == 2
        assert took < 0.14  # two at a time: ~2 x 50 ms, not 3 x 50 ms
        assert sorted(round(r.queued_s, 1) for r in reads) == [0.0, 0.0, 0.1]
    finally:
        links["unit1"].close()
        await proxy.stop()


@pytest.mark.integration
async def test_dead_unit_is_backed_off_and_others_keep_reading(
    gateway: tuple[MeterServer, dict[int, SimulatedMeter], int],
) -> None:
    _server, meters, port = gateway
    devices = three_units(port)
    links = build_links(devices)
    link = links["unit1"]
    plans = [plan_device(d) for d in devices]
    meters[1].set_fault(Fault.silent())
    kinds: list[list[str | None]] = []
    wire = []
    try:
        for _ in range(7):
            reads = await asyncio.gather(*(read_device(link, p.unit_id, p.boundary) for p in plans))
            kinds.append([r.error.kind if r.error else None for r in reads])
            wire.append(len(meters[1].request_times_s))
        # unit 1 times out twice (the first time it is only moved to the back),
        # then is skipped (no request on the wire), retried, skipped twice …;
        # units 2 and 3 are read every time
        assert [k[0] for k in kinds] == ["timeout", "timeout", "backoff", "timeout", "backoff",
                                         "backoff", "timeout"]  # fmt: skip
        assert all(k[1:] == [None, None] for k in kinds)
        assert wire == [1, 2, 2, 3, 3, 3, 4]
        assert link.status()["units_offline"] == [1]
        # after its first failure the dead unit goes last: live units are not delayed
        assert meters[2].request_times_s[-1] < meters[1].request_times_s[-1]
        fast = await read_device(link, 1, plans[0].boundary, priority=Priority.FAST)
        assert fast.error is not None
        assert fast.error.kind is ReadErrorKind.BACKOFF
        meters[1].clear_faults()
        for _ in range(5):  # 4 failures so far: 4 boundary reads skipped, then a retry
            read = await read_device(link, 1, plans[0].boundary)
        assert read.error is None
        assert link.status()["units_offline"] == []
    finally:
        link.close()


@pytest.mark.integration
async def test_gateway_exception_11_counts_as_no_answer(
    gateway: tuple[MeterServer, dict[int, SimulatedMeter], int],
) -> None:
    _server, _meters, port = gateway
    link = TcpEndpoint("127.0.0.1", port, TIMEOUT_S)
    plan = plan_device(device()).boundary
    try:
        first = await read_device(link, 9, plan)  # no unit 9 behind the gateway
        assert first.error is not None
        assert first.error.exception_code == 11
        await read_device(link, 9, plan)
        second = await read_device(link, 9, plan)
        assert second.error is not None
        assert second.error.kind is ReadErrorKind.BACKOFF
        ok = await read_device(link, 1, plan)
        assert ok.error is None
    finally:
        link.close()


@pytest.mark.integration
async def test_fast_polls_yield_to_the_boundary(
    gateway: tuple[MeterServer, dict[int, SimulatedMeter], int],
) -> None:
    _server, meters, port = gateway
    link = TcpEndpoint("127.0.0.1", port, 0.5)
    link.register_unit(1, 0.5)
    link.register_unit(2, 0.5)
    plan = plan_device(device()).boundary
    meters[2].set_fault(Fault.delay(0.04))  # a slow fast-poll target
    loop = asyncio.get_running_loop()
    try:
        await read_device(link, 2, plan, priority=Priority.FAST)  # learn its duration
        link.expect_boundary(0.03)
        t0 = loop.time()
        fast = asyncio.ensure_future(read_device(link, 2, plan, priority=Priority.FAST))
        await asyncio.sleep(0.03)
        boundary = await read_device(link, 1, plan)
        boundary_done = loop.time() - t0
        await fast
        # the 40 ms fast poll was not started 30 ms before the boundary, so the
        # boundary read went out at once, and the fast poll after it
        assert boundary.error is None
        assert boundary.queued_s < 0.02
        assert boundary_done < 0.06
        assert meters[2].request_times_s[-1] > meters[1].request_times_s[-1]
    finally:
        link.close()


@pytest.mark.integration
async def test_unknown_unit_closing_connection_is_a_connection_error() -> None:
    meters = {1: SimulatedMeter.pmc1()}
    async with MeterServer(meters, unknown_unit=UnknownUnitPolicy.CLOSE) as server:
        port = await server.start_tcp()
        link = TcpEndpoint("127.0.0.1", port, TIMEOUT_S)
        plan = plan_device(device()).boundary
        try:
            gone = await asyncio.wait_for(read_device(link, 5, plan), 3)
            assert gone.error is not None
            assert gone.error.kind in (ReadErrorKind.CONNECTION, ReadErrorKind.TIMEOUT)
        finally:
            link.close()


# ---------------------------------------------------------------------------
# Fuzz: whatever comes back, a read ends in time, and the error is recorded


class ReplyServer:
    """Answers every request with the bytes of the current example."""

    def __init__(self, rtu: bool) -> None:
        self.rtu = rtu
        self.reply: bytes | None = b""
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readexactly(8 if self.rtu else 12)
                reply = self.reply
                if reply is None:  # "close the connection"
                    writer.close()
                    return
                if not self.rtu and reply[:1] == b"\x00":
                    # keep the transaction id so MBAP framing gets further in
                    reply = request[:2] + reply[2:]
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass


def _good_reply(rtu: bool, words: list[int]) -> bytes:
    pdu = bytes((3, 2 * len(words))) + b"".join(w.to_bytes(2, "big") for w in words)
    if rtu:
        body = bytes((1,)) + pdu
        return body + crc16_modbus(body).to_bytes(2, "little")
    return b"\x00\x00" + b"\x00\x00" + (len(pdu) + 1).to_bytes(2, "big") + b"\x01" + pdu


replies = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2), st.integers(0, 20)).map(
        lambda t: ("cut", t[0], t[1])
    ),
    st.tuples(
        st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2),
        st.integers(0, 20),
        st.integers(1, 255),
    ).map(lambda t: ("flip", t[0], t[1], t[2])),
    st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2).map(lambda w: ("good", w)),
    st.just(None),
)


class _Fuzz:
    """One event loop, server and link for all examples (examples run fast)."""

    def __init__(self, rtu: bool) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = ReplyServer(rtu)
        self.loop.run_until_complete(self.server.start())
        link_cls = RtuOverTcpEndpoint if rtu else TcpEndpoint
        self.link = link_cls("127.0.0.1", self.server.port, 0.05)
        self.plan = plan_device(device()).boundary
        self.errors: dict[str, int] = {}

    def run(self, spec: Any) -> None:
        rtu = self.server.rtu
        expected: int | None = None
        if isinstance(spec, tuple):
            good = _good_reply(rtu, spec[1])
            if spec[0] == "good":
                reply: bytes | None = good
                expected = (spec[1][0] << 16) | spec[1][1]
            elif spec[0] == "cut":
                reply = good[: min(spec[2], len(good) - 1)]
            else:
                at = spec[2] % len(good)
                reply = good[:at] + bytes((good[at] ^ spec[3],)) + good[at + 1 :]
        else:
            reply = spec
        self.server.reply = reply

        async def one() -> None:
            # at most: connect + timeout + guard; the link's own backoff may answer at once
            read = await asyncio.wait_for(read_device(self.link, 1, self.plan), 2.5)
            if read.error is None:
                assert set(read.values) == {"energy"}
                if expected is not None:
                    assert read.values["energy"] == expected
            else:
                self.errors[read.error.kind] = self.errors.get(read.error.kind, 0) + 1
                assert read.error.detail

        self.loop.run_until_complete(one())
        # no backoff between examples: each example starts from a clean unit
        self.link.scheduler.unit(1).backoff.record(ok=True, unresponsive=False, now_s=0)

    def close(self) -> None:
        self.loop.run_until_complete(self.link.aclose())
        self.loop.close()


@pytest.fixture(scope="module", params=[False, True], ids=["mbap", "rtu-over-tcp"])
def fuzz(request: pytest.FixtureRequest) -> Iterator[_Fuzz]:
    f = _Fuzz(rtu=request.param)
    yield f
    f.close()
    print("fuzz error kinds:", f.errors)


@pytest.mark.integration
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=replies)
def test_fuzzed_replies_never_hang_or_crash(fuzz: _Fuzz, spec: Any) -> None:
    fuzz.run(spec)


def test_float_nan_passes_through_the_plan() -> None:
    d = device(channels=[{"name": "e", "register": 0, "type": "float32"}])
    assert math.isnan(apply_plan(plan_device(d).boundary, {"e": math.nan}).values["e"])


def test_profile_static_point_type_names_match() -> None:
    # the simulator and edged agree on type names (profiles build simulators from plans)
    assert {t.value for t in DataType} == {
        "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"
    }  # fmt: skip
    assert StaticPoint(name="x", address=0, value=1).register_count == 1
