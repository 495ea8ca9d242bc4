"""Talking to corecapd over its Unix socket (blocking; for corecapctl and the job library)."""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any

from corecapd.protocol import ProtocolError, decode_reply, encode_request, root_socket

MAX_REPLY = 64 << 20  # a status of many thousand jobs fits easily


class DaemonUnreachable(Exception):
    """No daemon answered at the socket path."""


def call(socket_path: Path, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
    """Send one request and return its result.

    Raises:
        DaemonUnreachable: no daemon at `socket_path`, or it gave no reply within
            `timeout` seconds (per socket operation), or closed without one.
        RemoteError: the daemon refused the request, or the connection (busy).
        ProtocolError: the reply is not a protocol reply, or longer than MAX_REPLY.
    """
    if os.geteuid() == 0 and _is_socket(root_socket(socket_path)):
        socket_path = root_socket(socket_path)  # root's own, which no other user can flood
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            _connect(sock, socket_path, timeout)
        except OSError as err:
            raise DaemonUnreachable(
                f"cannot reach corecapd at {socket_path}: {err.strerror or err}"
                " (is corecapd running? is --socket right?)"
            ) from None
        try:
            sock.sendall(encode_request(command, **arguments))
        except OSError as err:
            # A daemon that refuses the connection (busy) answers at once and closes: the
            # send may fail, but the reason waits to be read.
            unsent: OSError | None = err
        else:
            unsent = None
        try:
            reply = _read_line(sock, time.monotonic() + timeout)
        except OSError as err:
            cause = unsent or err
            raise DaemonUnreachable(
                f"corecapd at {socket_path} did not answer: {cause.strerror or cause}"
            ) from None
    if reply is None:
        raise DaemonUnreachable(f"corecapd at {socket_path} closed the connection without a reply")
    return decode_reply(reply)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _connect(sock: socket.socket, path: Path, timeout: float) -> None:
    """Connect, waiting in the kernel while the daemon's listen queue is full (at most
    `timeout` seconds). A non-blocking connect to a Unix socket fails at once then (EAGAIN),
    and retrying from user space loses the race for each freed slot to anyone connecting in
    a tight loop (measured: root's status stalled 4.5 s behind one such user); a blocking
    connect sleeps in the kernel and is woken as the daemon accepts."""
    sock.setblocking(True)
    seconds = int(timeout)
    sock.setsockopt(
        socket.SOL_SOCKET,
        socket.SO_SNDTIMEO,
        struct.pack("ll", seconds, int((timeout - seconds) * 1e6)),
    )
    sock.connect(str(path))
    sock.settimeout(timeout)


def _read_line(sock: socket.socket, deadline: float) -> bytes | None:
    """One reply line, whole by `deadline` (a reply that trickles in does not reset the
    timeout); None when the daemon closes before a whole line."""
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(1 << 16)
        if not chunk:
            return None
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)
        if sum(map(len, chunks)) > MAX_REPLY:
            raise ProtocolError("reply too long")
