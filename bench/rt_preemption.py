"""A SCHED_FIFO corecapd kept busy is preempted by the kernel for the tasks it starves.

corecapd with `realtime_priority = 10` and a complete scan every SCAN s of N idle processes
(1,500 sleeps keep it 93-95% busy at the shortest `scan_interval`, 0.05 s), idle and beside
a load (4 busy shell loops and a `/bin/true` loop): its share of a CPU and the involuntary
context switches of its loop thread over a window. A real-time task is switched out
involuntarily only for something above it: RT throttling (`kernel.sched_rt_runtime_us`) or,
since Linux 6.12, the fair server that gives starved tasks their share. Baseline in the same
run: the same daemon scanning less often.

    .venv/bin/python bench/rt_preemption.py [--scans 0.05,0.15] [--crowd 1500] [--window 6]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from idle_cost import cpu_seconds, daemon, idle_processes

LOAD = ["while :; do :; done"] * 4 + ["while :; do /bin/true; done"]


def involuntary_switches(pid: int) -> int:
    """Of the process's main thread (the daemon's loop)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("nonvoluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise ValueError(f"no nonvoluntary_ctxt_switches in /proc/{pid}/status")


@contextlib.contextmanager
def load(on: bool) -> Iterator[None]:
    loops = [subprocess.Popen(["sh", "-c", loop]) for loop in LOAD] if on else []
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", default="0.05,0.15", help="scan intervals, s")
    parser.add_argument("--crowd", type=int, default=1500)
    parser.add_argument("--window", type=float, default=6.0)
    args = parser.parse_args()
    marker = f"CORECAP_BENCH_{uuid.uuid4().hex[:8]}"
    print(f"{args.crowd} idle processes, every scan complete, SCHED_FIFO; over {args.window} s")
    print(f"{'scan s':>7} {'load':>5} {'CPU %':>7} {'involuntary switches':>21}")
    with idle_processes(args.crowd):
        for interval in (float(part) for part in args.scans.split(",")):
            settings = (
                f"scan_interval = {interval}\nreconcile_interval = {interval}\n"
                "realtime_priority = 10"
            )
            for loaded in (False, True):
                with (
                    tempfile.TemporaryDirectory(prefix="corecap-bench-") as work,
                    daemon(Path(work), marker, True, settings) as process,
                    load(loaded),
                ):
                    time.sleep(2.0)  # the first scan, which classifies the crowd
                    cpu, switches = cpu_seconds(process.pid), involuntary_switches(process.pid)
                    time.sleep(args.window)
                    share = 100 * (cpu_seconds(process.pid) - cpu) / args.window
                    switched = involuntary_switches(process.pid) - switches
                print(f"{interval:>7} {'yes' if loaded else 'no':>5} {share:>7.1f} {switched:>21}")


if __name__ == "__main__":
    main()
