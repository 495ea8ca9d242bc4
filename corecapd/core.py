"""The decision core: inputs in, events and effects out. No clock, no I/O, no logging.

`JobTable.handle(input, now)` takes one of a closed set of inputs (`corecapd.effects`: a
scan, an exec, an exit, a registration, a report, evidence, a policy, ...) and returns the
events it implies (jobs started: rule matched, cores allocated, budget set; changed;
ended; violations begun or ended) and the effects the daemon's edges carry out (masks,
fences, releases, library reads, evidence to gather, state to save). Processes are keyed
by (pid, start time), so a reused PID is a new process. After a restart, `Adopt` (the
grants found on the host) and `Restore` (the registrations saved) come in before the
first scan, as data. Queries get frozen views (`snapshot`, `view`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corecapd.allocator import Grant, Holding, allocate, keep
from corecapd.budget import (
    OTHER,
    PYTHON,
    TENSORFLOW,
    Budget,
    declared_budget,
    job_budget,
    member_budget,
)
from corecapd.cpulist import format_cpulist
from corecapd.declaration import Pool, Registration, Settings, resolve
from corecapd.diagnosis import UNKNOWN, Diagnosis, Evidence, diagnose
from corecapd.effects import (
    Adopt,
    Confine,
    ConfineFailed,
    Effect,
    Escapes,
    EvidenceRead,
    Exec,
    ExecStat,
    Exit,
    GatherEvidence,
    Input,
    JobView,
    Member,
    NextScan,
    Outcome,
    Pin,
    Prepare,
    Register,
    Release,
    ReplacePolicy,
    Report,
    Restore,
    SaveState,
    Scan,
    Snapshot,
    ViolationRecord,
)
from corecapd.events import (
    EnforcementFailed,
    Event,
    JobChanged,
    JobEnded,
    JobEscaped,
    JobStarted,
    LayerOversized,
    StateProblem,
    ViolationEnded,
    ViolationEndedWithJob,
    ViolationStarted,
)
from corecapd.matching import (
    classify,
    classify_identity,
    exe_may_match,
    is_python,
    loads_library,
)
from corecapd.model import Identity, KeptRegistration, Observed, ProcKey, Sample
from corecapd.policy import Match, Policy, Rule
from corecapd.protocol import EpochReport
from corecapd.topology import Topology
from corecapd.violations import Transition, ViolationState

VIOLATION_HISTORY = 1000
EPOCHS_KEPT = 100  # per-epoch thread counts a job's Keras callback reported
# A job within budget has its layers checked (`GatherEvidence`) when its thread count
# reaches a new high above its cores, at most once in this many seconds: a TF job's
# attribution costs 7-11 ms of CPU (docs/diagnosis.md), so at most ~0.04% of a CPU per job,
# and the first check comes at the first scan after its grace.
LAYER_CHECK_INTERVAL = 30.0
FORESIGHTS = 16  # holdings whose foretold grants `foresee` keeps
# Libraries load late (TensorFlow ~2 s after exec; a notebook may import it after hours).
# /proc/PID/maps is re-read at doubling ages (0.1, 0.2, 0.4 ... s), so a process costs a
# handful of reads (~2 ms each for TensorFlow) over its life, never one per scan.
MIN_LIBRARY_REREAD = 0.1
# Registered jobs one non-root user may hold at once: a registration outlives its
# connection, and one user with 1,000 of them (a fork, register, exec sleep loop) took the
# daemon's scans to 60% of a core and its exec path past the first statement of new jobs.
MAX_REGISTERED_PER_USER = 64
EXE_VERDICTS = 4096  # distinct program names remembered by the exec path's pre-filter
_JOB_NAME = re.compile(r"([0-9]{1,10})-([0-9]{1,20})")


class Refused(ValueError):
    """A request the core will not carry out (a registration the policy does not allow, a
    report from a process in no job); the message says why. Nothing was changed."""


class RegistrationRefused(Refused):
    """A registration the policy does not allow; the message says why."""


@dataclass(frozen=True)
class LibraryRead:
    """When a process's libraries were last read, and what it looked like then."""

    next_due: float
    threads: int


@dataclass
class Job:
    """A matched process and every descendant, holding one set of cores."""

    id: ProcKey  # the matched (root) process
    user: str
    rule: Rule
    started_at: float
    members: set[ProcKey]
    cpus: frozenset[int] = frozenset()
    notes: tuple[str, ...] = ()
    # What each member runs, as its budget sees it (budget.TENSORFLOW, PYTHON or OTHER)
    kinds: dict[ProcKey, str] = field(default_factory=dict)
    member_threads: dict[ProcKey, int] = field(default_factory=dict)  # at the last scan
    budget: Budget = field(default_factory=lambda: Budget(0, "unset"))
    threads: int = 0
    cpu_percent: float = 0.0
    violation: ViolationState = field(default_factory=ViolationState)
    record: ViolationRecord | None = None
    cpu_seconds: dict[ProcKey, float] = field(default_factory=dict)
    sampled_at: float | None = None
    cpuset: frozenset[int] | None = None  # an outer bound set by someone else (Identity)
    registration: Registration | None = None  # what the job declared, if it registered
    settings: Settings | None = None  # its declaration resolved against its grant
    epochs: deque[EpochReport] = field(default_factory=lambda: deque(maxlen=EPOCHS_KEPT))
    uid: int = -1  # of the matched process (kept with its registration across restarts)
    parent: ProcKey | None = None  # a sub-job's enclosing job: its cpus are within that job's

    @property
    def pid(self) -> int:
        return self.id.pid

    @property
    def tensorflow(self) -> bool:
        """Whether TensorFlow was seen in any member's libraries."""
        return TENSORFLOW in self.kinds.values()

    @property
    def name(self) -> str:
        """Unique across PID reuse and daemon restarts: names the job's cgroup."""
        return f"{self.id.pid}-{self.id.start_ticks}"


