"""The Unix socket: who is asking (SO_PEERCRED, SO_PEERPIDFD), one request per line,
bounded per user and timed out both ways.

Any local user may connect (the socket is mode 0666) and read; commands in
`protocol.ROOT_ONLY` need the peer to be root. A misbehaving client gets an error reply
and is disconnected; it never reaches the daemon's state. No user can lock the others
out: a non-root uid holds at most MAX_CLIENTS_PER_USER connections, the last ROOT_RESERVE
of MAX_CLIENTS are root's alone, a request line must arrive whole within REQUEST_TIMEOUT
however slowly it trickles, and a reply the client does not take within WRITE_TIMEOUT
ends the connection.

A connection is tied to the process that made it, not to its PID: a pidfd of that
process is taken at accept (SO_PEERPIDFD, Linux >= 6.5), and `Peer.confirm` checks,
before a request changes anything, that the process read in /proc is still that one and
belongs to the connection's uid (a PID is reused once its process is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corecapd.protocol import (
    MAX_LINE,
    ROOT_ONLY,
    CommandFailed,
    ProtocolError,
    Request,
    decode_request,
    encode_error,
    encode_result,
    root_socket,
)

REQUEST_TIMEOUT = 10.0  # seconds for one whole request line, from when the daemon waits for it
WRITE_TIMEOUT = 5.0  # seconds for a client to take a reply (corecapctl reads at once)
# Connections the kernel queues before we accept them; when it is full, a connect() waits
# (client.call) or fails at once (EAGAIN, a non-blocking one). Capped by net.core.somaxconn.
BACKLOG = 1024
# Connections a second the public socket accepts at most (root's has no bound): a user who
# connects in a loop must not take the daemon's time from the exec path. corecapctl and the
# job library make one connection per call.
ACCEPT_RATE = 500.0
MAX_CLIENTS = 64  # connections at once, all users together
ROOT_RESERVE = 16  # of MAX_CLIENTS, the ones only uid 0 may take: root's corecapctl gets in
MAX_CLIENTS_PER_USER = 8  # connections one non-root uid may hold at once
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # asm-generic/socket.h; Python 3.11 lacks it


@dataclass(frozen=True)
class Peer:
    """The process at the other end, as the kernel saw it at connect time.

    `pid`, `uid` (effective), `gid`: SO_PEERCRED. `pidfd`: a pidfd of that very process
    (SO_PEERPIDFD), held while the connection lasts; None where the kernel has none.
    `connected_ticks`: CLOCK_BOOTTIME at accept in clock ticks, the unit of the start time
    in /proc/PID/stat: the caller started before it (the check where there is no pidfd).
    """

    pid: int
    uid: int
    gid: int
    pidfd: int | None = None
    connected_ticks: int | None = None

    def confirm(self, start_ticks: int, uid: int, doing: str) -> None:
        """Check that the process now at `self.pid`, as just read from /proc (its start
        time in clock ticks since boot, its effective uid), is the one that connected and
        the connection's user: call it after reading /proc and before acting on it.

        Raises:
            CommandFailed: the connecting process is gone (its PID may name another
                process by now), or the process's uid is not the connection's.
        """
        if not self._same_process(start_ticks):
            raise CommandFailed(
                f"the process that connected (PID {self.pid}) has exited;"
                f" PID {self.pid} is not the caller any more: nothing {doing}"
            )
        if uid != self.uid:
            raise CommandFailed(
                f"PID {self.pid} runs as uid {uid}, the connection is uid {self.uid}:"
                f" nothing {doing}"
            )

    def _same_process(self, start_ticks: int) -> bool:
        if self.pidfd is None:
            # No pidfd: a process that started after the connection was accepted is not
            # the one that made it (same-tick reuse, within 1/CLK_TCK s, goes unseen).
            return self.connected_ticks is not None and start_ticks <= self.connected_ticks
        try:
            signal.pidfd_send_signal(self.pidfd, 0)  # only while that very process exists
        except ProcessLookupError:
            return False
        return _pidfd_pid(self.pidfd) == self.pid


def _pidfd_pid(pidfd: int) -> int | None:
    """The PID a pidfd names now (the "Pid:" line of its fdinfo; -1 once it is reaped)."""
    with open(f"/proc/self/fdinfo/{pidfd}", "rb") as info:
        for line in info:
            if line.startswith(b"Pid:"):
                pid = int(line.split()[1])
                return pid if pid > 0 else None
    return None


def peer_credentials(sock: socket.socket) -> Peer:
    """SO_PEERCRED of a connected socket (no pidfd: `take_pidfd` adds it)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid)


