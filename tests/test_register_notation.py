"""Register numbers copied from a register list, and check-config's address warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edged.config.load import ConfigError, load_settings, load_settings_with_warnings

HEAD = """\
site: lab
devices:
  - id: meter
    transport: {type: tcp, host: 127.0.0.1, port: 502}
    channels:
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edged.yaml"
    path.write_text(text)
    return path


def channel(tmp_path: Path, entry: str) -> tuple[int, str]:
    device = load_settings(write(tmp_path, HEAD + f"      - {{name: e, {entry}}}\n")).devices[0]
    return device.channels[0].address, device.channels[0].function


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('register: "4x0091"', (90, "holding")),  # ION "40091" = holding register 91
        ('register: "3x0001"', (0, "input")),
        ('register: "0x5000"', (20480, "holding")),  # ABB prints hex wire addresses
        ("register_number: 40091", (90, "holding")),
        ("register_number: 40001", (0, "holding")),
        ("register_number: 30073", (72, "input")),  # Eastron 30073 = 0x0048
        ("register_number: 300053", (52, "input")),  # Carlo Gavazzi 300053 = 0034h
        ("register_number: 30073, function: input", (72, "input")),
        ("register: 90", (90, "holding")),
    ],
)
def test_register_list_numbers_become_pdu_addresses(
    tmp_path: Path, entry: str, expected: tuple[int, str]
) -> None:
    assert channel(tmp_path, entry) == expected


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("register: 90, register_number: 40091", "give `register` or `register_number`, not both"),
        ("register_number: 30073, function: holding", "is an input register, but function is"),
        ("register_number: 3204", "is not a Modicon register number"),
        ('register: "40091"', "is not understood"),
        ('register: "4x0000"', "register numbers start at 1"),
    ],
)
def test_bad_register_numbers_are_errors_with_file_and_line(
    tmp_path: Path, entry: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        channel(tmp_path, entry)
    (problem,) = info.value.problems
    assert (problem.file, problem.line) == (str(tmp_path / "edged.yaml"), 6)
    assert message in problem.message


def test_scale_and_clock_registers_take_the_notation(tmp_path: Path) -> None:
    text = HEAD + (
        '      - {name: e, register: "4x1168", scale_register: "4x1084"}\n'
        "    clock: {format: datetime4, register_number: 41845}\n"
    )
    device = load_settings(write(tmp_path, text)).devices[0]
    assert device.channels[0].address == 1167
    assert device.channels[0].scale_register is not None
    assert device.channels[0].scale_register.address == 1083
    assert device.clock is not None
    assert device.clock.address == 1844


def test_template_takes_the_notation(tmp_path: Path) -> None:
    text = HEAD.replace("    channels:\n", "") + (
        "    channel_count: 3\n"
        "    channel_template:\n"
        '      {name: "c{n}", register: "4x1168", stride: 2, scale_register: "4x1084",'
        " scale_stride: 1}\n"
    )
    device = load_settings(write(tmp_path, text)).devices[0]
    assert [(c.address, c.scale_register.address) for c in device.channels if c.scale_register] == [
        (1167, 1083),
        (1169, 1084),
        (1171, 1085),
    ]


def test_addresses_that_look_like_register_numbers_are_warnings(tmp_path: Path) -> None:
    text = HEAD + (
        "      - {name: a, register: 40090}\n"  # line 6
        "      - {name: b, register: 30073, function: input}\n"  # line 7
        "      - {name: c, register: 30073}\n"  # holding 30073: a real address on some meters
        "      - {name: d, register_number: 40091}\n"  # said on purpose: no warning
        "      - {name: f, register: 19068}\n"  # Janitza addresses are sent as printed
        "    clock: {register: 40300}\n"  # line 11
    )
    path = write(tmp_path, text)
    _, warnings = load_settings_with_warnings(path)
    assert [str(w) for w in warnings] == [
        f"{path}:6 devices[0].channels[0].register: address 40090 looks like a 4xxxx register "
        "number; the 0-based address is 40090-40001 = 89 (write `register_number: 40090` or the "
        "address itself; keep it only if the meter really uses this address)",
        f"{path}:7 devices[0].channels[1].register: address 30073 looks like a 3xxxx register "
        "number; the 0-based address is 30073-30001 = 72 (write `register_number: 30073` or the "
        "address itself; keep it only if the meter really uses this address)",
        f"{path}:11 devices[0].clock.register: address 40300 looks like a 4xxxx register "
        "number; the 0-based address is 40300-40001 = 299 (write `register_number: 40300` or the "
        "address itself; keep it only if the meter really uses this address)",
    ]


def test_a_profile_address_warning_points_into_the_profile(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    profile = tmp_path / "profiles" / "mine.yaml"
    profile.write_text("name: mine\nchannels:\n  - name: e\n    register: 40090\n")
    path = write(
        tmp_path, HEAD.replace("    channels:\n", "    profile: mine\n").replace("  - id", "  - id")
    )
    _, warnings = load_settings_with_warnings(path)
    assert [(w.file, w.line) for w in warnings] == [(str(profile), 4)]


PMC1 = """\
site: lab
devices:
  - id: pulses
    profile: pmc-1
    transport: {type: tcp, host: 127.0.0.1, port: 502}
"""


def test_pmc1_pulse_value_must_be_stated_or_check_config_warns(tmp_path: Path) -> None:
    path = write(tmp_path, PMC1)
    settings, warnings = load_settings_with_warnings(path)
    assert settings.devices[0].channels[0].multiplier == 0.144  # compatibility default
    (warning,) = warnings
    assert (warning.file, warning.line) == (str(path), 3)
    assert "profile pmc-1 only assumes channels.energy_import.multiplier" in warning.message
    stated = PMC1 + "    channels:\n      - {name: energy_import, multiplier: 0.288}\n"
    settings, warnings = load_settings_with_warnings(write(tmp_path, stated))
    assert warnings == ()
    assert settings.devices[0].channels[0].multiplier == 0.288


@pytest.mark.integration
def test_check_config_prints_warnings_and_still_passes(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "      - {name: a, register: 40090}\n")
    result = subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}:6 devices[0].channels[0].register: address 40090 looks like a " in (
        result.stderr
    )
    assert ": OK - site lab" in result.stdout
