"""A serial port that cannot be opened says why, with the config key to look
at (issue 16): not found, permission denied, busy, line settings refused.

The cases are made for real where this machine allows it: a missing path, a
pty held by another opener, a pty opened by an unprivileged child process, a
plain file; a pty that refuses even parity where the kernel does so."""

from __future__ import annotations

import errno
import os
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from edged.config.schema import Device
from edged.core.model import ReadErrorKind
from edged.core.plan import plan_device
from edged.io.modbus import RtuBus, read_device
from edged.io.serialdiag import SerialLine, explain_open_error, probe_serial_port

NOBODY = 65534


def line(port: str, parity: str = "N") -> SerialLine:
    return SerialLine(port=port, baudrate=9600, bytesize=8, parity=parity, stopbits=1)


@pytest.fixture
def pty() -> Iterator[str]:
    controller, tty = os.openpty()
    try:
        yield os.ttyname(tty)
    finally:
        os.close(tty)
        os.close(controller)


def test_a_missing_port_is_not_found(tmp_path: Path) -> None:
    reason = probe_serial_port(line(str(tmp_path / "ttyUSB9")))
    assert reason is not None
    assert f"serial port {tmp_path / 'ttyUSB9'} not found" in reason
    assert "/dev/serial/by-id/" in reason
    assert reason.endswith("check transport.port")


@pytest.mark.integration
def test_a_port_another_program_holds_is_busy(pty: str) -> None:
    held = serial.Serial(pty, exclusive=True)  # as pymodbus (or a second edged) holds it
    try:
        reason = probe_serial_port(line(pty))
    finally:
        held.close()
    assert reason is not None
    assert f"serial port {pty} is busy" in reason
    assert f"fuser -v {pty}" in reason
    assert reason.endswith("check transport.port")
    assert probe_serial_port(line(pty)) is None  # free again once released


def test_a_plain_file_is_not_a_serial_port(tmp_path: Path) -> None:
    path = tmp_path / "ttyUSB0"
    path.write_bytes(b"")
    assert probe_serial_port(line(str(path))) == (
        f"{path} is not a serial port (it takes no line settings); check transport.port"
    )


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_a_port_edged_may_not_open_says_permission_denied(pty: str) -> None:
    """A child process running as nobody opens a root-only pty, as edged
    outside the dialout group opens /dev/ttyUSB0."""
    os.chmod(pty, 0o600)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: everything it needs is imported already
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            reason = probe_serial_port(line(pty)) or "opened"
            os.write(write_end, reason.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reason = pipe.read().decode()
    os.waitpid(pid, 0)
    assert reason.startswith(f"permission denied opening serial port {pty} (owner root, ")
    assert "mode crw-------" in reason
    assert "edged runs as user nobody" in reason or f"edged runs as user {NOBODY}" in reason
    assert "dialout" in reason
    assert reason.endswith("check transport.port")


@pytest.mark.integration
def test_refused_line_settings_name_the_line_keys(pty: str) -> None:
    """Linux ptys refuse even parity (PARENB) on some kernels (this machine's
    once the pty has been configured before: hence the first, plain open);
    elsewhere the explanation of the same termios error is checked below."""
    assert probe_serial_port(line(pty)) is None
    reason = probe_serial_port(line(pty, parity="E"))
    if reason is None:
        pytest.skip("this kernel's ptys accept even parity")
    assert reason.startswith(f"serial port {pty} refused the line settings 9600 Bd 8E1 (")
    assert reason.endswith(
        "check transport.baudrate, transport.parity, transport.bytesize, transport.stopbits"
    )


def test_explanations_of_the_errors_pyserial_raises() -> None:
    """The exceptions as pyserial 3.5 builds them (serialposix.py), for the
    cases this machine cannot make: each names the cause and the key."""
    usb = line("/dev/ttyUSB0")
    denied = serial.SerialException(
        errno.EACCES,
        "could not open port /dev/ttyUSB0: [Errno 13] Permission denied: '/dev/ttyUSB0'",
    )
    assert explain_open_error(denied, usb).startswith(
        "permission denied opening serial port /dev/ttyUSB0 ("
    )
    gone = serial.SerialException(
        errno.ENXIO, "could not open port /dev/ttyUSB0: [Errno 6] No such device or address"
    )
    assert explain_open_error(gone, usb) == (
        "serial port /dev/ttyUSB0 has no device behind it (unplugged, or the driver lost it: "
        "see `dmesg`); check transport.port"
    )
    baud = ValueError("Failed to set custom baud rate (7): [Errno 22] Invalid argument")
    assert explain_open_error(baud, usb) == (
        "serial port /dev/ttyUSB0 refused the line settings 9600 Bd 8N1 (Failed to set custom "
        "baud rate (7): [Errno 22] Invalid argument); check transport.baudrate, "
        "transport.parity, transport.bytesize, transport.stopbits"
    )
    tcsetattr = termios.error(22, "Invalid argument")
    assert "refused the line settings 9600 Bd 8N1" in explain_open_error(tcsetattr, usb)


async def test_a_read_on_a_missing_port_carries_the_reason(tmp_path: Path) -> None:
    """Through the link a device reads with: the read error (device status
    `last_error`, the log) says what is wrong, not only 'cannot connect'."""
    port = str(tmp_path / "ttyUSB9")
    device = Device.model_validate(
        {
            "id": "rtu1",
            "transport": {"type": "rtu", "port": port, "unit_id": 1, "timeout": "200ms"},
            "channels": [{"name": "energy_import", "register": 0}],
        }
    )
    link = RtuBus(port, timeout_s=0.2)
    try:
        read = await read_device(link, 1, plan_device(device).boundary)
    finally:
        link.close()
    assert read.error is not None
    assert read.error.kind == ReadErrorKind.CONNECTION
    assert read.error.detail.startswith(f"cannot connect to rtu://{port}: serial port {port}")
    assert "not found" in read.error.detail
    assert read.error.detail.endswith("check transport.port")
