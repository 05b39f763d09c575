"""Sample a running process with py-spy and tell where its CPU goes.

    python -m bench.profile PID [--seconds 20] [--out DIR]

`py-spy record` (the `bench` extra installs it) samples the process from
outside at 100 Hz without slowing it much; the collapsed stacks it writes
can be opened in speedscope or flamegraph.pl. This module sums them into the
functions that cost most on their own (self) and with what they call
(inclusive), which is what the performance notes quote.
"""

from __future__ import annotations

import argparse
import asyncio
import linecache
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# py-spy cannot tell here that a thread blocked in C is idle, so a sample whose
# innermost Python line is one of these waits counts as idle, not as CPU.
IDLE_CALLS = ("poll(", "tx.get()", "work_queue.get(", ".acquire(", ".wait(")


@dataclass(frozen=True, slots=True)
class Profile:
    samples: int
    idle_samples: int
    self_pct: list[tuple[str, float]]
    inclusive_pct: list[tuple[str, float]]
    raw_path: Path


def py_spy() -> str | None:
    return shutil.which("py-spy")


def _idle(frame: str) -> bool:
    _, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    text = linecache.getline(path, int(line)) if line.isdigit() else ""
    return any(call in text for call in IDLE_CALLS)


def _frame_name(frame: str) -> str:
    # "read_device (/x/edged/io/modbus.py:790)" -> "edged/io/modbus.py:read_device"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif (stdlib := re.search(r"/lib/python3\.\d+/", path)) is not None:
        path = path[stdlib.end() :]
    elif "/edged/" in path:
        path = "edged/" + path.rsplit("/edged/", 1)[1]
    else:
        path = "/".join(Path(path).parts[-2:])
    return f"{path}:{name}"


def summarise(raw: str, raw_path: Path, top: int = 15) -> Profile:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw_frames = [f for f in stack.split(";") if f]
        if not raw_frames:
            continue
        if _idle(raw_frames[-1]):
            idle += count
            continue
        frames = [_frame_name(f) for f in raw_frames]
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    pct = 100.0 / max(total, 1)
    return Profile(
        samples=total,
        idle_samples=idle,
        self_pct=[(n, round(c * pct, 1)) for n, c in self_counts.most_common(top)],
        inclusive_pct=[(n, round(c * pct, 1)) for n, c in inclusive.most_common(top)],
        raw_path=raw_path,
    )


async def record(pid: int, seconds: float, out_dir: Path) -> Profile | None:
    """py-spy's samples of `pid` for `seconds`, or None without py-spy."""
    binary = py_spy()
    if binary is None:
        return None
    raw_path = out_dir / f"py-spy-{pid}.txt"
    proc = await asyncio.create_subprocess_exec(
        binary, "record", "--pid", str(pid), "--duration", str(int(seconds)),
        "--rate", "100", "--full-filenames", "--format", "raw", "--output", str(raw_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0 or not raw_path.exists():
        print(f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}", flush=True)
        return None
    return summarise(raw_path.read_text(), raw_path)


def show(profile: Profile, title: str) -> None:
    print(
        f"{title}: {profile.samples} busy samples ({profile.idle_samples} idle left out), "
        f"stacks in {profile.raw_path}"
    )
    print("  self %   function")
    for name, pct in profile.self_pct:
        print(f"  {pct:6.1f}   {name}")
    print("  incl %   function")
    for name, pct in profile.inclusive_pct:
        print(f"  {pct:6.1f}   {name}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("pid", type=int)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    profile = asyncio.run(record(args.pid, args.seconds, args.out))
    if profile is None:
        sys.exit("py-spy is not installed (pip install -e '.[bench]')")
    show(profile, f"pid {args.pid}")


if __name__ == "__main__":
    main()
