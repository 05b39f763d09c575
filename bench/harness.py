"""The apparatus every benchmark shares: meter processes, the broker, the daemon
under test, its CPU and memory read from /proc, an MQTT collector, figures.

The daemon runs as its own process (`edged run`) so what is measured is what a
gateway runs; the simulated meters run in other processes (several meters per
process, one TCP port per meter) so their CPU is not charged to it. CPU and RSS
come from /proc (Linux, as on every gateway edged targets): no extra package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from edged.sim.broker import Mosquitto, free_port, mosquitto_path

# Simulated meters served by one process: enough to keep the process count
# low, few enough that one simulator process never becomes the bottleneck.
METERS_PER_PROCESS = 250
# Registers of the fast-poll block served by bench.meters (float32 pairs).
MEASURE_BASE_REGISTER = 200
SITE = "bench"
TOPIC_PREFIX = "edged"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


class Skip(Exception):
    """The benchmark cannot run here (the message says why); not a failure."""


def raise_fd_limit(needed: int) -> int:
    """Raise this process's open-file limit (inherited by its children) to at
    least `needed` when the hard limit allows; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise Skip(f"needs {needed} open files, the hard limit is {hard} (raise `ulimit -Hn`)")
    return soft


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary(values: Sequence[float], prefix: str, digits: int = 3) -> dict[str, float | None]:
    """p50/p99/max of values, keyed `{prefix}_p50` …; None when there are none."""
    if not values:
        return {f"{prefix}_p50": None, f"{prefix}_p99": None, f"{prefix}_max": None}
    return {
        f"{prefix}_p50": round(percentile(values, 0.5), digits),
        f"{prefix}_p99": round(percentile(values, 0.99), digits),
        f"{prefix}_max": round(max(values), digits),
    }


# -- /proc figures -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcSample:
    at_s: float  # time.monotonic()
    cpu_s: float  # user + system, all threads
    rss_bytes: int


def proc_sample(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may hold spaces: the fields start after its ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime, rss_pages = int(fields[11]), int(fields[12]), int(fields[21])
    return ProcSample(time.monotonic(), (utime + stime) / CLK_TCK, rss_pages * PAGE_BYTES)


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_share(first: ProcSample, last: ProcSample) -> float:
    """Cores used between two samples (1.0 = one core busy all the time)."""
    return (last.cpu_s - first.cpu_s) / max(last.at_s - first.at_s, 1e-9)


def machine_load() -> dict[str, Any]:
    """What else the machine was doing: the figures are only as quiet as it was."""
    load1, load5, _ = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_1m": round(load1, 2), "loadavg_5m": round(load5, 2)}


async def sample_every(pid: int, every_s: float, until_s: float) -> list[ProcSample]:
    """Samples of `pid` every `every_s` until time.monotonic() reaches `until_s`."""
    samples = [proc_sample(pid)]
    while time.monotonic() < until_s:
        await asyncio.sleep(min(every_s, max(0.0, until_s - time.monotonic())))
        samples.append(proc_sample(pid))
    return samples


def rss_slope_mib_per_h(samples: Sequence[ProcSample]) -> float:
    """Least-squares RSS growth rate (MiB per hour) over the samples."""
    if len(samples) < 2:
        return 0.0
    xs = [s.at_s for s in samples]
    ys = [s.rss_bytes / MIB for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 3600.0


# -- processes -----------------------------------------------------------------


async def _terminate(proc: asyncio.subprocess.Process, grace_s: float = 15.0) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def meters(count: int, *, registers: int = 0) -> AsyncIterator[list[int]]:
    """`count` simulated PMC-1 meters in ceil(count / METERS_PER_PROCESS)
    processes, one TCP port each; with `registers`, each also serves a
    fast-poll block of float32 values from MEASURE_BASE_REGISTER."""
    raise_fd_limit(2 * count + 256)
    procs: list[asyncio.subprocess.Process] = []
    ports: list[int] = []
    try:
        for start in range(0, count, METERS_PER_PROCESS):
            n = min(METERS_PER_PROCESS, count - start)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.meters", str(n), "--registers", str(registers),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                raise RuntimeError("a bench.meters process exited before listening")
            ports += json.loads(line)["ports"]
        yield ports
    finally:
        await asyncio.gather(*(_terminate(p) for p in procs))


@contextlib.contextmanager
def broker(workdir: Path, *, tcp_nodelay: bool = True) -> Iterator[Mosquitto]:
    """A mosquitto on a free loopback port; Skip when it is not installed.

    With `tcp_nodelay` (the default here) it sends each PUBACK at once: with
    mosquitto's default, Nagle holds PUBACKs for the client's delayed ACK and
    caps any QoS 1 publisher, bare aiomqtt included, near 1-2k msg/s on
    loopback (docs/performance.md)."""
    if mosquitto_path() is None:
        raise Skip("mosquitto is not on PATH (apt-get install -y mosquitto)")
    b = Mosquitto(port=free_port(), workdir=workdir, tcp_nodelay=tcp_nodelay)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def workdir(name: str) -> Path:
    """A fresh directory on the disk the store would use (not a tmpfs, where an
    fsync costs nothing); EDGED_BENCH_DIR overrides where."""
    base = os.environ.get("EDGED_BENCH_DIR")
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"edged-bench-{name}-", dir=base))


