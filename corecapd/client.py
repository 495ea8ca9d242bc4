"""Talking to corecapd over its Unix socket (blocking; for corecapctl and the job library)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from corecapd.protocol import ProtocolError, decode_reply, encode_request

MAX_REPLY = 64 << 20  # a status of many thousand jobs fits easily


class DaemonUnreachable(Exception):
    """No daemon answered at the socket path."""


def call(socket_path: Path, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
    """Send one request and return its result; RemoteError if the daemon refused it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
        except OSError as err:
            raise DaemonUnreachable(
                f"cannot reach corecapd at {socket_path}: {err.strerror or err}"
                " (is corecapd running? is --socket right?)"
            ) from None
        try:
            sock.sendall(encode_request(command, **arguments))
            reply = _read_line(sock)
        except OSError as err:
            raise DaemonUnreachable(f"corecapd at {socket_path} did not answer: {err}") from None
    return decode_reply(reply)


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ProtocolError("corecapd closed the connection without a reply")
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)
        if sum(map(len, chunks)) > MAX_REPLY:
            raise ProtocolError("reply too long")
