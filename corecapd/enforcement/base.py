"""The shape every enforcement backend has (one module each, like threadpoolctl's controllers).

A backend confines a job, named by `Job.name` ("<pid>-<start ticks>", stable across daemon
restarts), to its cores. The daemon always runs the affinity backend first (the fast path:
pools size themselves from the mask) and then, when one is chosen, a fence the job cannot
undo itself (a cpuset).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from corecapd.procfs import ProcFS


class EnforcementError(Exception):
    """A job could not be confined; the message says why and what was allowed."""


@dataclass(frozen=True)
class Host:
    """What backends act on; paths are parameters so tests can point them elsewhere."""

    procfs: ProcFS
    online_cpus: frozenset[int]
    cgroup_root: Path = Path("/sys/fs/cgroup")
    cgroup: str = "corecap"  # the cgroup directory corecapd creates and owns


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, host: Host) -> None:
        self.host = host

    @abstractmethod
    def problem(self) -> str | None:
        """Why this backend cannot work on this host, or None when it can."""

    @abstractmethod
    def confine(self, job: str, pids: Sequence[int], cpus: frozenset[int]) -> int:
        """Confine the job's processes (all their threads) to `cpus`: create or update,
        idempotent, so it also takes in new members and repairs drift. Returns how many
        threads or processes had to be changed."""

    @abstractmethod
    def release(self, job: str, pids: Sequence[int]) -> None:
        """The job is over: let its live processes go, remove what `confine` made."""

    def tidy(self) -> None:  # noqa: B027 (optional: most backends leave nothing behind)
        """Remove what no job needs any more (a subtree left without job cgroups); called
        when the fence work has been idle for a moment, and at stop. Raises
        EnforcementError when something of ours cannot be removed."""

    def adopt(self) -> dict[str, frozenset[int]]:
        """Fences a previous daemon left behind (job name -> CPUs), to take over: their
        jobs keep these CPUs where the policy allows (`JobTable.adopt`). One a crash left
        half-made, or unreadable, is listed with no CPUs: `confine` completes it, or
        `release` removes it. Read-only."""
        return {}

    def describe(self) -> str:
        return self.name
