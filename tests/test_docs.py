"""The docs in docs/: generated references are fresh, links resolve, examples hold.

docs/configuration.md and docs/flags.md are generated (`python -m tools.docgen
--write`); when a model, a description or the flag table changes, regenerate
them and commit the result with the change.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edged.config.schema import Settings
from edged.core.model import Flag
from tools import docgen

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = (
    "getting-started.md",
    "configuration.md",
    "mqtt.md",
    "flags.md",
    "time.md",
    "deployment.md",
    "scaling.md",
    "profiles.md",
    "multimaster.md",
)
REGENERATE = "stale: run `python -m tools.docgen --write` and commit docs/"


@pytest.mark.parametrize(("filename", "build"), list(docgen.GENERATED.values()))
def test_generated_docs_are_fresh(filename: str, build: object) -> None:
    assert callable(build)
    committed = (DOCS / filename).read_text(encoding="utf-8")
    assert committed == build(), f"docs/{filename} is {REGENERATE}"


@pytest.mark.integration
def test_docgen_command_prints_the_configuration_reference() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.docgen"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (DOCS / "configuration.md").read_text(encoding="utf-8")


def test_docgen_write(tmp_path: Path) -> None:
    assert docgen.main(["--write", str(tmp_path)]) == 0
    for filename, build in docgen.GENERATED.values():
        assert (tmp_path / filename).read_text(encoding="utf-8") == build()


def test_every_config_key_is_documented() -> None:
    undocumented = [
        f"{s.path or '(top)'}.{r.key}"
        for s in docgen.config_sections()
        for r in s.rows
        if r.description == docgen.UNDOCUMENTED
    ]
    assert not undocumented, (
        "give these keys a Field(description=...) or an entry in tools.docgen.DESCRIPTIONS: "
        + ", ".join(undocumented)
    )


def test_every_key_appears_in_the_reference() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for section in docgen.config_sections():
        assert f"## {section.title}" in text
        for row in section.rows:
            assert f"| {row.key} |" in text


def test_every_flag_is_in_flags_md() -> None:
    text = (DOCS / "flags.md").read_text(encoding="utf-8")
    for flag in Flag:
        assert f"| `{flag}` |" in text


def test_describe_types() -> None:
    fields = Settings.model_fields
    assert (
        docgen.describe(fields["status_every"].annotation, fields["status_every"].metadata).text
        == "duration"
    )
    devices = docgen.describe(fields["devices"].annotation, fields["devices"].metadata)
    assert devices.text == "list of mapping"
    assert devices.children[0][1] == "[]"


@pytest.mark.parametrize("page", PAGES)
def test_page_exists_with_a_title(page: str) -> None:
    text = (DOCS / page).read_text(encoding="utf-8")
    assert text.startswith("# ")


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page: str) -> None:
    text = (DOCS / page).read_text(encoding="utf-8")
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        path, _, fragment = target.partition("#")
        file = (DOCS / path).resolve() if path else DOCS / page
        assert file.exists(), f"{page}: link to missing {target}"
        if fragment and file.suffix == ".md":
            body = file.read_text(encoding="utf-8")
            anchors = set(re.findall(r'<a id="([^"]+)"></a>', body)) | {
                _github_anchor(h) for h in re.findall(r"^#+ (.+)$", body, re.M)
            }
            assert fragment in anchors, f"{page}: no anchor #{fragment} in {path or page}"


def _github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _yaml_blocks(page: str) -> list[str]:
    text = (DOCS / page).read_text(encoding="utf-8")
    return re.findall(r"```yaml\n(.*?)```", text, re.S)


@pytest.mark.parametrize("page", ["getting-started.md", "profiles.md", "deployment.md", "time.md"])
def test_yaml_examples_parse(page: str) -> None:
    for block in _yaml_blocks(page):
        yaml.safe_load(block)


def test_full_config_examples_validate(tmp_path: Path) -> None:
    """Every example in the docs that is a whole config file passes check-config."""
    from edged.config.load import load_settings

    checked = 0
    for page in PAGES:
        if not (DOCS / page).exists():
            continue
        for block in _yaml_blocks(page):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and "site" in data and "devices" in data:
                config = tmp_path / "edged.yaml"
                config.write_text(block)
                load_settings(config)
                checked += 1
    assert checked >= 2


def test_profile_examples_load(tmp_path: Path) -> None:
    """A profile example in profiles.md works when a device names it."""
    from edged.config.load import load_settings

    blocks = [yaml.safe_load(b) for b in _yaml_blocks("profiles.md")]
    profiles = [b for b in blocks if isinstance(b, dict) and "name" in b and "site" not in b]
    assert profiles
    (tmp_path / "profiles").mkdir()
    for profile in profiles:
        (tmp_path / "profiles" / f"{profile['name']}.yaml").write_text(yaml.safe_dump(profile))
        config = tmp_path / "edged.yaml"
        config.write_text(
            "site: s\ndevices:\n  - id: d\n"
            f"    profile: {profile['name']}\n"
            "    transport: {type: tcp, host: 127.0.0.1}\n"
        )
        settings = load_settings(config)
        assert settings.devices[0].channels


def test_mqtt_md_documents_every_payload_field() -> None:
    from tests.support.schema import load_schema

    text = (DOCS / "mqtt.md").read_text(encoding="utf-8")
    interval = load_schema("interval")["properties"]
    event = load_schema("event")["properties"]
    status = load_schema("gateway_status")["$defs"]["status"]["properties"]
    device = load_schema("device_status")["properties"]
    peak = load_schema("peak")["properties"]
    for fields in (interval, event, status, device, peak):
        for name in fields:
            assert f"`{name}`" in text, f"mqtt.md does not document `{name}`"
