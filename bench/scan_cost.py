"""CPU time corecapd spends per scan of this machine's processes.

Runs the daemon's real scan path (Scanner -> JobTable.step -> affinity reconcile) in this
process and measures process CPU time per scan, median over repeats. In the same run, a
baseline: the same per-process facts read through psutil (oneshot), which is what the
hand-written /proc/PID/stat reader in corecapd/procfs.py is measured against.

    .venv/bin/python bench/scan_cost.py [--scans 200] [--repeats 7] [--jobs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import psutil

from corecapd.core import JobTable
from corecapd.enforcement import AffinityBackend, Host
from corecapd.policy import parse_policy
from corecapd.procfs import ProcFS, Scanner, online_cpus


def per_scan_cpu(scan: Callable[[], object], scans: int, repeats: int) -> float:
    """Median over `repeats` of the CPU seconds one scan costs (averaged over `scans`)."""
    results = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(scans):
            scan()
        results.append((time.process_time() - start) / scans)
    return statistics.median(results)


def psutil_scan() -> int:
    count = 0
    for proc in psutil.process_iter():
        try:
            with proc.oneshot():
                proc.create_time()
                proc.ppid()
                proc.num_threads()
                proc.cpu_times()
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=20, help="marked jobs of 10 threads each")
    args = parser.parse_args()

    marker = f"CORECAP_BENCH_{uuid.uuid4().hex[:8]}"
    policy = parse_policy(
        f"""
        [daemon]
        reserved_cpus = ""
        [[rules]]
        name = "bench"
        match = {{ cmdline = "{marker}", users = ["root"] }}
        cpus = 1
        """
    )
    procfs = ProcFS()
    online = online_cpus()
    scanner = Scanner(procfs)
    table = JobTable(policy, online, os.getpid(), enforcing=True)
    backend = AffinityBackend(Host(procfs, online))

    def corecapd_scan() -> None:
        table.step(scanner.scan(table.libraries_wanted), time.time())
        for job in table.jobs.values():
            backend.confine(job.name, [key.pid for key in job.members], job.cpus)

    jobs: list[subprocess.Popen[bytes]] = []
    try:
        rows = []
        for phase, count in (("idle host", 0), (f"{args.jobs} jobs x 11 threads", args.jobs)):
            while len(jobs) < count:
                jobs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            "import threading, sys\n"
                            "[threading.Thread(target=sys.stdin.read, daemon=True).start()"
                            " for _ in range(10)]\nsys.stdin.read()",
                            marker,
                        ],
                        stdin=subprocess.PIPE,
                    )
                )
            time.sleep(1.0 if count else 0)
            corecapd_scan()  # first sight: identities read, jobs placed
            assert len(table.jobs) == count, (len(table.jobs), count)
            processes = len(scanner.scan(frozenset()))
            ours = per_scan_cpu(corecapd_scan, args.scans, args.repeats)
            baseline = per_scan_cpu(psutil_scan, args.scans, args.repeats)
            rows.append((phase, processes, ours, baseline))
    finally:
        for job in jobs:
            job.kill()
            job.wait()

    print(f"scan cost, median of {args.repeats} x {args.scans} scans, CPU time per scan")
    print(f"{'phase':24} {'procs':>5} {'corecapd':>10} {'psutil':>10} {'ratio':>6}")
    for phase, processes, ours, baseline in rows:
        print(
            f"{phase:24} {processes:5d} {ours * 1e3:8.2f}ms {baseline * 1e3:8.2f}ms"
            f" {ours / baseline:6.2f}"
        )
    print("(corecapd: full scan + core step + affinity reconcile of every job thread;")
    print(" psutil: only reading the same per-process facts)")


if __name__ == "__main__":
    main()
