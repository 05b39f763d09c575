"""Hostile configuration files (issue 20, defect 2 and the YAML parts of 9):
every one is a located ConfigError, never an exception, a hang or a memory
blow-up; check-config never prints a traceback; and a seeded fuzzer over the
example configs checks several hundred mutations per run."""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edged.cli.main import main
from edged.config.load import ConfigError, load_settings
from edged.sim.meter import MeterServer
from tests.support.daemon import Daemon
from tests.support.meters import KWH_PER_COUNT, pmc1_meter
from tests.support.mqtt import (
    Broker,
    Collector,
    assert_unbroken,
    collect,
    events,
    intervals,
    series,
)

ROOT = Path(__file__).resolve().parent.parent

HEAD = """\
site: s1
storage: {path: /tmp/edged-test.db}
mqtt: {host: 127.0.0.1}
devices:
"""
DEVICE = """\
  - id: unit1
    transport: {type: tcp, host: 127.0.0.1, port: 502, unit_id: 1}
    channels:
      - {name: energy_import, register: 0}
"""

BILLION_LAUGHS = (
    "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(
        f"{chr(ord('b') + i)}: &{chr(ord('b') + i)} [{', '.join(['*' + chr(ord('a') + i)] * 9)}]\n"
        for i in range(8)
    )
    + HEAD
    + DEVICE
)

