"""Virtual meters across devices: waits for every input, then combines (pure).

Devices close the same boundary at slightly different moments; each input
record is held until every input of a virtual meter has reported that end,
then `edged.core.virtual.plan.combine_meter` builds the virtual records. A failed read
still reports (a MISSING record), so no end waits forever; a re-emitted input
record (gaps: prorate) recombines its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, tzinfo

from edged.core.model import Interval
from edged.core.virtual.plan import VirtualMeterPlan, combine_meter

# Ends older than this many pending ends are given up (an input stopped reporting).
MAX_PENDING_ENDS = 64


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
                    out.extend(
                        combine_meter(plan, site=self._site, end=end, zone=self._zone, records=have)
                    )
        self._forget_old()
        return out

    def _forget_old(self) -> None:
        if len(self._pending) > MAX_PENDING_ENDS:
            for end in sorted(self._pending)[: len(self._pending) - MAX_PENDING_ENDS]:
                del self._pending[end]
