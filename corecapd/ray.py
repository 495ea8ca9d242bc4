"""Ray: every task, actor and Tune trial gets the cores Ray assigned it, through corecapd.

Enabled for a whole Ray job in one line, on every node it reaches:

    ray.init(runtime_env={"worker_process_setup_hook": "corecapd.ray.setup"})

Why a `worker_process_setup_hook`: it is Ray's own way to set up every worker process of a
job (Ray imports it by module path in each worker, on each node, before the worker runs
anything), where a Tune callback runs in the driver, never in a trial's process, and a
decorator would have to be put on every remote function and every trainable. The hook runs
before any task is assigned, though, so it only installs the per-task step: Ray itself,
at the start of every task and actor creation (not of an actor's method calls, which keep
the actor's resources), sizes OpenMP to the CPUs assigned
(`ray._private.utils.set_omp_num_threads_if_unset`, called from `_raylet.execute_task`
before the task's function is loaded; private to Ray, tested with Ray 2.60). The hook
wraps that call, so each task first
registers with corecapd for `get_assigned_resources()["CPU"]` cores (`register` below) and
everything Ray would size to that count is sized to it: the cores themselves (the daemon's
grant, disjoint from the other tasks' while there are enough), TensorFlow's intra-op and
inter-op pools, tf.data, BLAS / OpenMP. A worker reused for a task with another CPU count
registers again, and its grant changes with it. If that function is gone (another Ray
version), the hook warns once and a task can call `corecapd.ray.register()` itself.

Without a daemon (or when it refuses) each task still gets its pools sized to the count
Ray assigned, and the worker warns once; its mask is left as it is (every worker would
otherwise pin itself to the same first CPUs). Below a job (a driver started by `corecap
run`, or matched by a rule, whose local Ray processes are its children), a registering
worker becomes a sub-job, its cores carved out of that job's grant (the daemon's rule for
any process of a job that registers).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from corecapd.job import CorecapWarning, Plan
from corecapd.job import register as register_job

# Where Ray sizes OpenMP at the start of each task: the moment to register (see above).
RAY_TASK_STEP = ("ray._private.utils", "set_omp_num_threads_if_unset")


@dataclass
class _Worker:
    """This worker process's registration (one per process: module state)."""

    # Threads Ray runs in the worker beside its main one (core worker, gRPC: 19 measured
    # with Ray 2.60), counted before any task: declared, so the daemon budgets for them.
    host_threads: int | None = None
    cores: int = 0  # what the plan was registered for; 0 = not registered yet
    plan: Plan | None = None


_worker = _Worker()


def setup() -> None:
    """Ray's `worker_process_setup_hook`: run by Ray once in each worker process, before
    it runs any task; makes every task and actor creation call `register` first."""
    _worker.host_threads = _threads_beside_main()
    module_name, name = RAY_TASK_STEP
    module = importlib.import_module(module_name)
    ray_step: Callable[[], bool] | None = getattr(module, name, None)
    if ray_step is None:
        warnings.warn(
            f"corecapd.ray: this Ray has no {module_name}.{name}, where corecap registers each"
            " task; call corecapd.ray.register() at the top of each task or trainable instead",
            CorecapWarning,
            stacklevel=2,
        )
        return
    if getattr(ray_step, "__wrapped__", None) is not None:
        return  # set up already (the hook given twice)

    @functools.wraps(ray_step)
    def register_then_ray_step() -> bool:
        register()
        # OMP_NUM_THREADS is now set: Ray's step leaves it, and does not unset it after
        # the task (it only unsets what it set), so the next task starts from this grant.
        return ray_step()

    setattr(module, name, register_then_ray_step)


def register(socket: str | None = None) -> Plan:
    """Register this Ray worker for the CPUs Ray assigned its current task or actor, unless
    it is registered for that many already (a reused worker, the same count).

    Args:
        socket: corecapd's socket; default `policy.daemon_socket`'s: $CORECAP_SOCKET, else
            the host policy's daemon.socket, else corecapd's default.

    Returns the plan in force (`corecapd.Plan`: the granted CPU ids, the pools' sizes,
    `manifest()`), also given by `plan()`.

    Raises:
        RuntimeError: called outside a Ray task or actor (Ray's `get_assigned_resources`
            only answers in a worker).
    """
    import ray

    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        raise RuntimeError("corecapd.ray.register: call it in a Ray task or actor, not the driver")
    assigned: dict[str, float] = context.get_assigned_resources()  # type: ignore[no-untyped-call]
    wanted = cores(assigned)
    if _worker.plan is not None and _worker.cores == wanted:
        return _worker.plan
    if _worker.host_threads is None:  # no setup hook: counted at the first registration
        _worker.host_threads = _threads_beside_main()
    _worker.plan = register_job(
        cpus=wanted,
        socket=socket,
        pin_standalone=False,
        host_threads=_worker.host_threads or None,
    )
    _worker.cores = wanted
    return _worker.plan


def plan() -> Plan | None:
    """The plan this worker registered last (for its `manifest()`, `keras_callback()`,
    `data_options()` in a task or trial), or None before its first registration."""
    return _worker.plan


def cores(assigned: Mapping[str, float]) -> int:
    """Cores for Ray's assigned resources ({"CPU": 1.0, ...}), as Ray sizes OpenMP for
    them: the whole CPUs assigned, at least 1 (a fraction of a CPU, or an actor with no CPU
    of its own, which Ray gives OMP_NUM_THREADS=1)."""
    return max(1, math.floor(assigned.get("CPU", 0.0)))


def _threads_beside_main() -> int:
    return len(os.listdir("/proc/self/task")) - 1
