"""The time state machine as one table: (state, input) -> state.

Every change of `TimeState` goes through `next_time_state`, the one place
that moves it, and the table is the whole of the rules (the way h11 keeps
its connection state machine): a pair that is not in the table cannot
happen, and says so. `docs/time.md` shows the table, generated from it
(`python -m tools.docgen --write`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from edged.core.errors import EdgedError
from edged.core.model import TimeState

ASSUMED, HOLDOVER, SYNCED = TimeState.ASSUMED, TimeState.HOLDOVER, TimeState.SYNCED

# Until something vouches for the system clock, edged only assumes it.
INITIAL_TIME_STATE = ASSUMED


class TimeInput(StrEnum):
    """What can move the time state, and what each means."""

    CONFIRMED_AT_START = "confirmed_at_start"
    NTP_FIT = "ntp_fit"
    KERNEL_SYNCED = "kernel_synced"
    KERNEL_UNSYNCED = "kernel_unsynced"
    SILENCE = "silence"


INPUT_MEANING: Mapping[TimeInput, str] = {
    TimeInput.CONFIRMED_AT_START: "start-up with a sync source already vouching for the "
    "system clock (`time.source: system`, kernel synchronised)",
    TimeInput.NTP_FIT: "an NTP poll round accepted into the offset model",
    TimeInput.KERNEL_SYNCED: "the kernel reports the system clock synchronised "
    "(`time.source: system`)",
    TimeInput.KERNEL_UNSYNCED: "the kernel reports the system clock unsynchronised",
    TimeInput.SILENCE: "no confirmation of the time for longer than `time.holdover_after`",
}

TIME_STATE_TRANSITIONS: Mapping[tuple[TimeState, TimeInput], TimeState] = {
    # Start-up happens once, in the initial state.
    (ASSUMED, TimeInput.CONFIRMED_AT_START): SYNCED,
    # A confirmation from NTP or the kernel is synced time, whatever came before.
    (ASSUMED, TimeInput.NTP_FIT): SYNCED,
    (HOLDOVER, TimeInput.NTP_FIT): SYNCED,
    (SYNCED, TimeInput.NTP_FIT): SYNCED,
    (ASSUMED, TimeInput.KERNEL_SYNCED): SYNCED,
    (HOLDOVER, TimeInput.KERNEL_SYNCED): SYNCED,
    (SYNCED, TimeInput.KERNEL_SYNCED): SYNCED,
    # Losing sync holds over synced time; assumed time stays assumed (it
    # never had a confirmation to hold over).
    (ASSUMED, TimeInput.KERNEL_UNSYNCED): ASSUMED,
    (HOLDOVER, TimeInput.KERNEL_UNSYNCED): HOLDOVER,
    (SYNCED, TimeInput.KERNEL_UNSYNCED): HOLDOVER,
    (ASSUMED, TimeInput.SILENCE): ASSUMED,
    (HOLDOVER, TimeInput.SILENCE): HOLDOVER,
    (SYNCED, TimeInput.SILENCE): HOLDOVER,
}


class ImpossibleTransition(EdgedError):
    """A (state, input) pair the table does not have: a bug, not a clock event."""


def next_time_state(state: TimeState, event: TimeInput) -> TimeState:
    try:
        return TIME_STATE_TRANSITIONS[(state, event)]
    except KeyError:
        raise ImpossibleTransition(f"time state {state} has no transition on {event}") from None
