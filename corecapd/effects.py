"""The core's closed set of inputs and effects, and the read-only views it gives out.

h11's shape: the daemon turns what it reads (a scan, an exec, an exit, a request) into one
input, calls `JobTable.handle(input, now)`, and gets back an `Outcome`: the events that
happened, for every sink (journal, stderr), and the effects the edges carry out, in order
(set masks, fence, release, read libraries, gather evidence, save state). The core never
calls out and the daemon never reaches into the core's objects: what a query needs
(`status`, `explain`) is a `Snapshot` or a `JobView`, frozen copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corecapd.budget import Budget
from corecapd.declaration import Pool, Registration, Settings
from corecapd.diagnosis import Evidence, JobFacts
from corecapd.events import Event
from corecapd.model import Identity, KeptRegistration, Observed, ProcKey, Sample
from corecapd.policy import Policy
from corecapd.protocol import EpochReport

# -- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    """Processes as a scan read them now. `complete`: every process on the host (a full
    read of /proc); else only those the last `NextScan` named (the jobs' processes and
    those waiting on their libraries) and any process found in their place: the exec,
    fork and exit events said what else changed."""

    processes: Mapping[ProcKey, Observed]
    complete: bool = True


@dataclass(frozen=True)
class Exec:
    """A process just exec'd, as far as read before its stat file: who it is, and the PID
    of its nearest ancestor the core can place (`JobTable.ancestry_known`). The core pins
    it ahead (`Pin`) when that alone tells its CPUs; `ExecStat` follows and places it."""

    pid: int
    ancestor: int
    identity: Identity


@dataclass(frozen=True)
class ExecStat:
    """The exec'd process with its stat file read, and the ancestors between it and
    `Exec.ancestor` (nearest first: forked since the last scan, like the /bin/sh of
    `os.system`), which join its job with it."""

    process: Observed
    lineage: tuple[Sample, ...] = ()


@dataclass(frozen=True)
class Exit:
    """A process exited (its exit event; a leader thread that exited alone is no exit)."""

    pid: int


@dataclass(frozen=True)
class Register:
    """A process declares itself a job (over the socket; the caller, checked)."""

    process: Observed
    registration: Registration


@dataclass(frozen=True)
class Report:
    """A registered job's process reports the pools its library runs (read after that
    library applied its limits) and/or a Keras epoch's thread count."""

    process: Observed
    pools: tuple[Pool, ...] | None = None
    epoch: EpochReport | None = None


@dataclass(frozen=True)
class EvidenceRead:
    """What `GatherEvidence` asked for, read now."""

    job: str
    evidence: Evidence


@dataclass(frozen=True)
class ReplacePolicy:
    """A validated policy replaces the one in force; the next scan applies it."""

    policy: Policy


@dataclass(frozen=True)
class Adopt:
    """Before the first scan: what jobs held when a previous daemon stopped (job name ->
    CPUs), from the fences it left and from processes' masks."""

    fences: Mapping[str, frozenset[int]]
    masks: Mapping[str, frozenset[int]]


@dataclass(frozen=True)
class Restore:
    """Before the first scan: the registrations a previous daemon saved (job name ->)."""

    registrations: Mapping[str, KeptRegistration]


@dataclass(frozen=True)
class Escapes:
    """Threads each job moved out of its mask since the last report (set back already)."""

    threads: Mapping[str, int]


@dataclass(frozen=True)
class ConfineFailed:
    """Setting a job's masks failed (`Confine` or `Pin`)."""

    job: str
    error: str


@dataclass(frozen=True)
class Prepare:
    """Nothing waits: work out now what the next exec needs (`JobTable.foresee`)."""


Input = (
    Scan
    | Exec
    | ExecStat
    | Exit
    | Register
    | Report
    | EvidenceRead
    | ReplacePolicy
    | Adopt
    | Restore
    | Escapes
    | ConfineFailed
    | Prepare
)

