"""What a job declares it will run, resolved against the cores it was granted. Pure.

Shared by the daemon (budgets, diagnosis) and the job library (what to apply), so both
sides derive the same numbers: a layer left unset gets one thread per granted core, except
inter-op, which gets at most 2 (TensorFlow runs few independent ops at once in a training
step; each inter-op thread is one more thread the budget must carry).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

MAX_DECLARED = 4096
DEFAULT_INTER_OP = 2


@dataclass(frozen=True)
class Declaration:
    """The job's own words; None = "derive it from my grant"."""

    cpus: int | None = None
    intra_op: int | None = None
    inter_op: int | None = None
    data_workers: int | None = None
    blas: int | None = None
    # Threads the process ran for what hosts it before the job's own code, beside its main
    # thread (a Ray worker's core worker and gRPC threads: 19 measured, docs/budgets.md).
    host_threads: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Settings:
    """Every threaded layer's size, for a grant of `cpus` cores."""

    cpus: int
    intra_op: int
    inter_op: int
    data_workers: int
    blas: int
    host_threads: int = 0  # not a pool: budgeted on top of them (`Declaration.host_threads`)

    def pools(self) -> dict[str, int]:
        """The four layers' sizes, by name (JSON-ready)."""
        return {
            "intra_op": self.intra_op,
            "inter_op": self.inter_op,
            "data_workers": self.data_workers,
            "blas": self.blas,
        }

    def oversubscribed(self) -> tuple[str, ...]:
        """Layers declared wider than the grant: accepted, and said so."""
        return tuple(
            f"{name}={value} on {self.cpus} CPUs: oversubscribed by design"
            for name, value in self.pools().items()
            if value > self.cpus
        )

    def environment(self) -> dict[str, str]:
        """The variables that size each layer in a process that has not started them yet."""
        return {
            "OMP_NUM_THREADS": str(self.blas),
            "OPENBLAS_NUM_THREADS": str(self.blas),
            "MKL_NUM_THREADS": str(self.blas),
            "TF_NUM_INTRAOP_THREADS": str(self.intra_op),
            "TF_NUM_INTEROP_THREADS": str(self.inter_op),
        }


def resolve(declaration: Declaration, granted: int) -> Settings:
    def pick(value: int | None, default: int) -> int:
        return default if value is None else value

    return Settings(
        cpus=granted,
        intra_op=pick(declaration.intra_op, granted),
        inter_op=pick(declaration.inter_op, min(DEFAULT_INTER_OP, granted)),
        data_workers=pick(declaration.data_workers, granted),
        blas=pick(declaration.blas, granted),
        host_threads=pick(declaration.host_threads, 0),
    )


class DeclarationError(ValueError):
    """A declaration field that is not a thread count; the message names the field."""


def declaration_from(message: Mapping[str, object]) -> Declaration:
    """Validate a declaration as it arrives over the socket (or from the command line)."""
    values: dict[str, int | None] = {}
    for field in fields(Declaration):
        value = message.get(field.name)
        if value is None:
            values[field.name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise DeclarationError(f"{field.name}: expected an integer or null, got {value!r:.40}")
        if not 1 <= value <= MAX_DECLARED:
            raise DeclarationError(f"{field.name}: expected 1 to {MAX_DECLARED}, got {value}")
        values[field.name] = value
    return Declaration(**values)


# The variables TensorFlow's runtime reads when it starts (at the first op), by pool.
TENSORFLOW_POOL_VARIABLES = {
    "intra_op": "TF_NUM_INTRAOP_THREADS",
    "inter_op": "TF_NUM_INTEROP_THREADS",
}


def tensorflow_pools(
    intra_op: int, inter_op: int, environment: Mapping[str, str], cpus: int
) -> dict[str, int]:
    """The threads TensorFlow's intra-op and inter-op pools run: its "unset" resolved.

    `intra_op` and `inter_op` are as `tf.config.threading` reports them, where 0 means
    "let TensorFlow decide"; `environment` holds TF_NUM_INTRAOP_THREADS /
    TF_NUM_INTEROP_THREADS as the process had them when TensorFlow's runtime started;
    `cpus` is the number of CPUs in the affinity mask of the thread that started it (at
    the first op). Each pool runs its setting if above 0, else its variable if that is a
    positive integer, else one thread per CPU: measured with TensorFlow 2.21 on 1 and 2
    CPUs (docs/budgets.md, "What TensorFlow runs when it decides").

    Returns {"intra_op": threads, "inter_op": threads}, each at least 1.
    """
    configured = {"intra_op": intra_op, "inter_op": inter_op}
    sizes = {}
    for pool, variable in TENSORFLOW_POOL_VARIABLES.items():
        from_environment = _positive(environment.get(variable))
        if configured[pool] > 0:
            sizes[pool] = configured[pool]
        elif from_environment is not None:
            sizes[pool] = from_environment
        else:
            sizes[pool] = max(cpus, 1)
    return sizes


def _positive(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


@dataclass(frozen=True)
class Pool:
    """A thread pool the job saw in itself (threadpoolctl's view, or TensorFlow's), with
    its effective size: the threads it runs, never a setting's "unset"."""

    layer: str  # "openblas", "openmp", "mkl", "tensorflow-intra-op", ...
    threads: int


@dataclass(frozen=True)
class Registration:
    """Everything a job tells the daemon about itself."""

    declaration: Declaration
    # TensorFlow's runtime was already initialised when the job registered: its pools are
    # what `pools` says, not what the declaration asked for.
    tensorflow_initialized: bool = False
    pools: tuple[Pool, ...] = ()


def registration_from(message: Mapping[str, object]) -> Registration:
    declaration = message.get("declaration", {})
    if not isinstance(declaration, dict):
        raise DeclarationError("declaration: expected an object")
    unknown = sorted(set(declaration) - {f.name for f in fields(Declaration)})
    if unknown:
        raise DeclarationError(f"declaration: unknown field {unknown[0][:40]!r}")
    initialized = message.get("tensorflow_initialized", False)
    if not isinstance(initialized, bool):
        raise DeclarationError("tensorflow_initialized: expected true or false")
    pools = pools_from(message.get("pools", []))
    return Registration(declaration_from(declaration), initialized, pools)


def pools_from(raw_pools: object) -> tuple[Pool, ...]:
    """Validate the pools a job reports (in `register` or a later `report`).

    Raises:
        DeclarationError: naming the first entry that is not {"layer": str, "threads": int}.
    """
    if not isinstance(raw_pools, list) or len(raw_pools) > 64:
        raise DeclarationError("pools: expected a list of at most 64 objects")
    pools = []
    for index, pool in enumerate(raw_pools):
        if not isinstance(pool, dict) or set(pool) != {"layer", "threads"}:
            raise DeclarationError(f'pools[{index}]: expected {{"layer": str, "threads": int}}')
        layer, threads = pool["layer"], pool["threads"]
        if not isinstance(layer, str) or not 0 < len(layer) <= 64:
            raise DeclarationError(f"pools[{index}].layer: expected a short string")
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise DeclarationError(f"pools[{index}].threads: expected an integer")
        if not 0 <= threads <= MAX_DECLARED:
            raise DeclarationError(f"pools[{index}].threads: expected 0 to {MAX_DECLARED}")
        pools.append(Pool(layer, threads))
    return tuple(pools)