def measure_points(registers: int) -> str:
    """YAML flow list of the float32 fast-poll points bench.meters serves."""
    points = [
        f"{{name: v{i:02d}, register: {MEASURE_BASE_REGISTER + 2 * i}, type: float32, unit: V}}"
        for i in range(registers // 2)
    ]
    return "[" + ", ".join(points) + "]"


def write_config(
    directory: Path,
    ports: Sequence[int],
    mqtt_port: int,
    *,
    interval: str,
    measure_registers: int = 0,
    measure_every: str = "1s",
    log_level: str = "info",
    extra: Sequence[str] = (),
    mqtt_options: str = "",
    device_prefix: str = "m",
    ntp_port: int | None = None,
) -> Path:
    """An edged config: one device per port, the PMC-1 counter as its channel.

    With `ntp_port` edged takes its reference time from that (local) NTP
    server, so its records are built on synchronised time as on a gateway
    whose clock is kept; without, a container's unsynchronised kernel clock
    makes every record AMT (suspect)."""
    lines = [
        f"site: {SITE}",
        "timezone: UTC",
        f"storage: {{path: {directory / 'edged.db'}}}",
        f"mqtt: {{host: 127.0.0.1, port: {mqtt_port}{', ' if mqtt_options else ''}{mqtt_options}}}",
        f"log: {{level: {log_level}, format: json}}",
        *([f'time: {{source: ntp, ntp_servers: ["127.0.0.1:{ntp_port}"]}}'] if ntp_port else []),
        *extra,
        "devices:",
    ]
    for i, port in enumerate(ports):
        lines += [
            f"  - id: {device_prefix}{i:04d}",
            f"    interval: {interval}",
            f"    transport: {{type: tcp, host: 127.0.0.1, port: {port}, timeout: 1s}}",
            "    channels: [{name: energy, register: 0, type: uint32, multiplier: 0.001}]",
        ]
        if measure_registers:
            lines.append(
                f"    measurements: {{every: {measure_every}, "
                f"points: {measure_points(measure_registers)}}}"
            )
    path = directory / "edged.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def ntp_server() -> AsyncIterator[int]:
    """A local NTP server agreeing with this machine's clock; yields its port."""
    from edged.sim.ntp import NtpServer

    async with NtpServer(offset_s=0.0) as server:
        yield await server.start("127.0.0.1", 0)


@dataclass
class Daemon:
    """`edged run` as a child process; its log goes to a file beside its config."""

    config: Path
    proc: asyncio.subprocess.Process | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.config.parent / "edged.log"

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edged.cli.main", "run", "-c", str(self.config),
                stdout=log, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )  # fmt: skip

    async def stop(self) -> int:
        if self.proc is None:
            return 0
        await _terminate(self.proc, grace_s=30.0)
        code = self.proc.returncode
        assert code is not None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def warnings(self) -> int:
        """Log lines at warning or above (a run that needed them is suspect)."""
        count = 0
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            for line in f:
                if '"level": "warning"' in line or '"level": "error"' in line:
                    count += 1
        return count


