"""The time state machine's table: total where it must be, and the rules a
billing engineer expects (written out here, not read back from the table)."""

from __future__ import annotations

import pytest

from edged.core.model import TimeState
from edged.core.time.states import (
    INITIAL_TIME_STATE,
    TIME_STATE_TRANSITIONS,
    ImpossibleTransition,
    TimeInput,
    next_time_state,
)

A, H, S = TimeState.ASSUMED, TimeState.HOLDOVER, TimeState.SYNCED
ANY_TIME = (
    TimeInput.NTP_FIT,
    TimeInput.KERNEL_SYNCED,
    TimeInput.KERNEL_UNSYNCED,
    TimeInput.SILENCE,
)


def test_edged_starts_assuming_the_clock() -> None:
    assert INITIAL_TIME_STATE is A


@pytest.mark.parametrize("event", ANY_TIME)
@pytest.mark.parametrize("state", list(TimeState))
def test_inputs_that_can_come_at_any_time_have_a_transition_from_every_state(
    state: TimeState, event: TimeInput
) -> None:
    assert (state, event) in TIME_STATE_TRANSITIONS


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (A, TimeInput.CONFIRMED_AT_START, S),
        (A, TimeInput.NTP_FIT, S),
        (H, TimeInput.NTP_FIT, S),
        (H, TimeInput.KERNEL_SYNCED, S),
        (S, TimeInput.SILENCE, H),
        (S, TimeInput.KERNEL_UNSYNCED, H),
        # Never confirmed: silence or a lost kernel sync cannot make it holdover.
        (A, TimeInput.SILENCE, A),
        (A, TimeInput.KERNEL_UNSYNCED, A),
        (H, TimeInput.SILENCE, H),
    ],
)
def test_transitions(state: TimeState, event: TimeInput, expected: TimeState) -> None:
    assert next_time_state(state, event) is expected


@pytest.mark.parametrize("state", [H, S])
def test_start_up_happens_only_in_the_initial_state(state: TimeState) -> None:
    with pytest.raises(ImpossibleTransition):
        next_time_state(state, TimeInput.CONFIRMED_AT_START)
