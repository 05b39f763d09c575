"""How hard the property tests hunt: the full example counts in CI.

CI (`CI=true`, as `.ci/run` sets it) or `EDGED_THOROUGH=1` runs every
property test at its full count; a developer's local run draws a fifth of
them so the fast lane (`pytest -m "not integration"`) stays quick. The
counts are the floor CI holds the code to, never lowered to pass.
"""

from __future__ import annotations

import os


def thorough() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes")
        for name in ("CI", "EDGED_THOROUGH")
    )


def examples(full: int) -> int:
    """`full` when thorough, else a fifth of it (at least 20)."""
    return full if thorough() else max(20, full // 5)
