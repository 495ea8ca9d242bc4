"""The kernel's process events connector (netlink, cn_proc): exec, exit and fork as they
happen.

pyroute2 ships `ProcEventSocket` and the cn_proc message layouts, but measured here its
decoder adds ~1 ms per event and it cannot ask the kernel for EXEC and EXIT events only;
the exec fast path can afford neither, so this is a plain socket and one `struct` unpack per
event (docs/benchmarks.md). Kernels >= 6.6 take a filter in the listen message
(`struct proc_input`); older ones take the 4-byte operation and send every event kind.

Forks tell which processes a job's processes start without an exec (multiprocessing and
DataLoader workers), so that scans need not list /proc (1 us per process, measured: 10 ms
a scan on a host of 10,000). The kernel sends a fork and an exit for every thread too; a
classic BPF socket filter (`process_filter`) drops those in the kernel, so a job's thread
pools never wake the daemon. It is a dozen instructions of our own: no library builds cBPF
for a netlink socket, and eBPF would need one (and CAP_BPF) for no gain here.

Three subscriptions, so that the daemon wakes only for what cannot wait: execs on one socket
(the exec path wakes for each); exits on another, which the daemon may let wait in a run of
them (a shell loop of `/bin/true` woke it 2.1-2.5 times per exec on one socket, once with
the exits apart: docs/benchmarks.md); forks on a third that wakes no one. A fork matters
only when a job's process made it, and then only to whoever next looks at the job: a `read`
that takes exits takes the forks waiting too, and the daemon reads before each scan,
request and scrape. Most forks on a host are of nobody's job, and each woke the daemon for
nothing: the loop woke 3.8-4.3 times per short job, 2.2-2.4 times with forks apart
(docs/benchmarks.md). Events from the sockets are merged by the kernel's timestamps, up to
the moment of the poll that found them (`read`), so that each comes before what it preceded.

Loss: when the receive buffer overflows the kernel drops events and the next recv fails
with ENOBUFS; `read` raises `EventsLost` and the caller rescans /proc. (Per-CPU sequence
numbers cannot tell: the events the filter drops consume numbers too.)
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from operator import attrgetter
from typing import NamedTuple

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
FILTER_SINCE = (6, 6)  # struct proc_input, with an event mask, in the listen message

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQii")  # what, cpu, timestamp_ns (CLOCK_MONOTONIC), pid, tgid
_PAIR = struct.Struct("=ii")
_HEADERS = _NLMSGHDR.size + _CN_MSG.size

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module does not export it
CAP_NET_ADMIN = 12
# The initial namespaces' inode numbers (PROC_USER_INIT_INO, PROC_PID_INIT_INO,
# PROC_TIME_INIT_INO): fixed ABI; with why the events need each.
INITIAL_NAMESPACES = {
    "user": ("user:[4026531837]", "where the kernel sends them"),
    "pid": ("pid:[4026531836]", "where the kernel sends them"),
    "time": ("time:[4026531834]", "whose monotonic clock stamps them (`read` merges by it)"),
}
RECEIVE_BUFFER = 8 << 20  # ~10,000 events: seconds of an exec storm without loss
DEFERRED_PER_READ = 256  # fork (or exit) datagrams per `read` when no exec waits
DEFERRED_PER_EXEC = 4096  # ... read at most before an exec: a storm's wait for its exec


SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>
EXEC, EXIT, FORK = "exec", "exit", "fork"


class EventsLost(Exception):
    """The kernel dropped events (receive buffer overflow, or a sequence gap)."""


class ProcEvent(NamedTuple):
    """One event (a tuple: one is made for every exec, fork and exit on the host, and a
    frozen dataclass costs three times more to make)."""

    kind: str  # EXEC, EXIT (of a process, not of one of its threads) or FORK (a process)
    pid: int  # the process (thread group) id; for FORK, the new process
    timestamp_ns: int  # kernel CLOCK_MONOTONIC at the event
    parent: int = 0  # FORK: the process that forked it


_STAMP = attrgetter("timestamp_ns")


# Where the event's fields lie in a datagram (header, cn_msg, then struct proc_event).
_WHAT = _HEADERS
_FIRST_PID = _HEADERS + 16  # exec and exit: process_pid, process_tgid; fork: parent_*
_CHILD_PID = _HEADERS + 24  # fork: child_pid, child_tgid


def process_filter(kinds: int) -> list[tuple[int, int, int, int]]:
    """A classic BPF program (code, jt, jf, k per instruction) that lets through, of
    `kinds`, execs, exits of processes and forks of processes, and drops everything else (a
    thread's creation or end, other event kinds, the ack to our listen message). cBPF loads
    words big-endian; the connector's are host-order, so constants are compared
    byte-swapped (pid against tgid needs no swap)."""

    def swap(k: int) -> int:
        return int.from_bytes(k.to_bytes(4, sys.byteorder), "big")

    ld_abs, tax, jeq_k, jeq_x, ret = 0x20, 0x07, 0x15, 0x1D, 0x06
    keep, drop = 0xFFFF, 0  # bytes of the packet kept: all of it (76), or none
    # Jump targets by name, resolved below to cBPF's offsets (from the next instruction).
    code: list[tuple[int, int | str, int | str, int]] = [(ld_abs, 0, 0, _WHAT)]
    checks = {PROC_EVENT_EXIT: ("exit", _FIRST_PID), PROC_EVENT_FORK: ("fork", _CHILD_PID)}
    if kinds & PROC_EVENT_EXEC:
        code.append((jeq_k, "keep", 0, swap(PROC_EVENT_EXEC)))
    for kind, (label, _) in checks.items():
        if kinds & kind:  # -> the same-ids check of (process or child) pid and tgid
            code.append((jeq_k, label, 0, swap(kind)))
    code.append((ret, 0, 0, drop))
    labels: dict[str, int] = {}
    for kind, (label, pid_at) in checks.items():
        if kinds & kind:
            labels[label] = len(code)
            code += [(ld_abs, 0, 0, pid_at), (tax, 0, 0, 0), (ld_abs, 0, 0, pid_at + 4)]
            code.append((jeq_x, "keep", "drop", 0))
    labels["keep"], labels["drop"] = len(code), len(code) + 1
    code += [(ret, 0, 0, keep), (ret, 0, 0, drop)]

    def offset(target: int | str, at: int) -> int:
        return target if isinstance(target, int) else labels[target] - at - 1

    return [(op, offset(jt, at), offset(jf, at), k) for at, (op, jt, jf, k) in enumerate(code)]


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program out of `struct sock_fprog`, whose
    pointer ctypes provides (the socket module passes the option's bytes as they are)."""
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))  # native alignment
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _check_can_listen(proc: str = "/proc/self") -> None:
    """The kernel refuses a subscription silently (send() succeeds; its EPERM comes back as
    an ACK that the event filter then drops), so the conditions are checked up front."""
    with open(f"{proc}/status") as status:
        effective = next(line for line in status if line.startswith("CapEff:"))
    if not int(effective.split()[1], 16) >> CAP_NET_ADMIN & 1:
        raise PermissionError(errno.EPERM, "needs CAP_NET_ADMIN")
    for kind, (initial, why) in INITIAL_NAMESPACES.items():
        try:
            namespace = os.readlink(f"{proc}/ns/{kind}")
        except FileNotFoundError:  # no time namespaces before Linux 5.6: the host's clock
            continue
        if namespace != initial:
            raise OSError(errno.EPERM, f"not in the host's {kind} namespace, {why}")


