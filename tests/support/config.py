"""Site configuration files for integration tests, written with yaml.safe_dump.

`site_config(tmp_path, devices=[...], mqtt_port=..., ntp_port=..., **overrides)`
starts from the settings most daemon tests share (site ``test-site`` in
Pacific/Auckland, the store under ``tmp_path/state``, JSON logs, a 1 s status
cadence) and merges ``overrides`` into it: a mapping merges key by key, any
other value replaces, ``None`` removes the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.meters import KWH_PER_COUNT

Tree = dict[str, Any]


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> Tree:
    out: Tree = dict(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def energy_channel(
    name: str = "energy_import", register: int = 0, multiplier: float = KWH_PER_COUNT
) -> Tree:
    return {"name": name, "register": register, "type": "uint32", "multiplier": multiplier}


def tcp_device(
    device_id: str,
    port: int,
    *,
    unit: int = 1,
    interval: str = "1s",
    timeout: str = "500ms",
    channels: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> Tree:
    """A device on the simulator at 127.0.0.1:`port`; one energy counter by default."""
    device: Tree = {
        "id": device_id,
        "interval": interval,
        "transport": {
            "type": "tcp", "host": "127.0.0.1", "port": port, "unit_id": unit, "timeout": timeout,
        },
    }  # fmt: skip
    if channels is not None or "profile" not in extra:
        device["channels"] = [dict(c) for c in (channels or [energy_channel()])]
    device.update(extra)
    return device


def site_settings(
    tmp_path: Path,
    *,
    devices: Sequence[Mapping[str, Any]] = (),
    mqtt_port: int | None = None,
    ntp_port: int | None = None,
    **overrides: Any,
) -> Tree:
    """The configuration as a tree (see the module docstring)."""
    tree: Tree = {
        "site": "test-site",
        "timezone": "Pacific/Auckland",
        "storage": {"path": str(tmp_path / "state" / "edged.db")},
        "log": {"format": "json"},
        "status_every": "1s",
    }
    if mqtt_port is not None:
        tree["mqtt"] = {"host": "127.0.0.1", "port": mqtt_port, "topic_prefix": "edged"}
    if ntp_port is not None:
        tree["time"] = {
            "source": "ntp", "ntp_servers": [f"127.0.0.1:{ntp_port}"], "ntp_poll": "2s",
        }  # fmt: skip
    tree["devices"] = [dict(d) for d in devices]
    return merged(tree, overrides)


def write_settings(path: Path, tree: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(tree), sort_keys=False))
    return path


def site_config(
    tmp_path: Path,
    *,
    devices: Sequence[Mapping[str, Any]] = (),
    mqtt_port: int | None = None,
    ntp_port: int | None = None,
    name: str = "edged.yaml",
    **overrides: Any,
) -> Path:
    """Write `tmp_path/name` and return its path (see the module docstring)."""
    tree = site_settings(
        tmp_path, devices=devices, mqtt_port=mqtt_port, ntp_port=ntp_port, **overrides
    )
    return write_settings(tmp_path / name, tree)


def daemon_config(
    tmp_path: Path,
    mqtt_port: int,
    modbus_port: int,
    ntp_port: int,
    *,
    interval: str = "1s",
    units: Sequence[int] = (1,),
    **overrides: Any,
) -> Path:
    """The common daemon test: device ``unit<N>`` for each simulated unit N, all
    on the one simulator (one 1 kWh/s energy counter each), on NTP time."""
    return site_config(
        tmp_path,
        devices=[tcp_device(f"unit{u}", modbus_port, unit=u, interval=interval) for u in units],
        mqtt_port=mqtt_port,
        ntp_port=ntp_port,
        **overrides,
    )


# A small valid configuration as text, for tests of the loader (line numbers,
# edits of the text itself); daemon tests build theirs with `site_config`.
GOOD = """\
site: demo-site
timezone: Pacific/Auckland
storage:
  path: /var/lib/edged/edged.db
mqtt:
  host: 127.0.0.1
  port: 1883
  topic_prefix: edged
devices:
  - id: unit1
    interval: 15m
    transport: {type: tcp, host: 10.0.0.5, port: 502, unit_id: 1}
    channels:
      - name: energy_import
        register: 0
        type: uint32
        word_order: big
        unit: kWh
        multiplier: 0.144
        rollover: 4294967296
"""


def write(tmp_path: Path, text: str, name: str = "edged.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path
