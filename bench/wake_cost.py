"""What one wake-up costs Python: the floor under corecapd's per-event CPU.

A child process sends N small datagrams, one every 0.7 ms (as exec, fork and exit events
come); this process receives each one after sleeping for it, three ways: a blocking recv,
a bare `select.epoll` loop, and an asyncio reader (as corecapd's loop). Printed: this
thread's CPU per datagram (time.thread_time), median over repeats. The difference between
the asyncio row and the blocking one is what the event loop adds to every event.

    .venv/bin/python bench/wake_cost.py [--messages 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import statistics
import time
from collections.abc import Callable

INTERVAL = 0.0007  # seconds between datagrams: the reader sleeps before each one


def blocking(sock: socket.socket, messages: int) -> None:
    sock.setblocking(True)
    for _ in range(messages):
        sock.recv(4096)


def epoll(sock: socket.socket, messages: int) -> None:
    sock.setblocking(False)
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    received = 0
    while received < messages:
        poller.poll()
        received += _drain(sock)
    poller.close()


def with_asyncio(sock: socket.socket, messages: int) -> None:
    sock.setblocking(False)
    loop = asyncio.new_event_loop()
    received = 0

    def on_readable() -> None:
        nonlocal received
        received += _drain(sock)
        if received >= messages:
            loop.stop()

    loop.add_reader(sock.fileno(), on_readable)
    loop.run_forever()
    loop.close()


def _drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(4096)
        except BlockingIOError:
            return count
        count += 1


def measure(reader: Callable[[socket.socket, int], None], messages: int) -> float:
    """This thread's CPU per datagram, in microseconds."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender = os.fork()
    if sender == 0:
        ours.close()
        for _ in range(messages):
            theirs.send(b"x" * 64)
            time.sleep(INTERVAL)
        os._exit(0)
    theirs.close()
    began = time.thread_time_ns()
    reader(ours, messages)
    used = time.thread_time_ns() - began
    os.waitpid(sender, 0)
    ours.close()
    return used / messages / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU per wake-up, us (median of {args.repeats} x {args.messages} datagrams)")
    for name, reader in (("blocking recv", blocking), ("epoll", epoll), ("asyncio", with_asyncio)):
        runs = [measure(reader, args.messages) for _ in range(args.repeats)]
        print(f"  {name:<14} {statistics.median(runs):6.1f}  ({min(runs):.1f}-{max(runs):.1f})")


if __name__ == "__main__":
    main()