def kernel_filters_events(release: str | None = None) -> bool:
    numbers = (release or os.uname().release).split("-")[0].split(".")
    try:
        return (int(numbers[0]), int(numbers[1])) >= FILTER_SINCE
    except (IndexError, ValueError):
        return False


class ProcEventSocket:
    """A non-blocking subscription to exec, exit and fork events of processes (not of
    threads: `process_filter`); needs CAP_NET_ADMIN.

    Three sockets: execs on one (`fileno`: the exec path wakes for each), exits on another
    (`deferred_fileno`: the caller may let them wait a moment and take them in a batch, or
    with the next exec), forks on a third that is never waited on: `read` takes them with
    the exits, and a caller that needs them (before a scan, or a request) calls `read`. A
    host's every fork and exit then stops costing a wake-up of its own (~20 us each in
    asyncio: bench/wake_cost.py). `read` merges the sockets in the order the kernel
    stamped the events."""

    def __init__(self, receive_buffer: int = RECEIVE_BUFFER) -> None:
        _check_can_listen()
        self.filtered = kernel_filters_events()  # the kernel sends only the kinds we ask
        # Forks and exits read but not given yet (newer than the exec or the poll that cut
        # the read; after EventsLost, its execs too).
        self._held: list[ProcEvent] = []
        sockets: list[socket.socket] = []
        try:
            for kind in (PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK):
                sockets.append(self._subscribe(kind, receive_buffer))
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        self._execs, self._exits, self._forks = sockets
        # The stamp of the newest event read from each of the others (by fd): the socket is
        # in order, so what it still holds came later.
        self._newest = {self._exits.fileno(): 0, self._forks.fileno(): 0}
        # Which socket holds a datagram, asked once per `read`: a recv on an empty socket
        # raises, and reading each until it raised cost more than the events' handling.
        self._ready = select.poll()
        for sock in sockets:
            self._ready.register(sock, select.POLLIN)

    def _subscribe(self, kinds: int, receive_buffer: int) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:
            try:  # as root, beyond net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.bind((0, CN_IDX_PROC))
            attach_filter(sock, process_filter(kinds))  # before any event is queued
            sock.send(self._listen_message(kinds))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _listen_message(self, kinds: int) -> bytes:
        if self.filtered:
            operation = struct.pack("=II", PROC_CN_MCAST_LISTEN, kinds)
        else:
            operation = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        body = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(operation), 0)
        body += operation
        return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), NLMSG_DONE, 0, 0, 0) + body

    def fileno(self) -> int:
        """The execs' socket: readable when an exec waits."""
        return self._execs.fileno()

    def deferred_fileno(self) -> int:
        """The exits' socket: readable when one waits (forks wait unseen: see the class)."""
        return self._exits.fileno()

    def close(self) -> None:
        for sock in (self._execs, self._exits, self._forks):
            sock.close()

    def read(
        self, wanted: Callable[[int], bool] = lambda pid: True, others: bool = True
    ) -> list[ProcEvent] | None:
        """The next exec datagram's events with the forks and exits that came before them,
        in the order they happened; when no exec waits, the forks and exits that do (at
        most DEFERRED_PER_READ datagrams of each, cut where the first bound stopped). None
        when nothing waits.

        `wanted(pid)` says whether an exec matters; one that does not is dropped and the
        forks and exits before it stay where they are, for a later read (nothing needs
        their order then: on a host, most execs are of no job's program, and reading the
        rest for each cost a third of its handling). `others=False`: with no exec wanted,
        leave the forks and exits too (unless an earlier read held some, newer than its
        exec: they go now, with what came before them), and say None when no exec waits.

        Raises:
            EventsLost: a socket's queue overflowed (what was read is kept for later).
        """
        # The kernel stamps events with CLOCK_MONOTONIC (ktime_get_ns) before it queues
        # them: what was stamped before this moment and is on no socket polled ready was
        # queued after the poll, and may be older than what a ready socket gives below.
        polled = time.monotonic_ns()
        ready = dict(self._ready.poll(0))  # fd -> POLLIN, or POLLERR after an overflow
        data = _receive(self._execs) if self._execs.fileno() in ready else None
        execs = [] if data is None else [e for e in parse_messages(data) if wanted(e.pid)]
        cut = max((event.timestamp_ns for event in execs), default=None)
        if cut is None and not others and not self._held:
            return None if data is None else []
        bound = DEFERRED_PER_READ if cut is None else DEFERRED_PER_EXEC
        left: list[int] = []  # the stamps where sockets stopped with more to read
        try:
            for sock in (self._exits, self._forks):
                if sock.fileno() in ready and not self._drain(sock, cut, bound):
                    left.append(self._newest[sock.fileno()])
        except EventsLost:
            self._held = sorted(self._held + execs, key=_STAMP)
            raise
        # How far the forks and exits go now: no further than a socket that stopped at its
        # bound, nor (with no exec) than the poll: a fork then its parent's exit, both
        # after the poll, would otherwise come as the exit alone (its socket polled ready
        # for an earlier one), the fork on a later read. An exec goes all the same.
        stop = min([*left, polled if cut is None else cut])
        events = [event for event in self._held if event.timestamp_ns <= stop] + execs
        self._held = [event for event in self._held if event.timestamp_ns > stop]
        events.sort(key=_STAMP)
        if not events and data is None and not self._held:
            return None
        return events  # [] while some are held: the next read (a later poll) has them

    def _drain(self, sock: socket.socket, cut: int | None, bound: int) -> bool:
        """Hold `sock`'s events waiting, up to the first after `cut` (the rest came later
        too; held, never more than a datagram's beyond it), or `bound` datagrams (in a
        storm: the rest follow, a moment late). Whether it stopped before the bound."""
        fd = sock.fileno()
        for _ in range(bound):
            if cut is not None and self._newest[fd] > cut:
                return True
            data = _receive(sock)
            if data is None:
                return True
            if events := parse_messages(data):
                self._newest[fd] = events[-1].timestamp_ns
                self._held += events
        return False


