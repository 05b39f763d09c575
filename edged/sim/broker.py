"""A mosquitto process on a loopback port, for tests, benchmarks and the demo."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def mosquitto_path() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(kw_only=True)
class Mosquitto:
    """mosquitto on 127.0.0.1:port; may be stopped and started again on the same port."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    # Send each PUBACK at once instead of letting Nagle hold it for the
    # client's delayed ACK (the benchmarks measure the client, not that wait).
    tcp_nodelay: bool = False
    # A mosquitto_passwd file: then only its users may connect (no anonymous).
    password_file: Path | None = None
    # mosquitto ACL file text (anonymous clients: `topic write a/#` lines);
    # None: every topic allowed.
    acl: str | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1"]
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines.append("allow_anonymous true")
        lines += [
            "persistence false",
            "max_queued_messages 1000000",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
        ]
        if self.tcp_nodelay:
            lines.append("set_tcp_nodelay true")
        if self.acl is not None:
            acl_file = self.workdir / "mosquitto.acl"
            acl_file.write_text(self.acl)
            lines.append(f"acl_file {acl_file}")
        if (self.acl is not None or self.password_file is not None) and os.geteuid() == 0:
            # mosquitto drops root for user "mosquitto" before it reads the ACL
            # and password files, which then lie in a directory only we may
            # read (a test's tmp_path): stay who started it.
            lines.append("user root")
        conf.write_text("".join(line + "\n" for line in lines))
        self.process = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}")
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would: no clean disconnects, and
        (persistence being off) every session, subscription and message in
        flight is gone. `start` brings it back empty on the same port."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
