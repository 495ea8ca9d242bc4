"""Peak thread counts of whole process trees (a launcher and its children), against the
budget corecapd derives for a job of those members (corecapd/budget.py `job_budget`).

A launcher (plain Python) starts N children at once, each the seed Keras fit (TensorFlow,
default settings), directly or through `/bin/sh -c` (os.system style); all run under a CPU
mask of 1 or 2 CPUs (the grant). Every process of the tree is found through
/proc/PID/task/*/children and its threads counted every 5 ms; the peak of the sum is
printed next to the derived budget (without slack, and with the default slack of 8). Also
the threads of the non-Python processes that sit between a job and its Python.

    .venv/bin/python bench/tree_threads.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from thread_counts import SEED_FIT  # bench/: the same seed Keras fit as the per-process figures

from corecapd.budget import OTHER, PYTHON, TENSORFLOW, job_budget

LAUNCHER = """
import shlex, subprocess, sys
n, shell, fit = int(sys.argv[1]), sys.argv[2] == "shell", sys.argv[3]
argv = [sys.executable, "-c", fit]
if shell:
    argv = ["sh", "-c", shlex.join(argv) + "; true"]
for child in [subprocess.Popen(argv) for _ in range(n)]:
    child.wait()
"""


def tree(pid: int) -> list[int]:
    """`pid` and every descendant, now."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    todo += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def peak_tree_threads(children: int, shell: bool, cpus: set[int]) -> int:
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(children), "shell" if shell else "direct", SEED_FIT],
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    peak = 0
    while launcher.poll() is None:
        peak = max(peak, sum(threads(pid) for pid in tree(launcher.pid)))
        time.sleep(0.005)
    if launcher.returncode != 0:
        raise SystemExit(f"the launcher failed: exit code {launcher.returncode}")
    return peak


def other_threads() -> dict[str, int]:
    """Threads of the programs that sit between a job and its Python, while they wait."""
    found = {}
    for name, argv in {
        "sh -c": ["sh", "-c", "sleep 1; true"],
        "bash script": ["bash", "-c", "sleep 1; true"],
        "timeout": ["timeout", "5", "sleep", "1"],
    }.items():
        process = subprocess.Popen(argv)
        time.sleep(0.3)
        found[name] = threads(process.pid)
        process.wait()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    online = sorted(os.sched_getaffinity(0))
    print("non-Python processes between a job and its Python (threads):", other_threads())
    print(f"{'workload':34} cpus  peak (runs)     budget  +slack 8")
    for children in (1, 2):
        for shell in (False, True):
            name = f"launcher + {children} TF fit" + (" via sh -c" if shell else "")
            kinds = [PYTHON] + [TENSORFLOW] * children + ([OTHER] * children if shell else [])
            for ncpus in (1, 2):
                if ncpus > len(online):
                    continue
                cpus = set(online[-ncpus:])
                peaks = [peak_tree_threads(children, shell, cpus) for _ in range(args.repeats)]
                bare = job_budget(kinds, ncpus, None, 0).threads
                print(
                    f"{name:34} {ncpus:4} {max(peaks):5} {peaks!s:10}"
                    f" {bare:6} {bare + 8:8}  median {statistics.median(peaks)}"
                )


if __name__ == "__main__":
    main()
