"""sd_notify over a real datagram socket, as systemd would receive it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from conftest import StartDaemon


def test_ready_status_watchdog_and_stopping(start_daemon: StartDaemon, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(10)
        daemon = start_daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        messages: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
            messages.append(receiver.recv(4096).decode())
        assert any("READY=1" in m for m in messages), messages
        assert any(m.startswith("STATUS=0 jobs, 0 over budget, mode enforce") for m in messages)
        assert sum("WATCHDOG=1" in m for m in messages) >= 3
        assert daemon.stop() == 0
        rest = []
        while True:
            try:
                rest.append(receiver.recv(4096).decode())
            except TimeoutError:
                break
            if "STOPPING=1" in rest[-1]:
                break
        assert "STOPPING=1" in rest[-1]