class JobTable:
    def __init__(
        self,
        policy: Policy,
        online_cpus: frozenset[int],
        daemon_pid: int,
        enforcing: bool,
        topology: Topology | None = None,
    ) -> None:
        self.online_cpus = online_cpus
        self.topology = topology
        self.daemon_pid = daemon_pid
        self.enforcing = enforcing
        self.jobs: dict[ProcKey, Job] = {}
        self.violations: deque[ViolationRecord] = deque(maxlen=VIOLATION_HISTORY)
        self.libraries_wanted: frozenset[ProcKey] = frozenset()
        self._member_of: dict[ProcKey, ProcKey] = {}  # process -> its job's id
        self._member_pids: dict[int, ProcKey] = {}  # for the exec path, which has a ppid only
        # PID -> parent PID of the processes the last scan saw in no job (less those that
        # exited since): the exec path's ancestry walk reads /proc only up to one of these
        # or a job's process (`ancestry_known`), and follows these links in memory (one
        # of them may have become a job since: its descendants are then in that job).
        self._outside: dict[int, int] = {}
        self._exec_marks: dict[ProcKey, int] = {}  # of processes classified outside any job
        self._exe_verdicts: dict[str, bool] = {}
        self._restored: dict[ProcKey, KeptRegistration] = {}
        # What jobs held when the previous daemon stopped (adopt), until the next step
        # decides which of them are kept: those it keeps count as held until placed, and
        # those it does not say why in their job's notes.
        self._adopted: dict[ProcKey, frozenset[int]] = {}
        self._kept: dict[ProcKey, Holding] = {}
        self._not_kept: dict[ProcKey, str] = {}
        self._ignored: set[ProcKey] = set()
        self._waiting: set[ProcKey] = set()  # classification may change once libraries load
        # Members a sub-job rule may still take once their libraries are read (its `loads`)
        self._sub_waiting: set[ProcKey] = set()
        # A scan that read only what was watched could not see what matters now (a reload:
        # every process is classified afresh; a new job's earlier children): read all.
        self._complete_next = False
        self._library_reads: dict[ProcKey, LibraryRead] = {}
        self._recheck: set[ProcKey] = set()  # read libraries on the next scan, whatever is due
        self._reallocate = False
        # rule size -> the CPUs a new job of that size gets now (None: work it out again)
        self._foreseen: dict[int, frozenset[int]] | None = None
        self._foresights: dict[tuple[Holding, ...], dict[int, frozenset[int]]] = {}
        self.policy = policy
        self.eligible_cpus = eligible_cpus(policy, online_cpus)
        self._failed: set[str] = set()  # jobs whose failure to confine was reported
        # Violation onsets waiting for their evidence (`GatherEvidence`), by job name
        self._withheld: dict[str, ViolationStarted] = {}
        # Layer checks of jobs within budget: waiting for evidence; the thread count and
        # time of each job's last check; each job's open records of oversized layers.
        self._checking: set[str] = set()
        # Onsets whose evidence had threads of unknown layer: looked at again at the next
        # scan (pending), once per job (done)
        self._look_again: set[str] = set()
        self._looked_again: set[str] = set()
        self._checked: dict[str, tuple[int, float]] = {}
        self._layer_records: dict[str, dict[str, ViolationRecord]] = {}
        self._left_fences: frozenset[str] | None = None  # adopted, until the first scan
        self._saved: tuple[tuple[str, KeptRegistration], ...] = ()

    def handle(self, given: Input, now: float) -> Outcome:
        """One input in; the events it led to and the effects to carry out, in order.

        Raises:
            Refused: a `Register` or `Report` the core will not carry out (nothing changed).
        """
        match given:
            case Scan(processes, complete):
                return self._scanned(processes, now, complete)
            case Exec(pid, ancestor, identity):
                cpus = self.foreseen_cpus(pid, ancestor, identity) if self.enforcing else None
                return Outcome(effects=[] if cpus is None else [Pin((pid,), cpus)])
            case ExecStat(process, lineage):
                events, job = self.admit(process, now, lineage)
                effects: list[Effect] = []
                if job is not None and self.enforcing:
                    between = [s.key.pid for s in lineage if self._member_of.get(s.key) == job.id]
                    effects.append(Confine(job.name, (process.key.pid, *between), job.cpus))
                return self._outcome(events, effects)
            case Exit(pid):
                return self._outcome(self.exited(pid, now))
            case Register(process, registration):
                events, job = self.register(process, registration, now)
                scan_next = [self._next_scan()] if self._complete_next else []
                return self._outcome(events, [*self._confining(job), *scan_next], job)
            case Report(process, pools, epoch):
                return self._reported(process, pools, epoch)
            case EvidenceRead(job_name, evidence):
                return Outcome(events=self._diagnosed(job_name, evidence, now))
            case ReplacePolicy(policy):
                self.enforcing = policy.daemon.mode == "enforce"
                self.replace_policy(policy)
                return Outcome(effects=[self._next_scan()])
            case Adopt(fences, masks):
                self.adopt(fences, masks)
                self._left_fences = frozenset(fences)
                return Outcome()
            case Restore(registrations):
                self.restore(registrations)
                return Outcome()
            case Escapes(threads):
                return Outcome(
                    events=[
                        JobEscaped(**job_facts(job), escaped_threads=count)
                        for name, count in threads.items()
                        if (job := self._named(name)) is not None
                    ]
                )
            case ConfineFailed(job_name, error):
                found = self._named(job_name)
                if found is None or job_name in self._failed:
                    return Outcome()
                self._failed.add(job_name)
                return Outcome(events=[EnforcementFailed(**job_facts(found), error=error)])
            case Prepare():
                self.foresee()
                return Outcome()

    def _named(self, name: str) -> Job | None:
        """The job called `name` (`Job.name`), if it runs."""
        key = job_key(name)
        return None if key is None else self.jobs.get(key)

    def _scanned(
        self, processes: Mapping[ProcKey, Observed], now: float, complete: bool
    ) -> Outcome:
        events = self.step(processes, now, complete)
        effects: list[Effect] = []
        if self.enforcing:
            for job in self.jobs.values():
                effects += self._confining(job)
            if self._left_fences is not None:  # a previous daemon's, whose job is gone
                current = {job.name for job in self.jobs.values()} | self.kept_for_later()
                effects += [Release(name, ()) for name in sorted(self._left_fences - current)]
        self._left_fences = None
        outcome = self._outcome(events, effects)
        outcome.effects.extend(self._layer_checks_due(now))
        for name in sorted(self._look_again):
            if (again := self._named(name)) is not None:
                outcome.effects.append(GatherEvidence(name, self.view(again).pids))
        self._look_again.clear()
        outcome.effects.append(self._next_scan())
        return outcome

    def _next_scan(self) -> NextScan:
        """What the next scan must read (`effects.NextScan`)."""
        return NextScan(self.libraries_wanted, self._complete_next)

    def watched(self) -> frozenset[ProcKey]:
        """What a partial scan reads now: the jobs' processes, those waiting on their
        libraries, and those whose libraries are due. O(those), no side effects."""
        return frozenset(self._member_of) | self._waiting | self.libraries_wanted

    def _outcome(
        self, events: list[Event], effects: Sequence[Effect] = (), job: Job | None = None
    ) -> Outcome:
        """The events and effects of one input: releases first (for the jobs that ended),
        then `effects`, then evidence for violations that began (their events wait for
        it), then the state to save if registrations changed."""
        if not events and not effects and job is None:
            return Outcome()  # most exits and execs: none of the jobs changed
        released: list[Effect] = []
        gathered: list[Effect] = []
        reported: list[Event] = []
        for event in events:
            if isinstance(event, JobEnded):
                self._failed.discard(event.job)
                self._withheld.pop(event.job, None)
                self._checking.discard(event.job)
                self._checked.pop(event.job, None)
                self._look_again.discard(event.job)
                self._looked_again.discard(event.job)
                if self.enforcing:
                    released.append(Release(event.job, event.live_pids))
            if isinstance(event, ViolationStarted) and (onset := self.job_of(event.pid)):
                self._withheld[onset.name] = event
                gathered.append(GatherEvidence(onset.name, self.view(onset).pids))
                continue
            reported.append(event)
        registrations = tuple(self.registrations())
        saved: list[Effect] = []
        if registrations != self._saved:
            self._saved = registrations
            saved.append(SaveState(registrations))
        return Outcome(
            reported,
            [*released, *effects, *gathered, *saved],
            None if job is None else self.view(job),
        )

    def _confining(self, job: Job) -> list[Effect]:
        if not self.enforcing:
            return []
        return [Confine(job.name, tuple(sorted(key.pid for key in job.members)), job.cpus)]

    def _reported(
        self,
        process: Observed,
        pools: tuple[Pool, ...] | None,
        epoch: EpochReport | None,
    ) -> Outcome:
        pid = process.key.pid
        job = self.job_of(pid)
        if job is None:
            raise Refused(f"PID {pid} is in no job: register first")
        if pools is not None:
            if job.registration is None or job.id != process.key:
                raise Refused(
                    f"PID {pid} did not register: only the process that registered reports"
                    " its pools"
                )
            # read after its library applied its limits: they replace what it registered
            job.registration = dataclasses.replace(job.registration, pools=pools)
        if epoch is not None:
            job.epochs.append(epoch)
        return self._outcome([], job=job)

    def _diagnosed(self, job_name: str, evidence: Evidence, now: float) -> list[Event]:
        """What `GatherEvidence` read: a violation's onset, now with its diagnosis, and
        the job's oversized layers (at the onset, or at a check within budget)."""
        onset = self._withheld.pop(job_name, None)
        checking = job_name in self._checking
        self._checking.discard(job_name)
        job = self._named(job_name)
        if job is None:
            return [] if onset is None else [onset]
        if onset is None and not checking:
            return []
        if (
            onset is not None
            and job_name not in self._looked_again
            and any(thread.layer == UNKNOWN for thread in evidence.threads)
        ):
            # A thread that has just started may not show its pool's name yet (c13: one
            # run in 5): the onset waits one scan for a second look, once per job.
            self._withheld[job_name] = onset
            self._look_again.add(job_name)
            self._looked_again.add(job_name)
            return []
        diagnosis = diagnose(self.view(job).diagnosis_facts(), evidence)
        events: list[Event] = []
        if onset is not None:
            summary = diagnosis.summary()
            if job.record is not None:
                job.record.diagnosis = summary
                job.record.layers = [finding.as_dict() for finding in diagnosis.oversized]
            events.append(dataclasses.replace(onset, diagnosis=summary))
        return events + self._layers_found(job, diagnosis, now)

    def _layers_found(self, job: Job, diagnosis: Diagnosis, now: float) -> list[Event]:
        """A record and an event for each layer newly oversized, or wider than when it
        was reported; the records of layers now within their allowance end."""
        records = self._layer_records.setdefault(job.name, {})
        events: list[Event] = []
        oversized = {finding.layer: finding for finding in diagnosis.oversized}
        for layer, finding in oversized.items():
            assert finding.expected is not None  # an oversized layer is a checked one
            record = records.get(layer)
            if record is not None and finding.threads <= record.threads:
                continue
            if record is None:
                record = records[layer] = ViolationRecord(
                    job.pid, job.rule.name, 0, finding.expected, now, kind="layer", layer=layer
                )
                self.violations.append(record)
            record.threads, record.budget = finding.threads, finding.expected
            record.diagnosis, record.layers = finding.hint(), [finding.as_dict()]
            events.append(
                LayerOversized(
                    **job_facts(job),
                    layer=layer,
                    name=finding.name,
                    layer_threads=finding.threads,
                    processes=finding.processes,
                    expected=finding.expected,
                    fix=finding.fix,
                    evidence=finding.evidence,
                )
            )
        for layer in records.keys() - oversized.keys():
            ended = records.pop(layer)
            ended.ended, ended.ended_by = now, "resolved"
        return events

    def _layer_checks_due(self, now: float) -> list[Effect]:
        """Evidence for each job within budget whose thread count reached a new high above
        its cores, at most once per LAYER_CHECK_INTERVAL per job. O(jobs), no copies."""
        due: list[Effect] = []
        for job in self.jobs.values():
            name = job.name
            if (
                job.violation.active
                or job.threads > job.budget.threads  # an onset, if it comes, gathers
                or name in self._checking
                or name in self._withheld
                or self._in_grace(job, now)
            ):
                continue
            high, when = self._checked.get(name, (len(job.cpus), -LAYER_CHECK_INTERVAL))
            if job.threads > high and now - when >= LAYER_CHECK_INTERVAL:
                self._checked[name] = (job.threads, now)
                self._checking.add(name)
                due.append(GatherEvidence(name, self.view(job).pids))
        return due

    def snapshot(self) -> Snapshot:
        """The whole table now, as frozen copies (oldest job first)."""
        return Snapshot(
            online_cpus=self.online_cpus,
            reserved_cpus=self.policy.daemon.reserved_cpus & self.online_cpus,
            eligible_cpus=self.eligible_cpus,
            jobs=tuple(
                self.view(job) for job in sorted(self.jobs.values(), key=lambda j: j.started_at)
            ),
            violations=tuple(dataclasses.replace(record) for record in self.violations),
        )

    def counts(self) -> tuple[int, int]:
        """Jobs, and jobs over budget now: O(jobs), no copies."""
        return len(self.jobs), sum(1 for job in self.jobs.values() if job.violation.active)

    def view(self, job: Job) -> JobView:
        """`job` as it is now (a copy)."""
        return JobView(
            pid=job.pid,
            name=job.name,
            user=job.user,
            rule=job.rule.name,
            cpus=job.cpus,
            threads=job.threads,
            budget=job.budget,
            cpu_percent=job.cpu_percent,
            violating=job.violation.active,
            started_at=job.started_at,
            tensorflow=job.tensorflow,
            members=_members(job),
            notes=job.notes,
            settings=job.settings,
            pools=job.registration.pools if job.registration else (),
            epochs=tuple(job.epochs),
            parent=None if job.parent is None else job.parent.pid,
        )

    def view_of(self, pid: int) -> JobView | None:
        """The job `pid` is a process of, now; None when it is in none."""
        job = self.job_of(pid)
        return None if job is None else self.view(job)

    def replace_policy(self, policy: Policy) -> None:
        """Adopt a validated policy: every process is classified afresh on the next step."""
        self.policy = policy
        self.eligible_cpus = eligible_cpus(policy, online_cpus=self.online_cpus)
        self._foreseen = None
        self._foresights.clear()
        self._exe_verdicts.clear()
        self._ignored.clear()
        self._reallocate = True
        self._complete_next = True

    def step(
        self, processes: Mapping[ProcKey, Observed], now: float, complete: bool = True
    ) -> list[Event]:
        """One scan (`effects.Scan`). A partial one (not `complete`) holds the processes
        the last `NextScan` watched: everything here costs as much as they do, not as the
        host's processes; what it cannot see (processes in no job, forgotten when they
        exit; children of a process that only now became a job) waits for the next
        complete scan, which it asks for (`NextScan.complete`) when that matters."""
        events: list[Event] = []
        alive = processes.keys()
        if complete:
            self._complete_next = False
            self._forget_gone_restart_data(alive)
            self._ignored &= alive
        if self._adopted:
            self._plan_adoption(processes)
        self._waiting &= alive
        self._forget_execd(processes, complete)
        fresh_libraries = self._note_library_reads(processes, now)
        # youngest first: a sub-job ends before the job enclosing it is judged empty
        for job in sorted(self.jobs.values(), key=lambda j: j.started_at, reverse=True):
            if job.id not in self.jobs:
                continue  # ended with its last sub-job
            for key in job.members - alive:
                self._drop(job, key)
            if not job.members and not self._encloses_any(job):
                events += self._end(job, now, "exited", live_pids=())

        if self._reallocate:
            events += self._reclassify_jobs(processes, now)

        events += self._enclose(processes, now)
        waiting = set(self._waiting)
        new = [
            key
            for key in processes
            if key not in self._ignored and key not in waiting and key not in self._member_of
        ]
        jobs_before = len(self.jobs)
        for key in sorted(new, key=_by_age):
            events += self._place_new(processes[key], now)
        if len(self.jobs) > jobs_before:  # new jobs: processes seen before may be below them
            events += self._enclose(processes, now)
        if self._kept or self._not_kept:  # placed, joined a job or none; some still waiting
            self._kept = {key: kept for key, kept in self._kept.items() if key in self._waiting}
            self._not_kept = {k: why for k, why in self._not_kept.items() if k in self._waiting}

        jobs_before = len(self.jobs)
        for key in waiting & self._waiting & fresh_libraries:
            events += self._classify(processes[key], now)
        if len(self.jobs) > jobs_before and not complete:
            self._complete_next = True  # they may have children this scan did not read
        self._sub_waiting &= self._member_of.keys()
        for key in sorted(self._sub_waiting & fresh_libraries, key=_by_age):
            job = self.jobs[self._member_of[key]]
            rule = self._sub_rule(processes[key], job)
            if rule is not None:
                events += self._split(job, processes[key], rule, processes)

        for job in self.jobs.values():
            events += self._sample(job, processes, fresh_libraries, now)

        self.libraries_wanted = self._libraries_due(processes, now)
        if complete:
            self._outside = {
                key.pid: seen.sample.ppid
                for key, seen in processes.items()
                if key not in self._member_of
            }
        return events

    def admit(
        self, process: Observed, now: float, lineage: Sequence[Sample] = ()
    ) -> tuple[list[Event], Job | None]:
        """The exec fast path: decide for one process that just exec'd, before any scan.

        Only what exec sets is read (exe, cmdline, users; libraries load later), so the
        job can be confined before the interpreter runs its first statement. `lineage`:
        its ancestors the table did not know (`ancestry_known`), nearest first, as the
        exec path read them: when the last one's parent is in a job, all of them join it
        with the process (the /bin/sh of `os.system` between a job and its Python)."""
        key = process.key
        if key in self._member_of:  # a job's process runs a new program
            job = self.jobs[self._member_of[key]]
            rule = None if key == job.id else self._sub_rule(process, job)
            if rule is None:
                return [], job
            events = self._split(job, process, rule, {key: process})
            return events, self.jobs[key]
        self._ignored.discard(key)
        self._waiting.discard(key)
        events = self._place_new(process, now, lineage)
        job_id = self._member_of.get(key)
        return events, self.jobs[job_id] if job_id is not None else None

    def ancestry_known(self, pid: int) -> bool:
        """Whether the table can tell, from `pid` alone, which job (if any) a child of
        `pid` belongs to: `pid` is a job's process, or the last scan saw it outside every
        job, or it is no user process (0, init). Else the exec path reads its parent and
        asks again. O(1), no side effects."""
        return pid in self._member_pids or pid in self._outside or pid <= 1

    def foresee(self) -> None:
        """Work out, while nothing waits, what a new job of each rule's size would get now,
        so that the exec path can confine before it places the job (`foreseen_cpus`)."""
        if self._foreseen is not None:
            return
        holdings = self._holdings(None)
        # A run of short jobs swings between the same few holdings: what each foretold is
        # kept (FORESIGHTS of them at most, until the policy changes).
        kept = self._foresights.get(key := tuple(holdings))
        if kept is not None:
            self._foreseen = kept
            return
        self._foreseen = {}
        for size in {rule.cpus for rule in self.policy.rules}:
            try:
                grant = allocate(size, "", self.eligible_cpus, holdings, None, self.topology)
            except ValueError:
                continue
            if not grant.shared:  # which shared cores depends on whose job it is
                self._foreseen[size] = grant.cpus
        if len(self._foresights) >= FORESIGHTS:
            self._foresights.clear()
        self._foresights[key] = self._foreseen

    def foreseen_cpus(self, pid: int, ppid: int, identity: Identity) -> frozenset[int] | None:
        """The CPUs `admit` will give a process that just exec'd, when known without placing
        it (None: only `admit` can tell, or no job). By PID, not key: the exec path asks
        before it reads the start time, and a PID's exit event comes before its reuse. No
        side effects: `admit` follows and decides."""
        member = self._member_pids.get(pid) or self._enclosing(ppid)
        if member is not None:  # a member that exec'd again, or a descendant of a job
            return self.jobs[self._member_of[member]].cpus
        if (fenced := self._fenced(identity)) is not None:
            return fenced.cpus  # its parent gone, its cgroup still says whose it is
        if self._foreseen is None or identity.cpuset is not None or pid == self.daemon_pid:
            return None
        if any(key.pid == pid for key in self._restored):
            return None  # placed as its registration asks
        if any(key.pid == pid for key in self._kept):
            return None  # it keeps what it held before a restart
        if identity.user in self.policy.users:
            return None  # capped: which cores depends on what the user holds
        rule = classify_identity(identity, None, self.policy.rules).rule
        return None if rule is None else self._foreseen.get(rule.cpus)

    def register(
        self, process: Observed, registration: Registration, now: float
    ) -> tuple[list[Event], Job]:
        """A process declares itself (over the socket): it becomes a job of its own, or
        updates its job, and its grant and budget follow what it declared.

        Raises:
            RegistrationRefused: a non-root user already holds MAX_REGISTERED_PER_USER
                registered jobs (nothing is changed).
        """
        key = process.key
        existing = self.jobs.get(key)
        uid = process.identity.uid
        if uid != 0 and (existing is None or existing.registration is None):
            held = sum(1 for job in self.jobs.values() if job.registration and job.uid == uid)
            if held >= MAX_REGISTERED_PER_USER:
                raise RegistrationRefused(
                    f"user {process.identity.user} has {held} registered jobs running, the"
                    " most one user may; the process runs on as its rules say"
                )
        owner = self._member_of.get(key)
        enclosing: ProcKey | None = None
        if owner is not None and owner != key:  # a process of a job registering for itself
            enclosing = owner
            self._drop(self.jobs[owner], key)
        elif owner is None and (found := self._enclosing(process.sample.ppid)) is not None:
            enclosing = self._member_of[found]  # below a job, not read as its member yet
        self._ignored.discard(key)
        self._waiting.discard(key)
        self._sub_waiting.discard(key)
        job = self.jobs.get(key)
        kind: type[JobStarted] = JobChanged
        if job is None:
            job = self._new_job(process, self._match(process) or self._registered_rule())
            job.parent = enclosing  # its cores come out of that job's grant
            kind = JobStarted
            self._complete_next = True  # it may have started processes before it registered
        job.registration = registration
        return self._place_tree(job, kind), job

    def restore(self, registrations: Mapping[str, KeptRegistration]) -> None:
        """Registrations a previous daemon saved (job name -> registration): each is applied
        again when its process (same PID and start time, so never a reused PID) is next
        classified, and only if that process still runs as the uid that registered; else it
        is dropped, and a `StateProblem` says so. Root may register, so a root process
        that did comes back as a job; an entry can enrol no other process."""
        self._restored = {
            key: kept for name, kept in registrations.items() if (key := job_key(name)) is not None
        }

    def registrations(self) -> list[tuple[str, KeptRegistration]]:
        return [
            (job.name, KeptRegistration(job.uid, job.registration))
            for job in self.jobs.values()
            if job.registration
        ]

    def adopt(
        self,
        fences: Mapping[str, frozenset[int]],
        masks: Mapping[str, frozenset[int]] | None = None,
    ) -> None:
        """What jobs held when a previous daemon stopped (job name -> CPUs), found on the
        host before the first step: the fences it left, and processes' current masks (with
        the affinity backend they are all it left; a fence counts over a mask). A process
        that becomes a job keeps those CPUs when they are still a grant the policy allows
        (`allocator.keep`: within the eligible CPUs and its cpuset, of the size its rule
        grants, within its user's cap); else it is placed afresh and its notes say why.
        Cores adopted grants share were shared before the restart, and stay so; new jobs
        get the free cores. The next step decides for all of them at once
        (`_plan_adoption`)."""
        self._adopted = {
            key: cpus
            for grants in (masks or {}, fences)
            for name, cpus in grants.items()
            if cpus and (key := job_key(name)) is not None
        }
        self._kept, self._not_kept = {}, {}

    def kept_for_later(self) -> frozenset[str]:
        """Names of processes that keep an adopted grant once a rule takes them (waiting
        for their libraries to be read): their fences are not let go meanwhile."""
        return frozenset(f"{key.pid}-{key.start_ticks}" for key in self._kept)

    def knows(self, pid: int) -> bool:
        """Whether the exit of `pid` changes anything here: it is a job's process, or the
        last complete scan saw it outside every job. O(1), no side effects."""
        return pid in self._member_pids or pid in self._outside

    def is_member(self, pid: int) -> bool:
        """Whether `pid` is a process of a job now. O(1), no side effects."""
        return pid in self._member_pids

    def job_of(self, pid: int) -> Job | None:
        key = self._member_pids.get(pid)
        return None if key is None else self.jobs[self._member_of[key]]

    def _registered_rule(self) -> Rule:
        """The rule of a job that registered but matches no rule: the policy's defaults."""
        return Rule("registered", Match(), self.policy.defaults.cpus)

    def may_match_exe(self, exe_name: str) -> bool:
        """Whether a process running `exe_name` could become a job (cached per name)."""
        found = self._exe_verdicts.get(exe_name)
        if found is None:
            if len(self._exe_verdicts) > EXE_VERDICTS:
                self._exe_verdicts.clear()
            found = self._exe_verdicts[exe_name] = exe_may_match(self.policy.rules, exe_name)
        return found

    def exited(self, pid: int, now: float) -> list[Event]:
        """A process-exit event: drop the process from its job, and end the job when it
        was the last one, without waiting for (or paying for) a full scan."""
        self._outside.pop(pid, None)  # its PID may come back as a job's descendant
        key = self._member_pids.get(pid)
        if key is None:
            return []
        job = self.jobs[self._member_of[key]]
        self._drop(job, key)
        if job.members or self._encloses_any(job):
            return []
        return self._end(job, now, "exited", live_pids=())

    def _place_new(
        self, process: Observed, now: float, lineage: Sequence[Sample] = ()
    ) -> list[Event]:
        """A descendant of a job's process joins that job, with the processes between
        (`lineage`, nearest first), or becomes its sub-job (`_take_in`); anything else is
        classified."""
        top = lineage[-1].ppid if lineage else process.sample.ppid
        parent = self._enclosing(top)
        if parent is not None and process.key not in self._restored:
            job = self.jobs[self._member_of[parent]]
            for between in reversed(lineage):
                if between.key not in self._member_of:
                    self._ignored.discard(between.key)
                    self._waiting.discard(between.key)
                    self._join(job, between.key, OTHER)  # its exe unread: the next scan's
            return self._take_in(job, process)
        fenced = self._fenced(process.identity)
        if fenced is not None and process.key not in self._restored:
            return self._take_in(fenced, process)
        return self._classify(process, now)  # below a job with a saved registration: register

    def _take_in(self, job: Job, process: Observed) -> list[Event]:
        """`process`, below a process of `job`, joins `job`, or becomes a sub-job of it
        when a sub-job rule takes it (`_sub_rule`)."""
        rule = self._sub_rule(process, job)
        if rule is None:
            self._join(job, process.key, _kind(process))
            return []
        return self._split(job, process, rule, {process.key: process})

    def _sub_rule(self, process: Observed, job: Job) -> Rule | None:
        """The sub-job rule that takes `process` (below a process of `job`) out of `job`:
        the first rule that matches it, when that rule is a sub-job rule other than `job`'s
        own (a trial's processes stay in the trial: its forked workers match as it does).
        While a `loads` ahead may still change the answer, it is asked again when the
        process's libraries are read. Matching costs what classifying costs: only without
        sub-job rules is it skipped."""
        if not any(rule.sub_job for rule in self.policy.rules):
            return None
        found = classify(process, self.policy.rules, self.daemon_pid)
        if found.waiting_on_libraries:
            self._sub_waiting.add(process.key)
        else:
            self._sub_waiting.discard(process.key)
        rule = found.rule
        if rule is None or not rule.sub_job or rule == job.rule:
            return None
        self._sub_waiting.discard(process.key)
        return rule

    def _split(
        self,
        job: Job,
        process: Observed,
        rule: Rule,
        processes: Mapping[ProcKey, Observed],
    ) -> list[Event]:
        """`process` (a new process below `job`, or a member of it) becomes a sub-job of
        `job` under `rule`, with the members of `job` below it (by `processes`' parent
        links), its cores carved out of `job`'s grant."""
        below: list[ProcKey] = []
        if process.key in job.members:
            self._drop(job, process.key)
            children: dict[int, list[ProcKey]] = {}
            for key in job.members:
                if key in processes and key != job.id:
                    children.setdefault(processes[key].sample.ppid, []).append(key)
            todo = [process.key.pid]
            while todo:
                for key in children.pop(todo.pop(), ()):
                    below.append(key)
                    todo.append(key.pid)
        sub = self._new_job(process, rule)
        sub.parent = job.id
        for key in below:
            self._move(key, job, sub)
        return [self._place(sub, JobStarted)]

    def _encloses_any(self, job: Job) -> bool:
        """Whether `job` has a sub-job. O(jobs): asked only of a job without members."""
        return any(other.parent == job.id for other in self.jobs.values())

    def _sub_jobs(self, job: Job) -> list[Job]:
        """The sub-jobs `job` encloses directly, oldest first."""
        return sorted(
            (other for other in self.jobs.values() if other.parent == job.id),
            key=lambda other: other.started_at,
        )

    def _enclosing(self, pid: int) -> ProcKey | None:
        """The job's process that `pid` is, or descends from as the last scan's parent
        links (`_outside`) show; None when none is. Memory only: a few dict lookups."""
        for _ in range(len(self._outside) + 1):  # one scan's links: a tree, read non-atomically
            member = self._member_pids.get(pid)
            if member is not None:
                return member
            parent = self._outside.get(pid)
            if parent is None:
                return None
            pid = parent
        return None

    def _fenced(self, identity: Identity) -> Job | None:
        """The job whose fence the process is in (inherited at fork), if it still runs:
        the ancestry of a process whose parent exited before anyone read it (`sh -c
        "python train.py &"`). Only a fence backend leaves this trace."""
        key = None if identity.fence is None else job_key(identity.fence)
        return None if key is None else self.jobs.get(key)

    def _enclose(self, processes: Mapping[ProcKey, Observed], now: float) -> list[Event]:
        """Membership by ancestry, as this scan's parent links show it. A process in no
        job whose parent is in one joins that job, however many processes lie between
        (a shell the exec path let pass, one first seen before its parent joined): nothing
        is left out for good once its ancestry says otherwise. A job whose root turns out
        to have its parent in another job is taken into that job. Jobs that registered,
        and processes with a saved registration, stay jobs of their own. Members stay
        members when their parent exits (reparented to init or a subreaper)."""
        events: list[Event] = []
        children: dict[int, list[ProcKey]] = {}
        for key, seen in processes.items():
            if key not in self._member_of and key not in self._restored:
                children.setdefault(seen.sample.ppid, []).append(key)
        self._follow_parents(processes)
        todo = [pid for pid in self._member_pids if pid in children]
        while todo:
            pid = todo.pop()
            job = self.jobs[self._member_of[self._member_pids[pid]]]
            for key in children.pop(pid, ()):
                self._ignored.discard(key)
                self._waiting.discard(key)
                events += self._take_in(job, processes[key])
                todo.append(key.pid)
        for kids in children.values():  # what is left, in no job: fenced by one of ours?
            for key in kids:
                fenced = self._fenced(processes[key].identity)
                if fenced is not None:
                    self._ignored.discard(key)
                    self._waiting.discard(key)
                    events += self._take_in(fenced, processes[key])
        for job in sorted(self.jobs.values(), key=lambda j: j.started_at):
            root = processes.get(job.id)
            if root is None or job.id not in self.jobs:
                continue
            parent = self._member_pids.get(root.sample.ppid)
            into = None if parent is None else self.jobs[self._member_of[parent]]
            if into is None or into is job or job.parent == into.id or self._within(into, job):
                continue
            if job.registration is not None or (job.rule.sub_job and job.rule != into.rule):
                job.parent = into.id  # registered, or a sub-job rule's: a sub-job of `into`
                events += self._place_tree(job, JobChanged)
            else:
                events += self._absorb(job, into, now)
        return events

    def _follow_parents(self, processes: Mapping[ProcKey, Observed]) -> None:
        """A member whose parent is in a sub-job of the member's job moves into that
        sub-job: it was a member before its parent became a sub-job (registered, or a
        sub-job rule took it). Only while there are sub-jobs: O(members)."""
        if all(job.parent is None for job in self.jobs.values()):
            return
        for job in sorted(self.jobs.values(), key=lambda j: j.started_at):
            for key in sorted(job.members - {job.id}, key=_by_age):  # parents first
                seen = processes.get(key)
                parent = None if seen is None else self._member_pids.get(seen.sample.ppid)
                into = None if parent is None else self.jobs[self._member_of[parent]]
                if into is not None and into is not job and self._within(into, job):
                    self._move(key, job, into)

    def _within(self, job: Job, outer: Job) -> bool:
        """Whether `job` is `outer` or one of its sub-jobs, at any depth."""
        seen: Job | None = job
        while seen is not None:
            if seen is outer:
                return True
            seen = None if seen.parent is None else self.jobs.get(seen.parent)
        return False

    def _absorb(self, job: Job, into: Job, now: float, reason: str = "") -> list[Event]:
        """Every member of `job` joins `into`, and `job` ends: `job`'s root is a
        descendant of `into`'s process (it became a job before its ancestor did), or a
        sub-job of `into` that no rule makes a sub-job any more. Its sub-jobs become
        `into`'s, placed within `into`'s grant."""
        self._foreseen = None
        for key in job.members:
            self._member_of[key] = into.id
            into.members.add(key)
            into.kinds[key] = job.kinds.get(key, OTHER)
        del self.jobs[job.id]
        self._waiting.discard(job.id)
        reason = reason or f"its process descends from job {into.pid}'s: joined that job"
        events: list[Event] = []
        if job.record is not None:
            events.append(self._close_with_job(job, now, reason))
        events.append(JobEnded(**job_facts(job), job=job.name, reason=reason, live_pids=()))
        for sub in self._sub_jobs(job):
            sub.parent = into.id
            events += self._place_tree(sub, JobChanged)
        return events

    def _forget_gone_restart_data(self, alive: Iterable[ProcKey]) -> None:
        """Saved registrations and adopted grants of processes that are gone never apply."""
        if self._restored:
            self._restored = {k: r for k, r in self._restored.items() if k in alive}
        if self._adopted:
            self._adopted = {k: a for k, a in self._adopted.items() if k in alive}
        if self._kept:
            self._kept = {k: kept for k, kept in self._kept.items() if k in alive}

    def _plan_adoption(self, processes: Mapping[ProcKey, Observed]) -> None:
        """Which adopted grants their jobs keep, decided for all of them before any job is
        placed: oldest first, each against those kept before it, by `allocator.keep`. One
        that cannot be kept then never makes another move, and new jobs (placed in the same
        step) see every kept grant as held, so they get the free cores."""
        adopted, self._adopted = self._adopted, {}
        holdings = self._holdings(None)
        kept_cores: set[int] = set()  # of the grants kept: shared before, if shared
        in_jobs = set(self._member_pids)
        for key in sorted(adopted, key=_by_age):
            process, held = processes[key], adopted[key]
            restored = self._restored.get(key)
            registration = None
            if restored is not None and restored.uid == process.identity.uid:
                registration = restored.registration
            if process.sample.ppid in in_jobs:
                in_jobs.add(key.pid)
                continue  # it will join its parent's job, or be placed afresh as its sub-job
            rule = self._rule_at_restart(process)
            if rule is None and registration is not None:
                rule = self._registered_rule()
            if rule is None:
                continue
            in_jobs.add(key.pid)
            limits = self.policy.users.get(process.identity.user)
            kept = keep(
                held,
                self._requested(rule, registration)[0],
                process.identity.user,
                self.eligible_cpus,
                holdings,
                limits.max_cpus if limits else None,
                topology=self.topology,
                allowed=process.identity.cpuset,
                shared_before=held & kept_cores,
            )
            if isinstance(kept, str):
                self._not_kept[key] = _placed_afresh(held, kept)
                continue
            self._kept[key] = Holding(process.identity.user, held)
            holdings.append(self._kept[key])
            kept_cores |= held

    def _rule_at_restart(self, process: Observed) -> Rule | None:
        """The rule of a process a previous daemon may have left in a job, as far as can
        be told before its libraries are read: a rule's `loads` counts as met."""
        if process.sample.kernel_thread or process.key.pid == self.daemon_pid:
            return None
        loaded = frozenset(name for rule in self.policy.rules for name in rule.match.loads)
        libraries = loaded | (process.libraries or frozenset())
        return classify_identity(process.identity, libraries, self.policy.rules).rule

    def _forget_execd(self, processes: Mapping[ProcKey, Observed], complete: bool) -> None:
        """Processes that exec'd since they were classified are classified again."""
        for key in list(self._exec_marks if complete else processes):
            if key not in self._exec_marks:
                continue
            observed = processes.get(key)
            if observed is None:
                del self._exec_marks[key]
            elif observed.sample.exec_mark != self._exec_marks[key] and key not in self._member_of:
                del self._exec_marks[key]
                self._ignored.discard(key)
                self._waiting.discard(key)

    # -- libraries, read from maps on a schedule -----------------------------------------

    def _note_library_reads(
        self, processes: Mapping[ProcKey, Observed], now: float
    ) -> frozenset[ProcKey]:
        """Record the reads the scanner made for the keys we asked for last time."""
        fresh = self.libraries_wanted & processes.keys()
        for key in fresh:
            sample = processes[key].sample
            age = now - sample.started_at
            self._library_reads[key] = LibraryRead(
                next_due=now + max(age, MIN_LIBRARY_REREAD), threads=sample.threads
            )
        for key in self._library_reads.keys() - processes.keys():
            del self._library_reads[key]
        self._recheck &= processes.keys()
        self._recheck -= fresh
        return fresh

    def _libraries_due(
        self, processes: Mapping[ProcKey, Observed], now: float
    ) -> frozenset[ProcKey]:
        """Processes whose libraries still matter (a `loads` rule may match, or a member of
        a job may load TensorFlow: every member counts, not only the root) and are due for
        a read. Each on its own doubling schedule: a member costs a handful of reads."""
        relevant = self._waiting | {
            key
            for job in self.jobs.values()
            for key, kind in job.kinds.items()
            if kind != TENSORFLOW and key in processes
        }
        return frozenset(
            key
            for key in relevant
            if key in self._recheck
            or key not in self._library_reads
            or now >= self._library_reads[key].next_due
        )

    # -- classification and allocation ---------------------------------------------------

    def _classify(self, process: Observed, now: float) -> list[Event]:
        key = process.key
        events: list[Event] = []
        restored = self._restored.pop(key, None)
        if restored is not None:
            if restored.uid == process.identity.uid:
                return self.register(process, restored.registration, now)[0]
            events.append(
                StateProblem(
                    error=f"the saved registration of job {key.pid}-{key.start_ticks} was made"
                    f" by uid {restored.uid}; its process runs as uid {process.identity.uid}:"
                    " not applied"
                )
            )
        job = self.jobs.get(key)
        found = self._rule_for(process, job)
        if found is None:
            if job is not None:
                return self._end(job, now, "no rule matches any more", tuple(self._pids(job)))
            if key not in self._waiting:
                self._ignored.add(key)
            return events
        if job is None:
            job = self._new_job(process, found)
            return [*events, self._place(job, JobStarted)]
        self._note_libraries(job, process)
        if found != job.rule:
            job.rule = found
            return self._place_tree(job, JobChanged)
        return []

    def _new_job(self, process: Observed, rule: Rule) -> Job:
        job = Job(
            id=process.key,
            user=process.identity.user,
            rule=rule,
            started_at=process.sample.started_at,
            members=set(),
            threads=process.sample.threads,
            cpuset=process.identity.cpuset,
            uid=process.identity.uid,
        )
        self.jobs[job.id] = job
        self._join(job, job.id, _kind(process))
        return job

    def _rule_for(self, process: Observed, job: Job | None) -> Rule | None:
        """The rule now; a job that registered keeps one even when no rule matches it."""
        found = self._match(process)
        if found is None and job is not None and job.registration is not None:
            return self._registered_rule()
        return found

    def _match(self, process: Observed) -> Rule | None:
        """The rule for `process` now; keeps it waiting while `loads` may still change that."""
        found = classify(process, self.policy.rules, self.daemon_pid)
        self._exec_marks[process.key] = process.sample.exec_mark
        if found.waiting_on_libraries:
            self._waiting.add(process.key)
        else:
            self._waiting.discard(process.key)
        return found.rule

    def _reclassify_jobs(self, processes: Mapping[ProcKey, Observed], now: float) -> list[Event]:
        """After a reload: rules, caps and reserved CPUs may all have changed. A sub-job
        whose rule makes no sub-job any more joins its enclosing job; a member that a
        sub-job rule takes now becomes a sub-job."""
        self._reallocate = False
        events: list[Event] = []
        for job in sorted(self.jobs.values(), key=lambda j: j.started_at):  # enclosing first
            if job.id not in self.jobs:
                continue
            root = processes.get(job.id)
            found = self._rule_for(root, job) if root is not None else job.rule
            parent = None if job.parent is None else self.jobs.get(job.parent)
            if (
                parent is not None
                and job.registration is None
                and (found is None or not found.sub_job or found == parent.rule)
            ):
                why = f"no rule makes it a sub-job any more: joined job {parent.pid}"
                events += self._absorb(job, parent, now, why)
            elif found is None:
                events += self._end(job, now, "no rule matches any more", tuple(self._pids(job)))
            else:
                job.rule = found
        for job in sorted(self.jobs.values(), key=lambda j: j.started_at):
            for key in sorted(job.members - {job.id}, key=_by_age):
                seen = processes.get(key)
                if key in job.members and seen is not None:
                    rule = self._sub_rule(seen, job)
                    if rule is not None:
                        events += self._split(job, seen, rule, processes)
        previous = {job.id: (job.rule, job.cpus, job.budget) for job in self.jobs.values()}
        for job in self.jobs.values():
            job.cpus = frozenset()  # every job is placed afresh, oldest first
        for job in sorted(self.jobs.values(), key=lambda j: j.started_at):
            placed = self._place(job, JobChanged)
            if previous[job.id] != (job.rule, job.cpus, job.budget):
                events.append(placed)
        return events

    def _place_tree(self, job: Job, event: type[JobStarted]) -> list[Event]:
        """`_place` `job`; when its cores changed, its sub-jobs are placed again within
        them (a `JobChanged` for each whose grant or budget changed)."""
        before = job.cpus
        events: list[Event] = [self._place(job, event)]
        if job.cpus == before:
            return events
        subs = self._sub_jobs(job)
        previous = {sub.id: (sub.cpus, sub.budget) for sub in subs}
        for sub in subs:
            sub.cpus = frozenset()  # all of them afresh, oldest first
        for sub in subs:
            placed = self._place_tree(sub, JobChanged)
            if previous[sub.id] != (sub.cpus, sub.budget):
                events += placed
        return events

    def _place(self, job: Job, event: type[JobStarted]) -> JobStarted:
        """Allocate cores and set the budget for `job` as its rule now says."""
        self._foreseen = None
        parent = None if job.parent is None else self.jobs.get(job.parent)
        if parent is not None:
            self._grant_within(job, parent)
        else:
            job.parent = None
            self._grant(job)
        if job.registration is not None:
            job.settings = resolve(job.registration.declaration, len(job.cpus))
            job.notes += job.settings.oversubscribed()
        self._set_budget(job)
        return event(
            **job_facts(job),
            budget_basis=job.budget.basis,
            notes=job.notes,
            enforced=self.enforcing,
        )

    def _grant_within(self, job: Job, parent: Job) -> None:
        """A sub-job's cores: out of its enclosing job's grant, apart from its other
        sub-jobs' while there are enough (then the least loaded of them), and within its
        cpuset. No user cap applies: the enclosing job's grant already counts."""
        requested, notes = self._requested(job.rule, job.registration)
        carved = f"a sub-job of job {parent.pid}: its CPUs are carved out of that job's"
        try:
            grant = allocate(
                requested,
                job.user,
                parent.cpus,
                self._holdings(job),  # its sibling sub-jobs'
                None,
                topology=self.topology,
                allowed=job.cpuset,
            )
            job.cpus, job.notes = grant.cpus, (f"{carved} ({format_cpulist(parent.cpus)})",)
            job.notes += notes + grant.notes
        except ValueError as err:  # its cpuset and that grant have no CPU in common
            job.cpus = parent.cpus
            job.notes = (*notes, f"{carved}, but {err}: given that job's CPUs")

    def _grant(self, job: Job) -> None:
        """A top-level job's cores: as its rule (or registration) asks, within its user's
        cap and cpuset; kept from before a restart when still allowed."""
        kept = self._kept.pop(job.id, None)
        holdings = self._holdings(job)
        limits = self.policy.users.get(job.user)
        cap = limits.max_cpus if limits else None
        requested, notes = self._requested(job.rule, job.registration)
        if job.id in self._not_kept:
            notes += (self._not_kept.pop(job.id),)
        grant: Grant | None = None
        if kept is not None:  # checked again: its rule may differ from the one foreseen
            found = keep(
                kept.cpus,
                requested,
                job.user,
                self.eligible_cpus,
                holdings,
                cap,
                topology=self.topology,
                allowed=job.cpuset,
                shared_before=kept.cpus,  # shared as `_plan_adoption` allowed
            )
            if isinstance(found, str):
                notes += (_placed_afresh(kept.cpus, found),)
            else:
                grant = found
        try:
            if grant is None:
                grant = allocate(
                    requested,
                    job.user,
                    self.eligible_cpus,
                    holdings,
                    cap,
                    topology=self.topology,
                    allowed=job.cpuset,
                )
            job.cpus, job.notes = grant.cpus, notes + grant.notes
        except ValueError as err:  # its outer cpuset holds only CPUs reserved here
            assert job.cpuset is not None
            job.cpus, job.notes = job.cpuset, (*notes, f"{err}: left in its own cpuset")

    def _requested(
        self, rule: Rule, registration: Registration | None
    ) -> tuple[int, tuple[str, ...]]:
        """How many CPUs the job asks for: its rule's, or fewer if it declared fewer."""
        asked = registration.declaration.cpus if registration else None
        if asked is None:
            return rule.cpus, ()
        if asked > rule.cpus:
            return rule.cpus, (f"asked for {asked} CPUs, rule {rule.name} allows {rule.cpus}",)
        return asked, ()

    def _holdings(self, job: Job | None) -> list[Holding]:
        """The cores held beside `job`'s own by the jobs at its level: top-level jobs (a
        sub-job's cores are its enclosing job's) and the grants jobs keep across a restart
        that are not placed yet (so new jobs get the free cores); for a sub-job, its sibling
        sub-jobs."""
        level = None if job is None else job.parent
        holdings = [
            Holding(other.user, other.cpus)
            for other in self.jobs.values()
            if other is not job and other.cpus and other.parent == level
        ]
        if level is None:
            holdings += [kept for key, kept in self._kept.items() if job is None or key != job.id]
        return holdings

    def _set_budget(self, job: Job) -> None:
        """Declared, else the rule's max_threads, else derived from the cores: the sum of
        every member's budget for what it runs, plus slack (`budget.job_budget`); a
        registered root counts with its declaration."""
        declared = job.settings is not None
        job.budget = job_budget(
            (kind for key, kind in job.kinds.items() if not (declared and key == job.id)),
            len(job.cpus),
            job.rule.max_threads,
            self.policy.defaults.thread_slack,
            job.settings,
        )

    def _note_libraries(self, job: Job, process: Observed) -> None:
        if job.kinds.get(process.key) == TENSORFLOW or process.libraries is None:
            return
        if loads_library(process.libraries, "tensorflow"):
            job.kinds[process.key] = TENSORFLOW
            self._set_budget(job)

    def _join(self, job: Job, key: ProcKey, kind: str) -> None:
        job.members.add(key)
        job.kinds[key] = kind
        self._member_of[key] = job.id
        self._member_pids[key.pid] = key

    def _move(self, key: ProcKey, job: Job, into: Job) -> None:
        """`key` leaves `job` for `into`, as what it runs."""
        kind = job.kinds.get(key, OTHER)
        self._drop(job, key)
        self._join(into, key, kind)

    def _drop(self, job: Job, key: ProcKey) -> None:
        """`key` leaves `job` (it exited, or registered a job of its own)."""
        job.members.discard(key)
        job.kinds.pop(key, None)
        job.member_threads.pop(key, None)
        job.cpu_seconds.pop(key, None)
        self._leave(key)

    def _leave(self, key: ProcKey) -> None:
        del self._member_of[key]
        if self._member_pids.get(key.pid) == key:
            del self._member_pids[key.pid]

    def _end(self, job: Job, now: float, reason: str, live_pids: tuple[int, ...]) -> list[Event]:
        """`job` ends (`reason`). Its sub-jobs, if any still run, go to the job enclosing
        it, or become top-level jobs (placed afresh: a sub-job rule outside every job makes
        a job like any rule). A sub-job's enclosing job that is left without processes and
        sub-jobs ends too."""
        self._foreseen = None
        for key in job.members:
            self._leave(key)
        self._waiting.discard(job.id)
        del self.jobs[job.id]
        events: list[Event] = []
        if job.record is not None:  # its violation ends with it: not "back within budget"
            events.append(self._close_with_job(job, now, reason))
        for record in self._layer_records.pop(job.name, {}).values():
            record.ended, record.ended_by = now, "exited" if reason == "exited" else "released"
        events.append(JobEnded(**job_facts(job), job=job.name, reason=reason, live_pids=live_pids))
        for sub in self._sub_jobs(job):
            sub.parent = job.parent
            events += self._place_tree(sub, JobChanged)
        outer = None if job.parent is None else self.jobs.get(job.parent)
        if outer is not None and not outer.members and not self._encloses_any(outer):
            events += self._end(outer, now, "exited", live_pids=())
        return events

    def _resolve(self, job: Job, now: float) -> ViolationEnded:
        """The job is back within budget."""
        assert job.record is not None
        record, job.record = job.record, None
        record.ended, record.ended_by = now, "resolved"
        return ViolationEnded(
            **job_facts(job), peak_threads=record.threads, duration=now - record.started
        )

    def _close_with_job(self, job: Job, now: float, reason: str) -> ViolationEndedWithJob:
        """The job ends (`reason`) during a violation: its last count and the peak."""
        assert job.record is not None
        record, job.record = job.record, None
        record.ended = now
        record.ended_by = "exited" if reason == "exited" else "released"
        return ViolationEndedWithJob(
            **job_facts(job),
            peak_threads=record.threads,
            duration=now - record.started,
            reason=reason,
        )

    @staticmethod
    def _pids(job: Job) -> Iterable[int]:
        return sorted(key.pid for key in job.members)

    # -- monitoring ----------------------------------------------------------------------

    def _stale_libraries(self, job: Job, processes: Mapping[ProcKey, Observed]) -> set[ProcKey]:
        """Members that may have loaded TensorFlow since their libraries were last read
        (their thread count changed), which would raise the job's budget. Asked once as a
        job goes over budget, not every scan."""
        if job.rule.max_threads is not None and job.settings is None:
            return set()  # a budget TensorFlow would not change
        return {
            key
            for key, kind in job.kinds.items()
            if kind != TENSORFLOW
            and not (job.settings is not None and key == job.id)
            and (
                (last := self._library_reads.get(key)) is None
                or last.threads != processes[key].sample.threads
            )
        }

    def _in_grace(self, job: Job, now: float) -> bool:
        return now - job.started_at < self.policy.defaults.grace

    def _sample(
        self,
        job: Job,
        processes: Mapping[ProcKey, Observed],
        fresh_libraries: frozenset[ProcKey],
        now: float,
    ) -> list[Event]:
        for key in job.members:  # exec changes what a member runs; TensorFlow stays loaded
            if job.kinds.get(key) != TENSORFLOW:
                job.kinds[key] = _kind(processes[key])
        self._set_budget(job)
        samples = [processes[key].sample for key in job.members]
        job.member_threads = {s.key: s.threads for s in samples}
        job.threads = sum(job.member_threads.values())
        cpu_now = {s.key: s.cpu_seconds for s in samples}
        if job.sampled_at is not None and now > job.sampled_at:
            used = sum(
                cpu_now[key] - job.cpu_seconds[key] for key in cpu_now if key in job.cpu_seconds
            )
            job.cpu_percent = max(0.0, 100.0 * used / (now - job.sampled_at))
        job.cpu_seconds, job.sampled_at = cpu_now, now

        if self._in_grace(job, now):
            return []
        over = job.threads > job.budget.threads
        first_over = over and not job.violation.active and job.violation.streak == 0
        stale = self._stale_libraries(job, processes) - fresh_libraries if first_over else None
        if stale:
            self._recheck |= stale
            return []  # judge on the next scan, with the libraries read again
        if job.record is not None:
            job.record.threads = max(job.record.threads, job.threads)
        job.violation, transition = job.violation.observe(
            over, self.policy.defaults.violation_after
        )
        if transition is Transition.ONSET:
            job.record = ViolationRecord(
                job.pid, job.rule.name, job.threads, job.budget.threads, started=now
            )
            self.violations.append(job.record)
            return [ViolationStarted(**job_facts(job))]
        if transition is Transition.RESOLVED and job.record is not None:
            return [self._resolve(job, now)]
        return []


