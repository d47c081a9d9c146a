"""A real Mosquitto broker on a free loopback port, for the fleet tests (skipped where the binary is absent)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional

import pytest

BINARY = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    def __init__(self, folder: Path, extra: List[str] = ()) -> None:  # type: ignore[assignment]
        if BINARY is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join([f"listener {self.port} 127.0.0.1", "persistence true",
                                          f"persistence_location {folder}/", "log_type error",
                                          # as root it would switch to user mosquitto, who cannot read tmp_path
                                          f"user {getpass.getuser()}",
                                          *(extra or ["allow_anonymous true"])]) + "\n")
        self.process: Optional[subprocess.Popen] = None  # type: ignore[type-arg]
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen([BINARY, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=open(self.folder / "broker.log", "a"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {(self.folder / 'broker.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
