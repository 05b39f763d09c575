"""Which boot of the machine the monotonic clock belongs to.

CLOCK_MONOTONIC runs across restarts of edged but starts again at each boot
of the machine, so a monotonic time persisted with a record's counter is
only comparable with one read in the same boot. Linux names each boot
(/proc/sys/kernel/random/boot_id); elsewhere the boot is unknown and nothing
monotonic is persisted.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@cache
def kernel_boot_id(path: Path = BOOT_ID_PATH) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None
