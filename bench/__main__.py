"""The benchmark suite: `python -m bench --quick` (a few minutes) or `--full`.

Runs each benchmark in its own process (each starts its own meters, broker
and daemon), passes its output through and ends with one JSON line holding
every benchmark's figures and targets, so that runs can be compared:

    python -m bench --quick > quick.txt; tail -n 1 quick.txt | python -m json.tool

`--quick` runs every scenario at reduced size and duration; `--full` runs the
target sizes (1000 meters, 500 x 30 registers, a one-hour idle soak,
100,000 backlog messages) and takes a little over an hour. `--only` picks
benchmarks; `--profile` adds a py-spy profile of the daemon to the boundary
and fast-poll runs (`pip install -e '.[bench]'`). The MQTT scenarios need
mosquitto on PATH (`apt-get install -y mosquitto`) and are skipped, with a
message, without it. docs/performance.md explains the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.harness import machine_load, raise_fd_limit

# name -> (quick arguments, full arguments)
SUITE: dict[str, tuple[list[str], list[str]]] = {
    "boundary": (
        ["--devices", "300", "--every", "5", "--boundaries", "4"],
        ["--devices", "1000", "--every", "5", "--boundaries", "12"],
    ),
    "fastpoll": (
        ["--devices", "100", "--registers", "30", "--seconds", "10"],
        ["--devices", "500", "--registers", "30", "--seconds", "60"],
    ),
    "idle": (
        ["--devices", "100", "--seconds", "20", "--sample-every", "2"],
        ["--devices", "100", "--seconds", "3600", "--sample-every", "10"],
    ),
    "store": (["--seconds", "1", "--devices", "1000"], ["--seconds", "5", "--devices", "1000"]),
    "drain": (["--backlog", "20000", "--live", "20"], ["--backlog", "100000", "--live", "20"]),
    "rtu": (["--seconds", "1"], ["--seconds", "3"]),
    "multimaster": (["--seconds", "10"], ["--seconds", "60"]),
    "readpath": (
        ["--devices", "100", "--seconds", "3", "--rounds", "2"],
        ["--devices", "100", "--seconds", "6", "--rounds", "2"],
    ),
}
PROFILED = {"boundary": "15", "fastpoll": "15"}


def run_one(name: str, args: list[str]) -> dict[str, Any]:
    """Run `python -m bench.NAME ARGS`, echoing its output; its last JSON line."""
    print(f"\n=== {name}: python -m bench.{name} {' '.join(args)}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"bench.{name}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    last: dict[str, Any] | None = None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            try:
                last = json.loads(line)
            except ValueError:
                continue
    code = proc.wait()
    took = round(time.monotonic() - started, 1)
    if code != 0 or last is None:
        return {"benchmark": name, "error": f"exited with {code}", "seconds": took}
    last["seconds"] = took
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced sizes (default)")
    size.add_argument("--full", action="store_true", help="the issue's sizes, ~1 h")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SUITE)}")
    parser.add_argument("--profile", action="store_true", help="py-spy the daemon")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    # 1000 meters need ~2000 sockets in the benchmark's processes: raise the
    # limit here too, so every child starts with it.
    raise_fd_limit(4096)
    mode = "full" if args.full else "quick"
    results: dict[str, Any] = {}
    for name in names:
        extra = ["--profile", PROFILED[name]] if args.profile and name in PROFILED else []
        results[name] = run_one(name, [*SUITE[name][1 if args.full else 0], *extra])
    print(f"\n=== summary ({mode})", flush=True)
    failed = False
    for name, result in results.items():
        if "error" in result:
            failed = True
            print(f"{name:9} ERROR: {result['error']}")
        elif "skipped" in result:
            print(f"{name:9} skipped: {result['skipped']}")
        else:
            marks = ", ".join(f"{t} {'ok' if ok else 'MISSED'}"
                              for t, ok in result.get("targets", {}).items())  # fmt: skip
            print(f"{name:9} {result['seconds']:7.1f} s  {marks}")
    print(json.dumps({"suite": mode, "machine": machine_load(), "results": results}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
