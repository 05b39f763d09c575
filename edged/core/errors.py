"""One base for edged's own exceptions.

Every error edged raises on purpose (a bad config, an unusable store, a
refused broker login, a bad time argument) is an `EdgedError`, so the CLI
reports any of them as one line and an exit code, never a traceback; an
exception that is not one is a bug.
"""

from __future__ import annotations


class EdgedError(Exception):
    """Base of every exception edged raises on purpose; str() is for people."""
