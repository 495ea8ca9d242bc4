"""The Unix socket: who is asking (SO_PEERCRED), one request per line, bounded and timed out.

Any local user may connect (the socket is mode 0666) and read; commands in
`protocol.ROOT_ONLY` need the peer to be root. A misbehaving client gets an error reply
and is disconnected; it never reaches the daemon's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
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
)

IDLE_TIMEOUT = 10.0
MAX_CLIENTS = 64


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid)


Handler = Callable[[Request, Peer], Any]


class SocketInUse(OSError):
    """The socket path belongs to a live daemon; taking it over would orphan that one."""


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class SocketServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if _answers(self.path):
            raise SocketInUse(f"{self.path}: another corecapd is already listening there")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a daemon that did not stop cleanly
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_LINE + 1
        )
        os.chmod(self.path, 0o666)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients > MAX_CLIENTS:
                writer.write(encode_error("too many clients, try again"))
                return
            peer = peer_credentials(writer.get_extra_info("socket"))
            while True:
                reply, keep_open = await self._answer(reader, peer)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
                if not keep_open:
                    return
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            self._clients -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, peer: Peer) -> tuple[bytes | None, bool]:
        """The reply to the next request, and whether the connection may go on."""
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_TIMEOUT)
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
