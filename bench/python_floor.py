"""The least a Python enforcer does per matched exec: a baseline for corecapd's CPU per
child, run by bench/exec_latency.py as the enforcer `pyfloor`.

What corecapd's exec path must do too, and nothing else: an asyncio loop under SCHED_FIFO
(as corecapd-rt), corecapd's own netlink sockets and decoder (execs on one, exits on
another, forks on a third that wakes no one), and per matched exec: the exe link (the
match), the status file (who runs it), the leader's mask, the stat file (its start time: a
PID alone is not a process) and a log line; the cgroup move on a thread of its own, handed
over once the callback returns (the move waits out an RCU grace period, ms, that the loop
must not wait for); a log line at the job's end. No policy, no allocation, no budget, no
journal fields, no per-job cpuset, no ancestry. A floor for matched execs only: it reads
every fork and exit before each exec, where corecapd leaves them for an exec no rule names.

    python bench/python_floor.py EXE_NAME CPU CPUSET_DIR
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import sys
import threading
import time

from corecapd.proc_events import EXEC, EXIT, ProcEventSocket
from corecapd.procfs import read_bytes


def main() -> None:
    name, cpus, cpuset = sys.argv[1], {int(sys.argv[2])}, sys.argv[3]
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    events = ProcEventSocket()
    moves: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
    batch: list[int] = []
    jobs: dict[int, bytes] = {}

    def mover() -> None:
        while True:
            for pid in moves.get():
                try:
                    fd = os.open(f"{cpuset}/cgroup.procs", os.O_WRONLY)
                    try:
                        os.write(fd, b"%d" % pid)
                    finally:
                        os.close(fd)
                except OSError:
                    pass  # gone

    def hand_over() -> None:
        moves.put(batch[:])
        batch.clear()

    def log(text: str) -> None:
        sys.stdout.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pyfloor: {text}\n")
        sys.stdout.flush()

    def on_events() -> None:
        while (got := events.read()) is not None:
            for event in got:
                if event.kind is EXIT:
                    if jobs.pop(event.pid, None) is not None:
                        log(f"job ended: PID {event.pid}")
                    continue
                if event.kind is not EXEC:
                    continue
                pid = event.pid
                try:
                    if os.path.basename(os.readlink(f"/proc/{pid}/exe")) != name:
                        continue
                    read_bytes(f"/proc/{pid}/status")
                    os.sched_setaffinity(pid, cpus)
                    jobs[pid] = read_bytes(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()[19]
                except OSError:
                    continue  # gone
                if not batch:
                    loop.call_soon(hand_over)
                batch.append(pid)
                log(f"job started: PID {pid} confined to CPU {next(iter(cpus))}")

    threading.Thread(target=mover, daemon=True).start()
    loop = asyncio.new_event_loop()
    loop.add_reader(events.fileno(), on_events)
    loop.add_reader(events.deferred_fileno(), on_events)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.run_forever()


if __name__ == "__main__":
    main()
