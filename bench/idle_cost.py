"""What corecapd costs at rest on a host with many processes: the real daemon's CPU and RSS.

For each host size (idle `sleep` processes started beside whatever runs here), the real
corecapd runs with a policy that matches only this benchmark's marked jobs, once with
exec events (the default: scans read only the jobs' processes; `reconcile_interval` reads
all of /proc) and once without (the baseline in the same run: every scan reads all of
/proc, as corecapd did before). Its CPU time is read from /proc/PID/stat over windows
without a complete scan in them (median over repeats), and a complete scan's cost
(the events-off daemon's per scan) is added once per reconcile_interval for the average.
The windows start once the jobs are settled: placed, past their grace (`defaults.grace`),
and through the one check of their layers that a job within budget gets when its thread
count first exceeds its cores (a stack attribution, ~5 ms each; issue 16). The CPU of that
settling is printed apart: it is paid once per job, not at rest.

    .venv/bin/python bench/idle_cost.py [--counts 100,1000,2000,10000] [--window 10]
        [--repeats 3] [--jobs 1] [--big-job 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from corecapd.client import call
from corecapd.policy import DaemonSettings, Defaults

TICKS = os.sysconf("SC_CLK_TCK")
RECONCILE = DaemonSettings().reconcile_interval  # the default, s
SPAWN = """
import os, signal, sys
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "1d"])
print("ready", flush=True)
signal.pause()
"""
JOB = """
import sys, threading
[threading.Thread(target=sys.stdin.read, daemon=True).start() for _ in range(int(sys.argv[2]))]
sys.stdin.read()
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def idle_processes(count: int) -> Iterator[None]:
    """`count` sleeps, children of a spawner in a process group of their own: all end
    with the group."""
    spawner = subprocess.Popen(
        [sys.executable, "-c", SPAWN, str(count)], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert spawner.stdout is not None and spawner.stdout.readline() == b"ready\n"
        yield
    finally:
        os.killpg(spawner.pid, signal.SIGKILL)
        spawner.wait()
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


@contextlib.contextmanager
def daemon(
    workdir: Path, marker: str, events: bool, settings: str = ""
) -> Iterator[subprocess.Popen[bytes]]:
    """corecapd with `settings` (TOML lines) added to its [daemon] table."""
    state = workdir / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    socket = workdir / "corecap.sock"
    policy = workdir / "policy.toml"
    policy.write_text(
        f"""
[daemon]
mode = "enforce"
backend = "affinity"
reserved_cpus = ""
exec_events = {str(events).lower()}
socket = "{socket}"
state_dir = "{state}"
{settings}
[[rules]]
name = "bench"
match = {{ cmdline = "{marker}", users = ["root"] }}
cpus = 1
"""
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "corecapd.daemon", "--config", str(policy)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert process.poll() is None and time.monotonic() < deadline, "corecapd did not start"
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait()


# The first, complete scan, the jobs placed, their grace (`defaults.grace`, 10 s) and the
# scan after it, which checks each job's layers once: then the daemon is at rest.
SETTLE = Defaults().grace + 4.0


def scans(socket: Path) -> dict[str, int]:
    found: dict[str, int] = call(socket, "status")["host"]["scans"]
    return found


def measure(
    process: subprocess.Popen[bytes], socket: Path, window: float, repeats: int
) -> tuple[float, float, float]:
    """Median CPU share (% of a core) over `repeats` windows with no complete scan in them
    (their count is checked before and after), CPU per scan (s), and RSS (MB)."""
    shares: list[float] = []
    per_scan: list[float] = []
    while len(shares) < repeats:
        before = scans(socket)
        used = cpu_seconds(process.pid)  # after the status call: the window holds none
        time.sleep(window)
        spent = cpu_seconds(process.pid) - used
        after = scans(socket)
        scanned = sum(after.values()) - sum(before.values())
        if after["complete"] != before["complete"] and after["partial"] != before["partial"]:
            continue  # a reconciliation fell in it: measured on its own (events off)
        shares.append(100 * spent / window)
        per_scan.append(spent / max(scanned, 1))
    return statistics.median(shares), statistics.median(per_scan), rss_mb(process.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,1000,2000,10000")
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="marked jobs of 4 threads each")
    parser.add_argument("--big-job", type=int, default=0, help="one more job of N threads")
    args = parser.parse_args()
    marker = f"CORECAP_BENCH_{uuid.uuid4().hex[:8]}"
    rows = []
    settling: list[tuple[int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs: list[subprocess.Popen[bytes]] = []
        try:
            for count in (int(c) for c in args.counts.split(",")):
                with idle_processes(count):
                    host = sum(1 for name in os.listdir("/proc") if name.isdigit())
                    results = {}
                    settled: dict[bool, float] = {}
                    for events in (True, False):
                        workdir = Path(tmp) / f"{count}-{events}"
                        workdir.mkdir()
                        with daemon(workdir, marker, events) as process:
                            while len(jobs) < args.jobs + (1 if args.big_job else 0):
                                threads = args.big_job if len(jobs) == args.jobs else 3
                                jobs.append(
                                    subprocess.Popen(
                                        [sys.executable, "-c", JOB, marker, str(threads)],
                                        stdin=subprocess.PIPE,
                                    )
                                )
                            began = cpu_seconds(process.pid)
                            time.sleep(SETTLE)
                            settled[events] = cpu_seconds(process.pid) - began
                            socket = workdir / "corecap.sock"
                            results[events] = measure(process, socket, args.window, args.repeats)
                    on, off = results[True], results[False]
                    average = on[0] + 100 * off[1] / RECONCILE  # one complete scan per interval
                    rows.append((host, on, off, average))
                    settling.append((host, settled[True], settled[False]))
        finally:
            for job in jobs:
                job.kill()
                job.wait()
    print(
        f"corecapd at rest: {args.jobs} marked jobs"
        + (f" + one of {args.big_job} threads" if args.big_job else "")
        + f", scan_interval 1 s; median of {args.repeats} x {args.window:g} s"
    )
    print(
        f"{'procs':>6} {'events: CPU':>12} {'+reconcile':>11} {'per scan':>9} {'RSS':>7}"
        f" {'no events: CPU':>15} {'per scan':>9} {'RSS':>7} {'ratio':>6}"
    )
    for host, on, off, average in rows:
        print(
            f"{host:6d} {on[0]:11.3f}% {average:10.3f}% {on[1] * 1e3:7.2f}ms {on[2]:5.1f}MB"
            f" {off[0]:14.3f}% {off[1] * 1e3:7.2f}ms {off[2]:5.1f}MB {off[0] / average:6.1f}"
        )
    print(f"(+reconcile: the events' CPU plus one complete scan per {RECONCILE:g} s)")
    for host, on_s, off_s in settling:
        print(
            f"settling at {host} procs ({SETTLE:g} s: start, placing the jobs, their layer"
            f" checks): {on_s:.2f} s of CPU with events, {off_s:.2f} s without"
        )
    print(json.dumps({"rows": rows}), file=sys.stderr)


if __name__ == "__main__":
    main()
