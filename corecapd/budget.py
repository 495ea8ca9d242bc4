"""How many threads a job may run. Pure.

A rule's `max_threads` is taken as written. Otherwise the budget is derived from the job's
cores, with a larger allowance for TensorFlow, whose intra-op, inter-op and tf.data pools
grow with the CPUs in its mask, plus `thread_slack`. The constants come from measurements
on this project's machine (docs/budgets.md): a default Keras `fit` peaks at 13 threads on 1
CPU and 19 on 2; plain Python with numpy's OpenBLAS runs one thread per CPU plus the main one.
"""

from __future__ import annotations

from dataclasses import dataclass

from corecapd.declaration import Settings

# TensorFlow: fixed runtime threads (Python main, TF's own housekeeping, Eigen's spare,
# tf.data's iterator) + per core: an intra-op and an inter-op thread plus tf.data workers.
TF_FIXED_THREADS = 6
TF_THREADS_PER_CPU = 7
# Plain Python: main + a few runtime/helper threads + BLAS/OpenMP pool and a worker pool.
PYTHON_FIXED_THREADS = 4
PYTHON_THREADS_PER_CPU = 2


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
    """The budget of a job that registered: what it declared, plus the runtime."""
    declared = (
        settings.intra_op
        + settings.inter_op
        + DATA_WORKER_WEIGHT * settings.data_workers
        + settings.blas
    )
    basis = (
        f"declared: intra {settings.intra_op} + inter {settings.inter_op}"
        f" + {DATA_WORKER_WEIGHT}x data {settings.data_workers} + BLAS {settings.blas}"
        f" + {RUNTIME_THREADS} runtime + {slack} slack"
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
