"""Bounded disk: retention cut-offs and budget decisions (pure), and
the store, recorder and housekeeper on real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.app.housekeeping import (
    RESUME_FRACTION,
    BudgetChange,
    BudgetLimits,
    BudgetState,
    DiskAlarm,
    DiskUsage,
    Housekeeper,
    budget_event,
    decide_budget,
    retention_cutoffs,
)
from edged.app.poller import Pending, Recorder, outbox_pending
from edged.config.load import (
    ConfigError,
    load_settings,
)
from edged.config.schema import Storage
from edged.core.model import Interval, Measurement, Read, TimeState, iso_utc
from edged.core.payloads import (
    Topics,
    encode,
    event_payload,
)
from edged.core.units import parse_size_bytes
from edged.io.store import Store
from tests.support.schema import load_schema, validate_message

T0 = datetime(2026, 11, 21, tzinfo=UTC)
DAY_S = 86_400.0
MB = 10**6
POLICY = ("measurements", "reads")
LIMITS = BudgetLimits(budget_bytes=100 * MB, min_free_bytes=10 * MB, policy=POLICY)
BOTH = frozenset(POLICY)
TOPICS = Topics("edged", "hk-site")


def usage(used_mb: float, free_mb: float = 1000, stored: frozenset[str] = BOTH) -> DiskUsage:
    return DiskUsage(int(used_mb * MB), int(free_mb * MB), stored)


# -- config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size_bytes"),
    [("2 GB", 2 * 10**9), ("2GB", 2 * 10**9), ("1.5 GiB", 3 * 2**29), ("512mib", 2**29),
     ("100 kB", 100_000), ("64 KiB", 65_536), ("10 B", 10), (4096, 4096), (" 7 tb ", 7 * 10**12)],
)  # fmt: skip
def test_sizes_in_human_units(text: object, size_bytes: int) -> None:
    assert parse_size_bytes(text) == size_bytes


@pytest.mark.parametrize("bad", ["2 GiGs", "GB", "-1 GB", "1,5 GB", 1.5, True, None, "2 gb 3"])
def test_bad_sizes_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a size such as 2 GB"):
        parse_size_bytes(bad)


def test_storage_defaults() -> None:
    storage = Storage()
    assert storage.retention.reads == 35 * DAY_S
    assert storage.retention.intervals == 400 * DAY_S
    assert storage.retention.measurements == 7 * DAY_S
    assert storage.disk_budget == 2 * 10**9
    assert storage.budget_policy == POLICY
    assert storage.check_every == 60.0


def test_storage_errors_name_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "edged.yaml"
    config.write_text(
        "site: s\n"
        "storage:\n"
        "  disk_budget: 2 GiGs\n"
        "  retention:\n"
        "    intervals: 0d\n"
        "  budget_policy: [measurements, intervals]\n"
        "devices:\n"
        "  - id: u\n"
        "    transport: {type: tcp, host: 127.0.0.1}\n"
        "    channels: [{name: e, register: 0}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    found = [str(p) for p in info.value.problems]
    assert found == [
        f"{config}:3 storage.disk_budget: expected a size such as 2 GB, 500 MB or 512 MiB "
        "(units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), got '2 GiGs'",
        f"{config}:5 storage.retention.intervals: Input should be greater than 0",
        f"{config}:6 storage.budget_policy: 'intervals' cannot be shed: the policy lists "
        "measurements and/or reads (intervals, events and unsent messages are always kept)",
    ]


def test_retention_null_keeps_for_ever_and_policy_may_be_empty(tmp_path: Path) -> None:
    config = tmp_path / "edged.yaml"
    config.write_text(
        "site: s\n"
        "storage: {retention: {intervals: null}, budget_policy: [], disk_budget: 512 MiB}\n"
        "devices:\n"
        "  - id: u\n"
        "    transport: {type: tcp, host: 127.0.0.1}\n"
        "    channels: [{name: e, register: 0}]\n"
    )
    storage = load_settings(config).storage
    assert storage.retention.intervals is None
    assert storage.budget_policy == ()
    assert storage.disk_budget == 2**29


# -- pure: retention ----------------------------------------------------------------


def test_retention_cutoffs_count_back_from_now() -> None:
    retention = {"reads": 35 * DAY_S, "intervals": 400 * DAY_S, "measurements": None}
    cutoffs = retention_cutoffs(T0, retention, TimeState.SYNCED)
    assert cutoffs == {"reads": T0 - timedelta(days=35), "intervals": T0 - timedelta(days=400)}
    assert retention_cutoffs(T0, retention, TimeState.HOLDOVER) == cutoffs


def test_no_retention_on_assumed_time() -> None:
    # A gateway that boots in 2040 on a bad RTC must not delete its history.
    assert retention_cutoffs(T0, {"reads": 1.0}, TimeState.ASSUMED) == {}


# -- pure: the budget ---------------------------------------------------------------


def test_under_budget_nothing_happens() -> None:
    decision = decide_budget(usage(99.9), LIMITS, BudgetState())
    assert decision.state == BudgetState()
    assert decision.purge == ()
    assert decision.change is None


def test_reaching_the_budget_sheds_measurements_first() -> None:
    decision = decide_budget(usage(100), LIMITS, BudgetState())
    assert decision.state == BudgetState(DiskAlarm.BUDGET, ("measurements",))
    assert decision.purge == ("measurements",)
    assert decision.change is BudgetChange.ENTERED


def test_hysteresis_keeps_the_alarm_until_ninety_percent() -> None:
    state = BudgetState(DiskAlarm.BUDGET, ("measurements",))
    for used_mb in (99.99, 95.0, 90.01):
        decision = decide_budget(usage(used_mb), LIMITS, state)
        assert decision.state == state, used_mb
        assert decision.change is None
        # between the marks the shed kind is still deleted down to the lower one
        assert decision.purge == ("measurements",)
    left = decide_budget(usage(100 * RESUME_FRACTION), LIMITS, state)
    assert left.state == BudgetState()
    assert left.change is BudgetChange.LEFT
    assert left.purge == ()
    # and it is not raised again before the budget itself is reached
    assert decide_budget(usage(99.9), LIMITS, left.state).change is None


def test_next_kind_is_shed_only_when_the_first_has_nothing_left() -> None:
    state = BudgetState(DiskAlarm.BUDGET, ("measurements",))
    still = decide_budget(usage(120, stored=BOTH), LIMITS, state)
    assert still.state.shed == ("measurements",)
    assert still.change is None
    escalated = decide_budget(usage(120, stored=frozenset({"reads"})), LIMITS, state)
    assert escalated.state == BudgetState(DiskAlarm.BUDGET, POLICY)
    assert escalated.purge == ("reads",)
    assert escalated.change is BudgetChange.ESCALATED
    # nothing more to shed: intervals are kept, the alarm stays up
    final = decide_budget(usage(120, stored=frozenset()), LIMITS, escalated.state)
    assert final.state == escalated.state
    assert final.purge == ()
    assert final.change is None


def test_no_escalation_between_the_marks() -> None:
    state = BudgetState(DiskAlarm.BUDGET, ("measurements",))
    decision = decide_budget(usage(95, stored=frozenset({"reads"})), LIMITS, state)
    assert decision.state == state
    assert decision.purge == ()


def test_entering_with_nothing_of_the_first_kind_sheds_the_next() -> None:
    decision = decide_budget(usage(150, stored=frozenset({"reads"})), LIMITS, BudgetState())
    assert decision.state == BudgetState(DiskAlarm.BUDGET, POLICY)
    assert decision.change is BudgetChange.ENTERED
    assert decision.purge == ("reads",)


def test_free_space_floor_raises_the_same_alarm() -> None:
    decision = decide_budget(usage(10, free_mb=9.9), LIMITS, BudgetState())
    assert decision.state == BudgetState(DiskAlarm.FREE_SPACE, ("measurements",))
    assert decision.change is BudgetChange.ENTERED
    # cleared only with margin: free >= floor / 0.9
    held = decide_budget(usage(10, free_mb=11.0), LIMITS, decision.state)
    assert held.change is None
    assert held.state.alarm is DiskAlarm.FREE_SPACE
    left = decide_budget(usage(10, free_mb=10 / RESUME_FRACTION + 0.01), LIMITS, decision.state)
    assert left.change is BudgetChange.LEFT


def test_free_space_floor_zero_is_off() -> None:
    limits = BudgetLimits(100 * MB, 0, POLICY)
    assert decide_budget(usage(10, free_mb=0), limits, BudgetState()).change is None


def test_empty_policy_alarms_but_sheds_nothing() -> None:
    limits = BudgetLimits(100 * MB, 0, ())
    decision = decide_budget(usage(150), limits, BudgetState())
    assert decision.state == BudgetState(DiskAlarm.BUDGET, ())
    assert decision.purge == ()
    assert decision.change is BudgetChange.ENTERED


@given(st.lists(st.floats(min_value=0, max_value=200), min_size=1, max_size=60))
def test_the_alarm_never_flaps(used_mbs: list[float]) -> None:
    """Entered only at or over the budget, left only at or under 90%, and never
    two changes of the same direction in a row."""
    state = BudgetState()
    last: BudgetChange | None = None
    for used_mb in used_mbs:
        decision = decide_budget(usage(used_mb), LIMITS, state)
        if decision.change is BudgetChange.ENTERED:
            assert int(used_mb * MB) >= LIMITS.budget_bytes
            assert last in (None, BudgetChange.LEFT)
        if decision.change is BudgetChange.LEFT:
            assert int(used_mb * MB) <= LIMITS.budget_bytes * RESUME_FRACTION
            assert last is BudgetChange.ENTERED
        if decision.change in (BudgetChange.ENTERED, BudgetChange.LEFT):
            last = decision.change
        assert (decision.state.alarm is None) == (decision.state.shed == ())
        state = decision.state


def test_budget_event_validates_and_says_what_is_shed() -> None:
    decision = decide_budget(usage(150), LIMITS, BudgetState())
    event = budget_event(decision, usage(150), LIMITS, T0)
    assert event.kind == "disk_budget"
    assert event.device is None
    assert event.details["change"] == "entered"
    assert event.details["storage_shedding"] == ["measurements"]
    assert "not storing measurements" in event.message
    payload = event_payload(event, "hk-site", 7)
    validate_message(TOPICS.event(None), json.loads(encode(payload)))


def test_gateway_status_schema_lists_the_alarm_kinds() -> None:
    status = load_schema("gateway_status")["$defs"]["status"]["properties"]
    assert status["disk_alarm"]["enum"] == [None, *(str(a) for a in DiskAlarm)]
    assert status["storage_shedding"]["items"]["enum"] == list(POLICY)


# -- the store on real files --------------------------------------------------------


def _read(at: datetime) -> Read:
    return Read(
        device="u1",
        boundary=at,
        read_at=at,
        read_lateness_ms=1.0,
        time_state=TimeState.SYNCED,
        values={"e": 1},
    )


def _interval(end: datetime) -> Interval:
    return Interval(
        site="hk-site", device="u1", channel="e", start=end - timedelta(minutes=15), end=end,
        duration_s=900.0, value=1.0, unit="kWh", demand=4.0, demand_unit="kW",
        counter_start=0, counter_end=1000, flags=frozenset(), time_state=TimeState.SYNCED,
        read_at=end, read_lateness_ms=1.0,
    )  # fmt: skip


def _count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _ids(db: Path, sql: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [str(r[0]) for r in conn.execute(sql)]


async def _commit(store: Store, days: range, sent: bool) -> Pending:
    """One read, one interval (with its outbox row) and one measurement a day."""
    ends = [T0 - timedelta(days=d) for d in days]
    pending = outbox_pending(store, TOPICS, "hk-site", [_interval(e) for e in ends], [])
    await store.commit_boundary(
        [_read(e) for e in ends],
        pending.intervals,
        {},
        pending.messages,
        measurements=[Measurement("u1", e, {"kw": 1.5, "v": None}) for e in ends],
    )
    if sent:
        await store.ack(seq for seq, _m in pending.messages)
    return pending


async def test_retention_deletes_old_rows_but_never_unsent_ones(tmp_path: Path) -> None:
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    try:
        await _commit(store, range(390, 410), sent=True)  # 20 days, acknowledged
        unsent = await _commit(store, range(410, 413), sent=False)  # old, still in the outbox
        await _commit(store, range(0, 3), sent=False)
        cutoff = T0 - timedelta(days=400)
        # small batches: the caller loops until a batch comes back short
        assert await store.delete_older("intervals", cutoff, 4) == 4
        assert await store.delete_older("intervals", cutoff, 100) == 5
        assert await store.delete_older("intervals", cutoff, 100) == 0
        assert await store.delete_older("reads", T0 - timedelta(days=35), 1000) == 23
        assert await store.delete_older("measurements", T0 - timedelta(days=7), 1000) == 23
    finally:
        await store.close()
    kept = _ids(db, 'SELECT "end" FROM intervals ORDER BY "end"')
    old_unsent = {iso_utc(i.end) for i, _p in unsent.intervals}
    assert old_unsent <= set(kept)  # older than the cut-off, but not acknowledged
    assert all(end >= iso_utc(T0 - timedelta(days=400)) for end in set(kept) - old_unsent)
    assert len(kept) == 11 + 3 + 3  # 390..400 (sent), 410..412 (unsent), 0..2
    assert _count(db, "outbox") == 6  # retention never touches the outbox
    assert _count(db, "reads") == 3
    assert _count(db, "measurements") == 3


async def test_shedding_deletes_oldest_first_and_space_goes_back(tmp_path: Path) -> None:
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    try:
        measurements = [
            Measurement("u1", T0 + timedelta(seconds=i), {"kw": float(i)}) for i in range(20_000)
        ]
        await store.commit_boundary([], [], {}, [], measurements=measurements)
        await store.reclaim()
        full = await store.used_bytes()
        assert full == db.stat().st_size  # after reclaim: no WAL, no free pages
        assert await store.delete_oldest("measurements", 15_000) == 15_000
        await store.reclaim()
        assert await store.used_bytes() == db.stat().st_size < full * 0.5
        with pytest.raises(ValueError, match="never shed"):
            await store.delete_oldest("intervals", 1)
    finally:
        await store.close()
    first = _ids(db, "SELECT at FROM measurements ORDER BY id LIMIT 1")
    assert first == [iso_utc(T0 + timedelta(seconds=15_000))]


# -- the recorder -------------------------------------------------------------------


async def test_recorder_batches_measurements_and_obeys_shedding(tmp_path: Path) -> None:
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    commits: list[int] = []
    loop = asyncio.get_running_loop()
    committed_at: list[float] = []
    committed = asyncio.Event()

    def on_committed() -> None:
        commits.append(1)
        committed_at.append(loop.time())
        committed.set()

    recorder = Recorder(store, on_committed=on_committed, measurement_flush_s=0.2)
    task = asyncio.create_task(recorder.run())
    try:
        added_at = loop.time()
        for i in range(10):
            recorder.add_measurement(Measurement("u1", T0 + timedelta(seconds=i), {"kw": 1.0}))
        # The flush timer (0.2 s) cannot fire before this earlier one: no race.
        await asyncio.sleep(0.05)
        assert commits == []  # buffered, not one transaction per poll
        # Waits for the commit itself, however long a loaded machine takes.
        await asyncio.wait_for(committed.wait(), 30)
        assert commits == [1]  # one flush for all ten
        assert committed_at[0] - added_at >= 0.2  # held for measurement_flush_s
        assert _count(db, "measurements") == 10
        recorder.set_shedding(frozenset({"measurements", "reads"}))
        recorder.add_measurement(Measurement("u1", T0, {"kw": 1.0}))
        end = T0 + timedelta(minutes=15)
        pending = outbox_pending(store, TOPICS, "hk-site", [_interval(end)], [])
        pending.reads.append(_read(end))
        recorder.submit(pending)
        await recorder.close()
        await task
    finally:
        await store.close()
    assert _count(db, "measurements") == 10
    assert _count(db, "reads") == 0  # shed
    assert _count(db, "intervals") == 1  # never shed
    assert _count(db, "outbox") == 1


# -- the housekeeper on a real store ------------------------------------------------


class FixedClock:
    def __init__(self, now: datetime, time_state: TimeState = TimeState.SYNCED) -> None:
        self._now = now
        self.time_state = time_state

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return 0.0


async def test_housekeeper_sheds_purges_and_keeps_intervals(tmp_path: Path) -> None:
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    changes: list[tuple[BudgetChange | None, tuple[str, ...]]] = []
    shedding: list[frozenset[str]] = []
    try:
        await _commit(store, range(0, 30), sent=False)
        storage = Storage(path=db, disk_budget=1, min_free=0)  # below an empty database
        keeper = Housekeeper(
            store, storage, FixedClock(T0), shedding.append,
            lambda d, _u: changes.append((d.change, d.state.shed)),
        )  # fmt: skip
        await keeper.check()
        assert changes == [
            (BudgetChange.ENTERED, ("measurements",)),
            (BudgetChange.ESCALATED, ("measurements", "reads")),
        ]
        assert shedding == [frozenset({"measurements"}), frozenset(POLICY)]
        status = keeper.status()
        assert status.alarm is DiskAlarm.BUDGET
        assert status.shedding == POLICY
        assert status.used_bytes == await store.used_bytes()
        await keeper.check()  # nothing changes: no second event
        assert len(changes) == 2
    finally:
        await store.close()
    assert _count(db, "measurements") == 0
    assert _count(db, "reads") == 0
    assert _count(db, "intervals") == 30  # never shed, unsent and sent alike
    assert _count(db, "outbox") == 30


async def test_housekeeper_free_space_alarm_comes_and_goes(tmp_path: Path) -> None:
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    changes: list[BudgetChange | None] = []
    shedding: list[frozenset[str]] = []
    free_bytes = [10]
    try:
        await _commit(store, range(0, 50), sent=True)
        storage = Storage(path=db, min_free=1000)
        keeper = Housekeeper(
            store, storage, FixedClock(T0), shedding.append,
            lambda d, _u: changes.append(d.change), free_bytes=lambda: free_bytes[0],
        )  # fmt: skip
        await keeper.check()
        assert keeper.status().alarm is DiskAlarm.FREE_SPACE
        free_bytes[0] = 10**9
        await keeper.check()
        assert changes == [BudgetChange.ENTERED, BudgetChange.ESCALATED, BudgetChange.LEFT]
        assert shedding[-1] == frozenset()
        assert keeper.status().alarm is None
    finally:
        await store.close()
    assert _count(db, "intervals") == 50
    assert _count(db, "reads") == 0  # shed in the alarm


@pytest.mark.looptime
async def test_housekeeper_checks_every_check_every_on_virtual_time(tmp_path: Path) -> None:
    """`run()` on virtual time: a check at start and every `check_every` (30 s)
    after; free space that drops at 50 s raises the alarm at the check at 60 s,
    not before. The test waits on events only, so virtual time moves only when
    the housekeeper sleeps (never while a store operation is in flight)."""
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    checked_at: list[float] = []
    changes: list[tuple[float, BudgetChange | None]] = []
    four_checks = asyncio.Event()

    def free_bytes() -> int:
        at = round(loop.time() - t0, 6)
        if at not in checked_at:
            checked_at.append(at)
        if len(checked_at) == 4:
            four_checks.set()
        return 10 if at >= 50 else 10**12

    try:
        storage = Storage(path=db, min_free=1000, check_every=30.0)
        keeper = Housekeeper(
            store, storage, FixedClock(T0), lambda _shed: None,
            lambda d, _u: changes.append((round(loop.time() - t0, 6), d.change)),
            free_bytes=free_bytes,
        )  # fmt: skip
        task = asyncio.create_task(keeper.run())
        await four_checks.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await store.close()
    assert checked_at == [0.0, 30.0, 60.0, 90.0]
    assert changes[0] == (60.0, BudgetChange.ENTERED)
    assert {at for at, _ in changes} == {60.0}  # entered (and escalated) once, at 60 s
    assert keeper.status().alarm is DiskAlarm.FREE_SPACE


@pytest.mark.looptime
async def test_idle_housekeeping_runs_full_rounds_only_after_commits(tmp_path: Path) -> None:
    """With nothing committed, `run()` measures free space every check_every
    but runs the store's round (a dozen statements) only every 900 s; a commit
    (the recorder calls check_free_space before each) brings the next one."""
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    full: list[float] = []
    free_checks: list[float] = []
    committed: list[float] = []
    three_rounds = asyncio.Event()

    def free_bytes() -> int:
        at = round(loop.time() - t0, 6)
        free_checks.append(at)
        if at == 90.0 and not committed:  # a commit right after the check at 90 s
            committed.append(at)
            loop.call_soon(keeper.check_free_space)
        return 10**12

    try:
        storage = Storage(path=db, min_free=1000, check_every=30.0)
        keeper = Housekeeper(
            store, storage, FixedClock(T0), lambda _shed: None, lambda _d, _u: None,
            free_bytes=free_bytes,
        )  # fmt: skip
        full_round = keeper.check

        async def counted() -> None:
            full.append(round(loop.time() - t0, 6))
            if len(full) == 3:
                three_rounds.set()
            await full_round()

        keeper.check = counted  # type: ignore[method-assign]
        task = asyncio.create_task(keeper.run())
        await three_rounds.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await store.close()
    assert full == [0.0, 120.0, 1020.0]
    # Free space is still watched every 30 s in between (and before each commit).
    assert {30.0, 60.0, 90.0, 150.0, 990.0} <= set(free_checks)


async def test_housekeeper_keeps_everything_on_assumed_time(tmp_path: Path) -> None:
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    try:
        await _commit(store, range(0, 50), sent=True)
        storage = Storage.model_validate(
            {"path": db, "min_free": 0, "retention": {"reads": "1d", "intervals": "1d"}}
        )
        far_future = T0 + timedelta(days=20 * 365)
        keeper = Housekeeper(
            store, storage, FixedClock(far_future, TimeState.ASSUMED), lambda _k: None,
            lambda _d, _u: None,
        )  # fmt: skip
        await keeper.check()
        assert _count(db, "reads") == 50
        keeper = Housekeeper(
            store, storage, FixedClock(far_future), lambda _k: None, lambda _d, _u: None
        )
        await keeper.check()
        assert _count(db, "reads") == 0
        assert _count(db, "intervals") == 0  # acknowledged, and older than 1 d
    finally:
        await store.close()


# -- integrity at start-up ----------------------------------------------------------


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_garbage_is_moved_aside_and_a_fresh_store_works(tmp_path: Path) -> None:
    db = tmp_path / "edged.db"
    db.write_bytes(b"this is not a database " * 400)
    (tmp_path / "edged.db-wal").write_bytes(b"wal bytes")
    at = datetime(2026, 11, 21, 1, 2, 3, tzinfo=UTC)
    store = await Store.open(db, now=lambda: at)
    try:
        recovered = store.recovered_from
        assert recovered is not None
        assert recovered.moved_to == tmp_path / "edged.db.corrupt-20261121T010203Z"
        # the WAL with it (SQLite finds it by name), and the -shm the check made
        assert recovered.moved[:2] == (
            recovered.moved_to,
            tmp_path / "edged.db.corrupt-20261121T010203Z-wal",
        )
        assert "not a database" in recovered.error
        await _commit(store, range(0, 2), sent=False)
    finally:
        await store.close()
    assert (tmp_path / "edged.db.corrupt-20261121T010203Z").read_bytes().startswith(b"this is")
    assert (tmp_path / "edged.db.corrupt-20261121T010203Z-wal").read_bytes() == b"wal bytes"
    assert _count(db, "intervals") == 2
    # a second recovery in the same second does not overwrite the first
    db.write_bytes(b"garbage again " * 400)
    again = await Store.open(db, now=lambda: at)
    await again.close()
    assert again.recovered_from is not None
    assert "edged.db.corrupt-20261121T010203Z.2" in _files(tmp_path)


async def test_damaged_pages_fail_the_integrity_check(tmp_path: Path) -> None:
    db = tmp_path / "edged.db"
    store = await Store.open(db)
    await _commit(store, range(0, 200), sent=False)
    await store.reclaim()
    await store.close()
    page_size = 4096
    with db.open("r+b") as f:  # scribble over a b-tree page in the middle
        f.seek(page_size * (db.stat().st_size // page_size // 2))
        f.write(b"\xff" * 600)
    store = await Store.open(db)
    try:
        assert store.recovered_from is not None
        assert store.recovered_from.error.startswith(("integrity_check", "database disk image"))
        assert store.recovered_from.moved_to.exists()
    finally:
        await store.close()
    assert _count(db, "intervals") == 0  # a fresh database


async def test_a_locked_database_is_an_error_not_corruption(tmp_path: Path) -> None:
    db = tmp_path / "edged.db"
    await (await Store.open(db)).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        from edged.io.store import StoreCorrupt, StoreError

        with pytest.raises(StoreError, match="locked by another process") as info:
            await Store.open(db, busy_timeout_s=0.2)
        assert not isinstance(info.value, StoreCorrupt)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _files(tmp_path) == ["edged.db"]


async def test_an_unopenable_path_is_an_error_not_corruption(tmp_path: Path) -> None:
    from edged.io.store import StoreError

    db = tmp_path / "edged.db"
    db.mkdir()  # e.g. a mistaken storage.path; root ignores file permissions
    with pytest.raises(StoreError, match="not a regular file"):
        await Store.open(db)
    assert _files(tmp_path) == ["edged.db"]
    assert db.is_dir()
