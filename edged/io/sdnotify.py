"""systemd's notify protocol (sd_notify(3)) without libsystemd, and the watchdog.

Under `Type=notify` systemd hands the service a datagram socket in
``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace) and, with
``WatchdogSec=``, the interval in ``WATCHDOG_USEC``. The service sends
newline-separated ``KEY=VALUE`` lines: ``READY=1`` once it is serving,
``RELOADING=1`` … ``READY=1`` around a reload, ``STOPPING=1`` on shutdown,
``STATUS=…`` for `systemctl status`, and ``WATCHDOG=1`` at least once per
interval, or systemd kills and restarts it.

edged pings the watchdog only while it is healthy: the ping comes from a task
on the event loop (a blocked loop sends none) and is withheld while any
heartbeat reports a stall (a poller stuck in a read or past its boundary, a
commit that does not return). Outside systemd every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger("edged.io.sdnotify")


def notify_address(env: Mapping[str, str]) -> str | None:
    """The socket address from ``NOTIFY_SOCKET`` (abstract names start with NUL)."""
    value = env.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a kind edged does not speak (vsock)


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """``WATCHDOG_USEC`` in seconds, or None when no watchdog is asked of this process.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for
    (a wrapper may have exec'd something else)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1_000_000


def message(**fields: str | int) -> bytes:
    """``KEY=VALUE`` lines; a value's newlines would start a new key, so they go."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends notify messages; does nothing when not started by systemd."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._socket: socket.socket | None = None
        self._failed = False
        if address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        return cls(notify_address(os.environ if env is None else env))

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: str | int) -> bool:
        """Send one message; never blocks or raises (systemd may be gone)."""
        if self._socket is None or self.address is None:
            return False
        try:
            self._socket.sendto(message(**fields), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._failed:  # once: a missing socket would otherwise log every ping
                log.warning("sd_notify failed", address=self.address.replace("\0", "@"),
                            error=str(exc))  # fmt: skip
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def reloading(self, monotonic_s: float | None = None) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload) match the reload it asked for.
        mono_s = time.monotonic() if monotonic_s is None else monotonic_s
        return self.send(RELOADING=1, MONOTONIC_USEC=int(mono_s * 1_000_000),
                         STATUS="reloading configuration")  # fmt: skip

    def stopping(self) -> bool:
        return self.send(STOPPING=1, STATUS="stopping")

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@dataclass(frozen=True, slots=True)
class Systemd:
    """What systemd asked of this process: where to notify, how often to ping."""

    notifier: Notifier
    watchdog_s: float | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> Systemd:
        env = os.environ if env is None else env
        return cls(
            Notifier.from_env(env), watchdog_interval_s(env, os.getpid() if pid is None else pid)
        )


async def run_watchdog(
    notifier: Notifier,
    interval_s: float,
    stalls: Callable[[], Sequence[str]],
    healthy_status: Callable[[], str],
) -> None:
    """Ping at half the interval while `stalls()` is empty; withhold pings otherwise.

    A stall that clears before the interval runs out costs nothing; one that
    lasts lets systemd kill and restart edged (the store carries on).
    """
    every_s = interval_s / 2
    withheld: tuple[str, ...] = ()
    while True:
        problems = tuple(stalls())
        if problems:
            if problems != withheld:
                log.error("watchdog pings withheld", stalls=list(problems),
                          watchdog_s=interval_s)  # fmt: skip
                notifier.status("stalled: " + "; ".join(problems))
            withheld = problems
        else:
            if withheld:
                log.info("stall cleared; watchdog pings resume")
                notifier.status(healthy_status())
                withheld = ()
            notifier.watchdog()
        await asyncio.sleep(every_s)
