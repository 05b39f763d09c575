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


@dataclass
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

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + (
                # mosquitto started as root drops to its own user before it reads
                # the password file, which then lies in a directory only we may
                # read (a test's tmp_path): keep the user it was started as.
                f"allow_anonymous false\npassword_file {self.password_file}\n"
                + ("user root\n" if os.geteuid() == 0 else "")
                if self.password_file is not None
                else "allow_anonymous true\n"
            )
            + "persistence false\n"
            "max_queued_messages 1000000\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\n"
            + ("set_tcp_nodelay true\n" if self.tcp_nodelay else "")
        )
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
