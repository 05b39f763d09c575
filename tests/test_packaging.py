"""edged as it is shipped: its package data is found through importlib.resources,
so a wheel, a zip or a Debian package's virtualenv finds the profiles and the
schemas without a source tree beside it (issue 16).

The wheel itself is built, installed into a fresh venv and run by
scripts/check-wheel (CI); these tests cover the lookup without a build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import edged
from edged.config.load import load_settings
from edged.config.schema import TcpTransport

SOURCE_PACKAGE = Path(edged.__file__).resolve().parent
ROOT = SOURCE_PACKAGE.parent
# Written by hand from the issue and docs/profiles.md, not read from the package.
SHIPPED_PROFILES = ("abb-b23", "bcpm", "cg-em24", "cg-em340", "generic", "iem3000", "ion-8600",
                    "janitza-umg", "pm5350", "pm8000", "pmc-1", "sdm120", "sdm630", "siemens-pac",
                    "socomec-countis", "sunspec")  # fmt: skip
SHIPPED_SCHEMAS = (
    "command_response",
    "device_status",
    "event",
    "gateway_status",
    "interval",
    "measurement",
    "peak",
    "replay_request",
)


def config_naming_every_profile(path: Path) -> Path:
    devices = "".join(
        f"  - id: dev{i}\n"
        f"    profile: {name}\n"
        f"    transport: {{type: tcp, host: 127.0.0.1, port: {15020 + i}, unit_id: 1}}\n"
        for i, name in enumerate(SHIPPED_PROFILES)
    )
    path.write_text(
        f"site: pkg\nstorage: {{path: {path.parent / 'edged.db'}}}\ndevices:\n{devices}"
    )
    return path


def zipped_package(tmp_path: Path) -> Path:
    """The edged package as a zip archive: no file of it exists on disk."""
    archive = tmp_path / "edged.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(SOURCE_PACKAGE.rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts:
                zf.write(file, Path("edged") / file.relative_to(SOURCE_PACKAGE))
    return archive


def run_from(archive: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # -I would also drop site-packages (pydantic, yaml): -S is not wanted either.
    # PYTHONPATH puts the zip first, ahead of the checkout or an editable install.
    env = {**os.environ, "PYTHONPATH": str(archive), "PYTHONSAFEPATH": "1"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_no_schemas_outside_the_package() -> None:
    """The JSON Schemas moved into the package (edged/schemas/); one added at the
    old place would not ship and would not be checked."""
    assert not (ROOT / "schemas").exists(), "JSON Schemas belong in edged/schemas/"


def test_shipped_profiles_and_schemas_are_package_data() -> None:
    from importlib.resources import files

    from edged.config.load import available_profiles

    assert set(SHIPPED_PROFILES) <= set(available_profiles(Path("/nonexistent")))
    schemas = files("edged") / "schemas"
    for name in SHIPPED_SCHEMAS:
        assert (schemas / f"{name}.json").is_file(), name


@pytest.mark.integration
def test_check_config_from_a_zipped_package_finds_every_profile(tmp_path: Path) -> None:
    archive = zipped_package(tmp_path)
    config = config_naming_every_profile(tmp_path / "site.yaml")
    code = (
        "import sys, edged\n"
        f"assert edged.__file__.startswith({str(archive)!r}), edged.__file__\n"
        "from edged.cli.main import main\n"
        f"sys.exit(main(['check-config', '-c', {str(config)!r}]))\n"
    )
    result = run_from(archive, code, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unknown profile" not in result.stdout + result.stderr


@pytest.mark.integration
def test_schemas_are_read_from_a_zipped_package(tmp_path: Path) -> None:
    archive = zipped_package(tmp_path)
    code = (
        "import json, edged\n"
        "from importlib.resources import files\n"
        f"assert edged.__file__.startswith({str(archive)!r}), edged.__file__\n"
        "d = files('edged') / 'schemas'\n"
        f"for name in {SHIPPED_SCHEMAS!r}:\n"
        "    schema = json.loads((d / (name + '.json')).read_text(encoding='utf-8'))\n"
        "    print(name, schema['$schema'])\n"
    )
    result = run_from(archive, code, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(SHIPPED_SCHEMAS)
    assert all(line.endswith("https://json-schema.org/draft/2020-12/schema") for line in lines)


@pytest.mark.integration
def test_an_unknown_profile_lists_the_shipped_ones_from_a_zip(tmp_path: Path) -> None:
    archive = zipped_package(tmp_path)
    config = tmp_path / "site.yaml"
    config.write_text(
        "site: pkg\ndevices:\n  - id: d\n    profile: nope\n"
        "    transport: {type: tcp, host: 127.0.0.1, port: 15020, unit_id: 1}\n"
    )
    code = (
        "import sys\n"
        "from edged.cli.main import main\n"
        f"sys.exit(main(['check-config', '-c', {str(config)!r}]))\n"
    )
    result = run_from(archive, code, cwd=tmp_path)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "unknown profile 'nope' (known: " + ", ".join(SHIPPED_PROFILES) + ")" in out


def test_the_packaged_config_is_valid_and_polls_nothing_real() -> None:
    """/etc/edged/edged.yaml as the .deb installs it: check-config accepts it,
    and until it is edited it reaches nothing beyond this machine."""
    settings = load_settings(ROOT / "debian" / "edged.yaml")
    assert settings.storage.path == Path("/var/lib/edged/edged.db")
    assert settings.mqtt.host == "127.0.0.1"
    assert settings.mqtt.brokers == ()
    for device in settings.devices:
        assert isinstance(device.transport, TcpTransport)
        assert device.transport.host == "127.0.0.1"


def test_the_packaged_units_are_the_checked_in_ones() -> None:
    """debian/rules derives the installed units from systemd/ with two edits
    (the /usr/bin path and the sysusers account); the sed expressions must
    still match, or the package would ship /usr/local/bin and DynamicUser."""
    rules = (ROOT / "debian" / "rules").read_text()
    assert "s#/usr/local/bin/edged#/usr/bin/edged#g" in rules
    assert "s#^DynamicUser=yes$$#User=edged\\nGroup=edged#" in rules
    for unit in ("edged.service", "edged@.service"):
        lines = (ROOT / "systemd" / unit).read_text().splitlines()
        assert "DynamicUser=yes" in lines, unit
        assert any(line.startswith("ExecStart=/usr/local/bin/edged run") for line in lines), unit
