"""What the daemon reports: one event type per kind, each with a fixed journal MESSAGE_ID.

Events are data; `corecapd.journal` sends them. `fields()` gives the structured journal
fields (CORECAP_*), which are also what the readable stderr line shows, so tests and
`journalctl -o verbose` see the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from corecapd.cpulist import format_cpulist

# syslog priorities, as journald takes them
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str]
    message_id: ClassVar[str]  # fixed per kind, for `journalctl MESSAGE_ID=...`
    priority: ClassVar[int] = INFO

    def message(self) -> str:
        raise NotImplementedError

    def fields(self) -> dict[str, str]:
        raise NotImplementedError


@dataclass(frozen=True)
class DaemonStarted(Event):
    kind = "daemon-started"
    message_id = "3d0d0216cb5f4ac6bafc72933e39e281"
    policy: str
    mode: str
    backend: str
    backend_reason: str
    eligible_cpus: frozenset[int]

    def message(self) -> str:
        return (
            f"corecapd started: policy {self.policy}, mode {self.mode}, backend {self.backend}"
            f" ({self.backend_reason}), job CPUs {format_cpulist(self.eligible_cpus)}"
        )

    def fields(self) -> dict[str, str]:
        return {
            "CORECAP_POLICY": self.policy,
            "CORECAP_MODE": self.mode,
            "CORECAP_BACKEND": self.backend,
            "CORECAP_BACKEND_REASON": self.backend_reason,
            "CORECAP_CPUS": format_cpulist(self.eligible_cpus),
        }


@dataclass(frozen=True)
class DaemonStopped(Event):
    kind = "daemon-stopped"
    message_id = "f5ec179371dd4d13a3d7b9ab7f747d6b"
    reason: str  # what stopped it, e.g. "SIGTERM"
    jobs: int  # jobs held at the stop; their masks and fences stay for the next corecapd

    def message(self) -> str:
        return (
            f"corecapd stopped ({self.reason}): {self.jobs} jobs keep their masks and fences"
            " for the next corecapd to take over"
        )

    def fields(self) -> dict[str, str]:
        return {"CORECAP_REASON": self.reason, "CORECAP_JOBS": str(self.jobs)}


@dataclass(frozen=True)
class PolicyReloaded(Event):
    kind = "policy-reloaded"
    message_id = "559675ee84bd4ebe9925755b2f66486e"
    policy: str
    rules: int
    # Keys whose change waits for a restart ("daemon.metrics"): the rest is in force.
    restart_needed: tuple[str, ...] = ()

    def message(self) -> str:
        text = f"policy reloaded from {self.policy}: {self.rules} rules"
        if self.restart_needed:
            text += f"; {', '.join(self.restart_needed)} changed: takes effect at restart"
        return text

    def fields(self) -> dict[str, str]:
        return {
            "CORECAP_POLICY": self.policy,
            "CORECAP_RULES": str(self.rules),
            "CORECAP_RESTART_NEEDED": " ".join(self.restart_needed),
        }


@dataclass(frozen=True)
class PolicyRejected(Event):
    kind = "policy-rejected"
    message_id = "1f2d47a8bea0483aaa0adf731e8ba92e"
    priority = ERR
    policy: str
    error: str

    def message(self) -> str:
        return f"reload rejected, the policy in force stays: {self.error}"

    def fields(self) -> dict[str, str]:
        return {"CORECAP_POLICY": self.policy, "CORECAP_ERROR": self.error}


@dataclass(frozen=True)
class JobEvent(Event):
    """Something that happened to one job; the fields every job event carries."""

    pid: int
    user: str
    rule: str
    cpus: frozenset[int]
    threads: int
    budget: int

    def fields(self) -> dict[str, str]:
        return {
            "CORECAP_PID": str(self.pid),
            "CORECAP_USER": self.user,
            "CORECAP_RULE": self.rule,
            "CORECAP_CPUS": format_cpulist(self.cpus),
            "CORECAP_THREADS": str(self.threads),
            "CORECAP_BUDGET": str(self.budget),
        }


@dataclass(frozen=True)
class JobStarted(JobEvent):
    kind = "job-started"
    message_id = "dc214601c3c645908795eeb97baebb60"
    budget_basis: str
    notes: tuple[str, ...]
    enforced: bool

    def message(self) -> str:
        verb = "confined" if self.enforced else "would confine (monitor mode)"
        text = (
            f"PID {self.pid} ({self.user}, rule {self.rule}) {verb} to CPUs"
            f" {format_cpulist(self.cpus)}; budget {self.budget} threads ({self.budget_basis})"
        )
        return text + "".join(f"; {note}" for note in self.notes)

    def fields(self) -> dict[str, str]:
        return super().fields() | {
            "CORECAP_BUDGET_BASIS": self.budget_basis,
            "CORECAP_NOTES": "; ".join(self.notes),
            "CORECAP_ENFORCED": "1" if self.enforced else "0",
        }


@dataclass(frozen=True)
class JobChanged(JobStarted):
    kind = "job-changed"
    message_id = "dc825a52c8b744728f07607b1c61cbda"


@dataclass(frozen=True)
class JobEnded(JobEvent):
    kind = "job-ended"
    message_id = "48427d6496df45c1ab75e19e447df6b6"
    job: str  # Job.name: what the backends confined
    reason: str
    live_pids: tuple[int, ...]  # members still running: the backend must let them go

    def message(self) -> str:
        cpus = format_cpulist(self.cpus)
        return f"PID {self.pid} (rule {self.rule}) released CPUs {cpus}: {self.reason}"

    def fields(self) -> dict[str, str]:
        return super().fields() | {"CORECAP_REASON": self.reason}


@dataclass(frozen=True)
class ViolationStarted(JobEvent):
    kind = "violation-started"
    message_id = "949e558bffc54b94af9af70301abaaab"
    priority = WARNING
    diagnosis: str = ""  # the layer and the setting that would fix it (corecapd.diagnosis)

    def message(self) -> str:
        text = (
            f"PID {self.pid} (rule {self.rule}) over budget: {self.threads} threads,"
            f" budget {self.budget}, on CPUs {format_cpulist(self.cpus)}"
        )
        return f"{text}: {self.diagnosis}" if self.diagnosis else text

    def fields(self) -> dict[str, str]:
        return super().fields() | {"CORECAP_DIAGNOSIS": self.diagnosis}


@dataclass(frozen=True)
class ViolationEnded(JobEvent):
    kind = "violation-ended"
    message_id = "2542ec2e938d4a48a87c906de9d3bab1"
    priority = NOTICE
    peak_threads: int
    duration: float

    def message(self) -> str:
        return (
            f"PID {self.pid} (rule {self.rule}) back within budget: {self.threads} threads,"
            f" budget {self.budget}; peak {self.peak_threads} over {self.duration:.1f} s"
        )

    def fields(self) -> dict[str, str]:
        return super().fields() | {
            "CORECAP_PEAK_THREADS": str(self.peak_threads),
            "CORECAP_DURATION": f"{self.duration:.3f}",
        }


@dataclass(frozen=True)
class ViolationEndedWithJob(JobEvent):
    """A job ended (its last process exited, or it was let go) while over budget: its
    violation ends with it, not "back within budget". `threads` is the last count."""

    kind = "violation-ended-with-job"
    message_id = "6825ff3ef68f4e4bb5e546139c67b482"
    priority = NOTICE
    peak_threads: int
    duration: float
    reason: str  # why the job ended, as its JobEnded says: "exited", ...

    def message(self) -> str:
        return (
            f"PID {self.pid} (rule {self.rule}) ended while over budget ({self.reason}):"
            f" last {self.threads} threads, budget {self.budget}; peak {self.peak_threads}"
            f" over {self.duration:.1f} s"
        )

    def fields(self) -> dict[str, str]:
        return super().fields() | {
            "CORECAP_PEAK_THREADS": str(self.peak_threads),
            "CORECAP_DURATION": f"{self.duration:.3f}",
            "CORECAP_REASON": self.reason,
        }


@dataclass(frozen=True)
class EnforcementFailed(JobEvent):
    kind = "enforcement-failed"
    message_id = "fcd14043e687484fb557197f9a09592b"
    priority = ERR
    error: str

    def message(self) -> str:
        return f"PID {self.pid} (rule {self.rule}) could not be confined: {self.error}"

    def fields(self) -> dict[str, str]:
        return super().fields() | {"CORECAP_ERROR": self.error}


@dataclass(frozen=True)
class ExecEventsUnavailable(Event):
    kind = "exec-events-unavailable"
    message_id = "11e74ba6e21c4062adcbb34e98f3c051"
    priority = WARNING
    reason: str

    def message(self) -> str:
        return f"no exec events ({self.reason}): jobs are found by scanning /proc only"

    def fields(self) -> dict[str, str]:
        return {"CORECAP_REASON": self.reason}


@dataclass(frozen=True)
class ExecEventsLost(Event):
    kind = "exec-events-lost"
    message_id = "e772ab4576ec48dc9cf95082bccd51b8"
    priority = WARNING
    reason: str
    total: int

    def message(self) -> str:
        return f"exec events lost ({self.reason}): rescanning /proc; {self.total} losses so far"

    def fields(self) -> dict[str, str]:
        return {"CORECAP_REASON": self.reason, "CORECAP_LOSSES": str(self.total)}


@dataclass(frozen=True)
class FenceFailed(Event):
    kind = "fence-failed"
    message_id = "82735cb0c28243eebcfb2edc85bccccb"
    priority = ERR
    job: str  # Job.name; "" when tidying up after the last job failed
    error: str

    def message(self) -> str:
        if not self.job:
            return f"removing the cpuset fences' subtree failed ({self.error})"
        return f"job {self.job}: the cpuset fence failed ({self.error}); its affinity still holds"

    def fields(self) -> dict[str, str]:
        return {"CORECAP_JOB": self.job, "CORECAP_ERROR": self.error}


@dataclass(frozen=True)
class StateProblem(Event):
    kind = "state-problem"
    message_id = "24884896d65f4e18985dc1a4ce94b786"
    priority = WARNING
    error: str

    def message(self) -> str:
        return f"registrations are not kept across restarts: {self.error}"

    def fields(self) -> dict[str, str]:
        return {"CORECAP_ERROR": self.error}


@dataclass(frozen=True)
class JobEscaped(JobEvent):
    kind = "escape"
    message_id = "6ed2e5f26974413496036b1fda76d558"
    priority = WARNING
    escaped_threads: int

    def message(self) -> str:
        return (
            f"PID {self.pid} (rule {self.rule}) changed the CPU mask of"
            f" {self.escaped_threads} of its threads; set back to {format_cpulist(self.cpus)}"
        )

    def fields(self) -> dict[str, str]:
        return super().fields() | {"CORECAP_ESCAPED_THREADS": str(self.escaped_threads)}


@dataclass(frozen=True)
class MetricsUnavailable(Event):
    kind = "metrics-unavailable"
    message_id = "ad9f0cf4129048da8fb782b88ad735cd"
    priority = ERR
    address: str  # daemon.metrics
    reason: str

    def message(self) -> str:
        return f"no metrics at {self.address} ({self.reason}); jobs are confined all the same"

    def fields(self) -> dict[str, str]:
        return {"CORECAP_ADDRESS": self.address, "CORECAP_REASON": self.reason}


@dataclass(frozen=True)
class LayerOversized(JobEvent):
    """One threaded layer of a job is wider than its grant allows it, whether or not the
    job's total is over budget (corecapd.diagnosis). `threads`/`budget` are the job's."""

    kind = "layer-oversized"
    message_id = "786a89ba5ad64f6f83d7268a1756ab74"
    priority = WARNING
    layer: str  # "tf-data", "openmp", ... (corecapd.attribution.Layer values)
    name: str  # "tf.data private pool"
    layer_threads: int  # its width over all of the job's processes
    processes: int
    expected: int  # what the grant allows it: cores, declared size, or the quota
    fix: str
    evidence: str  # one thread's, e.g. "start routine gomp_thread_start in libgomp.so.1"

    def message(self) -> str:
        where = f" in {self.processes} processes" if self.processes > 1 else ""
        return (
            f"PID {self.pid} (rule {self.rule}): {self.name} of {self.layer_threads} threads"
            f"{where} on {self.expected} CPUs ({self.evidence}): {self.fix}"
        )

    def fields(self) -> dict[str, str]:
        return super().fields() | {
            "CORECAP_LAYER": self.layer,
            "CORECAP_LAYER_NAME": self.name,
            "CORECAP_LAYER_THREADS": str(self.layer_threads),
            "CORECAP_PROCESSES": str(self.processes),
            "CORECAP_EXPECTED": str(self.expected),
            "CORECAP_FIX": self.fix,
            "CORECAP_EVIDENCE": self.evidence,
        }
