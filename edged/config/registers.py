"""Register numbers as vendors print them -> the 0-based PDU addresses edged reads.

edged's `register:` is the address in the Modbus frame (0-based). Register lists
print other things: Modicon numbers (40001 = holding address 0, 30001 = input
address 0, six-digit 400001/300001 likewise), "4x0091" (holding register 91,
address 90), or hex addresses that go on the wire as written (ABB 0x5000).
This module turns those into an address and a function so a site can copy a
number straight from a register list, and says when a plain address looks like
a Modicon number typed as an address (the most common commissioning mistake:
every read is then an illegal-address exception).
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

Function = Literal["holding", "input"]

_MODICON: Final = (
    # (first, last, function, offset): number N in [first, last] is address N - offset
    (40001, 49999, "holding", 40001),
    (30001, 39999, "input", 30001),
    (400001, 465536, "holding", 400001),
    (300001, 365536, "input", 300001),
)
_PREFIXED = re.compile(r"^([34])[xX](\d{4,5})$")
_HEX = re.compile(r"^0[xX]([0-9a-fA-F]{1,4})$")

NOTATION_HELP: Final = (
    "a 0-based register address (the address in the Modbus frame), or a number copied "
    'from a register list as a string: "4x0091" (holding register 91, address 90), '
    '"3x0001" (input register 1, address 0) or "0x5000" (a hex address, sent as written)'
)
REGISTER_NUMBER_HELP: Final = (
    "instead of `register`: a Modicon register number as printed in a register list, "
    "40001-49999 or 400001-465536 (holding, address = N - 40001 / N - 400001) or "
    "30001-39999 or 300001-365536 (input, address = N - 30001 / N - 300001); sets "
    "`function` accordingly"
)


def modicon_number(number: int) -> tuple[int, Function]:
    """(address, function) of a Modicon 3xxxx/4xxxx register number."""
    for first, last, function, offset in _MODICON:
        if first <= number <= last:
            return number - offset, function  # type: ignore[return-value]
    raise ValueError(
        f"register_number {number} is not a Modicon register number (40001-49999, "
        "30001-39999, 400001-465536 or 300001-365536); give the 0-based address as "
        "`register` instead"
    )


def parse_register_text(text: str) -> tuple[int, Function | None]:
    """(address, implied function or None) of a register written as a string."""
    stripped = text.strip()
    if match := _PREFIXED.match(stripped):
        number = int(match.group(2))
        if number < 1:
            raise ValueError(f"register {text!r}: register numbers start at 1")
        return number - 1, "holding" if match.group(1) == "4" else "input"
    if match := _HEX.match(stripped):
        return int(match.group(1), 16), None
    raise ValueError(f"register {text!r} is not understood; expected {NOTATION_HELP}")


def normalise(data: Any) -> Any:
    """Before-validator for a register map: `register_number` or a string
    `register` become a 0-based `register` (and `function`), checked against
    an explicit `function`."""
    if not isinstance(data, dict):
        return data
    number = data.get("register_number")
    register = data.get("register")
    if number is None and not isinstance(register, str):
        return data
    implied: Function | None
    if number is not None:
        if register is not None:
            raise ValueError("give `register` or `register_number`, not both")
        if not isinstance(number, int) or isinstance(number, bool):
            raise ValueError(f"register_number must be a whole number, got {number!r}")
        address, implied = modicon_number(number)
    else:
        address, implied = parse_register_text(str(register))
    given = data.get("function")
    if implied is not None and given is not None and given != implied:
        shown = register if register is not None else number
        raise ValueError(f"register {shown} is an {implied} register, but function is {given}")
    result = {**data, "register": address}
    if implied is not None:
        result["function"] = implied
    return result


def address_hint(address: int, function: str) -> str | None:
    """A warning when a plain address looks like a Modicon number typed as one."""
    if function == "holding" and 40000 <= address <= 49999:
        prefix, offset = "4xxxx", 40001
    elif function == "input" and 30000 <= address <= 39999:
        prefix, offset = "3xxxx", 30001
    else:
        return None
    if address < offset:
        return (
            f"address {address} looks like a {prefix} register number, but {prefix} numbers "
            f"start at {offset} (address 0); check the register list"
        )
    return (
        f"address {address} looks like a {prefix} register number; the 0-based address is "
        f"{address}-{offset} = {address - offset} (write `register_number: {address}` or the "
        "address itself; keep it only if the meter really uses this address)"
    )
