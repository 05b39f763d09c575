"""structlog set-up: JSON lines for journald and pipes, readable console on a TTY."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip


# The configured level, for callers that would otherwise build a debug
# line's fields (a call through structlog's proxy binds a logger even when
# the level drops it): unconfigured structlog prints everything.
_min_level = logging.NOTSET


def enabled(level: int) -> bool:
    """Whether a line at `level` would be written."""
    return level >= _min_level


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: object = None,
) -> None:
    global _min_level
    _min_level = LEVELS.get(level, logging.INFO)
    out = stream if stream is not None else sys.stdout
    use_console = fmt == "console" or (fmt == "auto" and getattr(out, "isatty", lambda: False)())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=True)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