def _members(job: Job) -> tuple[Member, ...]:
    """Every process of the job, root first, with its share of the job's budget."""
    settings, rows = job.settings, []
    for key in sorted(job.members, key=lambda k: (k != job.id, k.start_ticks, k.pid)):
        kind = job.kinds.get(key, OTHER)
        share: int | None = None
        if settings is not None and key == job.id:  # the declaration is the root's
            kind, share = "registered", declared_budget(settings, slack=0).threads
        elif settings is not None or job.rule.max_threads is None:
            share = member_budget(kind, len(job.cpus))
        rows.append(Member(key.pid, kind, job.member_threads.get(key, 0), share))
    return tuple(rows)


def _by_age(key: ProcKey) -> tuple[int, int]:
    """Oldest process first (parents before their children)."""
    return key.start_ticks, key.pid


def _kind(process: Observed) -> str:
    """What a process runs, as a job's budget sees it: TensorFlow in its libraries (as
    last read), else a Python interpreter, else anything else."""
    if process.libraries is not None and loads_library(process.libraries, "tensorflow"):
        return TENSORFLOW
    return PYTHON if is_python(process.identity) else OTHER


def _placed_afresh(held: frozenset[int], why: str) -> str:
    """The note of a job that could not keep what it held before a restart."""
    return f"held CPUs {format_cpulist(held)} before corecapd restarted, but {why}: placed afresh"


def job_facts(job: Job) -> dict[str, Any]:
    """The fields every job event carries (corecapd.events.JobEvent)."""
    return dict(
        pid=job.pid,
        user=job.user,
        rule=job.rule.name,
        cpus=job.cpus,
        threads=job.threads,
        budget=job.budget.threads,
    )


def job_key(name: str) -> ProcKey | None:
    """The process a job name ("<pid>-<start ticks>", `Job.name`) stands for; None if it is
    no such name."""
    found = _JOB_NAME.fullmatch(name)
    return None if found is None else ProcKey(int(found[1]), int(found[2]))


def eligible_cpus(policy: Policy, online_cpus: frozenset[int]) -> frozenset[int]:
    """CPUs jobs may get: online and not reserved. Empty means the policy cannot work here."""
    return online_cpus - policy.daemon.reserved_cpus