# -- effects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """Set every thread of these processes to `cpus` now, ahead of their job's placement
    (the exec path: before the interpreter's first statement). Only `Exec` gives it, and
    the exec path carries it out itself (it must know whether the pin took)."""

    pids: tuple[int, ...]
    cpus: frozenset[int]


@dataclass(frozen=True)
class Confine:
    """Every thread of `pids` to the job's CPUs (its mask, kept in the books), then its
    fence (a cgroup cpuset, where a fence backend runs)."""

    job: str
    pids: tuple[int, ...]
    cpus: frozenset[int]


@dataclass(frozen=True)
class Release:
    """The job ended: let go of its fence, and set the masks of `pids` (still running)
    back to the whole host."""

    job: str
    pids: tuple[int, ...]


@dataclass(frozen=True)
class NextScan:
    """What the next scan reads: the libraries (/proc/PID/maps) of `libraries`; every
    process when `complete`, else what `JobTable.watched` names then (when exec and fork
    events tell the rest; the daemon also reads everything at its reconcile interval and
    after lost events)."""

    libraries: frozenset[ProcKey]
    complete: bool


@dataclass(frozen=True)
class GatherEvidence:
    """Read the job's threads, each attributed to its layer, its environment, mask and
    CPU quota now (`pids`: root first), and hand them back as `EvidenceRead`: a violation
    began (its event waits for its diagnosis), or the job reached a new high of threads
    above its cores (its layers are checked: `core.LAYER_CHECK_INTERVAL`)."""

    job: str
    pids: tuple[int, ...]


@dataclass(frozen=True)
class SaveState:
    """What registered jobs declared changed: keep it for a restarted daemon."""

    registrations: tuple[tuple[str, KeptRegistration], ...]


Effect = Pin | Confine | Release | NextScan | GatherEvidence | SaveState


@dataclass(frozen=True)
class Outcome:
    """What one input led to. `job`: the job a `Register` or `Report` concerned."""

    events: list[Event] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)
    job: JobView | None = None


# -- views --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One process of a job: what it runs ("tensorflow", "python", "other", or
    "registered" for a root that declared its pools), its threads at the last scan, and its
    share of the job's budget without slack (None when the rule's `max_threads` is it)."""

    pid: int
    kind: str
    threads: int
    budget: int | None


@dataclass(frozen=True)
class JobView:
    """A job as it is now, for queries (a copy: the core goes on without it)."""

    pid: int
    name: str
    user: str
    rule: str
    cpus: frozenset[int]
    threads: int
    budget: Budget
    cpu_percent: float
    violating: bool
    started_at: float
    tensorflow: bool
    members: tuple[Member, ...]  # root first
    notes: tuple[str, ...]
    settings: Settings | None  # its declaration resolved against its grant
    pools: tuple[Pool, ...]  # what its library reported it runs
    epochs: tuple[EpochReport, ...]
    parent: int | None = None  # a sub-job's enclosing job (its root's PID); None: top-level

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(member.pid for member in self.members)

    def diagnosis_facts(self) -> JobFacts:
        return JobFacts(
            cpus=len(self.cpus),
            threads=self.threads,
            budget=self.budget.threads,
            tensorflow=self.tensorflow,
            settings=self.settings,
            pools=self.pools,
        )


@dataclass
class ViolationRecord:
    """One violation: the core keeps it up to date while it lasts; a `Snapshot` holds
    copies."""

    pid: int
    rule: str
    threads: int  # the peak while it lasted
    budget: int
    started: float
    ended: float | None = None
    diagnosis: str = ""
    # How it ended: "resolved" (back within budget), "exited" (the job's last process
    # exited while over budget) or "released" (the job was let go while over budget: its
    # rule no longer matches, or it joined the job of an ancestor); None while it lasts.
    ended_by: str | None = None
    # "threads": the job's total over its budget; "layer": one layer wider than its grant
    # allows it (`layer`), the job's total over budget or not: `threads` is then the
    # layer's width and `budget` what it is allowed.
    kind: str = "threads"
    layer: str | None = None
    # The oversized layers found (`diagnosis.LayerFinding.as_dict()`), with their fixes.
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Snapshot:
    """The whole table, for `status` and `violations`."""

    online_cpus: frozenset[int]
    reserved_cpus: frozenset[int]
    eligible_cpus: frozenset[int]
    jobs: tuple[JobView, ...]  # oldest first
    violations: tuple[ViolationRecord, ...]  # oldest first