def _receive(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(4096)
    except BlockingIOError:
        return None
    except OSError as err:
        if err.errno == errno.ENOBUFS:
            raise EventsLost("the kernel's event queue overflowed") from None
        raise


def parse_messages(data: bytes) -> list[ProcEvent]:
    """The exec, process-exit and process-fork events in one datagram."""
    events = []
    offset = 0
    while offset + _HEADERS + _EVENT.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, offset)[0]
        what, _, timestamp, pid, tgid = _EVENT.unpack_from(data, offset + _HEADERS)
        if what == PROC_EVENT_EXEC:
            events.append(ProcEvent(EXEC, tgid, timestamp))
        elif what == PROC_EVENT_EXIT and pid == tgid:
            events.append(ProcEvent(EXIT, tgid, timestamp))
        elif what == PROC_EVENT_FORK and offset + _CHILD_PID + 8 <= len(data):
            child, child_tgid = _PAIR.unpack_from(data, offset + _CHILD_PID)
            if child == child_tgid:
                events.append(ProcEvent(FORK, child, timestamp, parent=tgid))
        offset += max(length, _HEADERS + _EVENT.size)
    return events


def encode_event(
    what: int,
    cpu: int,
    seq: int,
    timestamp_ns: int,
    pid: int,
    tgid: int,
    child: tuple[int, int] = (0, 0),
) -> bytes:
    """One netlink datagram as the kernel sends it (for tests and benchmarks); for a fork,
    `pid` and `tgid` are the parent's and `child` the new task's pid and tgid (equal for a
    process, the parent's tgid for a thread)."""
    # The kernel sends the whole union: 24 bytes after what, cpu and timestamp (76 in all).
    event = _EVENT.pack(what, cpu, timestamp_ns, pid, tgid) + _PAIR.pack(*child) + bytes(8)
    body = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, 0, len(event), 0) + event
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), NLMSG_DONE, 0, 0, 0) + body
