"""The publisher's background deletes of acknowledged outbox rows (edged.io.mqtt)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from edged.io.mqtt import _Deletes


def test_deletes_run_one_at_a_time_and_merge_what_arrives_meanwhile() -> None:
    async def scenario() -> list[list[int]]:
        calls: list[list[int]] = []
        release = asyncio.Event()

        async def delete(seqs: Sequence[int]) -> None:
            calls.append(list(seqs))
            if len(calls) == 1:
                await release.wait()  # the first delete is slow (an fsync)

        deletes = _Deletes(delete)
        deletes.add([1, 2])
        await asyncio.sleep(0)  # the first delete starts
        deletes.add([3])  # acknowledged while it runs: not a delete of its own yet
        deletes.add([4, 5])
        await asyncio.sleep(0)
        assert calls == [[1, 2]]
        release.set()
        await deletes.done()
        return calls

    assert asyncio.run(scenario()) == [[1, 2], [3, 4, 5]]


def test_done_waits_even_when_nothing_was_acknowledged() -> None:
    # An empty window still calls the delete: it retries rows whose delete failed.
    async def scenario() -> list[list[int]]:
        calls: list[list[int]] = []

        async def delete(seqs: Sequence[int]) -> None:
            await asyncio.sleep(0)
            calls.append(list(seqs))

        deletes = _Deletes(delete)
        deletes.add([])
        await deletes.done()
        await deletes.done()  # nothing left: returns at once
        return calls

    assert asyncio.run(scenario()) == [[]]


def test_done_raises_what_the_delete_raised() -> None:
    async def scenario() -> str:
        async def delete(seqs: Sequence[int]) -> None:
            raise RuntimeError("store gone")

        deletes = _Deletes(delete)
        deletes.add([7])
        try:
            await deletes.done()
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert asyncio.run(scenario()) == "store gone"
