"""The systemd units: `systemd-analyze verify`, the security exposure score, and
edged actually running under the unit's seccomp sandbox.

These need systemd-analyze (and libseccomp, which systemd depends on). CI
installs systemd (.ci/run) and runs with CI=true, where a missing tool is a
failure; elsewhere the tests skip without it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from edged.sim.broker import Mosquitto
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.meters import meter
from tests.support.mqtt import collect, intervals

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("edged.service", "edged@.service")
SHIPPED_EDGED = "/usr/local/bin/edged"
IN_CI = os.environ.get("CI") == "true"
# systemd-analyze security bands: 0 PERFECT, < 1 SAFE, < 5 OK, < 7.5 MEDIUM …
OK_BAND_MAX = 4.9


def require_systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing in CI: .ci/run must install systemd")
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return tool


def installed_copy(tmp_path: Path, unit: str) -> Path:
    """The unit as it would be installed on this machine: `verify` checks that
    ExecStart's program exists, so /usr/local/bin/edged becomes the edged on
    PATH (pip's entry point) in a copy; nothing else is touched."""
    scripts = Path(sysconfig.get_path("scripts")) / "edged"
    edged = shutil.which("edged") or (str(scripts) if scripts.exists() else None)
    if edged is None:
        pytest.fail("the edged command is not installed (pip install -e .)")
    text = (ROOT / "systemd" / unit).read_text()
    assert SHIPPED_EDGED in text
    copy = tmp_path / unit
    copy.write_text(text.replace(SHIPPED_EDGED, str(Path(edged).resolve())))
    return copy


def test_template_is_the_unit_with_instance_paths() -> None:
    """edged@.service differs from edged.service only where an instance must."""
    unit = (ROOT / "systemd" / "edged.service").read_text()
    template = (ROOT / "systemd" / "edged@.service").read_text()

    def settings(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    instance = {
        "Description=edged edge data acquisition (Modbus -> SQLite -> MQTT)":
            "Description=edged edge data acquisition, instance %i",
        "StateDirectory=edged": "StateDirectory=edged/%i",
    }  # fmt: skip
    expected = [
        instance.get(line, line.replace("/etc/edged/edged.yaml", "/etc/edged/%i.yaml"))
        for line in settings(unit)
    ]
    assert settings(template) == expected


@pytest.mark.integration
@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, unit: str) -> None:
    tool = require_systemd_analyze()
    copy = installed_copy(tmp_path, unit)
    targets = [copy] if "@" not in unit else [copy, tmp_path / "edged@north.service"]
    for target in targets:
        result = subprocess.run([tool, "verify", str(target)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "edged" not in result.stderr, result.stderr  # no warning about our unit


@pytest.mark.integration
@pytest.mark.parametrize("unit", UNITS)
def test_unit_security_exposure_is_ok_or_better(tmp_path: Path, unit: str) -> None:
    tool = require_systemd_analyze()
    copy = installed_copy(tmp_path, unit)
    result = subprocess.run(
        [tool, "security", "--no-pager", "--offline=true", str(copy)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", result.stdout)
    assert match is not None, result.stdout
    score, band = float(match[1]), match[2]
    print(f"systemd-analyze security {unit}: {score} {band}")
    assert score <= OK_BAND_MAX, result.stdout
    assert band in ("OK", "SAFE", "PERFECT")


def sandboxed(unit: str, *command: str) -> list[str]:
    return [sys.executable, "-m", "tests.unit_sandbox", str(ROOT / "systemd" / unit), "--",
            *command]  # fmt: skip


PROBE = """
import mmap, os, socket
from edged.io.ntp import kernel_sync_status
results = [str(kernel_sync_status())]
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    results.append("wx-mapped")
except OSError as exc:
    results.append(f"wx-errno-{exc.errno}")
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    results.append("packet-socket")
except OSError as exc:
    results.append(f"packet-errno-{exc.errno}")
try:
    os.setpriority(os.PRIO_PROCESS, 0, 5)
    results.append("reniced")
except OSError as exc:
    results.append(f"nice-errno-{exc.errno}")
print(" ".join(results))
"""


@pytest.mark.integration
def test_the_sandbox_harness_enforces_the_unit() -> None:
    """Not a no-op: what the unit forbids fails in the harness, and reading the
    kernel's sync status (adjtimex, made by glibc as clock_adjtime) still works."""
    require_systemd_analyze()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def probe(command: list[str]) -> list[str]:
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        return result.stdout.split()

    outside = probe([sys.executable, "-c", PROBE])
    inside = probe(sandboxed("edged.service", sys.executable, "-c", PROBE))
    assert inside[0] == outside[0]  # the same kernel sync status as unconfined
    assert inside[1:] == ["wx-errno-1", "packet-errno-97", "nice-errno-1"]  # EPERM, EAFNOSUPPORT


@pytest.mark.integration
async def test_daemon_runs_under_the_unit_sandbox(
    tmp_path: Path, broker: Mosquitto, ntp_port: int
) -> None:
    """MemoryDenyWriteExecute, the syscall allow list and the address families
    of the unit, applied as systemd would: edged starts, reports READY over
    AF_UNIX, reads over Modbus TCP, publishes over MQTT and stops cleanly."""
    require_systemd_analyze()
    async with meter() as (_server, port), collect(broker, "edged/#") as got:
        config = site_config(
            tmp_path, devices=[tcp_device("unit1", port)], mqtt_port=broker.port, ntp_port=ntp_port
        )
        daemon = Daemon(config, tmp_path, watchdog_usec=1_000_000,
                        wrapper=sandboxed("edged.service"))  # fmt: skip
        async with daemon:  # READY=1 over AF_UNIX from inside the sandbox
            messages = daemon.notes
            await got.wait_for(lambda c: len(intervals(c)) >= 3, 20, "3 intervals")
            assert await daemon.stop(signal.SIGTERM) == 0
    log = (tmp_path / "edged.log").read_text()
    assert "Traceback" not in log, log
    assert any(m.startswith(b"READY=1") for m in messages)
    assert any(m.startswith(b"STOPPING=1") for m in messages)
    records = intervals(got)
    assert all(r["value"] is not None for r in records)
    assert records[-1]["time_state"] == "synced"
    status = [p for t, p, _ in got.messages if t.endswith("/gateway/status")]
    assert status[-1]["state"] == "offline"  # the clean shutdown got through
