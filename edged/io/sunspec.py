"""SunSpec model discovery over a link (read-only): the "SunS" marker at 0,
40000 or 50000, then the model chain, until one of the wanted meter models
(rules in :mod:`edged.core.sunspec`)."""

from __future__ import annotations

from collections.abc import Sequence

from edged.core.model import ReadError, ReadErrorKind
from edged.core.registers import Point, ReadRequest
from edged.core.sunspec import (
    BASE_ADDRESSES,
    END_MODEL_ID,
    MAX_MODELS,
    ModelRef,
    is_marker,
    next_model_address,
)
from edged.io.bus import Priority
from edged.io.modbus import Link


def _pair(address: int) -> ReadRequest:
    points = (
        Point(name=f"_sunspec.{address}", function="holding", address=address, data_type="uint16"),
        Point(
            name=f"_sunspec.{address + 1}",
            function="holding",
            address=address + 1,
            data_type="uint16",
        ),
    )
    return ReadRequest(function="holding", address=address, count=2, points=points)


async def _words(link: Link, unit_id: int, address: int) -> tuple[int, ...] | ReadError:
    raw = await link.read(unit_id, (_pair(address),), priority=Priority.BOUNDARY)
    if raw.error is not None:
        return raw.error
    return raw.registers[0][1]


async def discover(link: Link, unit_id: int, models: Sequence[int]) -> ModelRef | ReadError:
    """The first of ``models`` in the device's SunSpec chain, or why not.

    A base that answers with an exception (no register there) is skipped; a
    timeout or a broken link ends the search (the next read tries again)."""
    for base in BASE_ADDRESSES:
        words = await _words(link, unit_id, base)
        if isinstance(words, ReadError):
            if words.kind is ReadErrorKind.EXCEPTION:
                continue
            return words
        if not is_marker(words):
            continue
        address = base + 2
        seen: list[int] = []
        for _ in range(MAX_MODELS):
            header = await _words(link, unit_id, address)
            if isinstance(header, ReadError):
                return header
            model_id, length = header
            if model_id == END_MODEL_ID:
                break
            model = ModelRef(model_id, address, length)
            if model_id in models:
                return model
            seen.append(model_id)
            address = next_model_address(model)
            if address > 0xFFFF - 2:
                break
        return ReadError(
            ReadErrorKind.MALFORMED,
            f"SunSpec chain at {base} has models {seen}, none of {list(models)}",
        )
    return ReadError(ReadErrorKind.MALFORMED, "no SunSpec marker 'SunS' at 0, 40000 or 50000")
