"""The kernel's process events connector (netlink, cn_proc): exec and exit as they happen.

pyroute2 ships `ProcEventSocket` and the cn_proc message layouts, but measured here its
decoder adds ~1 ms per event and it cannot ask the kernel for EXEC and EXIT events only;
the exec fast path can afford neither, so this is a plain socket and one `struct` unpack per
event (docs/benchmarks.md). Kernels >= 6.6 take a filter in the listen message
(`struct proc_input`); older ones take the 4-byte operation and send every event kind.

Loss: when the receive buffer overflows the kernel drops events and the next recv fails
with ENOBUFS; `read` raises `EventsLost` and the caller rescans /proc. Per-CPU sequence
numbers also reveal gaps, but only without a filter: filtered-out events consume numbers.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
FILTER_SINCE = (6, 6)  # struct proc_input, with an event mask, in the listen message

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQii")  # what, cpu, timestamp_ns (CLOCK_MONOTONIC), pid, tgid
_HEADERS = _NLMSGHDR.size + _CN_MSG.size

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module does not export it
CAP_NET_ADMIN = 12
# The initial namespaces' inode numbers (PROC_USER_INIT_INO, PROC_PID_INIT_INO): fixed ABI.
INITIAL_NAMESPACES = {"user": "user:[4026531837]", "pid": "pid:[4026531836]"}
RECEIVE_BUFFER = 8 << 20  # ~10,000 events: seconds of an exec storm without loss


class EventsLost(Exception):
    """The kernel dropped events (receive buffer overflow, or a sequence gap)."""


@dataclass(frozen=True)
class ProcEvent:
    exec: bool  # else: exit
    pid: int  # the process (thread group) id
    timestamp_ns: int  # kernel CLOCK_MONOTONIC at the event


def _check_can_listen(proc: str = "/proc/self") -> None:
    """The kernel refuses a subscription silently (send() succeeds; its EPERM comes back as
    an ACK that the event filter then drops), so the conditions are checked up front."""
    with open(f"{proc}/status") as status:
        effective = next(line for line in status if line.startswith("CapEff:"))
    if not int(effective.split()[1], 16) >> CAP_NET_ADMIN & 1:
        raise PermissionError(errno.EPERM, "needs CAP_NET_ADMIN")
    for kind, initial in INITIAL_NAMESPACES.items():
        if os.readlink(f"{proc}/ns/{kind}") != initial:
            raise OSError(
                errno.EPERM, f"not in the host's {kind} namespace, where the kernel sends them"
            )


def kernel_filters_events(release: str | None = None) -> bool:
    numbers = (release or os.uname().release).split("-")[0].split(".")
    try:
        return (int(numbers[0]), int(numbers[1])) >= FILTER_SINCE
    except (IndexError, ValueError):
        return False


class ProcEventSocket:
    """A non-blocking subscription to exec and exit events; needs CAP_NET_ADMIN."""

    def __init__(self, receive_buffer: int = RECEIVE_BUFFER) -> None:
        _check_can_listen()
        self.filtered = kernel_filters_events()
        self._last_seq: dict[int, int] = {}
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:
            try:  # as root, beyond net.core.rmem_max
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self._sock.bind((0, CN_IDX_PROC))
            self._sock.send(self._listen_message())
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise

    def _listen_message(self) -> bytes:
        if self.filtered:
            operation = struct.pack("=II", PROC_CN_MCAST_LISTEN, PROC_EVENT_EXEC | PROC_EVENT_EXIT)
        else:
            operation = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        body = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(operation), 0)
        body += operation
        return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), NLMSG_DONE, 0, 0, 0) + body

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def read(self) -> list[ProcEvent] | None:
        """The exec and process-exit events of the next datagram (maybe none of them: other
        kinds, without a filter); None when no datagram is waiting."""
        try:
            data = self._sock.recv(4096)
        except BlockingIOError:
            return None
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                raise EventsLost("the kernel's event queue overflowed") from None
            raise
        return parse_messages(data, None if self.filtered else self._last_seq)


def parse_messages(data: bytes, sequences: dict[int, int] | None) -> list[ProcEvent]:
    """The exec and process-exit events in one datagram. With `sequences` (last sequence
    number per CPU, updated here) a gap raises EventsLost; pass None under a filter."""
    events = []
    offset = 0
    while offset + _HEADERS + _EVENT.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, offset)[0]
        seq = _CN_MSG.unpack_from(data, offset + _NLMSGHDR.size)[2]
        what, cpu, timestamp, pid, tgid = _EVENT.unpack_from(data, offset + _HEADERS)
        if sequences is not None:
            last = sequences.get(cpu)
            sequences[cpu] = seq
            if last is not None and seq != (last + 1) & 0xFFFFFFFF:
                raise EventsLost(f"event sequence on CPU {cpu} jumped from {last} to {seq}")
        if what == PROC_EVENT_EXEC or (what == PROC_EVENT_EXIT and pid == tgid):
            events.append(ProcEvent(what == PROC_EVENT_EXEC, tgid, timestamp))
        offset += max(length, _HEADERS + _EVENT.size)
    return events


def encode_event(what: int, cpu: int, seq: int, timestamp_ns: int, pid: int, tgid: int) -> bytes:
    """One netlink datagram as the kernel sends it (for tests and benchmarks)."""
    # The kernel sends the whole union: 24 bytes after what, cpu and timestamp (76 in all).
    event = _EVENT.pack(what, cpu, timestamp_ns, pid, tgid) + bytes(16)
    body = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, 0, len(event), 0) + event
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), NLMSG_DONE, 0, 0, 0) + body
