"""The `edged` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edged import __version__
from edged.config.load import (
    ConfigError,
    load_settings,
)
from edged.config.schema import Settings
from edged.core.errors import EdgedError
from edged.core.export import CSV_COLUMNS
from edged.core.model import iso_utc

DEFAULT_CONFIG = Path("/etc/edged/edged.yaml")
# `edged status` exits with this when there is at least one alarm (as `systemctl
# status` exits 3 for a unit that is not running).
STATUS_ALARM = 3


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
    from edged.config.load import load_settings_with_warnings

    try:
        settings, warnings = load_settings_with_warnings(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{args.config}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    # Warnings do not fail the check: the values are valid, only probably wrong.
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    channels = sum(len(d.channels) for d in settings.devices)
    print(
        f"{args.config}: OK - site {settings.site}, {len(settings.devices)} device(s), "
        f"{channels} channel(s), time zone {settings.timezone}"
    )
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 2
    devices = {d.id: d for d in settings.devices}
    device = devices.get(args.device)
    if device is None:
        print(f"edged probe: no device {args.device!r} in {args.config} "
              f"(known: {', '.join(devices)})", file=sys.stderr)  # fmt: skip
        return 2
    from edged.cli.probe import run_probe

    table, all_ok = asyncio.run(run_probe(device))
    sys.stdout.write(table)
    return 0 if all_ok else 1


def event_loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The daemon's event loop: uvloop when it is installed (`pip install
    'edged[fast]'`) and EDGED_EVENT_LOOP is not `asyncio`, asyncio's own
    otherwise. uvloop runs the same daemon on about a fifth less CPU when
    fast-polling (docs/performance.md); edged needs nothing else of it."""
    if os.environ.get("EDGED_EVENT_LOOP", "").strip().lower() == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 1
    import structlog

    from edged.app import logs
    from edged.app.app import App, run_until_signal
    from edged.io.mqtt import CredentialsError
    from edged.io.sdnotify import Systemd
    from edged.io.store import StoreError

    logs.configure(settings.log.level, settings.log.format)
    app = App(settings, args.config, systemd=Systemd.from_env())
    loop_name, loop_factory = event_loop_factory()
    structlog.get_logger("edged.cli.main").info("event loop", loop=loop_name)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run_until_signal(app))
    except (StoreError, CredentialsError) as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # the store failed during start-up
        print(f"edged: store {settings.storage.path}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edged.cli.demo import run_demo

    try:
        return asyncio.run(
            run_demo(args.duration, args.plain, args.interval, sparkplug=args.sparkplug)
        )
    except KeyboardInterrupt:
        return 0


def _store_path(args: argparse.Namespace, settings: Settings) -> Path:
    """`--db` when given, else the config's `storage.path`."""
    return args.db if args.db is not None else settings.storage.path


def _open_store(args: argparse.Namespace, settings: Settings) -> sqlite3.Connection | None:
    from edged.io.queries import StoreUnavailable, connect_readonly

    try:
        return connect_readonly(_store_path(args, settings))
    except StoreUnavailable as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return None


def cmd_status(args: argparse.Namespace) -> int:
    from edged.io.queries import format_status, status_json, store_status

    settings = _load(args.config)
    if settings is None:
        return 1
    conn = _open_store(args, settings)
    if conn is None:
        return 1
    try:
        status = store_status(conn, settings, _store_path(args, settings), datetime.now(UTC))
    finally:
        conn.close()
    if args.format == "json":
        print(json.dumps(status_json(status), indent=2))
    else:
        sys.stdout.write(format_status(status))
    return STATUS_ALARM if any(a.level == "alarm" for a in status.alarms) else 0


def cmd_intervals(args: argparse.Namespace) -> int:
    try:
        return _intervals(args)
    except BrokenPipeError:
        # `edged intervals ... | head`: the reader has gone; stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


def _time_range(
    prog: str, args: argparse.Namespace, settings: Settings
) -> tuple[datetime, datetime] | None:
    """--from/--to in the site zone; None (after saying why) when they are unusable."""
    from edged.core.export import TimeArgumentError, parse_range

    try:
        return parse_range(args.start, args.end, settings.zone, datetime.now(UTC))
    except TimeArgumentError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def _warn_unknown_devices(prog: str, args: argparse.Namespace, settings: Settings) -> None:
    known = [d.id for d in settings.devices] + [v.id for v in settings.virtual_meters]
    for device in args.device:
        if device not in known:
            print(
                f"{prog}: warning: device {device!r} is not in {args.config} "
                f"(known: {', '.join(known)}); searching the store anyway",
                file=sys.stderr,
            )


def _intervals(args: argparse.Namespace) -> int:
    from edged.core.export import Format, make_writer
    from edged.io.queries import IntervalQuery, count_intervals, iter_interval_payloads

    settings = _load(args.config)
    if settings is None:
        return 1
    zone = settings.zone
    span_range = _time_range("edged intervals", args, settings)
    if span_range is None:
        return 2
    start, end = span_range
    _warn_unknown_devices("edged intervals", args, settings)
    if args.plot is not None:
        from edged.cli.plot import PlotUnavailable, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            print(f"edged intervals: {exc}", file=sys.stderr)
            return 1
    fmt: Format | None = args.format or ("table" if args.plot is None else None)
    conn = _open_store(args, settings)
    if conn is None:
        return 1
    query = IntervalQuery(
        start=start, end=end, devices=tuple(args.device), channels=tuple(args.channel)
    )
    out = sys.stdout if args.output is None else args.output.open("w", encoding="utf-8", newline="")
    plotted: list[dict[str, Any]] = []
    count = 0
    try:
        total = count_intervals(conn, query)
        writer = make_writer(fmt, out, zone) if fmt is not None else None
        with _progress(total) as advance:
            for payload in iter_interval_payloads(conn, query):
                if writer is not None:
                    writer.write(payload)
                if args.plot is not None:
                    plotted.append(payload)
                count += 1
                advance()
        if writer is not None:
            writer.close()
    finally:
        conn.close()
        if out is not sys.stdout:
            out.close()
    what = ", ".join(args.device) or "all devices"
    span = f"{iso_utc(start)} .. {iso_utc(end)}"
    if count == 0:
        print(f"edged intervals: no intervals for {what} ending in ({span}]", file=sys.stderr)
    if args.output is not None:
        print(f"edged intervals: wrote {count} interval(s) to {args.output}", file=sys.stderr)
    if args.plot is not None:
        from edged.cli.plot import plot_intervals

        title = f"{settings.site}: {what}, {span}"
        plot_intervals(plotted, args.plot, zone, title)
        print(f"edged intervals: plotted {count} interval(s) to {args.plot}", file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from edged.app.replay import ReplayError, publish_stored
    from edged.io.mqtt import CredentialsError, default_client_id, resolve_password
    from edged.io.queries import IntervalQuery, count_intervals, iter_interval_payloads

    prog = "edged replay"
    settings = _load(args.config)
    if settings is None:
        return 1
    span_range = _time_range(prog, args, settings)
    if span_range is None:
        return 2
    start, end = span_range
    _warn_unknown_devices(prog, args, settings)
    conn = _open_store(args, settings)
    if conn is None:
        return 1
    query = IntervalQuery(
        start=start, end=end, devices=tuple(args.device), channels=tuple(args.channel)
    )
    what = ", ".join(args.device) or "all devices"
    if args.channel:
        what += f" ({', '.join(args.channel)})"
    span = f"ending in ({iso_utc(start)} .. {iso_utc(end)}]"
    try:
        total = count_intervals(conn, query)
        if total == 0:
            print(f"{prog}: no stored intervals for {what} {span}; nothing to replay",
                  file=sys.stderr)  # fmt: skip
            return 1
        if args.dry_run:
            print(f"{prog}: would replay {total} interval(s) of {what} {span}")
            return 0
        password = resolve_password(settings.mqtt)
        # Never the daemon's own client id: the broker would disconnect the daemon.
        client_id = f"{default_client_id(settings.mqtt, settings.site)}-replay-{os.getpid()}"
        with _progress(total, "replay") as advance:

            def published(count: int) -> None:
                for _ in range(count):
                    advance()

            broker, sent = asyncio.run(
                publish_stored(
                    settings,
                    iter_interval_payloads(conn, query),
                    client_id=client_id,
                    password=password,
                    on_published=published,
                )
            )
    except (CredentialsError, ReplayError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    print(
        f"{prog}: published {sent} interval(s) of {what} {span} with replay: true to "
        f"{broker.host}:{broker.port}; every one acknowledged by the broker"
    )
    return 0


# An export of at least this many rows shows a progress bar (on a terminal).
PROGRESS_MIN_ROWS = 2000


@contextlib.contextmanager
def _progress(total: int, description: str = "intervals") -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr for long operations, only when stderr is a terminal."""
    if total < PROGRESS_MIN_ROWS or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


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

    p = sub.add_parser(
        "run",
        help="run the daemon",
        description="Run the daemon until SIGTERM; SIGHUP reloads the configuration file.",
    )
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
        "probe",
        help="read every point of one device once and print it (commissioning)",
        description="Read every channel, measurement point, clock and status word of one "
        "device once, each on its own (read-only: function 3 or 4 only), and print the raw "
        "registers, the decoded value and its unit, to compare with the meter's display "
        "before going live. A point the meter answers with an exception, or does not answer, "
        "is an ERROR row; the other points are still read. Exit status: 0 every point read, "
        "1 at least one point failed, 2 config unusable or unknown device.",
    )
    config_arg(p)
    p.add_argument("--device", required=True, metavar="ID", help="id of the device to read")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "demo",
        help="run simulated meters, a broker and the daemon with a live view",
        description="Start two simulated meters, an MQTT broker (mosquitto if installed, "
        "else the embedded amqtt) and the daemon with short intervals and a virtual "
        "station total of both meters, and show the intervals as an upstream consumer "
        "receives them. Nothing to configure.",
    )
    p.add_argument("--duration", type=float, default=None, metavar="N",
                   help="exit after N seconds (default: run until Ctrl-C)")  # fmt: skip
    p.add_argument("--plain", action="store_true",
                   help="print one line per interval instead of the live table")  # fmt: skip
    p.add_argument("--interval", type=int, default=10, metavar="S",
                   help="interval length in seconds (default 10; must divide a day)")  # fmt: skip
    p.add_argument("--sparkplug", action="store_true",
                   help="also publish Sparkplug B (docs/sparkplug.md), shown decoded")  # fmt: skip
    p.set_defaults(func=cmd_demo)

    def db_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", type=Path, default=None, metavar="PATH",
                       help="store to read instead of the config's storage.path "
                       "(e.g. a copy taken off a gateway)")  # fmt: skip

    p = sub.add_parser(
        "status",
        help="show devices, outbox and alarms from the local store",
        description="Read the local store (read-only; the daemon may keep running) and show, "
        "per configured device, the last read and its result, failed reads, the last interval "
        "end and the last 24 h of interval quality; the outbox depth and the age of its oldest "
        "unsent message; the daemon's liveness mark; and alarms. Exit status: 0 no alarms, "
        f"1 config or store unreadable, {STATUS_ALARM} at least one alarm.",
    )
    config_arg(p)
    db_arg(p)
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="text for people (default), json for monitoring scripts")  # fmt: skip
    p.set_defaults(func=cmd_status)

    from edged.core.export import FORMATS, TIME_HELP

    def filter_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", action="append", default=[], metavar="D",
                       help="device id (repeat for several; default: all)")  # fmt: skip
        p.add_argument("--channel", action="append", default=[], metavar="C",
                       help="channel name (repeat for several; default: all)")  # fmt: skip

    p = sub.add_parser(
        "intervals",
        help="export interval records from the local store (table, CSV, JSON, PNG plot)",
        description="Export the interval records stored on this gateway whose end lies in "
        "(--from, --to], ordered by end, device, channel. Reads the store read-only; the "
        "daemon may keep running. CSV has one row per interval (columns: "
        + ", ".join(CSV_COLUMNS)
        + "); flags and iee_status are joined with '|'; an empty cell is null.",
        epilog="Times: " + TIME_HELP + ". A local time that DST skips or repeats is refused; "
        "write it with its offset. A progress bar is shown on stderr for long exports when "
        "stderr is a terminal.",
    )
    config_arg(p)
    db_arg(p)
    filter_args(p)
    p.add_argument("--from", dest="start", default=None, metavar="T",
                   help="start of the range, exclusive (default: 24 h before --to)")  # fmt: skip
    p.add_argument("--to", dest="end", default=None, metavar="T",
                   help="end of the range, inclusive (default: now)")  # fmt: skip
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="table (default), csv or json; with only --plot: none")  # fmt: skip
    p.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                   help="write to FILE instead of stdout")  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="also draw interval demand over the range, flagged intervals marked, "
                   "as a PNG (needs the optional extra: pip install 'edged[plot]')")  # fmt: skip
    p.set_defaults(func=cmd_intervals)

    p = sub.add_parser(
        "replay",
        help="publish stored interval records again, marked replay: true",
        description="Publish the interval records stored on this gateway whose end lies in "
        "(--from, --to] again, for an upstream system that lost data: each is the stored "
        "record with replay: true (same id and seq, so consumers de-duplicate it), sent at "
        "QoS 1 to the configured broker with the daemon's connection settings (TLS, "
        "credentials, failover order). Reads the store read-only; the daemon may keep "
        "running. Waits for the broker to acknowledge every record. Exit status: 0 all "
        "published, 1 nothing stored in the range, or the config, store or broker is "
        "unusable, 2 unusable --from/--to.",
        epilog="Times: " + TIME_HELP + ". A progress bar is shown on stderr for long "
        "replays when stderr is a terminal.",
    )
    config_arg(p)
    db_arg(p)
    p.add_argument("--from", dest="start", required=True, metavar="T",
                   help="start of the range, exclusive")  # fmt: skip
    p.add_argument("--to", dest="end", required=True, metavar="T",
                   help="end of the range, inclusive")  # fmt: skip
    filter_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="only count the records that would be published")  # fmt: skip
    p.set_defaults(func=cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except EdgedError as exc:
        # Every error edged raises on purpose is one line for the operator;
        # anything else is a bug and keeps its traceback.
        print(f"edged {args.command}: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
