"""Run a command under a systemd unit's seccomp settings, as systemd 252 applies them.

    python -m tests.unit_sandbox systemd/edged.service -- python -m edged.cli.main run -c X

Reads `SystemCallFilter=`, `SystemCallErrorNumber=`, `SystemCallArchitectures=`,
`MemoryDenyWriteExecute=` and `RestrictAddressFamilies=` from the unit's
[Service] section, expands the syscall groups with `systemd-analyze
syscall-filter` (the installed systemd's own definition), loads the same
filters through libseccomp (the library systemd uses) and execs the command.
So a test can show that edged, Python and its libraries run under the unit's
sandbox without systemd as PID 1 — a unit too tight for its program would
otherwise only be found on the first start on a gateway.

The filesystem, device and namespace settings need systemd itself and are
not reproduced here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

# libseccomp's action and comparison encodings (seccomp.h).
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_GE = 5
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
# Address families are small integers; anything from here up is refused as a block.
AF_LIMIT = 64


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def service_settings(unit: str) -> list[tuple[str, str]]:
    """(key, value) of the [Service] section in order (keys may repeat)."""
    out: list[tuple[str, str]] = []
    section = ""
    for raw in unit.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


@cache
def _group(name: str) -> tuple[str, ...]:
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return tuple(
        line.strip()
        for line in text.splitlines()[1:]
        if line.strip() and not line.strip().startswith("#")
    )


def expand(names: Iterable[str]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        if name.startswith("@"):
            calls |= expand(_group(name))
        else:
            calls.add(name)
    return calls


def allowed_syscalls(filters: Sequence[str]) -> set[str]:
    """Apply SystemCallFilter= lines in order, as systemd does for an allow
    list: the first sets the list (plus @default, always allowed), later ones
    add names or, with ~, take them away."""
    if not filters or filters[0].startswith("~"):
        raise ValueError("this harness only does allow lists")
    allowed = expand(["@default"])
    for line in filters:
        remove = line.startswith("~")
        names = expand(line.removeprefix("~").split())
        allowed = allowed - names if remove else allowed | names
    return allowed


def _check(result: int, what: str) -> None:
    if result < 0:
        raise OSError(-result, f"libseccomp {what}: {os.strerror(-result)}")


def load_filters(settings: Sequence[tuple[str, str]]) -> None:
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]  # fmt: skip
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def rule(ctx: int, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a system call on this architecture
            return
        array = (ArgCmp * max(1, len(cmps)))(*(ArgCmp(*c) for c in cmps))
        _check(lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array), name)

    values: dict[str, list[str]] = {}
    for key, value in settings:
        values.setdefault(key, []).append(value)
    if values.get("SystemCallArchitectures") not in (None, ["native"]):
        raise ValueError("only SystemCallArchitectures=native is reproduced")
    filters = values.get("SystemCallFilter", [])
    allowed_calls = sorted(allowed_syscalls(filters)) if filters else []
    # Separate filters, as systemd loads them (these first, the allow list
    # last, since loading a filter is itself a system call): the kernel
    # applies the strictest result of all.
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if values.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        eperm = scmp_act_errno(errno.EPERM)
        both = PROT_WRITE | PROT_EXEC
        rule(ctx, eperm, "mmap", (2, SCMP_CMP_MASKED_EQ, both, both))
        rule(ctx, eperm, "mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        rule(ctx, eperm, "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        rule(ctx, eperm, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
    families = values.get("RestrictAddressFamilies")
    if families:
        permitted = {int(getattr(socket, name)) for name in families[-1].split()}
        refuse = scmp_act_errno(errno.EAFNOSUPPORT)
        for family in range(AF_LIMIT):
            if family not in permitted:
                rule(ctx, refuse, "socket", (0, SCMP_CMP_EQ, family, 0))
        rule(ctx, refuse, "socket", (0, SCMP_CMP_GE, AF_LIMIT, 0))
    _check(lib.seccomp_load(ctx), "load restrictions")
    lib.seccomp_release(ctx)
    if filters:
        # A context's architecture is the native one: other ABIs hit the
        # bad-arch action (kill), as with SystemCallArchitectures=native.
        error = values.get("SystemCallErrorNumber", [""])[-1]
        default = scmp_act_errno(getattr(errno, error)) if error else SCMP_ACT_KILL_PROCESS
        ctx = lib.seccomp_init(default)
        for name in allowed_calls:
            rule(ctx, SCMP_ACT_ALLOW, name)
        _check(lib.seccomp_load(ctx), "load allow list")
        lib.seccomp_release(ctx)


def main(argv: Sequence[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m tests.unit_sandbox UNIT -- COMMAND [ARG...]")
    settings = service_settings(Path(argv[0]).read_text())
    if ("NoNewPrivileges", "yes") not in settings:
        sys.exit("the unit must set NoNewPrivileges=yes (seccomp needs it unprivileged)")
    load_filters(settings)  # libseccomp sets no_new_privs itself
    command = list(argv[2:])
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
