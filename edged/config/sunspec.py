"""The SunSpec model definitions (JSON) that pysunspec2 ships, read for
`profile: sunspec` (the layout rules are :mod:`edged.core.sunspec`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any


@cache
def model_definition(model_id: int) -> Mapping[str, Any]:
    """The SunSpec model definition (JSON) pysunspec2 ships for ``model_id``."""
    try:
        package = resources.files("sunspec2")
    except ModuleNotFoundError:
        raise ValueError(
            "SunSpec model definitions come from pysunspec2, which is not installed "
            "(pip install 'pysunspec2>=1.3.7,<1.4')"
        ) from None
    path = package / "models" / "json" / f"model_{model_id}.json"
    try:
        definition: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no SunSpec model {model_id} in pysunspec2") from None
    return definition