def take_pidfd(sock: socket.socket, peer: Peer) -> Peer:
    """`peer` with a pidfd of the connecting process, or with the moment of the
    connection where the kernel gives no pidfd. The caller closes the pidfd.

    A connecting process that has exited already gets a pidfd that names no process
    (kernels that cannot make one answer ESRCH or EINVAL): `confirm` refuses it.
    """
    ticks = int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as err:
        if err.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):  # before Linux 6.5
            return Peer(peer.pid, peer.uid, peer.gid, None, ticks)
        return Peer(peer.pid, peer.uid, peer.gid, None, None)  # gone: confirm() refuses
    return Peer(peer.pid, peer.uid, peer.gid, pidfd, ticks)


Handler = Callable[[Request, Peer], Any]


class SocketInUse(OSError):
    """The socket path belongs to a live daemon; taking it over would orphan that one."""


class SocketPathTaken(OSError):
    """Something other than a socket is at the socket path; corecapd removes only sockets."""


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _listen(path: Path, mode: int) -> socket.socket:
    """A non-blocking listening socket at `path` with file mode `mode`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # no moment in which others may connect to the root socket
    try:
        listener.bind(str(path))
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(umask)
    os.chmod(path, mode)
    listener.listen(BACKLOG)
    listener.setblocking(False)
    return listener


def _take(path: Path) -> None:
    """Make `path` free for a socket: remove a stale socket, refuse anything else."""
    found = _what_is_at(path)
    if found not in (None, "socket"):
        raise SocketPathTaken(
            f"daemon.socket: {str(path)!r}: {found} is there, not a socket;"
            " corecapd replaces only a stale socket: move it away or choose another path"
        )
    if found == "socket":
        if _answers(path):
            raise SocketInUse(f"{path}: another corecapd is already listening there")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _what_is_at(path: Path) -> str | None:
    """None when nothing is at `path`, "socket" for a socket, else what is there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


class SocketServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._listeners: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self._clients: Counter[int] = Counter()  # open connections by uid
        self._tasks: set[asyncio.Task[None]] = set()  # one per open connection

    async def start(self) -> None:
        """Listen at the path (mode 0666, everyone) and at its root-only twin
        (`protocol.root_socket`, mode 0600); a stale socket at either (a daemon that did not
        stop cleanly) is replaced, anything else is left alone.

        Raises:
            SocketInUse: a live daemon answers at the path.
            SocketPathTaken: a file, directory, link or device is at the path.
        """
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        for path in (self.path, root_socket(self.path)):
            _take(path)
        public = _listen(self.path, 0o666)
        # Only root can connect to it (file permissions), so no other user can fill its
        # listen queue or spend its accept budget.
        private = _listen(root_socket(self.path), 0o600)
        self._listeners = [public, private]
        self._acceptors = [
            asyncio.create_task(self._accept(public, ACCEPT_RATE)),
            asyncio.create_task(self._accept(private, None)),
        ]

    async def _accept(self, listener: socket.socket, rate: float | None) -> None:
        """Accept and serve connections, at most `rate` a second (a token bucket; None: no
        bound). Past the bound, connections wait in the kernel's queue, and once it is full
        connect() fails for the newcomers: backpressure on whoever connects in a loop,
        while the exec path, scans and root's socket keep the daemon's time."""
        loop = asyncio.get_running_loop()
        tokens, last = rate or 0.0, loop.time()
        while True:
            if rate is not None:
                now = loop.time()
                tokens, last = min(rate, tokens + (now - last) * rate), now
                if tokens < 1:
                    await asyncio.sleep((1 - tokens) / rate)
                    continue
                tokens -= 1
            try:
                connection, _ = await loop.sock_accept(listener)
            except OSError:  # e.g. EMFILE: out of descriptors for now; those held will end
                await asyncio.sleep(0.1)
                continue
            reader, writer = await asyncio.open_unix_connection(sock=connection, limit=MAX_LINE + 1)
            self._tasks.add(asyncio.create_task(self._serve(reader, writer)))

    async def stop(self) -> None:
        for acceptor in self._acceptors:
            acceptor.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for listener in self._listeners:
            listener.close()
        for task in self._tasks:  # connections still open end now, their pidfds closed
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listeners:
            for path in (self.path, root_socket(self.path)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _refusal(self, uid: int) -> str | None:
        """Why a new connection of `uid` is refused now, or None to serve it."""
        total = sum(self._clients.values())
        if total >= MAX_CLIENTS:
            return f"corecapd is busy: {total} connections open, the most it serves; try again"
        if uid == 0:
            return None
        if total >= MAX_CLIENTS - ROOT_RESERVE:
            return f"corecapd is busy: {total} connections open, the rest are root's; try again"
        if self._clients[uid] >= MAX_CLIENTS_PER_USER:
            return (
                f"corecapd is busy: uid {uid} has {self._clients[uid]} connections open,"
                f" the most one user may; close some and try again"
            )
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, as a task in `_tasks` (`_accept` put it there)."""
        try:
            await self._converse(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()  # the daemon stops: drop the connection at once
        finally:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.discard(task)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            peer = peer_credentials(sock)
        except OSError:  # the client is gone already
            writer.transport.abort()
            return
        refusal = self._refusal(peer.uid)
        if refusal is not None:
            writer.write(encode_error(refusal))  # a fresh socket's buffer takes it whole
            await _close(writer)
            return
        self._clients[peer.uid] += 1
        peer = take_pidfd(sock, peer)
        try:
            while True:
                reply, keep_open = await self._answer(reader, peer)
                if reply is None:
                    return
                writer.write(reply)
                try:
                    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                except asyncio.TimeoutError:
                    writer.transport.abort()  # it does not read: drop what it did not take
                    return
                if not keep_open:
                    return
        except (ConnectionError, asyncio.TimeoutError):  # gone, or no whole request in time
            pass
        finally:
            if peer.pidfd is not None:
                os.close(peer.pidfd)
            self._clients[peer.uid] -= 1
            if not self._clients[peer.uid]:
                del self._clients[peer.uid]
            await _close(writer)

    async def _answer(self, reader: asyncio.StreamReader, peer: Peer) -> tuple[bytes | None, bool]:
        """The reply to the next request, and whether the connection may go on."""
        try:
            # The whole line within the timeout, however it trickles in: not an idle timer.
            line = await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_TIMEOUT)
        except asyncio.IncompleteReadError as err:
            if not err.partial.strip():
                return None, False  # the client hung up between requests
            return encode_error("request must end with a newline"), False
        except asyncio.LimitOverrunError:
            return encode_error(f"request longer than {MAX_LINE} bytes"), False
        try:
            request = decode_request(line)
        except ProtocolError as err:
            return encode_error(str(err)), False
        if request.command in ROOT_ONLY and peer.uid != 0:
            return encode_error(f"{request.command} needs root (you are uid {peer.uid})"), True
        try:
            return encode_result(self.handler(request, peer)), True
        except CommandFailed as err:
            return encode_error(str(err)), True


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close, waiting at most WRITE_TIMEOUT for buffered output to go out."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT)
    except asyncio.TimeoutError:
        writer.transport.abort()
    except ConnectionError:
        pass
