"""What the exec path's own Python work costs per matched child, stage by stage: the part
of the daemon's CPU per child that is neither the event loop's wake-ups
(bench/wake_cost.py) nor the fence thread, and that only doing less would cut.

The real daemon object (`daemon.build`, the affinity backend alone: no fence thread, no
event loop), its journal lines to a file, and N children of a copy of the Python
interpreter under a unique name, one at a time. For each child, once it has exec'd and
waits: this thread's CPU (time.thread_time) for the exec path as the daemon runs it on an
exec event (`_admit`: the cheap reads, the pin ahead, the stat read, placing the job,
confining its threads, the job-started line), then, once the child has exited and been
reaped, for its exit (`Exit`: the job ends, its masks are let go, the job-ended line) and
the next exec's foresight (`Prepare`). Each stage is timed by a wrapper around the method
that does it (about 1 us each). Medians over the children. Needs root (it sets the
children's masks). Run from the repository root:

    .venv/bin/python bench/exec_path_hot.py [--children 300]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corecapd.daemon import build
from corecapd.effects import Exit, Prepare
from corecapd.proc_events import EXEC, ProcEvent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exe = work / f"pyhot{secrets.token_hex(4)}"
        shutil.copy2(os.path.realpath(sys.executable), exe)
        cpus = sorted(os.sched_getaffinity(0))
        policy = work / "corecap.toml"
        policy.write_text(
            f'[daemon]\nmode = "enforce"\nbackend = "affinity"\nexec_events = false\n'
            f'reserved_cpus = "{",".join(map(str, cpus[:-1]))}"\n'
            f'socket = "{work}/corecap.sock"\nstate_dir = "{work}/state"\n\n'
            f'[[rules]]\nname = "bench"\nmatch = {{ exe = ["{exe.name}"], users = ["root"] }}\n'
            "cpus = 1\n"
        )
        daemon = build(policy)
        with open(work / "journal.log", "w") as journal:
            daemon.reporter.stream = journal
            admitted, exited, stages = measure(daemon, exe, args.children)
    print(f"exec path, hot: {args.children} children of {exe.name}, medians (min-max), us")
    for name, values in (("exec (_admit)", admitted), ("exit + Prepare", exited)):
        print(
            f"  {name:<15} {statistics.median(values):7.1f}  ({min(values):.1f}-{max(values):.1f})"
        )
    total = statistics.median(a + e for a, e in zip(admitted, exited, strict=True))
    print(f"  {'per child':<15} {total:7.1f}")
    print("of which, per child (medians):")
    for name, values in stages.items():
        print(f"  {name:<15} {statistics.median(values):7.1f}")


STAGES = (
    ("exe readlink", "scanner.procfs", "exe"),
    ("identity reads", "scanner.procfs", "identity_and_parent"),
    ("stat read", "scanner", "observe"),
    ("core", "table", "handle"),
    ("pin", "affinity", "pin"),
    ("confine", "affinity", "confine"),
    ("release", "affinity", "release"),
    ("journal line", "reporter", "emit"),
)


def timed(daemon: Any, spent: Counter[str]) -> None:
    """Wrap each stage's method on its object, adding this thread's CPU in it to `spent`."""
    for name, owner_path, method in STAGES:
        owner = daemon
        for part in owner_path.split("."):
            owner = getattr(owner, part)
        setattr(owner, method, _wrapped(getattr(owner, method), name, spent))


def _wrapped(function: Callable[..., Any], name: str, spent: Counter[str]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.thread_time_ns()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] += time.thread_time_ns() - began

    return wrapper


def measure(
    daemon: Any, exe: Path, children: int
) -> tuple[list[float], list[float], dict[str, list[float]]]:
    admitted: list[float] = []
    exited: list[float] = []
    stages: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    spent: Counter[str] = Counter()
    timed(daemon, spent)
    for _ in range(children):
        spent.clear()
        child = subprocess.Popen([exe, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        while os.readlink(f"/proc/{child.pid}/exe") != str(exe):
            time.sleep(0.001)  # until it has exec'd
        began = time.thread_time_ns()
        daemon._admit(ProcEvent(EXEC, child.pid, time.monotonic_ns()))
        admitted.append((time.thread_time_ns() - began) / 1000)
        assert daemon.table.is_member(child.pid), "the child was not placed"
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        began = time.thread_time_ns()
        daemon._apply(Exit(child.pid), time.time())
        daemon._apply(Prepare(), time.time())
        exited.append((time.thread_time_ns() - began) / 1000)
        for name in stages:
            stages[name].append(spent[name] / 1000)
    return admitted, exited, stages


if __name__ == "__main__":
    main()
