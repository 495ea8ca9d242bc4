"""How many threads a job may run. Pure.

A rule's `max_threads` is taken as written. Otherwise the budget is derived from the job's
cores, with a larger allowance for TensorFlow, whose intra-op, inter-op and tf.data pools
grow with the CPUs in its mask, plus `thread_slack`. The constants come from measurements
on this project's machine (docs/budgets.md): a default Keras `fit` peaks at 13 threads on 1
CPU and 19 on 2; plain Python with numpy's OpenBLAS runs one thread per CPU plus the main one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from corecapd.declaration import Settings

# TensorFlow: fixed runtime threads (Python main, TF's own housekeeping, Eigen's spare,
# tf.data's iterator) + per core: an intra-op and an inter-op thread plus tf.data workers.
TF_FIXED_THREADS = 6
TF_THREADS_PER_CPU = 7
# Plain Python: main + a few runtime/helper threads + BLAS/OpenMP pool and a worker pool.
PYTHON_FIXED_THREADS = 4
PYTHON_THREADS_PER_CPU = 2
# A member that runs no Python (a shell, env, timeout, nohup's program): one thread.
# Measured (docs/budgets.md): dash, bash, env, timeout each run 1 thread while they wait.
OTHER_PROCESS_THREADS = 1

# What a member of a job runs, as its budget sees it.
TENSORFLOW = "tensorflow"  # TensorFlow seen in its /proc/PID/maps
PYTHON = "python"  # a Python interpreter (its exe), without TensorFlow
OTHER = "other"  # anything else


@dataclass(frozen=True)
class Budget:
    threads: int
    basis: str  # how it was derived, shown by `corecapctl status` and in violations


# A registered job's budget: its declared pools, the threads TensorFlow runs besides them
# (main, graph runner, the spare threads each pool keeps), and tf.data's private pool twice
# (its autotuner and prefetch threads grow with it). Measured (docs/budgets.md): a Keras fit
# with intra/inter/data = 1/1/1 peaks at 10 threads, 8/8/8 at 38, 16/16/16 at 70.
RUNTIME_THREADS = 11
DATA_WORKER_WEIGHT = 2


def declared_budget(settings: Settings, slack: int) -> Budget:
    """The budget of a job that registered: what it declared (its pools, and the threads
    of what hosts it, such as a Ray worker's), plus the runtime."""
    declared = (
        settings.intra_op
        + settings.inter_op
        + DATA_WORKER_WEIGHT * settings.data_workers
        + settings.blas
        + settings.host_threads
    )
    host = f" + {settings.host_threads} host" if settings.host_threads else ""
    basis = (
        f"declared: intra {settings.intra_op} + inter {settings.inter_op}"
        f" + {DATA_WORKER_WEIGHT}x data {settings.data_workers} + BLAS {settings.blas}"
        f"{host} + {RUNTIME_THREADS} runtime + {slack} slack"
    )
    return Budget(declared + RUNTIME_THREADS + slack, basis)


def thread_budget(cpus: int, tensorflow: bool, max_threads: int | None, slack: int) -> Budget:
    if max_threads is not None:
        return Budget(max_threads, "rule max_threads")
    if tensorflow:
        derived = TF_FIXED_THREADS + TF_THREADS_PER_CPU * cpus
        basis = f"TensorFlow default: {TF_FIXED_THREADS} + {TF_THREADS_PER_CPU}x{cpus} CPUs"
    else:
        derived = PYTHON_FIXED_THREADS + PYTHON_THREADS_PER_CPU * cpus
        basis = f"Python default: {PYTHON_FIXED_THREADS} + {PYTHON_THREADS_PER_CPU}x{cpus} CPUs"
    return Budget(derived + slack, f"{basis} + {slack} slack")


def member_budget(kind: str, cpus: int) -> int:
    """Threads one member of `kind` (TENSORFLOW, PYTHON or OTHER) may run on `cpus` CPUs,
    without slack: TF 6 + 7 x cpus, other Python 4 + 2 x cpus, anything else 1."""
    if kind == TENSORFLOW:
        return TF_FIXED_THREADS + TF_THREADS_PER_CPU * cpus
    if kind == PYTHON:
        return PYTHON_FIXED_THREADS + PYTHON_THREADS_PER_CPU * cpus
    return OTHER_PROCESS_THREADS


def job_budget(
    kinds: Iterable[str],
    cpus: int,
    max_threads: int | None,
    slack: int,
    declared: Settings | None = None,
) -> Budget:
    """The budget of a whole job (every process of it): what a registered root declared,
    else the rule's `max_threads`, else derived; plus, with a declaration or derived, the
    sum of `member_budget` over `kinds` (the members budgeted by formula: all of them, or
    all but a registered root) and `slack` once.

    A job of one process gets exactly `declared_budget` / `thread_budget`, basis included.
    Measured (docs/budgets.md): a launcher with one or two TensorFlow children, a default
    Keras fit each, stays within the sum of its members' budgets."""
    counted = Counter(kinds)
    if declared is None and max_threads is not None:
        return Budget(max_threads, "rule max_threads")
    if declared is not None:
        own = declared_budget(declared, 0)
        if not counted:
            return declared_budget(declared, slack)
        head, threads = own.basis.removesuffix(" + 0 slack"), own.threads
    elif sum(counted.values()) <= 1:  # one process (none: a job about to end)
        return thread_budget(cpus, TENSORFLOW in counted, None, slack)
    else:
        head, threads = "", 0
    parts = [head] if head else []
    for kind in (TENSORFLOW, PYTHON, OTHER):
        if counted[kind]:
            threads += counted[kind] * member_budget(kind, cpus)
            parts.append(f"{counted[kind]} {_FORMULA[kind].format(cpus=cpus)}")
    return Budget(threads + slack, " + ".join(parts) + f" + {slack} slack")


_FORMULA = {
    TENSORFLOW: f"TensorFlow x ({TF_FIXED_THREADS} + {TF_THREADS_PER_CPU}x{{cpus}} CPUs)",
    PYTHON: f"Python x ({PYTHON_FIXED_THREADS} + {PYTHON_THREADS_PER_CPU}x{{cpus}} CPUs)",
    OTHER: f"other x {OTHER_PROCESS_THREADS}",
}
