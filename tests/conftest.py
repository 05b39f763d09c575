"""Shared fixtures: a real mosquitto on a free loopback port, a local NTP server,
and the guard that keeps the fast lane (`-m "not integration"`) free of I/O.
Helpers live in `tests/support/`."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from edged.sim.broker import Mosquitto, free_port, mosquitto_path
from tests.support.examples import examples

# Property tests judge the code, not the machine: no per-example deadline and no
# "input generation too slow" health check, both wall-clock bounds that fail on
# a loaded machine (explicit @settings on a test still override the rest).
# Hypothesis' 100 examples per property in CI; fewer in a local run
# (tests/support/examples.py).
settings.register_profile(
    "edged",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=examples(100),
)
settings.load_profile("edged")

MOSQUITTO = mosquitto_path()


@pytest.fixture(autouse=True)
def _fast_lane_is_honest(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test not marked ``integration`` may not open a socket, start a process
    or open a pty: `pytest -m "not integration"` stays a fast, self-contained lane.

    The event loop's own socketpair wraps existing descriptors (``fileno`` given)
    and is allowed. A violation fails the test even when the code under test
    swallows the exception raised here."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    violations: list[str] = []

    def forbid(what: str) -> None:
        violations.append(what)
        raise IntegrationOnly(
            f"{request.node.nodeid} {what}: mark it @pytest.mark.integration "
            "(or pytestmark = pytest.mark.integration for the module)"
        )

    real_socket_init = socket.socket.__init__
    real_openpty = os.openpty

    def socket_init(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        fileno = args[3] if len(args) > 3 else kwargs.get("fileno")
        if fileno is None:
            forbid("opens a socket")
        real_socket_init(self, *args, **kwargs)

    def popen_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        forbid("starts a process")

    def openpty() -> tuple[int, int]:
        forbid("opens a pty")
        return real_openpty()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "__init__", socket_init)
        patch.setattr(subprocess.Popen, "__init__", popen_init)
        patch.setattr(os, "openpty", openpty)
        yield
    if violations:
        pytest.fail(f"{request.node.nodeid} {violations[0]} but is not marked integration")


class IntegrationOnly(BaseException):
    """Raised by the fast-lane guard (a BaseException: `except Exception` in the
    code under test must not hide it)."""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    if MOSQUITTO is None:
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto)")
    b = Mosquitto(port=free_port(), workdir=tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
async def ntp_port() -> AsyncIterator[int]:
    """A local NTP server in agreement with the system clock."""
    from edged.sim.ntp import NtpServer

    async with NtpServer(offset_s=0.0) as server:
        yield await server.start("127.0.0.1", 0)