@contextlib.asynccontextmanager
async def daemon(config: Path, env: dict[str, str] | None = None) -> AsyncIterator[Daemon]:
    d = Daemon(config, env=env or {})
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


@dataclass
class Bare:
    """The bare baseline (bench.bare) as a child process."""

    directory: Path
    ports: Sequence[int]
    mqtt_port: int
    every_s: float
    registers: int = 0
    ticks: int = 0
    proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        ports_file = self.directory / "bare-ports.json"
        ports_file.write_text(json.dumps(list(self.ports)))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.bare", "--ports-file", str(ports_file),
            "--mqtt-port", str(self.mqtt_port), "--every", str(self.every_s),
            "--registers", str(self.registers), "--ticks", str(self.ticks),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def finish(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Its result: after its ticks (timeout_s=None) or after a SIGTERM."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        if timeout_s is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        out = await asyncio.wait_for(self.proc.stdout.read(), timeout_s or 30.0)
        await _terminate(self.proc)
        lines = out.decode().strip().splitlines()
        if not lines:
            raise RuntimeError(f"bench.bare exited with {self.proc.returncode} and no result")
        result: dict[str, Any] = json.loads(lines[-1])
        return result


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    received_s: float  # time.time() on receipt


@dataclass
class Collector:
    """Every message on the subscribed filters, with its wall-clock arrival."""

    messages: list[Message] = field(default_factory=list)

    def payloads(self, topic_part: str) -> list[tuple[dict[str, Any], float]]:
        return [(json.loads(m.payload), m.received_s) for m in self.messages
                if topic_part in m.topic]  # fmt: skip


@contextlib.asynccontextmanager
async def collect(port: int, filters: Sequence[str]) -> AsyncIterator[Collector]:
    collector = Collector()

    async def receive(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            collector.messages.append(
                Message(message.topic.value, bytes(message.payload), time.time())
            )

    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-{os.getpid()}") as client:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=0)
        task = asyncio.create_task(receive(client))
        try:
            yield collector
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def parse_epoch(text: str) -> float:
    from edged.core.model import parse_iso_utc

    return parse_iso_utc(text).timestamp()


async def wait_until(predicate: Any, timeout_s: float, every_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(every_s)
    return bool(predicate())


async def sleep_to_wall(target_s: float) -> None:
    """Sleep until time.time() reaches target_s (coarse: the loop's timer)."""
    delay = target_s - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def next_multiple(now_s: float, every_s: float) -> float:
    return (math.floor(now_s / every_s) + 1) * every_s


# -- output --------------------------------------------------------------------


def emit(benchmark: str, figures: dict[str, Any], targets: dict[str, bool]) -> None:
    """The closing JSON line: every figure, the targets met, and the load."""
    line = {"benchmark": benchmark, **figures, "targets": targets, "machine": machine_load()}
    print(json.dumps(line), flush=True)


def say(text: str) -> None:
    print(text, flush=True)


def conclude(
    benchmark: str,
    figures: Coroutine[Any, Any, dict[str, Any]],
    targets: Callable[[dict[str, Any]], dict[str, bool]],
) -> int:
    """Run a benchmark's coroutine; print its closing JSON line (or why it
    was skipped). The exit status of a benchmark module."""
    try:
        found = asyncio.run(figures)
    except Skip as why:
        skipped(benchmark, str(why))
        return 0
    emit(benchmark, found, targets(found))
    return 0


def skipped(benchmark: str, why: str) -> None:
    say(f"{benchmark}: SKIPPED: {why}")
    print(json.dumps({"benchmark": benchmark, "skipped": why}), flush=True)
