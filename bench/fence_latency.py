"""Exec -> fenced: how long after a matched process starts it sits in its cpuset.

Starts corecapd with the backend asked for (default: what `auto` picks here) and a rule
matching only this run's children, spawns N children one after another, and polls each
child's /proc/PID/cgroup every 0.2 ms until it is in its fence. The baseline in the same
run: the same children's spawn -> affinity confined (the fast path). Medians and p99 over
the children; run as root.

    .venv/bin/python bench/fence_latency.py [--children 50] [--backend auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from corecapd.client import DaemonUnreachable, call

POLL = 0.0002
TIMEOUT = 5.0


def fenced(pid: int, before: str) -> bool:
    return Path(f"/proc/{pid}/cgroup").read_text() != before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=50)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    marker = f"CORECAP_FENCE_{uuid.uuid4().hex[:8]}"
    cpus = sorted(os.sched_getaffinity(0))
    target = {cpus[-1]}
    with tempfile.TemporaryDirectory() as scratch:
        policy = Path(scratch) / "policy.toml"
        socket = Path(scratch) / "api.sock"
        policy.write_text(
            f'[daemon]\nmode = "enforce"\nbackend = "{args.backend}"\n'
            f'reserved_cpus = "{",".join(map(str, cpus[:-1]))}"\nsocket = "{socket}"\n'
            f'state_dir = "{scratch}/state"\ncgroup = "corecap-bench-{marker[-8:]}"\n'
            "realtime_priority = 10\n"
            f'[[rules]]\nname = "bench"\nmatch = {{ cmdline = "{marker}", users = ["root"] }}\n'
            "cpus = 1\n"
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "corecapd.daemon", "--config", str(policy)],
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                try:
                    backend = call(socket, "status")["host"]["backend"]
                    break
                except DaemonUnreachable:
                    time.sleep(0.05)
            masks, fences = measure(args.children, marker, target)
        finally:
            daemon.terminate()
            daemon.wait()
    print(f"exec -> confined, {args.children} children, backend {backend}")
    for name, values in (("affinity (fast path)", masks), ("fence (cgroup)", fences)):
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        print(
            f"  {name:22} p50 {statistics.median(ordered):7.2f} ms  p99 {p99:7.2f} ms"
            f"  max {ordered[-1]:7.2f} ms"
        )


def measure(count: int, marker: str, target: set[int]) -> tuple[list[float], list[float]]:
    masks, fences = [], []
    before = Path("/proc/self/cgroup").read_text()
    for _ in range(count):
        started = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, "-S", "-I", "-c", "import sys; sys.stdin.read()", marker],
            stdin=subprocess.PIPE,
        )
        mask_at = fence_at = None
        try:
            while (mask_at is None or fence_at is None) and time.monotonic() - started < TIMEOUT:
                now = time.monotonic()
                if mask_at is None and os.sched_getaffinity(child.pid) == target:
                    mask_at = now
                if fence_at is None and fenced(child.pid, before):
                    fence_at = now
                time.sleep(POLL)
        finally:
            child.kill()
            child.wait()
        if mask_at is None or fence_at is None:
            raise SystemExit(f"child {child.pid} not confined within {TIMEOUT} s")
        masks.append((mask_at - started) * 1000)
        fences.append((fence_at - started) * 1000)
        time.sleep(0.05)
    return masks, fences


if __name__ == "__main__":
    main()
