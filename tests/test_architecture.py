"""The layering the tree promises, checked from outside the import-linter run.

`lint-imports` (scripts/check) enforces the package contracts in
pyproject.toml; these tests check the two promises it cannot state: that
importing the engine really loads no I/O library in a fresh interpreter, and
that no module-level import cycle exists anywhere in edged.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grimp
import pytest

IO_LIBRARIES = (
    "yaml",
    "pymodbus",
    "serial",
    "aiosqlite",
    "sqlite3",
    "aiomqtt",
    "paho",
    "ntplib",
    "structlog",
    "asyncio",
)

PURE_MODULES = (
    "edged.core.engine.intervals",
    "edged.core.time.timebase",
    "edged.core.virtual.meters",
    "edged.core.payloads",
    "edged.core.reload",
)


@pytest.mark.integration
@pytest.mark.parametrize("module", PURE_MODULES)
def test_importing_the_core_loads_no_io_library(module: str) -> None:
    probe = (
        f"import sys, json; import {module}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {IO_LIBRARIES!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []


def test_no_module_level_import_cycle() -> None:
    graph = grimp.build_graph("edged")
    cycles = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            if graph.chain_exists(importer=imported, imported=importer):
                chain = graph.find_shortest_chain(importer=imported, imported=importer)
                cycles.append(" -> ".join((importer, *(chain or ()))))
    assert cycles == []
