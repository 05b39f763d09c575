"""Virtual meters across devices: waits for every input, then combines (pure).

Devices close the same boundary at slightly different moments; each input
record is held until every input of a virtual meter has reported that end,
then `edged.core.virtual.plan.combine_meter` builds the virtual records. A failed read
still reports (a MISSING record), so no end waits forever; a re-emitted input
record (gaps: prorate) recombines its end, however old (no fixed window:
an end is forgotten only once no input can re-emit it any more).

A virtual record covers exactly the span its inputs' records cover (issue
13): when one input's LONG record closes a gap (it holds the energy of its
MISSING records before it), the other inputs' ordinary records for the same
ends go into the same virtual record, a LONG one whose value is the signed
sum over the whole span and whose demand is that value over the span's real
length. The virtual records for the gap's ends stay MISSING (they were
published so, and an id is never published with two contents), and the
station total equals the sum of its inputs over any span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, tzinfo
from decimal import Decimal

from edged.core.model import Flag, Interval, TimeState
from edged.core.schedule import nominal_start
from edged.core.virtual.plan import VirtualChannelPlan, VirtualMeterPlan, combine, combine_meter

# A safety net for memory only: an input that never reports a valued record
# again would otherwise keep the other inputs' records for ever. 35 040 ends
# are a year of quarter hours.
MAX_HELD_ENDS = 35_040
# Kept for compatibility with code that imported it; nothing is given up
# after 64 ends any more.
MAX_PENDING_ENDS = MAX_HELD_ENDS

_TIME_STATE_RANK = {TimeState.SYNCED: 0, TimeState.HOLDOVER: 1, TimeState.ASSUMED: 2}


def _valued(record: Interval | None) -> bool:
    return record is not None and record.value is not None and Flag.MISSING not in record.flags


class VirtualMeters:
    def __init__(self, plans: Sequence[VirtualMeterPlan], site: str, zone: tzinfo) -> None:
        self._plans = tuple(plans)
        self._site = site
        self._zone = zone
        self._needed = {
            plan.meter_id: {(i.device, i.channel) for c in plan.channels for i in c.inputs}
            for plan in self._plans
        }
        self._inputs = set().union(*self._needed.values()) if self._needed else set()
        # end -> (device, channel) -> latest record for that end
        self._pending: dict[datetime, dict[tuple[str, str], Interval]] = {}

    def replanned(self, plans: Sequence[VirtualMeterPlan]) -> VirtualMeters:
        """The same meters under new plans (a config reload): inputs already
        held for ends not yet complete are kept, so the interval in progress
        is still combined."""
        new = VirtualMeters(plans, self._site, self._zone)
        for end, have in self._pending.items():
            kept = {key: record for key, record in have.items() if key in new._inputs}
            if kept:
                new._pending[end] = kept
        return new

    def add(self, records: Sequence[Interval]) -> list[Interval]:
        """Take a device's new records; return virtual records now complete."""
        touched: set[datetime] = set()
        for record in records:
            key = (record.device, record.channel)
            if key in self._inputs:
                self._pending.setdefault(record.end, {})[key] = record
                touched.add(record.end)
        out: list[Interval] = []
        for end in sorted(touched):
            have = self._pending[end]
            for plan in self._plans:
                if self._needed[plan.meter_id] <= have.keys():
                    out.extend(self._combine(plan, end))
        self._forget_old()
        return out

    def _combine(self, plan: VirtualMeterPlan, end: datetime) -> list[Interval]:
        have = self._pending[end]
        records = combine_meter(plan, site=self._site, end=end, zone=self._zone, records=have)
        out: list[Interval] = []
        for channel, record in zip(plan.channels, records, strict=True):
            spanned = self._span_record(plan, channel, end)
            out.append(spanned if spanned is not None else record)
        return out

    def _covered(self, key: tuple[str, str], end: datetime) -> list[datetime]:
        """Ends whose energy the input's record at `end` holds: itself, and
        for a LONG record the run of MISSING records right before it."""
        record = self._pending[end][key]
        ends = [end]
        if Flag.LONG not in record.flags:
            return ends
        for earlier in sorted((e for e in self._pending if e < end), reverse=True):
            previous = self._pending[earlier].get(key)
            if previous is None or Flag.MISSING not in previous.flags:
                break
            if Flag.COUNTER_RESET in previous.flags:
                break
            ends.append(earlier)
        return ends

    def _span_record(
        self, plan: VirtualMeterPlan, channel: VirtualChannelPlan, end: datetime
    ) -> Interval | None:
        """The virtual record at `end` when an input's record spans earlier
        ends; None when every input covers just `end` (the ordinary case)."""
        have = self._pending[end]
        keys = [(i.device, i.channel) for i in channel.inputs]
        if not all(_valued(have.get(k)) for k in keys):
            return None
        covered = {k: set(self._covered(k, end)) for k in keys}
        span = set().union(*covered.values())
        if span == {end}:
            return None
        start = nominal_start(min(span), plan.interval_s, self._zone)
        total = Decimal(0)
        flags: set[Flag] = {Flag.LONG}
        used: list[Interval] = []
        durations: list[float] = []
        for item in channel.inputs:
            key = (item.device, item.channel)
            own = 0.0
            for e in sorted(span):
                record = self._pending.get(e, {}).get(key)
                if e in covered[key] and e != end:
                    continue  # inside this input's LONG record at `end`
                if not _valued(record):
                    # No energy known for this end from this input: the span
                    # cannot be completed; the virtual record stays MISSING.
                    return self._missing(plan, channel, end)
                assert record is not None
                assert record.value is not None
                total += item.sign * Decimal(repr(record.value))
                own += record.duration_s
                used.append(record)
                flags |= record.flags
            durations.append(own)
        flags.discard(Flag.MISSING)
        duration_s = max(durations) if durations else float((end - start).total_seconds())
        value = float(total)
        demand = None
        if (
            channel.demand_unit is not None
            and Flag.AMT not in flags
            and all(r.demand is not None for r in used)
            and duration_s > 0
        ):
            demand = float(total / (Decimal(repr(duration_s)) / 3600))
        record = combine(plan, channel, site=self._site, end=end, zone=self._zone, inputs={
            i.ref: have.get((i.device, i.channel)) for i in channel.inputs
        })  # fmt: skip
        return replace(
            record,
            value=value,
            duration_s=duration_s,
            demand=demand,
            rolling_demand=None,
            original_value=None,
            flags=frozenset(flags),
            time_state=max(
                (r.time_state for r in used),
                key=_TIME_STATE_RANK.__getitem__,
                default=record.time_state,
            ),
        )

    def _missing(
        self, plan: VirtualMeterPlan, channel: VirtualChannelPlan, end: datetime
    ) -> Interval:
        record = combine(plan, channel, site=self._site, end=end, zone=self._zone, inputs={})
        return replace(record, flags=record.flags | {Flag.MISSING}, value=None, demand=None)

    def _forget_old(self) -> None:
        """Forget ends no input can re-emit or need: every input has a valued
        record at or after them."""
        if not self._pending:
            return
        last_valued: dict[tuple[str, str], datetime] = {}
        for end, have in self._pending.items():
            for key, record in have.items():
                if _valued(record) and (key not in last_valued or end > last_valued[key]):
                    last_valued[key] = end
        if self._inputs <= last_valued.keys():
            settled = min(last_valued[k] for k in self._inputs)
            for end in [e for e in self._pending if e < settled]:
                del self._pending[end]
        if len(self._pending) > MAX_HELD_ENDS:
            for end in sorted(self._pending)[: len(self._pending) - MAX_HELD_ENDS]:
                del self._pending[end]
