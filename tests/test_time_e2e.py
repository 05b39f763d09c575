"""The daemon on NTP-corrected time, end to end over loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.sim.meter import MeterServer, SimulatedMeter
from edged.sim.ntp import NtpServer
from tests.support.config import site_config, tcp_device
from tests.support.daemon import Daemon
from tests.support.mqtt import Broker, collect
from tests.support.schema import validate_messages

pytestmark = pytest.mark.integration

# True time (the NTP server) is 3.4 s ahead of this machine's clock: a
# fractional offset, so true and system second boundaries differ by 0.4 s.
TRUE_AHEAD_S = 3.4


def boundary_error_s(system_s: float, offset_s: float) -> float:
    """Distance of a request's true time from the nearest whole second."""
    true_s = system_s + offset_s
    return abs(true_s - round(true_s))


async def test_reads_follow_ntp_time_steps_are_flagged_and_silence_is_holdover(
    tmp_path: Path, broker: Broker
) -> None:
    meter = SimulatedMeter.pmc1(load_kw=3600.0, kwh_per_count=0.001)
    async with (
        MeterServer({1: meter}) as server,
        NtpServer(offset_s=TRUE_AHEAD_S) as ntp,
        collect(broker, "edged/#") as got,
    ):
        port = await server.start_tcp("127.0.0.1", 0)
        ntp_port = await ntp.start("127.0.0.1", 0)
        config = site_config(
            tmp_path,
            devices=[
                tcp_device(
                    "m",
                    port,
                    timeout="300ms",
                    channels=[{"name": "energy", "register": 0, "multiplier": 0.001}],
                )
            ],
            mqtt_port=broker.port,
            ntp_port=ntp_port,
            site="timed",
            timezone="UTC",
            storage={"path": str(tmp_path / "edged.db")},
            log=None,
            mqtt={"topic_prefix": None},
            time={"ntp_poll": "1s", "holdover_after": "3s"},
        )
        daemon = Daemon(config, tmp_path)
        try:
            await daemon.start()

            def regular_synced_reads() -> list[dict[str, object]]:
                # Measured on synced time with nothing irregular: the first NTP
                # confirmation steps the reference, closing what it skipped.
                return [
                    p
                    for p in got.payloads("/interval/")
                    if p["time_state"] == "synced" and p["flags"] == [] and p["value"] is not None
                ]

            await got.wait_for(lambda c: len(regular_synced_reads()) >= 3, 20, "synced reads")
            # Requests reach the meter on true (NTP) second boundaries, which
            # are 0.4 s off the system clock's: the reference is corrected.
            # Telling the two apart needs only the midpoint (0.2 s), not a
            # tight lateness bound a loaded machine would break.
            recent = list(meter.request_times_s)[-2:]
            apart_s = boundary_error_s(0.0, TRUE_AHEAD_S)  # 0.4 s
            assert apart_s == pytest.approx(0.4)
            assert all(boundary_error_s(t, TRUE_AHEAD_S) < apart_s / 2 for t in recent), recent
            assert all(boundary_error_s(t, 0.0) > apart_s / 2 for t in recent), recent

            # True time jumps 3 s ahead again: beyond the step threshold. (The
            # first sync was a step too; only flags after this one count.)
            def stepped_forward() -> set[str]:
                return {
                    str(p["id"])
                    for p in got.payloads("/interval/")
                    if "CLOCK_SET_FORWARD" in p["flags"]
                }

            before_step = stepped_forward()
            ntp.offset_s = TRUE_AHEAD_S + 3.0
            await got.wait_for(
                lambda c: (
                    bool(stepped_forward() - before_step)
                    and any(p["kind"] == "clock_step" for p in c.payloads("/gateway/event"))
                ),
                15,
                "a clock_step event and an interval flagged CLOCK_SET_FORWARD",
            )

            # NTP goes silent: holdover, said so in the retained gateway status.
            ntp.unreachable = True
            await got.wait_for(
                lambda c: any(
                    p.get("time_state") == "holdover" for p in c.payloads("/gateway/status")
                ),
                15,
                "gateway status in holdover",
            )
            assert await daemon.stop() == 0
        finally:
            await daemon.close()
    validate_messages(got.messages)
    stepped = [p for p in got.payloads("/interval/") if "CLOCK_SET_FORWARD" in p["flags"]]
    assert stepped[0]["quality"] == "suspect"
    assert "TIMERESET" in stepped[0]["iee_status"]
