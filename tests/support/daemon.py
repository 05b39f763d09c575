"""`edged run` as a child process, launched the way systemd runs it.

    async with Daemon(config, tmp_path) as daemon:   # started and READY
        ...
        assert await daemon.stop() == 0              # SIGTERM, the exit code

The daemon gets its own sd_notify socket (``NOTIFY_SOCKET``), so readiness is
the daemon's own READY=1, not a guess; every notification is kept in
``notes``. Output (JSON log lines) goes to ``tmp_path/edged.log``, appended
to across restarts. Leaving the block kills a daemon still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.notify import datagrams

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class Daemon:
    def __init__(
        self,
        config: Path,
        tmp_path: Path,
        *,
        watchdog_usec: int | None = None,
        wrapper: Sequence[str] = (),
        log_name: str = "edged.log",
        env: dict[str, str] | None = None,
        autostart: bool = True,
    ) -> None:
        self.config = config
        self.autostart = autostart  # False: the block calls start() itself
        self.log_path = tmp_path / log_name
        self.watchdog_usec = watchdog_usec
        self.wrapper = list(wrapper)  # a command to run edged under (a sandbox)
        self.extra_env = env or {}
        self.process: asyncio.subprocess.Process | None = None
        self.notes: list[bytes] = []  # every sd_notify datagram, in order
        self._arrived = asyncio.Event()
        self._stack = AsyncExitStack()
        # A short directory of its own: AF_UNIX paths are limited to 108 bytes.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="edged-"))
        self.notify_socket = self._socket_dir / "notify"
        self._listening = False

    async def __aenter__(self) -> Daemon:
        if self.autostart:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self, *, wait_ready: bool = True) -> None:
        if not self._listening:
            self.notes = await self._stack.enter_async_context(
                datagrams(self.notify_socket, self._arrived)
            )
            self._listening = True
        readies = self.readies()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(self.notify_socket),
               **self.extra_env}  # fmt: skip
        if self.watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.wrapper, sys.executable, "-m", "edged.cli.main", "run", "-c",
                str(self.config), stdout=log, stderr=log, env=env,
            )  # fmt: skip
        if wait_ready:
            await self.wait_for_note(lambda: self.readies() > readies, READY_TIMEOUT_S, "READY=1")

    def readies(self) -> int:
        return sum(n.startswith(b"READY=1") for n in self.notes)

    async def wait_for_note(self, predicate: Any, timeout_s: float, what: str) -> None:
        """Until `predicate()` holds; fails at once if the daemon exits meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            process = self.process
            if process is not None and process.returncode is not None:
                raise AssertionError(
                    f"edged exited ({process.returncode}) before {what}:\n{self.log_tail()}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.2))

    async def reload(self) -> None:
        """SIGHUP: reload the configuration file."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` (SIGTERM: a clean stop) and return the exit code."""
        assert self.process is not None
        self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        self.process = None
        return code

    async def ensure_stopped(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.process = None

    async def close(self) -> None:
        try:
            await self.ensure_stopped()
        finally:
            await self._stack.aclose()
            self._listening = False
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- the log --------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_entries(self) -> list[dict[str, Any]]:
        """The JSON log lines (anything else, a traceback say, is skipped)."""
        entries = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
