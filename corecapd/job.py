"""The job library: one call at the top of a training script sizes every threaded layer.

    import corecapd
    plan = corecapd.register(cpus=2)        # before or after `import tensorflow`
    import tensorflow as tf
    dataset = dataset.with_options(plan.data_options())
    model.fit(dataset, callbacks=[plan.keras_callback()])
    json.dump(plan.manifest(), open("run/threads.json", "w"))

`register` asks corecapd (at `policy.daemon_socket`) for cores, pins this process to the
grant (not when corecapd is in monitor mode, a dry run), and sizes TensorFlow's intra-op and
inter-op pools, tf.data, and the BLAS / OpenMP pools to it: through the environment for what
has not started yet, through `tf.config.threading` and threadpoolctl for what has. Without a
daemon it applies the same settings to the CPUs this process already has, and warns once; so
does a daemon that refuses (busy: too many connections open).

Every pool size it records or reports is the pool's effective size, the threads it runs:
TensorFlow's 0 ("let TensorFlow decide") is resolved by `declaration.tensorflow_pools`, and
the BLAS / OpenMP pools are read after the limits were applied.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.abc
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

from corecapd.client import DaemonUnreachable, call
from corecapd.cpulist import format_cpulist
from corecapd.declaration import (
    Declaration,
    Pool,
    Settings,
    declaration_from,
    resolve,
    tensorflow_pools,
)
from corecapd.diagnosis import THREADING_VARIABLES
from corecapd.policy import daemon_socket
from corecapd.protocol import ProtocolError, RemoteError

# What `corecap run` leaves in the environment for the library in the job to find.
GRANT_VARIABLES = {
    "cpus": "CORECAP_CPUS",
    "intra_op": "CORECAP_INTRA_OP",
    "inter_op": "CORECAP_INTER_OP",
    "data_workers": "CORECAP_DATA_WORKERS",
    "blas": "CORECAP_BLAS",
}


# A file for the job's manifest, written as the process exits (`corecap bench` sets it for
# each run: what the job ran, TensorFlow's settings and threadpool_info included).
MANIFEST_VARIABLE = "CORECAP_MANIFEST"


def grant_environment(plan: Plan) -> dict[str, str]:
    """The CORECAP_* variables that hand `plan`'s grant to the library in the job."""
    found = {"CORECAP_CPUS": ",".join(map(str, plan.cpus))}
    for name, variable in GRANT_VARIABLES.items():
        if name != "cpus":
            found[variable] = str(getattr(plan.settings, name))
    if plan.daemon is not None:
        found["CORECAP_SOCKET"] = plan.daemon
    return found


class CorecapWarning(UserWarning):
    """Settings could not be applied as asked (no daemon, or TensorFlow started already)."""


