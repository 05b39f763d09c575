"""Why a serial port cannot be opened, in words a field engineer can act on.

pymodbus logs the OS error of a failed serial open and returns False, so the
link only knows that the connect failed ("cannot connect to rtu:///dev/...").
When it does, the link opens the port once itself, the way pymodbus does
(pyserial, exclusive, the same line settings), and turns the error into a
sentence that says what is wrong and which config key to look at: the port is
not there, edged may not open it, another program holds it, or the port
refused the line settings.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass

import serial

PORT_KEY = "transport.port"
LINE_KEYS = "transport.baudrate, transport.parity, transport.bytesize, transport.stopbits"


@dataclass(frozen=True, slots=True, kw_only=True)
class SerialLine:
    """A serial port and its line settings, as configured."""

    port: str
    baudrate: int
    bytesize: int
    parity: str
    stopbits: int

    def describe(self) -> str:
        return f"{self.baudrate} Bd {self.bytesize}{self.parity}{self.stopbits}"


def probe_serial_port(line: SerialLine) -> str | None:
    """Open and close the port as the Modbus client does; None when it opens,
    otherwise why not. Blocking (an open and a few ioctls): run it in a thread."""
    try:
        port = serial.Serial(
            port=line.port,
            baudrate=line.baudrate,
            bytesize=line.bytesize,
            parity=line.parity,
            stopbits=line.stopbits,
            timeout=0,
            exclusive=True,
        )
    # SerialException (an OSError), ValueError (a baud rate the driver refuses),
    # termios.error (tcsetattr refused the line settings): all are answers.
    except Exception as exc:
        return explain_open_error(exc, line)
    port.close()
    return None


def explain_open_error(exc: BaseException, line: SerialLine) -> str:
    """The error pyserial raised opening `line.port`, for a field engineer."""
    code = _errno(exc)
    port = line.port
    if code == errno.ENOENT:
        return (
            f"serial port {port} not found (no such device): is the adapter plugged in and "
            f"the name right? Stable names are in /dev/serial/by-id/; check {PORT_KEY}"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied opening serial port {port} ({_ownership(port)}); edged runs "
            f"as {_whoami()}: add that user to the port's group (dialout on Debian) or check "
            f"{PORT_KEY}"
        )
    if code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK):
        return (
            f"serial port {port} is busy: another program holds it (a second edged on the "
            f"same port, a getty, ModemManager; `fuser -v {port}` names it); check {PORT_KEY}"
        )
    if code in (errno.ENXIO, errno.ENODEV, errno.EIO):
        return (
            f"serial port {port} has no device behind it (unplugged, or the driver lost it: "
            f"see `dmesg`); check {PORT_KEY}"
        )
    if code == errno.ENOTTY:
        return f"{port} is not a serial port (it takes no line settings); check {PORT_KEY}"
    text = str(exc)
    if isinstance(exc, ValueError) or code == errno.EINVAL or "configure port" in text:
        return (
            f"serial port {port} refused the line settings {line.describe()} ({text}); check "
            f"{LINE_KEYS}"
        )
    return f"cannot open serial port {port}: {text}; check {PORT_KEY}"


def _errno(exc: BaseException) -> int | None:
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    # pyserial wraps a failed tcsetattr as "Could not configure port: (errno, text)".
    match = re.search(r"\((\d+), ", str(exc))
    return int(match.group(1)) if match else None


def _ownership(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "owner unknown"
    return f"owner {_user(st.st_uid)}, group {_group(st.st_gid)}, mode {stat.filemode(st.st_mode)}"


def _whoami() -> str:
    uid = os.geteuid()
    groups = ", ".join(sorted({_group(g) for g in os.getgroups()})) or "none"
    return f"user {_user(uid)} (groups: {groups})"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
