"""Validate MQTT messages against the JSON Schemas in `edged/schemas/` (draft 2020-12).

Integration tests can check every message they receive::

    from tests.support.schema import validate_message
    for topic, payload, retained in collector.messages:
        validate_message(topic, payload, retained=retained)

`validate_message` picks the schema from the topic, validates the payload
(formats included: `date-time` is checked), and checks that the payload agrees
with its topic (site, device, channel, and the record id built from them). A
topic without a schema is an error: a new message type comes with its schema.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from importlib.resources import files
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]

# The schemas are package data: read them the way an installed edged ships them.
SCHEMA_DIR = files("edged") / "schemas"
SCHEMA_NAMES = (
    "interval",
    "event",
    "gateway_status",
    "device_status",
    "peak",
    "measurement",
    "command_response",
    "replay_request",  # published to edged, not by it: checked with validate_payload
)
RETAINED = frozenset({"gateway_status", "device_status", "peak"})

# Matched from the end: the prefix may itself contain '/'.
TOPICS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<prefix>.+)/(?P<site>[^/]+)/gateway/status$"), "gateway_status"),
    (re.compile(r"^(?P<prefix>.+)/(?P<site>[^/]+)/gateway/event$"), "event"),
    (
        re.compile(r"^(?P<prefix>.+)/(?P<site>[^/]+)/gateway/response/(?P<command>[^/]+)$"),
        "command_response",
    ),
    (
        re.compile(r"^(?P<prefix>.+)/(?P<site>[^/]+)/device/(?P<device>[^/]+)/status$"),
        "device_status",
    ),
    (re.compile(r"^(?P<prefix>.+)/(?P<site>[^/]+)/device/(?P<device>[^/]+)/event$"), "event"),
    (
        re.compile(r"^(?P<prefix>.+)/(?P<site>[^/]+)/device/(?P<device>[^/]+)/measurement$"),
        "measurement",
    ),
    (
        re.compile(
            r"^(?P<prefix>.+)/(?P<site>[^/]+)/device/(?P<device>[^/]+)/interval/(?P<channel>[^/]+)$"
        ),
        "interval",
    ),
    (
        re.compile(
            r"^(?P<prefix>.+)/(?P<site>[^/]+)/device/(?P<device>[^/]+)/peak/(?P<channel>[^/]+)$"
        ),
        "peak",
    ),
)


class SchemaViolation(AssertionError):
    """A message that breaks the MQTT contract."""


def load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return schema


@functools.cache
def validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def schema_for_topic(topic: str) -> tuple[str, dict[str, str]]:
    """(schema name, topic parts) for a topic; SchemaViolation when none applies."""
    for pattern, name in TOPICS:
        match = pattern.match(topic)
        if match:
            return name, {k: v for k, v in match.groupdict().items() if v is not None}
    raise SchemaViolation(f"no schema for topic {topic!r}")


def _leaf_errors(error: Any) -> list[Any]:
    """For a oneOf failure, the errors of the branch that came closest."""
    if error.validator != "oneOf" or not error.context:
        return [error]
    branches: dict[int, list[Any]] = {}
    for sub in error.context:
        branches.setdefault(sub.schema_path[0], []).append(sub)
    closest = min(branches.values(), key=len)
    return [leaf for sub in closest for leaf in _leaf_errors(sub)]


def validate_payload(name: str, payload: Mapping[str, Any]) -> None:
    errors = [
        leaf
        for error in sorted(validator(name).iter_errors(payload), key=lambda e: list(e.path))
        for leaf in _leaf_errors(error)
    ]
    if errors:
        lines = [
            f"  {'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in errors
        ]
        raise SchemaViolation(
            f"payload breaks edged/schemas/{name}.json:\n"
            + "\n".join(lines)
            + f"\n{dict(payload)!r}"
        )


def validate_message(topic: str, payload: Mapping[str, Any], *, retained: bool = False) -> str:
    """Validate one received message; returns the schema name it was checked against."""
    name, parts = schema_for_topic(topic)
    validate_payload(name, payload)
    problems: list[str] = []
    if payload.get("site") != parts["site"]:
        problems.append(f"site {payload.get('site')!r} is not the topic's {parts['site']!r}")
    if "device" in parts and payload.get("device") != parts["device"]:
        problems.append(f"device {payload.get('device')!r} is not the topic's {parts['device']!r}")
    if "command" in parts and payload.get("command") != parts["command"]:
        problems.append(
            f"command {payload.get('command')!r} is not the topic's {parts['command']!r}"
        )
    if name == "event" and "device" not in parts and payload.get("device") is not None:
        problems.append("a gateway event must have device null")
    if "channel" in parts and payload.get("channel") != parts["channel"]:
        problems.append(
            f"channel {payload.get('channel')!r} is not the topic's {parts['channel']!r}"
        )
    if name == "interval":
        expected = f"{payload['site']}/{payload['device']}/{payload['channel']}/{payload['end']}"
        if payload["id"] != expected:
            problems.append(f"id {payload['id']!r} is not {expected!r}")
    if name == "event":
        subject = payload["device"] or "gateway"
        expected = f"{payload['site']}/{subject}/{payload['kind']}/{payload['at']}"
        if payload["id"] != expected:
            problems.append(f"id {payload['id']!r} is not {expected!r}")
    if retained and name not in RETAINED:
        problems.append(f"{name} messages are never retained")
    if problems:
        raise SchemaViolation(f"{topic}: " + "; ".join(problems))
    return name


def validate_messages(messages: Iterable[tuple[str, Mapping[str, Any], bool]]) -> dict[str, int]:
    """Validate a collector's (topic, payload, retained) list; counts per schema."""
    counts: dict[str, int] = {}
    for topic, payload, retained in messages:
        name = validate_message(topic, payload, retained=retained)
        counts[name] = counts.get(name, 0) + 1
    return counts