@dataclass
class Plan:
    """What this process was granted and runs; `manifest()` records it for the run."""

    cpus: list[int]
    settings: Settings
    notes: list[str]
    daemon: str | None  # the socket that granted it; None when standalone
    tensorflow_initialized_before: bool
    # The threads TensorFlow's pools ran when register() came after its first op
    # ({"intra_op": n, "inter_op": n}); empty when register() came first.
    tensorflow_threads: dict[str, int] = field(default_factory=dict)
    epoch_threads: list[int] = field(default_factory=list)
    # Whether this process was pinned to `cpus`: not by a daemon in monitor mode (a dry
    # run), nor standalone with pin_standalone=False.
    pinned: bool = True

    def tensorflow_pools(self) -> dict[str, int] | None:
        """The threads TensorFlow's intra-op and inter-op pools run (or will run, once its
        runtime starts under the settings in force): {"intra_op": n, "inter_op": n}, never
        TensorFlow's 0; None when TensorFlow is not imported."""
        if self.tensorflow_threads:
            return dict(self.tensorflow_threads)
        return _tensorflow_pools_now()

    def data_options(self) -> Any:
        """tf.data.Options whose private pool and autotuner fit the grant."""
        import tensorflow as tf

        options = tf.data.Options()
        options.threading.private_threadpool_size = self.settings.data_workers
        options.autotune.cpu_budget = len(self.cpus)
        return options

    def keras_callback(self) -> Any:
        """A Keras callback that records the process's thread count after each epoch and
        reports it to corecapd (shown by `corecapctl explain`)."""
        import tensorflow as tf

        plan = self

        class ThreadCountCallback(tf.keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                threads = len(os.listdir("/proc/self/task"))
                plan.epoch_threads.append(threads)
                if plan.daemon is not None:
                    try:
                        call(Path(plan.daemon), "report", epoch=epoch, threads=threads)
                    except (DaemonUnreachable, RemoteError, ProtocolError) as err:
                        _warn_once(f"thread counts not reported to corecapd: {err}")

        return ThreadCountCallback()

    def manifest(self) -> dict[str, Any]:
        """Every threading fact of this process, JSON-serialisable, for run artifacts."""
        from threadpoolctl import threadpool_info

        return {
            "pid": os.getpid(),
            "cpus": self.cpus,
            "affinity": sorted(os.sched_getaffinity(0)),
            "settings": self.settings.pools(),
            "notes": self.notes,
            "daemon": self.daemon,
            "environment": {name: os.environ.get(name) for name in THREADING_VARIABLES},
            "tensorflow": _tensorflow_facts(self),
            "tensorflow_initialized_before_register": self.tensorflow_initialized_before,
            "threadpool_info": threadpool_info(),
            "threads": len(os.listdir("/proc/self/task")),
            "epoch_threads": self.epoch_threads,
        }


def register(
    cpus: int | None = None,
    intra_op: int | None = None,
    inter_op: int | None = None,
    data_workers: int | None = None,
    blas: int | None = None,
    *,
    socket: str | None = None,
    pin_standalone: bool = True,
    host_threads: int | None = None,
) -> Plan:
    """Declare this job's threading, get cores, and size every layer to them.

    `host_threads` declares the threads this process runs for what hosts it, beside its
    main thread and its pools (a Ray worker's, counted by `corecapd.ray`): the daemon
    budgets for them.

    Without a daemon, `pin_standalone` pins this process to the first `cpus` CPUs of its
    mask (True: a lone job), or leaves its mask as it is and sizes the pools only (False:
    one of several workers that know nothing of each other, as Ray's do: pinned, they
    would all stack on the same first CPUs).
    """
    asked = {
        "cpus": cpus,
        "intra_op": intra_op,
        "inter_op": inter_op,
        "data_workers": data_workers,
        "blas": blas,
        "host_threads": host_threads,
    }
    for name, variable in GRANT_VARIABLES.items():  # set by `corecap run`
        if asked[name] is None and os.environ.get(variable):
            asked[name] = _count_from_environment(variable) if name != "cpus" else None
    if asked["cpus"] is None and os.environ.get("CORECAP_CPUS"):
        asked["cpus"] = len(os.environ["CORECAP_CPUS"].split(","))
    try:
        declaration = declaration_from(asked)
    except ValueError as err:
        raise ValueError(f"corecapd.register: {err}") from None

    initialized = _tensorflow_initialized()
    running: dict[str, int] = {}
    if initialized:
        # TensorFlow's pools exist and never resize. Read them before anything here changes
        # the mask or the environment they were sized from, and declare them as they run.
        running = _tensorflow_pools_now() or {}
        declaration = dataclasses.replace(declaration, **running)
    path = daemon_socket(socket)
    granted, notes, daemon, pin = _ask_daemon(path, declaration, initialized, pin_standalone)
    settings = resolve(declaration, len(granted))
    plan = Plan(granted, settings, notes, daemon, initialized, running, pinned=pin)
    _apply(plan, pin=pin)
    if running:
        message = (
            "corecapd.register was called after TensorFlow initialised its thread pools: they run"
            f" intra_op={running['intra_op']}, inter_op={running['inter_op']} threads"
            f"{_asked_instead(asked, running)} and cannot be resized to the grant"
            f" of {len(plan.cpus)} CPUs. Call it before the first TensorFlow op."
        )
        plan.notes.append(message)
        warnings.warn(message, CorecapWarning, stacklevel=2)
    _report_pools(plan)
    if os.environ.get(MANIFEST_VARIABLE):
        _manifest_at_exit(plan, Path(os.environ[MANIFEST_VARIABLE]))
    return plan


_at_exit: list[tuple[Plan, Path]] = []  # the latest plan, and where its manifest goes


def _manifest_at_exit(plan: Plan, path: Path) -> None:
    if not _at_exit:
        atexit.register(_write_manifest)
    _at_exit[:] = [(plan, path)]


def _write_manifest() -> None:
    plan, path = _at_exit[-1]
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(plan.manifest()))
    partial.replace(path)  # whole or absent, for whoever reads it


def _asked_instead(asked: dict[str, int | None], running: dict[str, int]) -> str:
    """What the caller asked that TensorFlow does not run (", not the intra_op=1 asked for")."""
    differ = [f"{k}={asked[k]}" for k in running if asked[k] is not None and asked[k] != running[k]]
    return f", not the {', '.join(differ)} asked for" if differ else ""


