"""sd_notify over a real AF_UNIX datagram socket, the watchdog gate, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edged.app.heartbeat import STALL_AFTER_S, Heartbeat
from edged.io.sdnotify import (
    Notifier,
    Systemd,
    message,
    notify_address,
    run_watchdog,
    watchdog_interval_s,
)


def test_notify_address_from_the_environment() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": ""}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@sd-notify-1"}) == "\0sd-notify-1"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_watchdog_interval_from_the_environment() -> None:
    assert watchdog_interval_s({}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 42) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 30.0
    # Meant for another process (a wrapper that exec'd us would have fixed it).
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "-5"}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 42) is None


def test_message_lines_cannot_smuggle_keys() -> None:
    assert message(READY=1, STATUS="a\nWATCHDOG=1") == b"READY=1\nSTATUS=a WATCHDOG=1"


@contextlib.contextmanager
def listening(address: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    try:
        yield sock
    finally:
        sock.close()


@pytest.mark.integration
def test_notifier_sends_to_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with listening(path) as sock:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
        assert notifier.enabled
        assert notifier.ready("running: 1 device(s)")
        assert sock.recv(4096) == b"READY=1\nSTATUS=running: 1 device(s)"
        assert notifier.reloading(monotonic_s=12.5)
        assert sock.recv(4096) == (
            b"RELOADING=1\nMONOTONIC_USEC=12500000\nSTATUS=reloading configuration"
        )
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
        notifier.close()


@pytest.mark.integration
def test_notifier_sends_to_an_abstract_socket(tmp_path: Path) -> None:
    name = f"edged-test-{id(tmp_path)}"
    with listening("\0" + name) as sock:
        notifier = Systemd.from_env({"NOTIFY_SOCKET": "@" + name}).notifier
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.close()


@pytest.mark.integration
def test_notifier_outside_systemd_does_nothing_and_a_gone_socket_does_not_raise(
    tmp_path: Path,
) -> None:
    silent = Systemd.from_env({})
    assert not silent.notifier.enabled
    assert silent.watchdog_s is None
    assert not silent.notifier.ready("x")
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert not gone.watchdog()
    assert not gone.watchdog()  # logged once, still no exception
    gone.close()


class RecordingNotifier(Notifier):
    """A notifier without a socket: keeps each message with its loop time."""

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[tuple[float, bytes]] = []

    def send(self, **fields: str | int) -> bool:
        self.sent.append((asyncio.get_running_loop().time(), message(**fields)))
        return True

    def messages(self) -> list[bytes]:
        return [m for _, m in self.sent]

    def pings(self) -> list[float]:
        return [t for t, m in self.sent if m == b"WATCHDOG=1"]


@pytest.mark.looptime
async def test_watchdog_pings_only_while_no_heartbeat_is_stalled() -> None:
    """On virtual time: pings every 50 ms (half the 0.1 s interval) while the
    poller is idle, none while it is hung, and again once it is not."""
    notifier = RecordingNotifier()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    epoch = datetime(2026, 11, 21, 0, 14, 59, tzinfo=UTC)

    def now() -> datetime:  # the reference clock, on the same virtual time
        return epoch + timedelta(seconds=loop.time() - t0)

    beat = Heartbeat(name="poller:unit1")
    beat.waiting_for(now() + timedelta(seconds=1))  # idle: waiting for a boundary

    def stalls() -> list[str]:
        stall = beat.stall(now(), loop.time(), limit_s=0.3)
        return [stall] if stall else []

    task = asyncio.create_task(run_watchdog(notifier, 0.1, stalls, lambda: "running"))
    await asyncio.sleep(0.525)  # off the 50 ms grid: no tie with a ping
    healthy = notifier.pings()
    assert [round(t - t0, 6) for t in healthy] == [round(0.05 * i, 6) for i in range(11)]
    beat.busy(loop.time() - 1.0)  # a read in flight for a second: hung
    await asyncio.sleep(0.05)  # the check at 0.55 s sees it
    withheld_from = len(notifier.sent)
    await asyncio.sleep(0.5)
    got = notifier.messages()
    assert b"WATCHDOG=1" not in got[withheld_from:]
    assert notifier.pings() == healthy  # not one ping from 0.55 s on
    assert any(m.startswith(b"STATUS=stalled: poller:unit1: busy for") for m in got)
    beat.waiting_for(now() + timedelta(seconds=1))  # the read returned (at 1.075 s)
    await asyncio.sleep(0.3)
    got = notifier.messages()
    assert len(notifier.pings()) > len(healthy)
    assert got[-1] == b"WATCHDOG=1"
    assert b"STATUS=running" in got
    # resumed at the first check after the stall cleared, on the same 50 ms grid
    resumed = [round(t - t0, 6) for t in notifier.pings()[len(healthy) :]]
    assert resumed == [1.1, 1.15, 1.2, 1.25, 1.3, 1.35]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_heartbeat_tells_idle_from_hung() -> None:
    boundary = datetime(2026, 11, 21, 0, 15, tzinfo=UTC)
    beat = Heartbeat(name="poller:m1")
    assert beat.stall(boundary, 100.0) is None  # nothing yet
    beat.waiting_for(boundary)
    # Waiting 15 minutes for the boundary is idle, however long.
    assert beat.stall(boundary - timedelta(minutes=15), 0.0) is None
    assert beat.stall(boundary + timedelta(seconds=STALL_AFTER_S - 1), 0.0) is None
    late = beat.stall(boundary + timedelta(seconds=STALL_AFTER_S + 1), 0.0)
    assert late is not None
    assert "past its boundary" in late
    # A clock stepped back moves the boundary later: still waiting, not hung.
    assert beat.stall(boundary - timedelta(hours=1), 1e6) is None
    beat.busy(1000.0)
    assert beat.stall(boundary, 1000.0 + STALL_AFTER_S - 1) is None
    busy = beat.stall(boundary, 1000.0 + STALL_AFTER_S + 1)
    assert busy is not None
    assert busy.startswith("poller:m1: busy for")
    beat.waiting_until(5000.0)  # a fast-poll tick on the monotonic clock
    assert beat.stall(boundary, 5000.0 + STALL_AFTER_S - 1) is None
    assert beat.stall(boundary, 5000.0 + STALL_AFTER_S + 1) is not None
    beat.idle()
    assert beat.stall(boundary + timedelta(days=1), 1e9) is None


@pytest.mark.parametrize("limit_s", [0.5, 60.0])
def test_heartbeat_limit_is_a_bound_not_a_constant(limit_s: float) -> None:
    beat = Heartbeat(name="recorder")
    beat.busy(0.0)
    assert beat.stall(datetime.now(UTC), limit_s * 0.9, limit_s) is None
    assert beat.stall(datetime.now(UTC), limit_s * 1.1, limit_s) is not None
