"""The `edged` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from edged import __version__
from edged.config import ConfigError, Settings, load_settings

DEFAULT_CONFIG = Path("/etc/edged/edged.yaml")


def _load(path: Path) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 1
    channels = sum(len(d.channels) for d in settings.devices)
    print(
        f"{args.config}: OK - site {settings.site}, {len(settings.devices)} device(s), "
        f"{channels} channel(s), time zone {settings.timezone}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 1
    from edged import logs
    from edged.app import App, run_until_signal
    from edged.publish import CredentialsError
    from edged.store import StoreError

    logs.configure(settings.log.level, settings.log.format)
    app = App(settings, args.config)
    try:
        asyncio.run(run_until_signal(app))
    except (StoreError, CredentialsError) as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edged.demo import run_demo

    try:
        return asyncio.run(run_demo(args.duration, args.plain, args.interval))
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edged",
        description="Edge data acquisition for billing-grade electricity interval data: "
        "reads Modbus meters on interval boundaries, buffers in SQLite, publishes to MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"configuration file (default {DEFAULT_CONFIG})")  # fmt: skip

    p = sub.add_parser("run", help="run the daemon", description="Run the daemon until SIGTERM.")
    config_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate a configuration file without touching the network; "
        "prints every problem with file, line and key, exits 1 if there are any.",
    )
    config_arg(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "demo",
        help="run simulated meters, a broker and the daemon with a live view",
        description="Start two simulated meters, an MQTT broker (mosquitto if installed, "
        "else the embedded amqtt) and the daemon with short intervals, and show the "
        "intervals as an upstream consumer receives them. Nothing to configure.",
    )
    p.add_argument("--duration", type=float, default=None, metavar="N",
                   help="exit after N seconds (default: run until Ctrl-C)")  # fmt: skip
    p.add_argument("--plain", action="store_true",
                   help="print one line per interval instead of the live table")  # fmt: skip
    p.add_argument("--interval", type=int, default=10, metavar="S",
                   help="interval length in seconds (default 10; must divide a day)")  # fmt: skip
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