def _ask_daemon(
    path: Path, declaration: Declaration, initialized: bool, pin_standalone: bool
) -> tuple[list[int], list[str], str | None, bool]:
    """The grant: (CPUs, notes, the daemon's socket or None, whether to pin this process to
    the CPUs). The pools follow once the limits are applied (`_report_pools`)."""
    try:
        grant = call(
            path,
            "register",
            declaration=declaration.as_dict(),
            tensorflow_initialized=initialized,
        )
    except (DaemonUnreachable, RemoteError, ProtocolError) as err:
        # No daemon, or one that refused (busy, or this process is not what it expects):
        # the job runs all the same, sized to the CPUs it has.
        own = sorted(os.sched_getaffinity(0))
        cpus = own[: declaration.cpus] if declaration.cpus else own
        why = f"corecapd refused: {err}" if isinstance(err, RemoteError) else str(err)
        if pin_standalone:
            _warn_once(f"{why}; applying the settings to this process's CPUs {cpus} only")
        else:  # once per process, whatever count each registration asks for
            _warn_once(f"{why}; sizing the pools to the CPUs asked for, the mask left as it is")
        note = "no daemon" if isinstance(err, DaemonUnreachable) else why
        unpinned = [] if pin_standalone else [f"standalone: not pinned, mask {own}"]
        return cpus, [f"standalone: {note}", *unpinned], None, pin_standalone
    cpus, notes = list(grant["cpus"]), list(grant["notes"])
    if declaration.cpus and len(cpus) < declaration.cpus:
        _warn_once(
            f"granted {len(cpus)} of the {declaration.cpus} CPUs asked for ({'; '.join(notes)})"
        )
    if not grant["enforced"]:  # monitor mode: a dry run, for the job's own mask too
        notes.append("monitor mode: not pinned, the pools sized to the grant")
        if not os.environ.get("CORECAP_CPUS"):  # else `corecap run` said it before the exec
            _warn_once(
                f"monitor mode: the pools are sized to the grant of CPUs {format_cpulist(cpus)},"
                " the mask is left as it is"
            )
    return cpus, notes, str(path), bool(grant["enforced"])


def _apply(plan: Plan, pin: bool) -> None:
    """Pin every thread (if `pin`), then size each layer by the means its state allows."""
    for name in os.listdir("/proc/self/task") if pin else ():
        try:
            os.sched_setaffinity(int(name), plan.cpus)
        except ProcessLookupError:
            continue  # a thread that just ended
    os.environ.update(plan.settings.environment())
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=plan.settings.blas)  # libraries loaded already
    tf = sys.modules.get("tensorflow")
    if tf is None:
        # TF's runtime reads TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS; the hook makes
        # tf.config.threading say the same as soon as `import tensorflow` completes.
        sys.meta_path.insert(0, _SizeTensorflowOnImport(plan))
    elif not plan.tensorflow_threads:  # imported, not started: its pools can still be sized
        _size_tensorflow(tf, plan)


def _report_pools(plan: Plan) -> None:
    """Tell corecapd the pools this process runs, read now that the limits are applied."""
    pools = [{"layer": p.layer, "threads": p.threads} for p in _pools(plan)]
    if plan.daemon is None or not pools:
        return
    try:
        call(Path(plan.daemon), "report", pools=pools)
    except (DaemonUnreachable, RemoteError, ProtocolError) as err:
        _warn_once(f"thread pools not reported to corecapd: {err}")


class _SizeTensorflowOnImport(importlib.abc.MetaPathFinder):
    """Sets tf.config.threading right after `import tensorflow`, before any op can run."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and not for the lookup below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader, plan = spec.loader, self.plan
        run_module = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _size_tensorflow(module, plan)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _size_tensorflow(tf: Any, plan: Plan) -> None:
    tf.config.threading.set_intra_op_parallelism_threads(plan.settings.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(plan.settings.inter_op)


def _tensorflow_initialized() -> bool:
    """Whether TensorFlow's runtime (and so its thread pools) exists already."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    from tensorflow.python.eager import context  # no public API tells

    return context.context()._context_handle is not None


def _pools(plan: Plan) -> list[Pool]:
    """The thread pools this process runs now, each with the threads it runs: BLAS/OpenMP
    libraries as threadpoolctl reads them, and TensorFlow's once its runtime exists."""
    from threadpoolctl import threadpool_info

    pools = [
        Pool(str(info["internal_api"]), int(info["num_threads"])) for info in threadpool_info()
    ]
    running = plan.tensorflow_pools() if _tensorflow_initialized() else None
    if running is not None:
        pools.append(Pool("tensorflow-intra-op", running["intra_op"]))
        pools.append(Pool("tensorflow-inter-op", running["inter_op"]))
    return pools


def _tensorflow_pools_now() -> dict[str, int] | None:
    """What TensorFlow's pools run, or will run if its runtime starts now (its settings,
    else the variables, else the CPUs in this thread's mask); None without TensorFlow."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return None
    return tensorflow_pools(
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
        os.environ,
        len(os.sched_getaffinity(0)),
    )


def _tensorflow_facts(plan: Plan) -> dict[str, Any] | None:
    tf = sys.modules.get("tensorflow")
    running = plan.tensorflow_pools()
    if tf is None or running is None:
        return None
    return {
        "version": tf.__version__,
        "initialized": _tensorflow_initialized(),
        "intra_op": running["intra_op"],  # threads, TensorFlow's 0 resolved
        "inter_op": running["inter_op"],
        "configured": {  # as tf.config.threading says: 0 = "let TensorFlow decide"
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
    }


def _count_from_environment(variable: str) -> int | None:
    try:
        return int(os.environ[variable])
    except ValueError:
        return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"corecapd: {message}", CorecapWarning, stacklevel=4)