# name -> (file text, line the problem must be reported on or None, message part)
HOSTILE = {
    "merge_key": (
        "base: &b {interval: 15m}\n" + HEAD + DEVICE + "    <<: *b\n",
        10,
        "merge keys",
    ),
    "custom_tag": (HEAD + DEVICE.replace("host: 127.0.0.1,", "host: !env HOST,"), 6, "tag"),
    "python_tag": (HEAD.replace("site: s1", "site: !!python/object:os.system x"), 1, "tag"),
    "complex_key": (HEAD + DEVICE + "    ? [a, b]\n    : 1\n", 9, "complex key"),
    "recursive_alias": ("loop: &l [*l]\n" + HEAD + DEVICE, 1, "recursive"),
    "recursive_mapping": ("loop: &l {x: *l}\n" + HEAD + DEVICE, 1, "recursive"),
    # located at the anchor (line 2, "b") whose expansion crossed the budget
    "billion_laughs": (BILLION_LAUGHS, 2, "alias"),
    "duplicate_key": (HEAD + DEVICE + "    interval: 15m\n    interval: 1s\n", 10, "duplicate key"),
    "deep_nesting": ("x: " + "[" * 5000 + "]" * 5000 + "\n" + HEAD + DEVICE, None, "nest"),
    "bad_timestamp": ("when: 2026-13-45\n" + HEAD + DEVICE, 1, "invalid value"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_yaml_is_a_located_config_error(tmp_path: Path, name: str) -> None:
    text, line, words = HOSTILE[name]
    path = tmp_path / "edged.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    (problem,) = caught.value.problems
    assert problem.file == str(path)
    assert problem.line == line, str(problem)
    assert words in problem.message.lower() or words in problem.message, str(problem)


def test_non_utf8_and_huge_files_are_config_errors(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes((HEAD + DEVICE).replace("s1", "s\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        load_settings(latin)
    huge = tmp_path / "huge.yaml"
    huge.write_text(HEAD + DEVICE + "# " + "x" * (5 * 1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_settings(huge)


@pytest.mark.parametrize("name", ["merge_key", "custom_tag", "complex_key", "recursive_alias"])
def test_check_config_never_prints_a_traceback(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "edged.yaml"
    path.write_text(HOSTILE[name][0])
    assert main(["check-config", "-c", str(path)]) != 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert re.search(rf"{re.escape(str(path))}:\d+ ", out.err), out.err


# ---------------------------------------------------------------------------
# The fuzzer: seeded mutations of the example configs

TOKENS = [
    "<<: *a", "&a", "*a", "!env X", "!!python/name:os.system", "? [a, b]\n: 1", "{", "}", "[",
    "]", "'", '"', ": ", "- ", "\t", "\x00", "-999999999d", "9999-12-31T23:59:59Z", "1e309",
    "\u0661\u0665m", "15m", "0", "-1", "null", "~", "true", "[]", "{}", "&b [*b]", "%YAML 1.1",
    "---", "...", "#", "|", ">", "\u200b", "1" * 400, "x" * 2000,
]  # fmt: skip


def _seeds() -> list[str]:
    seeds = [(ROOT / "config" / "edged.yaml").read_text()]
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S):
            if "devices:" in block:
                seeds.append(block)
    return seeds


def _mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True) or [""]
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        i = rng.randrange(len(lines))
        if op == 0:
            del lines[i]
            lines = lines or [""]
        elif op == 1:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            at = rng.randint(0, len(lines[i]))
            lines[i] = lines[i][:at] + rng.choice(TOKENS) + lines[i][at:]
        elif op == 4:
            lines[i] = " " * rng.randint(0, 8) + lines[i].lstrip(" ")
        elif op == 5:
            head, sep, _ = lines[i].partition(": ")
            if sep:
                lines[i] = head + sep + rng.choice(TOKENS) + "\n"
        else:
            at = rng.randint(0, len(lines[i]))
            lines[i] = lines[i][:at] + chr(rng.randrange(1, 0x3000)) + lines[i][at:]
    return "".join(lines)


FUZZ_RUNS = 400


def test_config_fuzzer_zero_tracebacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Several hundred seeded mutations: each is a Settings or a ConfigError
    whose every problem names the file; check-config prints no traceback.
    (A hang fails the test through pytest-timeout.)"""
    seeds = _seeds()
    assert len(seeds) >= 2
    rng = random.Random(20)
    path = tmp_path / "edged.yaml"
    outcomes = {"valid": 0, "rejected": 0}
    limit = sys.getrecursionlimit()
    for run in range(FUZZ_RUNS):
        text = _mutate(rng.choice(seeds), rng)
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        problems = None
        try:
            load_settings(path)
            outcomes["valid"] += 1
        except ConfigError as exc:
            outcomes["rejected"] += 1
            problems = exc.problems
        if problems is not None:
            assert problems, f"run {run}: empty ConfigError"
            assert all(p.file.endswith(".yaml") for p in problems), f"run {run}"
            assert all("Traceback" not in p.message for p in problems)
        if run % 20 == 0:  # the CLI too, on a sample (it loads the same way)
            main(["check-config", "-c", str(path)])
            out = capsys.readouterr()
            assert "Traceback" not in out.err + out.out, f"run {run}:\n{text}\n{out.err}"
    assert sys.getrecursionlimit() == limit
    assert outcomes["rejected"] > FUZZ_RUNS // 2, outcomes
    print("config fuzz outcomes:", outcomes)


# ---------------------------------------------------------------------------
# SIGHUP with hostile files: the daemon keeps running the old config


def good_text(tmp_path: Path, broker: Broker, port: int, ntp_port: int) -> str:
    """A valid configuration as text in flow style: the hostile variants are
    edits of this very text (a tag on the host, a merge key in the device)."""
    return f"""\
site: test-site
timezone: Pacific/Auckland
storage:
  path: {tmp_path / "state" / "edged.db"}
mqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: edged}}
log: {{format: json}}
status_every: 1s
time: {{source: ntp, ntp_servers: ["127.0.0.1:{ntp_port}"], ntp_poll: 2s}}
devices:
  - id: unit1
    interval: 1s
    transport: {{type: tcp, host: 127.0.0.1, port: {port}, unit_id: 1, timeout: 500ms}}
    channels:
      - {{name: energy_import, register: 0, type: uint32, multiplier: {KWH_PER_COUNT}}}
"""


def rejections(n: int) -> Callable[[Collector], bool]:
    return lambda c: len(events(c, "config_rejected")) >= n


@pytest.mark.integration
async def test_sighup_with_hostile_yaml_keeps_the_daemon_up(
    tmp_path: Path, broker: Broker, ntp_port: int
) -> None:
    async with MeterServer({1: pmc1_meter()}) as server, collect(broker, "edged/#") as got:
        port = await server.start_tcp()
        config = tmp_path / "edged.yaml"
        good = good_text(tmp_path, broker, port, ntp_port)
        config.write_text(good)
        async with Daemon(config, tmp_path) as d:
            await got.wait_for(lambda c: len(intervals(c)) >= 2, 20, "2 intervals")
            hostile = [
                "base: &b {interval: 1s}\n" + good + "    <<: *b\n",
                good.replace("host: 127.0.0.1,", "host: !env HOST,", 1),
                good + "    ? [a, b]\n    : 1\n",
                BILLION_LAUGHS.replace(HEAD + DEVICE, "") + good,
            ]
            for n, text in enumerate(hostile, start=1):
                config.write_text(text)
                await d.reload()
                await got.wait_for(rejections(n), 15, f"reject {n}")
                assert d.process is not None
                assert d.process.returncode is None
            before = len(intervals(got))
            await got.wait_for(lambda c: len(intervals(c)) >= before + 2, 10, "intervals")
            assert await d.stop() == 0
    rejected = events(got, "config_rejected")
    assert len(rejected) == len(hostile)
    for event in rejected:
        (problem,) = event["details"]["problems"]
        assert re.match(rf"{re.escape(str(config))}:\d+ ", problem), problem
    assert_unbroken(series(got, "unit1", "energy_import")[1:], "unit1")


# ---------------------------------------------------------------------------
# Ids and names that would collide in published records (defect 5), and
# topic prefixes the broker would swallow (defect 7)

TWO_DEVICES = (
    HEAD
    + DEVICE
    + """\
  - id: unit2
    transport: {type: tcp, host: 127.0.0.1, port: 502, unit_id: 2}
    channels:
      - {name: energy_import, register: 0}
"""
)


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "edged.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return [f"{p.line} {p.key_path}: {p.message}" for p in caught.value.problems]


def test_virtual_meter_reusing_a_device_id_is_an_error(tmp_path: Path) -> None:
    text = TWO_DEVICES + (
        "virtual_meters:\n"  # line 13
        "  - id: unit1\n"  # line 14
        "    channels: [{name: total, add: [unit1.energy_import, unit2.energy_import]}]\n"
    )
    assert problems_of(tmp_path, text) == [
        "14 virtual_meters[0].id: virtual meter id 'unit1' is also a device id"
    ]


def test_duplicate_virtual_meter_ids_and_channels_are_errors(tmp_path: Path) -> None:
    text = TWO_DEVICES + (
        "virtual_meters:\n"  # 13
        "  - id: station\n"  # 14
        "    channels:\n"  # 15
        "      - {name: total, add: [unit1.energy_import]}\n"  # 16
        "      - {name: total, add: [unit2.energy_import]}\n"  # 17
        "  - id: station\n"  # 18
        "    channels: [{name: total, add: [unit1.energy_import]}]\n"
    )
    assert problems_of(tmp_path, text) == [
        "17 virtual_meters[0].channels[1].name: duplicate channel name 'total'",
        "18 virtual_meters[1].id: duplicate virtual meter id 'station'",
    ]


def test_duplicate_measurement_point_names_are_an_error(tmp_path: Path) -> None:
    text = (
        HEAD
        + DEVICE
        + (
            "    measurements:\n"  # 9
            "      points:\n"  # 10
            "        - {name: kw, register: 10, type: float32, unit: kW}\n"  # 11
            "        - {name: kw, register: 12, type: float32, unit: kW}\n"  # 12
        )
    )
    assert problems_of(tmp_path, text) == [
        "12 devices[0].measurements.points[1].name: duplicate measurement point name 'kw'"
    ]


@pytest.mark.parametrize(
    ("prefix", "words"),
    [("$SYS", "must not start with $"), ("'$share/x'", "must not start with $"),
     ("a//b", "empty levels"), ("a/+/b", "pattern"), ("a/#", "pattern")],
)  # fmt: skip
def test_unpublishable_topic_prefix_is_an_error(tmp_path: Path, prefix: str, words: str) -> None:
    text = HEAD.replace(
        "mqtt: {host: 127.0.0.1}", f"mqtt: {{host: 127.0.0.1, topic_prefix: {prefix}}}"
    )
    (problem,) = problems_of(tmp_path, text + DEVICE)
    assert problem.startswith("3 mqtt.topic_prefix: "), problem
    assert words in problem, problem


async def test_a_reload_that_takes_too_long_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the reader's own bounds miss, a reload gives up after
    RELOAD_LOAD_TIMEOUT_S with config_rejected and keeps running."""
    import time as time_module

    from edged.app import app as app_module

    path = tmp_path / "edged.yaml"
    path.write_text(HEAD + DEVICE)
    settings = load_settings(path)
    app = app_module.App(settings, path)
    app._devices = object()  # type: ignore[assignment]  # only checked for None here
    monkeypatch.setattr(app_module, "RELOAD_LOAD_TIMEOUT_S", 0.2)
    monkeypatch.setattr(app_module, "load_settings", lambda p: time_module.sleep(1.0))
    await app._reload()
    (event,) = app._early_events
    assert event.kind == "config_rejected"
    assert "not loaded within 0.2 s" in event.message
    assert app.settings is settings  # the running configuration is kept
