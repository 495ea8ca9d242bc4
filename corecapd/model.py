"""The data the pure core works on: what was seen of each process, keyed by (pid, start)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from corecapd.declaration import Registration


class ProcKey(NamedTuple):
    """A process's identity: a PID alone is reused, a PID with its start time is not.

    A tuple, not a dataclass: it keys every table of the core, and a tuple hashes in C
    (a frozen dataclass calls a Python __hash__ at every lookup)."""

    pid: int
    start_ticks: int


@dataclass(frozen=True, slots=True)  # thousands of them: no __dict__ each
class Sample:
    """What one scan read of a process: one /proc/PID/stat read gives all of it."""

    key: ProcKey
    ppid: int
    threads: int
    cpu_seconds: float
    started_at: float  # seconds since the epoch
    kernel_thread: bool
    # Where the program's code and stack are mapped: exec maps a new program anew (ASLR),
    # so a change of mark with the same key means the process exec'd something else.
    exec_mark: int = 0


@dataclass(frozen=True, slots=True)  # thousands of them: no __dict__ each
class Identity:
    """Read once per process, on first sight (exec is the only thing that changes it)."""

    uid: int
    user: str
    groups: frozenset[str]
    exe: str  # /proc/PID/exe target; "" when unreadable
    cmdline: tuple[str, ...]
    # The CPUs its cpuset allows when that is an outer bound someone else set (Slurm,
    # Kubernetes, a container): grants stay inside it. None: the whole host.
    cpuset: frozenset[int] | None = None
    # The job (its name, Job.name) whose fence corecapd made the process is in: a child
    # inherits its parent's cgroup at fork, so this names its job even when the parent
    # exited before it could be read. None: in no fence of ours.
    fence: str | None = None


@dataclass(frozen=True, slots=True)  # thousands of them: no __dict__ each
class Observed:
    """One process as the core sees it in a scan."""

    sample: Sample
    identity: Identity
    libraries: frozenset[str] | None  # shared-object stems from maps; None = not read yet

    @property
    def key(self) -> ProcKey:
        return self.sample.key


@dataclass(frozen=True)
class KeptRegistration:
    """A registration as kept across daemon restarts: what the job declared, and the uid its
    process had when it registered. A restarted daemon applies it again only to the same
    process (PID and start time, the job's name) still running as that uid."""

    uid: int
    registration: Registration
