"""Retention and the disk budget.

The decisions are pure: `retention_cutoffs` turns `now` and the configured
retention into a cut-off time per kind of row, and `decide_budget` turns the
measured disk use and the previous state into the next state (alarm, what is
not stored, what to delete now). `Housekeeper` is the shell: every
`storage.check_every` it deletes expired rows in small batches, measures the
database (main file + WAL, less free pages) and the file system's free space,
applies the decision to the recorder, deletes shed rows oldest first while
the decision asks for it, and reports every change of state (the app turns
it into a `disk_budget` event and a gateway status).

Nothing unsent is ever deleted: the outbox is not touched, and an interval
whose message the broker has not acknowledged is kept whatever its age.
Intervals (and events, which live in the outbox until sent) are never shed:
when they alone exceed the budget the alarm stays up and says so.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import structlog

from edged.config.schema import Storage
from edged.core.model import Event, TimeState
from edged.io.clock import Clock
from edged.io.store import TIMED_TABLES, CorruptStore, Store

log = structlog.get_logger("edged.app.housekeeping")

# The alarm clears only once use is back under this share of the budget (and
# free space above the floor by as much): hysteresis, so it does not flap on
# every check while use hovers around the budget.
RESUME_FRACTION = 0.9
# Rows deleted per statement: each batch is a short transaction, so the
# recorder's boundary commits slip in between batches.
DELETE_BATCH_ROWS = 2000
# Rows of a shed kind deleted per round of the budget loop; each round ends
# with a checkpoint (Store.reclaim) so that it measures what it freed.
PURGE_BATCH_ROWS = 10_000
# A full round (retention, the store's size) costs a dozen statements, each a
# round trip to aiosqlite's thread: at check_every (60 s) that was most of an
# idle daemon's wake-ups. `run` does one only when the recorder committed
# something since the last, in the disk alarm, or at least this often; in
# between it only measures free space (one statvfs), which other processes
# can change. Rows that expire with no commit are deleted within this.
IDLE_ROUND_EVERY_S = 900.0


class DiskAlarm(StrEnum):
    BUDGET = "budget"  # the database reached storage.disk_budget
    FREE_SPACE = "free_space"  # its file system fell under storage.min_free


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    budget_bytes: int
    min_free_bytes: int
    policy: tuple[str, ...]  # kinds to shed, in order


@dataclass(frozen=True, slots=True)
class DiskUsage:
    used_bytes: int  # the database: main file + WAL - free pages
    free_bytes: int  # available on its file system
    stored: frozenset[str]  # sheddable kinds that still have rows


@dataclass(frozen=True, slots=True)
class BudgetState:
    alarm: DiskAlarm | None = None
    shed: tuple[str, ...] = ()  # kinds not stored now


class BudgetChange(StrEnum):
    ENTERED = "entered"
    ESCALATED = "escalated"  # another kind is no longer stored
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    state: BudgetState
    purge: tuple[str, ...]  # shed kinds whose oldest rows to delete now
    change: BudgetChange | None


def retention_cutoffs(
    now: datetime, retention: Mapping[str, float | None], time_state: TimeState
) -> dict[str, datetime]:
    """Per kind, rows older than the returned time may be deleted. None while
    the time is only assumed: an unconfirmed clock must not decide what is old."""
    if time_state is TimeState.ASSUMED:
        return {}
    return {
        kind: now - timedelta(seconds=keep_s)
        for kind, keep_s in retention.items()
        if keep_s is not None
    }


def decide_budget(usage: DiskUsage, limits: BudgetLimits, state: BudgetState) -> BudgetDecision:
    """The next budget state from the measured use.

    The alarm is raised when the database reaches the budget or free space
    falls under the floor, and cleared only when use is back under
    RESUME_FRACTION of the budget and free space above floor / RESUME_FRACTION.
    In the alarm the first kind of the policy is not stored and its stored rows
    are deleted oldest first until use is back under that mark; the next kind
    is shed only when the kinds already shed have nothing left to delete and
    the limit is still exceeded."""
    over_budget = usage.used_bytes >= limits.budget_bytes
    low_free = usage.free_bytes < limits.min_free_bytes
    recovered = (
        usage.used_bytes <= limits.budget_bytes * RESUME_FRACTION
        and usage.free_bytes * RESUME_FRACTION >= limits.min_free_bytes
    )
    reason = DiskAlarm.FREE_SPACE if low_free else DiskAlarm.BUDGET if over_budget else None
    change: BudgetChange | None = None
    if state.alarm is None:
        if reason is None:
            return BudgetDecision(state, (), None)
        alarm, shed, change = reason, limits.policy[:1], BudgetChange.ENTERED
    elif recovered:
        return BudgetDecision(BudgetState(), (), BudgetChange.LEFT)
    else:
        # Between the marks the alarm keeps the reason it had.
        alarm, shed = reason or state.alarm, state.shed
    if reason is not None:
        while len(shed) < len(limits.policy) and not usage.stored.intersection(shed):
            shed = limits.policy[: len(shed) + 1]
            change = change or BudgetChange.ESCALATED
    purge = tuple(kind for kind in shed if kind in usage.stored)
    return BudgetDecision(BudgetState(alarm, shed), purge, change)


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskStatus:
    """What the gateway status shows about the store."""

    used_bytes: int | None
    free_bytes: int | None
    budget_bytes: int
    alarm: DiskAlarm | None
    shedding: tuple[str, ...]


def budget_event(
    decision: BudgetDecision, usage: DiskUsage, limits: BudgetLimits, at: datetime
) -> Event:
    """The gateway event for a change of the budget state."""
    state, change = decision.state, decision.change
    assert change is not None
    if change is BudgetChange.LEFT:
        message = "disk use back under the budget: storing everything again"
    else:
        limit = (
            f"free space {usage.free_bytes} B under storage.min_free {limits.min_free_bytes} B"
            if state.alarm is DiskAlarm.FREE_SPACE
            else f"database {usage.used_bytes} B reached storage.disk_budget "
            f"{limits.budget_bytes} B"
        )
        kept = "intervals and events are still stored and sent"
        message = f"{limit}: not storing {', '.join(state.shed) or 'nothing more'}; {kept}"
    return Event(
        device=None,
        kind="disk_budget",
        at=at,
        message=message,
        details={
            "change": str(change),
            "alarm": None if state.alarm is None else str(state.alarm),
            "storage_shedding": list(state.shed),
            "disk_used_bytes": usage.used_bytes,
            "disk_budget_bytes": limits.budget_bytes,
            "disk_free_bytes": usage.free_bytes,
            "min_free_bytes": limits.min_free_bytes,
        },
    )


def store_corrupt_event(recovered: CorruptStore) -> Event:
    """The gateway event for a damaged database moved aside at start-up."""
    return Event(
        device=None,
        kind="store_corrupt",
        at=recovered.at,
        message=f"the database was damaged and has been moved aside to {recovered.moved_to}; "
        "edged started a fresh one (unsent messages and engine state in the old file were "
        "not carried over)",
        details={
            "moved_to": str(recovered.moved_to),
            "moved": [str(p) for p in recovered.moved],
            "error": recovered.error,
        },
    )


class Housekeeper:
    """The shell around the pure decisions; one task in the app's TaskGroup."""

    def __init__(
        self,
        store: Store,
        settings: Storage,
        clock: Clock,
        apply_shedding: Callable[[frozenset[str]], None],
        on_change: Callable[[BudgetDecision, DiskUsage], None],
        free_bytes: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._apply_shedding = apply_shedding
        self._on_change = on_change
        directory = settings.path.parent
        self._free_bytes = free_bytes or (lambda: shutil.disk_usage(directory).free)
        self.limits = BudgetLimits(settings.disk_budget, settings.min_free, settings.budget_policy)
        self.state = BudgetState()
        self.usage: DiskUsage | None = None
        # A commit since the last full round (check_free_space runs before each).
        self._written = True
        self._last_round_s: float | None = None

    def status(self) -> DiskStatus:
        usage = self.usage
        return DiskStatus(
            used_bytes=usage.used_bytes if usage else None,
            free_bytes=usage.free_bytes if usage else None,
            budget_bytes=self.limits.budget_bytes,
            alarm=self.state.alarm,
            shedding=self.state.shed,
        )

    async def run(self) -> None:
        while True:
            if self._round_due():
                await self.check()
            else:
                await self._check_free_space_only()
            await asyncio.sleep(self._settings.check_every)

    def _round_due(self) -> bool:
        if self._written or self.usage is None or self.state.alarm is not None:
            return True
        every_s = max(IDLE_ROUND_EVERY_S, self._settings.check_every)
        last = self._last_round_s
        return last is None or asyncio.get_running_loop().time() - last >= every_s

    async def _check_free_space_only(self) -> None:
        """Nothing written since the last round: the store's figures stand, and
        only the file system's free space may have moved. A full round if that
        changes the budget state."""
        last = self.usage
        assert last is not None
        try:
            usage = DiskUsage(last.used_bytes, self._free_bytes(), last.stored)
        except OSError as exc:
            log.debug("free space not measured", error=str(exc))
            return
        decision = decide_budget(usage, self.limits, self.state)
        if decision.change is not None or decision.purge:
            await self.check()
            return
        self.usage = usage

    async def check(self) -> None:
        """One round: retention, then the budget (deleting shed rows as decided)."""
        self._written = False
        self._last_round_s = asyncio.get_running_loop().time()
        deleted = await self._expire()
        while True:
            usage = await self._measure()
            decision = decide_budget(usage, self.limits, self.state)
            self._apply(decision, usage)
            if not decision.purge:
                break
            for kind in decision.purge:
                deleted += await self._store.delete_oldest(kind, PURGE_BATCH_ROWS)
            # Until a checkpoint the deletes sit in the WAL and the file does
            # not shrink: reclaim, so the next measurement sees the space freed.
            await self._store.reclaim()
        if deleted:
            await self._store.reclaim()
            self.usage = await self._measure()

    def check_free_space(self) -> None:
        """Before each boundary commit: raise the free-space alarm the moment
        the file system falls under `min_free`, not at the next periodic
        check, which may come after the disk is full. (Only raising: the
        periodic check clears the alarm, with its hysteresis.)"""
        self._written = True
        if self.state.alarm is not None:
            return
        try:
            free = self._free_bytes()
        except OSError as exc:
            log.debug("free space not measured", error=str(exc))
            return
        if free >= self.limits.min_free_bytes:
            return
        last = self.usage
        usage = DiskUsage(
            last.used_bytes if last else 0, free, last.stored if last else frozenset()
        )
        self.usage = usage
        self._apply(decide_budget(usage, self.limits, self.state), usage)

    async def _expire(self) -> int:
        retention = self._settings.retention
        cutoffs = retention_cutoffs(
            self._clock.now(),
            {kind: getattr(retention, kind) for kind in TIMED_TABLES},
            self._clock.time_state,
        )
        deleted = 0
        for kind, cutoff in cutoffs.items():
            while True:
                count = await self._store.delete_older(kind, cutoff, DELETE_BATCH_ROWS)
                deleted += count
                if count < DELETE_BATCH_ROWS:
                    break
        if deleted:
            log.info("retention deleted expired rows", rows=deleted)
        return deleted

    async def _measure(self) -> DiskUsage:
        stored = frozenset(
            [kind for kind in self.limits.policy if await self._store.has_rows(kind)]
        )
        used = await self._store.used_bytes()
        usage = DiskUsage(used, self._free_bytes(), stored)
        self.usage = usage
        return usage

    def _apply(self, decision: BudgetDecision, usage: DiskUsage) -> None:
        if decision.state.shed != self.state.shed:
            self._apply_shedding(frozenset(decision.state.shed))
        self.state = decision.state
        if decision.change is None:
            return
        log_at = log.info if decision.change is BudgetChange.LEFT else log.warning
        log_at("disk budget", change=str(decision.change),
               alarm=str(decision.state.alarm) if decision.state.alarm else None,
               shedding=list(decision.state.shed), used_bytes=usage.used_bytes,
               free_bytes=usage.free_bytes, budget_bytes=self.limits.budget_bytes)  # fmt: skip
        self._on_change(decision, usage)
