"""Checks on a Modbus read reply before any register in it is believed.

pymodbus matches a reply to its request only loosely: it decodes whatever
function code the reply carries (an fc 4 answer to an fc 3 request comes back
as input registers), takes registers up to an odd or short byte count, and
accepts transaction id 0 and any unit id for unit 0. A meter read that is
billed on must come from exactly the request that was sent, so the shell
hands the raw frame it received to :func:`reply_problem` and drops the read
when anything does not match (Modbus application protocol v1.1b3, 6.3/6.4:
the reply echoes the function code, byte count = 2 x quantity of registers;
Modbus messaging on TCP/IP v1.0b, 3.1.3: the MBAP header echoes the
transaction and unit identifiers).

Pure: bytes and numbers in, a problem text (or None) out.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReceivedFrame", "reply_problem"]

FUNCTION_CODES = {"holding": 3, "input": 4}
EXCEPTION_BIT = 0x80


@dataclass(frozen=True, slots=True)
class ReceivedFrame:
    """One frame as the framer cut it: its unit id, transaction id (0 on RTU)
    and PDU (function code onwards, without the RTU CRC)."""

    unit_id: int
    transaction_id: int
    pdu: bytes


def reply_problem(
    frame: ReceivedFrame | None,
    *,
    function: str,
    count: int,
    unit_id: int,
    transaction_id: int | None,
) -> str | None:
    """Why ``frame`` is not a well-formed reply to a read of ``count``
    registers with ``function`` ('holding' or 'input') from ``unit_id``
    (``transaction_id`` None: a serial framing without one), or None.

    An exception reply (function code + 0x80, one code byte) is well formed.
    """
    if frame is None:
        return "no frame was received for this reply"
    sent_fc = FUNCTION_CODES[function]
    if frame.unit_id != unit_id:
        return f"reply from unit {frame.unit_id}, request was to unit {unit_id}"
    if transaction_id is not None and frame.transaction_id != transaction_id:
        return f"reply has transaction id {frame.transaction_id}, request had {transaction_id}"
    pdu = frame.pdu
    if not pdu:
        return "empty reply"
    fc = pdu[0]
    if fc == sent_fc | EXCEPTION_BIT:
        if len(pdu) != 2:
            return f"exception reply of {len(pdu)} bytes, expected 2"
        return None
    if fc != sent_fc:
        return f"reply has function code {fc}, request had {sent_fc}"
    if len(pdu) < 2:
        return "reply without a byte count"
    byte_count = pdu[1]
    if byte_count != 2 * count:
        return f"reply byte count {byte_count}, expected {2 * count} for {count} registers"
    if len(pdu) != 2 + byte_count:
        return f"reply carries {len(pdu) - 2} data bytes, byte count says {byte_count}"
    return None
