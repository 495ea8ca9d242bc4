"""Why a job runs the threads it runs: each layer's width against the cores. Pure.

The evidence is every thread of every process of the job, attributed to its layer from its
own stack (`corecapd.attribution`, read by the daemon), with the job's CPU mask and CPU
quota, the threading variables in its environment, what it declared and what its library
reported. A layer is checked when a setting sizes it from the CPUs: TensorFlow's intra-op
and inter-op pools, tf.data's private pool, OpenMP, OpenBLAS and MKL. Its width is counted
over all of the job's processes (N processes that each size a pool to the job's cores run
N times that pool on them: docs/diagnosis.md), and it is oversized when wider than what the
grant allows it (its cores, its declared size, or the quota when that is smaller). Only an
oversized layer gets a fix; `unknown` threads are counted as unknown, never guessed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from corecapd.declaration import Pool, Settings

# Variables that size a threaded layer when the library loads.
THREADING_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)


UNKNOWN = "unknown"  # `attribution.Layer.UNKNOWN`: no evidence names the thread's layer


@dataclass(frozen=True)
class ThreadLayer:
    """One thread of the job and its layer (`corecapd.attribution.ThreadEvidence`, with its
    process): `layer` is an `attribution.Layer` value ("tf-intra-op", "openmp", ...)."""

    pid: int
    tid: int
    comm: str  # what the job named it: print through `printable.visible`
    layer: str
    runtime: str  # within the layer: "libgomp", "private pool", ...; "" when none
    library: str  # the file its start routine lies in; "" when unknown
    evidence: str  # "start routine gomp_thread_start in libgomp.so.1"


@dataclass(frozen=True)
class Quota:
    """A CPU bandwidth limit of the job's cgroup (or an ancestor's): `cpus` = quota / period
    (0.5 = half of one CPU's time), and where it was read."""

    cpus: float
    source: str  # "cpu.cfs_quota_us=50000, cpu.cfs_period_us=100000 in /sys/fs/cgroup/cpu/x"


@dataclass(frozen=True)
class Evidence:
    """What the daemon read of a job's processes, at one moment."""

    environment: Mapping[str, str]  # THREADING_VARIABLES set in the job's environment
    threads: tuple[ThreadLayer, ...] = ()  # every thread, attributed; () when not read
    mask_cpus: int = 0  # CPUs in the root's affinity mask; 0 when it could not be read
    quota: Quota | None = None  # the root's cgroup CPU quota, if any

    @property
    def thread_names(self) -> Counter[str]:
        """comm -> threads, counted across the job."""
        return Counter(thread.comm for thread in self.threads)


@dataclass(frozen=True)
class JobFacts:
    cpus: int
    threads: int
    budget: int
    tensorflow: bool
    settings: Settings | None  # declared, resolved; None when the job did not register
    pools: tuple[Pool, ...]  # what the job's library saw in itself


@dataclass(frozen=True)
class LayerFinding:
    """One layer of the job: its width over all of its processes, and for a checked layer
    what the grant allows it (`expected`) and, only when wider (`oversized`), the fix."""

    layer: str  # "tf-intra-op", "tf-data", "openmp", ... (`attribution.Layer` values)
    name: str  # "tf.data private pool", "OpenMP pool (libgomp)", ...
    threads: int  # the width: threads of the layer, plus each pool's caller for OpenMP/BLAS
    processes: int  # processes that run threads of this layer
    expected: int | None  # for the grant; None for a layer no setting sizes
    fix: str  # the setting that fixes it; "" when the layer is not oversized
    evidence: str  # one thread's evidence, from the widest process

    @property
    def oversized(self) -> bool:
        return self.expected is not None and self.threads > self.expected

    def hint(self) -> str:
        return (
            f"{self.name} of {self.threads} threads{_in_processes(self)} on {self.expected} CPUs"
            f" ({self.evidence}): {self.fix}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"oversized": self.oversized}


@dataclass(frozen=True)
class Diagnosis:
    hints: tuple[str, ...]  # oversized layers, the quota, the widest unchecked layer, unknown
    # threads, then what the job reported and declared
    layers: tuple[LayerFinding, ...]  # every layer seen, checked ones first
    facts: JobFacts
    evidence: Evidence

    @property
    def oversized(self) -> tuple[LayerFinding, ...]:
        return tuple(finding for finding in self.layers if finding.oversized)

    def summary(self) -> str:
        """Every oversized layer with its fix, else the first hint."""
        if self.oversized:
            return "; ".join(finding.hint() for finding in self.oversized)
        return self.hints[0] if self.hints else "no single layer stands out"

    def as_dict(self) -> dict[str, Any]:
        settings = self.facts.settings
        quota = self.evidence.quota
        return {
            "threads": self.facts.threads,
            "budget": self.facts.budget,
            "cpus": self.facts.cpus,
            "tensorflow": self.facts.tensorflow,
            "declared": None if settings is None else settings.pools(),
            "pools": [{"layer": p.layer, "threads": p.threads} for p in self.facts.pools],
            "thread_names": dict(self.evidence.thread_names),
            "environment": dict(self.evidence.environment),
            "mask_cpus": self.evidence.mask_cpus,
            "quota": None if quota is None else asdict(quota),
            "layers": [finding.as_dict() for finding in self.layers],
            "thread_layers": [
                {k: v for k, v in asdict(thread).items() if k != "comm"}
                for thread in self.evidence.threads
            ],
            "hints": list(self.hints),
        }


@dataclass(frozen=True)
class _Checked:
    """A layer some setting sizes from the CPUs: how to name it and how to fix it."""

    name: str
    declared: str | None  # the `Settings` field that declares its size
    caller_joins: bool  # OpenMP / BLAS: the calling thread is one of the pool's threads
    variable: str | None  # the environment variable that sizes it
    fix: str  # with {n}: the size to set


_TF_FIX = (
    "call tf.config.threading.set_{kind}_op_parallelism_threads({{n}}) before the first op,"
    " or set TF_NUM_{upper}OP_THREADS={{n}}"
)
# Keyed by (layer, runtime); runtime None: any runtime of the layer.
_CHECKED: dict[tuple[str, str | None], _Checked] = {
    ("tf-intra-op", None): _Checked(
        "TensorFlow intra-op pool",
        "intra_op",
        False,
        "TF_NUM_INTRAOP_THREADS",
        _TF_FIX.format(kind="intra", upper="INTRA"),
    ),
    ("tf-inter-op", None): _Checked(
        "TensorFlow inter-op pool",
        "inter_op",
        False,
        "TF_NUM_INTEROP_THREADS",
        _TF_FIX.format(kind="inter", upper="INTER"),
    ),
    ("tf-data", "private pool"): _Checked(
        "tf.data private pool",
        "data_workers",
        False,
        None,
        "set options.threading.private_threadpool_size = {n} (a tf.data.Options, given to"
        " dataset.with_options)",
    ),
    ("openmp", None): _Checked(
        "OpenMP pool",
        "blas",
        True,
        "OMP_NUM_THREADS",
        'set OMP_NUM_THREADS={n}, or call threadpoolctl.threadpool_limits({n}, user_api="openmp")',
    ),
    ("openblas", None): _Checked(
        "OpenBLAS pool",
        "blas",
        True,
        "OPENBLAS_NUM_THREADS",
        "set OPENBLAS_NUM_THREADS={n}, or call"
        ' threadpoolctl.threadpool_limits({n}, user_api="blas")',
    ),
    ("mkl", None): _Checked(
        "MKL pool",
        "blas",
        True,
        "MKL_NUM_THREADS",
        'set MKL_NUM_THREADS={n}, or call threadpoolctl.threadpool_limits({n}, user_api="blas")',
    ),
}


def diagnose(facts: JobFacts, evidence: Evidence) -> Diagnosis:
    """Each layer of the job checked against what its grant allows it.

    `facts.cpus`: the job's granted cores; a quota below the mask (`evidence.quota.cpus <
    evidence.mask_cpus`) lowers every checked layer's allowance to the quota's whole CPUs
    (at least 1). Pure and total: any evidence gives a diagnosis."""
    allowed = facts.cpus
    quota = evidence.quota
    quota_limits = quota is not None and evidence.mask_cpus > 0 and quota.cpus < evidence.mask_cpus
    if quota is not None and quota_limits:
        allowed = min(allowed, quota_cpus(quota))
    findings = _findings(facts, evidence, allowed)
    oversized = [finding for finding in findings if finding.oversized]
    hints = [finding.hint() for finding in oversized]
    if quota is not None and quota_limits:
        hints.append(_quota_hint(quota, evidence.mask_cpus, oversized))
    widest = _widest_unchecked(findings)
    if widest is not None and not oversized and facts.threads > facts.budget:
        hints.append(
            f"the widest layer: {widest.name}, {widest.threads} of the job's {facts.threads}"
            f" threads{_in_processes(widest)} ({widest.evidence}); no setting sizes this layer"
            " to the CPUs: the job's code (or the library that starts these threads) decides"
            " how many"
        )
    unknown = [finding for finding in findings if finding.layer == UNKNOWN]
    if unknown:
        hints.append(
            f"{unknown[0].threads} threads of unknown layer ({unknown[0].evidence}):"
            " not attributed, not guessed"
        )
    hints += _pool_hints(facts)
    return Diagnosis(tuple(hints), tuple(findings), facts, evidence)


def _in_processes(finding: LayerFinding) -> str:
    return f" in {finding.processes} processes" if finding.processes > 1 else ""


def _widest_unchecked(findings: list[LayerFinding]) -> LayerFinding | None:
    """The widest layer no setting sizes (python-threading, tf.data's iterators, other
    native threads), when it is wider than every checked one; never `main` or `unknown`
    (that has a hint of its own)."""
    unchecked = [f for f in findings if f.expected is None and f.layer not in ("main", UNKNOWN)]
    if not unchecked:
        return None
    widest = max(unchecked, key=lambda finding: finding.threads)
    checked = [f.threads for f in findings if f.expected is not None]
    return widest if widest.threads > max(checked, default=0) else None


def quota_cpus(quota: Quota) -> int:
    """The CPUs a quota pays for, whole, at least 1: what pools should be sized to."""
    return max(1, math.floor(quota.cpus))


def _findings(facts: JobFacts, evidence: Evidence, allowed: int) -> list[LayerFinding]:
    """Every layer seen, the checked ones first (in `_CHECKED` order), then the rest."""
    # (layer, runtime or None) -> pid -> library -> [threads]
    groups: dict[tuple[str, str | None], dict[int, dict[str, list[ThreadLayer]]]] = {}
    for thread in evidence.threads:
        key = _checked_key(thread)
        groups.setdefault(key, {}).setdefault(thread.pid, {}).setdefault(thread.library, []).append(
            thread
        )
    found = [
        _checked(key, groups[key], facts, evidence, allowed) for key in _CHECKED if key in groups
    ]
    for (layer, runtime), by_pid in groups.items():
        if (layer, runtime) in _CHECKED:
            continue
        threads = [
            thread for pools in by_pid.values() for pool in pools.values() for thread in pool
        ]
        name = layer if runtime is None else f"{layer} ({runtime})"
        found.append(
            LayerFinding(layer, name, len(threads), len(by_pid), None, "", threads[0].evidence)
        )
    return found


def _checked_key(thread: ThreadLayer) -> tuple[str, str | None]:
    """The group of a thread: a checked layer's key, else (layer, runtime or None)."""
    if (thread.layer, None) in _CHECKED:
        return thread.layer, None
    return thread.layer, thread.runtime or None


def _checked(
    key: tuple[str, str | None],
    by_pid: Mapping[int, Mapping[str, list[ThreadLayer]]],
    facts: JobFacts,
    evidence: Evidence,
    allowed: int,
) -> LayerFinding:
    """One checked layer. Within a process, pools of the same layer in different libraries
    (numpy's and scipy's OpenBLAS) are not added up: one caller drives one at a time (the
    idle copy's thread used 5-9 ticks, its start-up spin, against 249: docs/diagnosis.md);
    the widest counts. Across processes they are: each process drives its own at once."""
    layer = _CHECKED[key]
    joins = 1 if layer.caller_joins else 0
    widths = {
        pid: max(len(pool) + joins for pool in pools.values()) for pid, pools in by_pid.items()
    }
    # The size the job's library reports for itself (threadpoolctl, after the job's own
    # limits) is the width it uses: threads beyond it stay parked (OpenBLAS keeps the
    # threads it started when threadpool_limits lowers it), and naming the limit already
    # in place as the fix would be wrong. Reported by the registered process: the root.
    reported = [pool.threads for pool in facts.pools if pool.layer == key[0]]
    root = evidence.threads[0].pid if evidence.threads else None
    if reported and root in widths:
        widths[root] = min(widths[root], max(reported))
    widest_pid = max(widths, key=lambda pid: widths[pid])
    widest = max(by_pid[widest_pid].values(), key=len)
    declared = (
        getattr(facts.settings, layer.declared) if facts.settings and layer.declared else None
    )
    expected = declared if declared is not None else allowed
    width = sum(widths.values())
    name = layer.name
    if key[0] == "openmp" and widest[0].runtime:
        name = f"{name} ({widest[0].runtime})"
    fix = ""
    if width > expected:
        size = max(1, expected // len(widths))
        fix = layer.fix.format(n=size)
        if len(widths) > 1:
            fix += f" in each of its {len(widths)} processes"
        value = evidence.environment.get(layer.variable) if layer.variable else None
        if value is not None:
            fix = f"{layer.variable}={value} in the job's environment; {fix}"
    return LayerFinding(key[0], name, width, len(widths), expected, fix, widest[0].evidence)


def _quota_hint(quota: Quota, mask_cpus: int, oversized: list[LayerFinding]) -> str:
    size = quota_cpus(quota)
    text = (
        f"a CPU quota of {quota.cpus:g} CPUs ({quota.source}) is not thread control: the"
        f" pools were sized from the CPU mask ({mask_cpus} CPUs), not from the quota"
        f" ({quota.cpus:g} CPUs)"
    )
    if not oversized:
        return text + f"; no pool is wider than {size} CPUs now"
    return (
        f"{text}; size them to {size}: "
        + "; ".join(finding.fix for finding in oversized)
        + f"; or give the job {size} cores (a rule's cpus = {size}) instead of the quota"
    )


def _pool_hints(facts: JobFacts) -> list[str]:
    hints = [
        f"{pool.layer} pool of {pool.threads} threads on {facts.cpus} CPUs (reported by the job)"
        for pool in facts.pools
        if pool.threads > facts.cpus
    ]
    if facts.settings is not None:
        hints += [f"declared {note}" for note in facts.settings.oversubscribed()]
    return hints
