"""How long the exec path can wait behind a complete scan's step in the core.

A complete scan (at start, every `reconcile_interval`, after lost events) reads /proc in
pieces and handles exec events between them (`Scanner.scanning`), but the core then takes
the whole view in one `JobTable.handle(Scan(...))`: an exec that arrives meanwhile waits
for it. This measures that step with N idle processes beside it (sleeps, in no job), the
first (every process new: classified) and later ones (median), in wall-clock ms, against
the scan's read of the same processes in the same run (the part that does yield).

    .venv/bin/python bench/core_step.py [--sizes 1000,2000,5000,10000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from idle_cost import idle_processes

from corecapd.core import JobTable
from corecapd.effects import Scan
from corecapd.policy import parse_policy
from corecapd.procfs import ProcFS, Scanner, online_cpus

POLICY = """
[daemon]
reserved_cpus = ""
[[rules]]
name = "bench"
match = { exe = ["corecap-bench-nothing"], users = ["root"] }
cpus = 1
"""


def measure(size: int, repeats: int) -> tuple[int, float, float, float]:
    """(processes seen, read ms, first step ms, later steps ms: medians over `repeats`)."""
    with idle_processes(size):
        scanner = Scanner(ProcFS())
        table = JobTable(parse_policy(POLICY), online_cpus(), os.getpid(), enforcing=True)
        processes = scanner.scan(frozenset())
        started = time.perf_counter()
        table.handle(Scan(processes, True), time.time())
        first = (time.perf_counter() - started) * 1e3
        reads, steps = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            processes = scanner.scan(frozenset())
            read = time.perf_counter()
            table.handle(Scan(processes, True), time.time())
            reads.append((read - started) * 1e3)
            steps.append((time.perf_counter() - read) * 1e3)
        return len(processes), statistics.median(reads), first, statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,5000,10000")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print("complete scan: the core's step (one piece) and the read (in pieces), wall ms,")
    print(f"median of {args.repeats}")
    print(f"{'idle':>6} {'seen':>6} {'read':>8} {'step, first':>12} {'step':>8} {'step/read':>10}")
    for size in (int(part) for part in args.sizes.split(",")):
        seen, read, first, step = measure(size, args.repeats)
        print(f"{size:>6} {seen:>6} {read:>8.2f} {first:>12.2f} {step:>8.2f} {step / read:>10.2f}")


if __name__ == "__main__":
    main()
