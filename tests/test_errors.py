"""One exception base: every error edged raises on purpose is an EdgedError,
and the CLI reports one as a single line with exit code 1."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil

import pytest

import edged
from edged.cli import main as cli
from edged.core.errors import EdgedError
from edged.io.store import StoreError


def _edged_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(edged.__path__, "edged."):
        if info.name.startswith("edged.sim") or info.name.endswith("__main__"):
            continue  # simulators are test equipment, not edged
        module = importlib.import_module(info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == info.name:
                found.append(value)
    return found


def test_every_edged_exception_is_an_edged_error() -> None:
    exceptions = _edged_exceptions()
    assert len(exceptions) >= 10  # the walk found the package's exceptions
    assert [e.__qualname__ for e in exceptions if not issubclass(e, EdgedError)] == []


def test_cli_reports_an_edged_error_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(args: argparse.Namespace) -> int:
        raise StoreError("cannot use /var/lib/edged/edged.db: disk I/O error")

    parser = cli.build_parser()
    original = parser.parse_args

    def parse(argv: object = None) -> argparse.Namespace:
        args = original(["status", "-c", "x.yaml"])
        args.func = failing
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err == "edged status: cannot use /var/lib/edged/edged.db: disk I/O error\n"
