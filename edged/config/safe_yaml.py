"""A YAML reader for configuration files that an attacker (or a typo) cannot
use to crash or hang the daemon.

PyYAML's ``SafeLoader`` refuses Python objects but still: follows merge keys
(``<<: *a``), raises on custom tags (``!env X``) and on unhashable complex
keys (``? [a, b]``), recurses for ever on a recursive alias, and expands a
"billion laughs" document (aliases of aliases) into gigabytes. A reload runs
this on a live daemon, so every one of those is refused here with a located
message, and the work done is bounded: the file size, the number of nodes
built (aliases count every time they are expanded), the number of alias uses
and the nesting depth.

Duplicate keys in a mapping are refused too: YAML 1.2 forbids them and
PyYAML silently keeps the last, so a second ``interval:`` under a device
would quietly win.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from edged.core.errors import EdgedError

__all__ = ["Limits", "YamlRefused", "build"]

KeyPath = tuple[str | int, ...]

_Y = "tag:yaml.org,2002:"
# Tags a configuration file may carry (implicitly resolved or written out).
ALLOWED_TAGS = frozenset(
    _Y + t for t in ("null", "bool", "int", "float", "str", "timestamp", "seq", "map")
)
_NO_MERGE = "merge keys (<<) are not supported: write the keys out"
_PLAIN_KEYS = "a key must be a plain value, not a list or mapping (complex key)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds on the work one file may ask for."""

    max_bytes: int = 4 * 1024 * 1024
    max_nodes: int = 200_000
    max_alias_uses: int = 100
    max_depth: int = 64


class YamlRefused(EdgedError):
    """A construct the configuration reader does not accept, with its line."""

    def __init__(self, line: int | None, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}" if line is not None else message)


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _Builder:
    def __init__(self, limits: Limits, lines: dict[KeyPath, int]) -> None:
        self.limits = limits
        self.lines = lines
        self.nodes = 0
        self.alias_uses = 0
        self.seen: set[int] = set()
        self.open: set[int] = set()  # nodes being built: a recursive alias

    def build(self, node: yaml.Node, path: KeyPath, depth: int) -> Any:
        self.lines.setdefault(path, _line(node))
        ident = id(node)
        if ident in self.open:
            raise YamlRefused(_line(node), "recursive alias: an anchor refers to itself")
        if ident in self.seen and not isinstance(node, yaml.ScalarNode):
            self.alias_uses += 1
            if self.alias_uses > self.limits.max_alias_uses:
                raise YamlRefused(
                    _line(node),
                    f"more than {self.limits.max_alias_uses} alias uses (a 'billion laughs' "
                    "document?)",
                )
        self.seen.add(ident)
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise YamlRefused(_line(node), f"more than {self.limits.max_nodes} values")
        if depth > self.limits.max_depth:
            raise YamlRefused(_line(node), f"nested deeper than {self.limits.max_depth} levels")
        if node.tag not in ALLOWED_TAGS:
            if node.tag == _Y + "merge":
                raise YamlRefused(_line(node), _NO_MERGE)
            raise YamlRefused(_line(node), f"tag {node.tag!r} is not supported in a config file")
        if isinstance(node, yaml.MappingNode):
            self.open.add(ident)
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise YamlRefused(_line(key_node), _PLAIN_KEYS)
                if key_node.tag == _Y + "merge":
                    raise YamlRefused(_line(key_node), _NO_MERGE)
                key = self.build(key_node, (*path, "<key>"), depth + 1)
                if key in result:
                    raise YamlRefused(_line(key_node), f"duplicate key {key!r}")
                self.lines[(*path, key)] = _line(key_node)
                result[key] = self.build(value_node, (*path, key), depth + 1)
            self.open.discard(ident)
            return result
        if isinstance(node, yaml.SequenceNode):
            self.open.add(ident)
            items = [self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
            self.open.discard(ident)
            return items
        return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        # e.g. a timestamp "2026-13-45": SafeLoader raises ValueError
        raise YamlRefused(_line(node), f"invalid value: {exc}") from None
    finally:
        loader.dispose()


def build(text: str, limits: Limits | None = None) -> tuple[Any, Mapping[KeyPath, int]]:
    """Parse ``text``: (plain data, line of every key path). Raises
    :class:`YamlRefused` for anything refused or malformed."""
    limits = limits or Limits()
    if len(text) > limits.max_bytes:
        raise YamlRefused(None, f"file larger than {limits.max_bytes} bytes")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlRefused(line, f"invalid YAML: {problem}") from None
    except RecursionError:
        raise YamlRefused(None, "invalid YAML: nested too deeply") from None
    lines: dict[KeyPath, int] = {}
    if node is None:
        return None, lines
    try:
        data = _Builder(limits, lines).build(node, (), 0)
    except RecursionError:
        raise YamlRefused(None, "nested too deeply") from None
    # "<key>" paths were only needed while building.
    for path in [p for p in lines if p and p[-1] == "<key>"]:
        del lines[path]
    return data, lines
