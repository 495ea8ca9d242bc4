"""Why a job runs more threads than its budget: the layer, and the setting that fixes it. Pure.

Thread names alone cannot attribute threads to pools (TensorFlow's intra-op threads carry
the process's own name), so the evidence is combined: what the job declared and its pools
reported, the threading variables in its environment, and its threads grouped by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
_BLAS_VARIABLES = {
    "OMP_NUM_THREADS": "OpenMP",
    "OPENBLAS_NUM_THREADS": "OpenBLAS",
    "MKL_NUM_THREADS": "MKL",
    "BLIS_NUM_THREADS": "BLIS",
}
# TensorFlow names its inter-op (and tf.data) threads tf_Compute; each pool keeps a few spare.
TF_INTER_OP_NAME = "tf_Compute"
TF_SPARE_THREADS = 5


@dataclass(frozen=True)
class Evidence:
    """What the daemon read of a job's processes when it was over budget."""

    thread_names: Mapping[str, int]  # /proc/PID/task/*/comm, counted across the job
    environment: Mapping[str, str]  # THREADING_VARIABLES set in the job's environment
    process_name: str  # the root's comm: TensorFlow's intra-op threads carry it


@dataclass(frozen=True)
class JobFacts:
    cpus: int
    threads: int
    budget: int
    tensorflow: bool
    settings: Settings | None  # declared, resolved; None when the job did not register
    pools: tuple[Pool, ...]  # what the job's library saw in itself


@dataclass(frozen=True)
class Diagnosis:
    hints: tuple[str, ...]
    facts: JobFacts
    evidence: Evidence

    def summary(self) -> str:
        return self.hints[0] if self.hints else "no single layer stands out"

    def as_dict(self) -> dict[str, Any]:
        settings = self.facts.settings
        return {
            "threads": self.facts.threads,
            "budget": self.facts.budget,
            "cpus": self.facts.cpus,
            "tensorflow": self.facts.tensorflow,
            "declared": None if settings is None else settings.pools(),
            "pools": [{"layer": p.layer, "threads": p.threads} for p in self.facts.pools],
            "thread_names": dict(self.evidence.thread_names),
            "environment": dict(self.evidence.environment),
            "hints": list(self.hints),
        }


def diagnose(facts: JobFacts, evidence: Evidence) -> Diagnosis:
    hints = [
        *_environment_hints(facts, evidence),
        *_pool_hints(facts),
        *_tensorflow_hints(facts, evidence),
    ]
    if not hints and evidence.thread_names:
        name, count = max(evidence.thread_names.items(), key=lambda item: item[1])
        hints.append(
            f"{count} of {facts.threads} threads are named {name!r}; no threading variable"
            " or declared pool explains them: the job's own threads?"
        )
    return Diagnosis(tuple(hints), facts, evidence)


def _environment_hints(facts: JobFacts, evidence: Evidence) -> list[str]:
    hints = []
    for variable, layer in _BLAS_VARIABLES.items():
        value = _number(evidence.environment.get(variable))
        if value is not None and value > facts.cpus:
            hints.append(
                f"{layer} pool of up to {value} threads on {facts.cpus} CPUs:"
                f" {variable}={value} in the job's environment; set {variable}={facts.cpus}"
            )
    for variable in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        value = _number(evidence.environment.get(variable))
        if value is not None and value > facts.cpus and facts.tensorflow:
            hints.append(
                f"TensorFlow pool of {value} threads on {facts.cpus} CPUs:"
                f" {variable}={value} in the job's environment; set {variable}={facts.cpus}"
            )
    return hints


def _pool_hints(facts: JobFacts) -> list[str]:
    hints = [
        f"{pool.layer} pool of {pool.threads} threads on {facts.cpus} CPUs (reported by the job)"
        for pool in facts.pools
        if pool.threads > facts.cpus
    ]
    if facts.settings is not None:
        hints += [f"declared {note}" for note in facts.settings.oversubscribed()]
    return hints


def _tensorflow_hints(facts: JobFacts, evidence: Evidence) -> list[str]:
    if not facts.tensorflow:
        return []
    expected = facts.settings.inter_op if facts.settings else facts.cpus
    inter = evidence.thread_names.get(TF_INTER_OP_NAME, 0) - TF_SPARE_THREADS
    intra = evidence.thread_names.get(evidence.process_name, 0) - TF_SPARE_THREADS
    hints = []
    if intra > max(facts.cpus, facts.settings.intra_op if facts.settings else 0):
        hints.append(
            f"TensorFlow intra-op pool of about {intra} threads on {facts.cpus} CPUs"
            f" ({intra + TF_SPARE_THREADS} threads named {evidence.process_name!r}):"
            f" call tf.config.threading.set_intra_op_parallelism_threads({facts.cpus})"
            " before the first op, or set TF_NUM_INTRAOP_THREADS"
        )
    if inter > max(facts.cpus, expected):
        hints.append(
            f"TensorFlow inter-op pool of about {inter} threads on {facts.cpus} CPUs"
            f" ({inter + TF_SPARE_THREADS} {TF_INTER_OP_NAME} threads):"
            f" call tf.config.threading.set_inter_op_parallelism_threads({facts.cpus})"
            " before the first op, or set TF_NUM_INTEROP_THREADS"
        )
    return hints


def _number(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
