"""JobTable.step: scans in, events out, on synthetic processes (no /proc, no clock)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corecapd.budget import thread_budget
from corecapd.core import MAX_REGISTERED_PER_USER, JobTable, RegistrationRefused
from corecapd.declaration import Declaration, Registration
from corecapd.events import (
    Event,
    JobChanged,
    JobEnded,
    JobStarted,
    ViolationEnded,
    ViolationEndedWithJob,
    ViolationStarted,
)
from corecapd.model import Identity, Observed, ProcKey, Sample
from corecapd.policy import Policy, parse_policy

T0 = 1_000_000.0  # when the test's processes start (seconds since the epoch)
DAEMON_PID = 77
PYTHON = "/usr/bin/python3.11"
TF_LIBS = frozenset({"libc.so.6", "libtensorflow_framework.so.2"})
PLAIN_LIBS = frozenset({"libc.so.6", "libm.so.6"})


def policy(text: str) -> Policy:
    return parse_policy(text, source="test.toml")


PYTHON_RULE = """
[[rules]]
name = "py"
match.exe = ["python*"]
cpus = 2
"""


class World:
    """A fake process table and the JobTable that watches it.

    Like corecapd.procfs.Scanner, a process's libraries (its maps) are only read in a scan
    when the previous step asked for them in `libraries_wanted`; otherwise the core sees
    the last read, or None if there was none."""

    def __init__(
        self,
        policy_text: str = PYTHON_RULE,
        online: Iterable[int] = range(8),
        enforcing: bool = True,
    ) -> None:
        self.table = JobTable(policy(policy_text), frozenset(online), DAEMON_PID, enforcing)
        self.procs: dict[ProcKey, Observed] = {}  # libraries here: what maps shows now
        self.read: dict[ProcKey, frozenset[str]] = {}
        self.reads: list[tuple[float, ProcKey]] = []  # (when, whose maps were read)
        self._ticks = 100

    def spawn(
        self,
        pid: int,
        *,
        ppid: int = 1,
        exe: str = PYTHON,
        cmdline: tuple[str, ...] = ("python3", "job.py"),
        uid: int = 1000,
        user: str = "alice",
        groups: frozenset[str] = frozenset(),
        threads: int = 1,
        started_at: float = T0,
        libraries: frozenset[str] = PLAIN_LIBS,
        kernel_thread: bool = False,
    ) -> ProcKey:
        self._ticks += 1
        key = ProcKey(pid, self._ticks)
        sample = Sample(key, ppid, threads, 0.0, started_at, kernel_thread)
        identity = Identity(uid, user, groups | {user}, exe, cmdline)
        self.procs[key] = Observed(sample, identity, libraries)
        return key

    def set(
        self,
        key: ProcKey,
        *,
        threads: int | None = None,
        cpu_seconds: float | None = None,
        libraries: frozenset[str] | None = None,
    ) -> None:
        old = self.procs[key]
        sample = old.sample
        if threads is not None:
            sample = replace(sample, threads=threads)
        if cpu_seconds is not None:
            sample = replace(sample, cpu_seconds=cpu_seconds)
        self.procs[key] = replace(
            old, sample=sample, libraries=old.libraries if libraries is None else libraries
        )

    def kill(self, *keys: ProcKey) -> None:
        for key in keys:
            del self.procs[key]

    def step(self, at: float) -> list[Event]:
        """One scan at T0 + `at` seconds."""
        for key in self.table.libraries_wanted & self.procs.keys():
            self.read[key] = self.procs[key].libraries or frozenset()
            self.reads.append((at, key))
        for key in self.read.keys() - self.procs.keys():
            del self.read[key]
        scan = {
            key: replace(seen, libraries=self.read.get(key))
            for key in self.procs
            for seen in (self.procs[key],)
        }
        return self.table.step(scan, T0 + at)

    def run(self, start: int, stop: int) -> list[Event]:
        """A scan every second from T0 + start to before T0 + stop; all their events."""
        events: list[Event] = []
        for at in range(start, stop):
            events += self.step(at)
        return events

    def read_times(self, key: ProcKey) -> list[float]:
        return [at for at, whose in self.reads if whose == key]

    def cpus(self, key: ProcKey) -> frozenset[int]:
        return self.table.jobs[key].cpus


E = TypeVar("E", bound=Event)


def of_type(events: list[Event], kind: type[E]) -> list[E]:
    """The events of exactly this type (JobChanged is a JobStarted subclass)."""
    return [event for event in events if type(event) is kind]


def only(events: list[Event], kind: type[E]) -> E:
    assert [type(e) for e in events] == [kind], events
    event = events[0]
    assert isinstance(event, kind)
    return event


# -- jobs start, grow, end ----------------------------------------------------------------


def test_matched_process_becomes_a_job() -> None:
    world = World()
    key = world.spawn(500, threads=3)
    started = only(world.step(1), JobStarted)
    assert (started.pid, started.user, started.rule) == (500, "alice", "py")
    assert started.cpus == frozenset({0, 1})
    assert started.threads == 3
    assert started.budget == thread_budget(2, False, None, 8).threads
    assert started.enforced
    job = world.table.jobs[key]
    assert job.members == {key}
    assert job.cpus == started.cpus
    assert job.started_at == T0
    # Seen again: nothing new happens.
    assert world.step(2) == []


def test_unmatched_processes_are_left_alone() -> None:
    world = World()
    world.spawn(600, exe="/usr/bin/bash", cmdline=("bash",))
    world.spawn(601, uid=33, user="www-data")  # a system service's Python
    world.spawn(602, kernel_thread=True, exe="", cmdline=())
    world.spawn(DAEMON_PID, uid=0, user="root")
    assert world.step(1) == []
    assert world.table.jobs == {}
    assert world.step(2) == []


def test_system_user_matched_when_named() -> None:
    world = World('[[rules]]\nname = "rootjob"\nmatch.users = ["root"]\n')
    key = world.spawn(700, uid=0, user="root")
    world.spawn(DAEMON_PID, uid=0, user="root")  # but never the daemon itself
    started = only(world.step(1), JobStarted)
    assert started.pid == 700
    assert set(world.table.jobs) == {key}


def test_child_joins_its_parents_job() -> None:
    world = World()
    parent = world.spawn(500, threads=2)
    world.step(1)
    child = world.spawn(501, ppid=500, threads=5)
    assert world.step(2) == []  # no new job
    assert set(world.table.jobs) == {parent}
    job = world.table.jobs[parent]
    assert job.members == {parent, child}
    assert job.threads == 7
    # A grandchild too, even a non-Python one.
    grandchild = world.spawn(502, ppid=501, exe="/usr/bin/bash", threads=1)
    assert world.step(3) == []
    assert job.members == {parent, child, grandchild}
    assert job.threads == 8


def test_child_seen_in_the_same_scan_as_its_parent_joins() -> None:
    world = World()
    parent = world.spawn(500)
    child = world.spawn(501, ppid=500)
    started = world.step(1)
    assert len(of_type(started, JobStarted)) == 1
    assert world.table.jobs[parent].members == {parent, child}


def test_child_of_an_unmatched_process_is_classified_itself() -> None:
    world = World()
    world.spawn(400, exe="/usr/bin/bash")
    child = world.spawn(401, ppid=400)
    started = only(world.step(1), JobStarted)
    assert started.pid == 401
    assert set(world.table.jobs) == {child}


def test_job_ends_when_all_members_exit() -> None:
    world = World()
    parent = world.spawn(500)
    child = world.spawn(501, ppid=500)
    world.step(1)
    held = world.cpus(parent)
    world.kill(parent)
    assert world.step(2) == []  # the child still runs: the job goes on
    assert world.table.jobs[parent].members == {child}
    world.kill(child)
    ended = only(world.step(3), JobEnded)
    assert (ended.pid, ended.rule, ended.reason) == (500, "py", "exited")
    assert ended.cpus == held
    assert ended.live_pids == ()
    assert world.table.jobs == {}
    # The released CPUs go to the next job.
    newcomer = world.spawn(600)
    world.step(4)
    assert world.cpus(newcomer) == held


def test_pid_reuse_ends_the_old_job_and_classifies_afresh() -> None:
    world = World()
    old = world.spawn(500)
    world.step(1)
    world.kill(old)
    new = world.spawn(500, exe="/usr/bin/bash")  # same PID, later start
    assert new != old
    ended = only(world.step(2), JobEnded)
    assert ended.pid == 500
    assert world.table.jobs == {}  # bash matches no rule
    # And the other way round: a reused PID that is Python is a new job.
    world.kill(new)
    newest = world.spawn(500)
    started = only(world.step(3), JobStarted)
    assert started.pid == 500
    assert set(world.table.jobs) == {newest}


def test_pid_reuse_of_a_member_leaves_the_job() -> None:
    world = World()
    parent = world.spawn(500)
    child = world.spawn(501, ppid=500)
    world.step(1)
    world.kill(child)
    stranger = world.spawn(501, exe="/usr/bin/bash", ppid=1)  # PID 501 reused elsewhere
    assert world.step(2) == []
    assert world.table.jobs[parent].members == {parent}
    assert stranger not in world.table.jobs[parent].members


# -- violations -------------------------------------------------------------------------

TIGHT = """
[defaults]
grace = 10
violation_after = 3

[[rules]]
name = "tight"
match.exe = ["python*"]
cpus = 1
max_threads = 5
"""


def test_violation_only_after_grace_and_violation_after_samples() -> None:
    world = World(TIGHT)
    key = world.spawn(500, threads=9)
    for second in range(0, 10):  # within grace: any spike is allowed
        events = world.step(second)
        assert not of_type(events, ViolationStarted), second
    assert world.step(10) == []  # 1st over sample after grace
    assert world.step(11) == []  # 2nd
    onset = only(world.step(12), ViolationStarted)  # 3rd
    assert (onset.pid, onset.rule, onset.threads, onset.budget) == (500, "tight", 9, 5)
    assert world.table.jobs[key].violation.active
    (record,) = world.table.violations
    assert (record.pid, record.rule, record.threads, record.budget) == (500, "tight", 9, 5)
    assert record.started == T0 + 12
    assert record.ended is None
    # Logged once: staying over budget gives no further events.
    world.set(key, threads=12)  # the peak
    assert world.step(13) == []
    world.set(key, threads=9)
    assert world.step(14) == []
    assert record.threads == 12


def test_violation_resolves_after_violation_after_samples_within_budget() -> None:
    world = World(TIGHT)
    key = world.spawn(500, threads=9)
    assert len(of_type(world.run(0, 13), ViolationStarted)) == 1  # at 12
    world.set(key, threads=14)
    world.step(13)
    world.set(key, threads=5)  # at the budget is within it
    assert world.step(14) == []
    assert world.step(15) == []
    resolved = only(world.step(16), ViolationEnded)
    assert resolved.peak_threads == 14
    assert resolved.duration == pytest.approx(4.0)
    assert resolved.threads == 5
    assert not world.table.jobs[key].violation.active
    (record,) = world.table.violations
    assert record.ended == T0 + 16
    assert world.table.jobs[key].record is None


def test_no_flapping_on_alternating_samples() -> None:
    world = World(TIGHT)
    key = world.spawn(500, threads=1)
    world.run(0, 10)
    for second in range(10, 40):
        world.set(key, threads=9 if second % 2 else 1)
        assert world.step(second) == []
    assert not world.table.violations


def test_long_running_process_seen_late_is_past_grace() -> None:
    world = World(TIGHT)
    world.spawn(500, threads=9, started_at=T0 - 3600)
    started = world.step(0)
    assert [type(e) for e in started] == [JobStarted]  # no violation at first sight
    # A max_threads budget does not depend on TensorFlow: no wait for a maps read, so the
    # first sample and two more make the 3 over-budget samples of a violation.
    assert world.step(1) == []
    assert len(of_type(world.step(2), ViolationStarted)) == 1


def test_children_count_towards_the_budget() -> None:
    world = World(TIGHT)
    world.spawn(500, threads=3)
    world.spawn(501, ppid=500, threads=3)
    world.run(0, 12)
    onset = of_type(world.step(12), ViolationStarted)
    assert len(onset) == 1 and onset[0].threads == 6


def test_job_exit_ends_its_violation_as_exited_not_resolved() -> None:
    world = World(TIGHT)
    key = world.spawn(500, threads=9)
    assert len(of_type(world.run(0, 13), ViolationStarted)) == 1
    world.set(key, threads=16)
    world.step(13)
    world.kill(key)
    events = world.step(14)
    assert [type(e) for e in events] == [ViolationEndedWithJob, JobEnded]
    closed = events[0]
    assert isinstance(closed, ViolationEndedWithJob)
    assert (closed.threads, closed.budget, closed.peak_threads) == (16, 5, 16)  # the last count
    assert closed.reason == "exited" and closed.duration == pytest.approx(2.0)
    assert "back within budget" not in closed.message()
    assert closed.kind != ViolationEnded.kind and closed.message_id != ViolationEnded.message_id
    (record,) = world.table.violations
    assert (record.ended, record.ended_by) == (T0 + 14, "exited")


def test_violation_that_resolves_says_so() -> None:
    world = World(TIGHT)
    key = world.spawn(500, threads=9)
    world.run(0, 13)
    world.set(key, threads=1)
    assert of_type(world.run(13, 16), ViolationEnded)
    (record,) = world.table.violations
    assert record.ended_by == "resolved"


def test_exit_event_of_a_job_in_violation_ends_it_as_exited() -> None:
    world = World(TIGHT)
    key = world.spawn(500, threads=9)
    world.run(0, 13)
    assert [type(e) for e in world.table.exited(500, T0 + 13.5)] == [
        ViolationEndedWithJob,
        JobEnded,
    ]
    assert world.table.violations[0].ended_by == "exited"
    world.kill(key)


def test_violation_history_keeps_ended_and_ongoing() -> None:
    world = World(TIGHT)
    first = world.spawn(500, threads=9)
    second = world.spawn(501, threads=9)
    assert len(of_type(world.run(0, 13), ViolationStarted)) == 2
    world.kill(first)
    world.step(13)
    assert [(r.pid, r.ended is None) for r in world.table.violations] == [
        (500, False),
        (501, True),
    ]
    assert world.table.jobs[second].record is world.table.violations[1]


# -- allocation -------------------------------------------------------------------------


def test_jobs_get_distinct_cores_while_free_ones_last() -> None:
    world = World(online=range(4))
    a = world.spawn(500)
    b = world.spawn(501)
    world.step(1)
    assert world.cpus(a) | world.cpus(b) == frozenset(range(4))
    c = world.spawn(502)
    started = only(world.step(2), JobStarted)
    assert len(world.cpus(c)) == 2
    assert any("sharing" in note for note in started.notes)


def test_per_user_cap_across_two_jobs() -> None:
    world = World(PYTHON_RULE + "\n[users.alice]\nmax_cpus = 3\n", online=range(8))
    first = world.spawn(500, user="alice", uid=1000)
    second = world.spawn(501, user="alice", uid=1000)
    other = world.spawn(502, user="bob", uid=1001)
    events = world.step(1)
    assert len(of_type(events, JobStarted)) == 3
    alice = world.cpus(first) | world.cpus(second)
    assert len(alice) == 3
    assert len(world.cpus(first)) == len(world.cpus(second)) == 2
    assert not world.cpus(other) & alice  # bob is not capped and gets free cores


def test_reserved_cpus_never_in_any_job() -> None:
    world = World('[daemon]\nreserved_cpus = "0,2"\n' + PYTHON_RULE, online=range(4))
    assert world.table.eligible_cpus == frozenset({1, 3})
    keys = [world.spawn(500 + n) for n in range(5)]
    world.step(1)
    for key in keys:
        assert world.cpus(key) == frozenset({1, 3})


def test_rule_asking_for_more_than_the_host_has() -> None:
    world = World('[[rules]]\nname = "big"\nmatch.exe = ["python*"]\ncpus = 64\n', range(4))
    key = world.spawn(500)
    started = only(world.step(1), JobStarted)
    assert world.cpus(key) == frozenset(range(4))
    assert any("asked for 64" in note for note in started.notes)
    assert started.budget == thread_budget(4, False, None, 8).threads


# -- libraries and `loads` --------------------------------------------------------------

TF_ONLY = """
[defaults]
grace = 10

[[rules]]
name = "tf"
match.loads = ["tensorflow"]
cpus = 4
"""


def test_loads_rule_matches_once_libraries_show_up() -> None:
    world = World(TF_ONLY)
    key = world.spawn(500, libraries=PLAIN_LIBS)  # TensorFlow not imported yet
    assert world.step(0.05) == []  # first sight: maps not read yet
    assert key in world.table.libraries_wanted  # the daemon must read them
    assert world.table.jobs == {}
    assert world.step(0.1) == []  # read: no TensorFlow
    assert world.read_times(key) == [0.1]
    world.set(key, libraries=TF_LIBS)  # `import tensorflow` done
    events: list[Event] = []
    at = 0.1
    while not events and at < 5:
        at = round(at + 0.05, 2)
        events = world.step(at)
    started = only(events, JobStarted)
    assert started.rule == "tf"
    assert at == world.read_times(key)[-1]  # matched on the first read that saw it
    assert at <= 0.4  # reads at doubling ages: 0.1, 0.2, 0.4 ...
    job = world.table.jobs[key]
    assert job.tensorflow
    assert job.budget.threads == thread_budget(4, True, None, 8).threads
    # Known to be TensorFlow now: its maps are never read again.
    reads = len(world.reads)
    for later in range(1, 100):
        world.step(at + later)
        assert key not in world.table.libraries_wanted
    assert len(world.reads) == reads


def test_libraries_are_reread_at_doubling_ages_not_every_scan() -> None:
    world = World(TF_ONLY)
    key = world.spawn(500, libraries=PLAIN_LIBS)
    for tick in range(0, 1001):  # ten scans a second for 100 s
        assert world.step(tick / 10) == []
    times = world.read_times(key)
    assert 5 <= len(times) <= 12, times  # a handful of reads, not one per scan
    ages = [t for t in times if t > 0]
    for earlier, later in itertools.pairwise(ages):
        # Due at twice the age of the last read, read in the scan after that.
        assert 2 * earlier <= later <= 2 * earlier + 0.21, times
    assert times[-1] > 50  # still watched long after grace: imports can come late


def test_tensorflow_imported_after_an_hour_is_still_noticed() -> None:
    world = World(TF_ONLY)
    key = world.spawn(500, libraries=PLAIN_LIBS)
    at = 0
    while at < 3600:
        assert world.step(at) == []
        at += 10
    world.set(key, libraries=TF_LIBS)
    started: list[Event] = []
    while not started and at < 3 * 3600:
        started = of_type(world.step(at), JobStarted)
        at += 10
    assert len(started) == 1
    assert key in world.table.jobs
    assert len(world.read_times(key)) < 20


def test_loads_rule_never_matches_a_process_without_the_library() -> None:
    world = World(TF_ONLY)
    world.spawn(500, libraries=PLAIN_LIBS)
    for at in range(0, 200):
        assert world.step(at) == []
    assert world.table.jobs == {}


SHIPPED_RULES = """
[defaults]
grace = 10

[[rules]]
name = "tensorflow"
match.loads = ["tensorflow"]
cpus = 4

[[rules]]
name = "python"
match.exe = ["python*"]
cpus = 2
"""


def test_python_job_becomes_tensorflow_job_when_tf_loads() -> None:
    world = World(SHIPPED_RULES)
    key = world.spawn(500, libraries=PLAIN_LIBS)
    started = only(world.step(0.05), JobStarted)
    assert started.rule == "python"
    assert len(world.cpus(key)) == 2  # confined from the start
    assert key in world.table.libraries_wanted
    assert world.step(0.1) == []  # read: not yet
    world.set(key, libraries=TF_LIBS)
    events: list[Event] = []
    at = 0.1
    while not events and at < 5:
        at = round(at + 0.05, 2)
        events = world.step(at)
    changed = only(events, JobChanged)
    assert changed.rule == "tensorflow"
    assert len(changed.cpus) == 4
    job = world.table.jobs[key]
    assert job.rule.name == "tensorflow"
    assert job.tensorflow
    assert changed.budget == thread_budget(4, True, None, 8).threads
    world.step(at + 100)
    assert key not in world.table.libraries_wanted


def test_tensorflow_noticed_for_a_job_matched_without_loads() -> None:
    world = World(PYTHON_RULE)
    key = world.spawn(500, libraries=PLAIN_LIBS)
    world.step(0.05)
    assert key in world.table.libraries_wanted  # the core asks for the maps...
    world.step(0.1)
    world.set(key, libraries=TF_LIBS)
    at = 0.1
    while at < 5 and not world.table.jobs[key].tensorflow:
        at = round(at + 0.05, 2)
        assert world.step(at) == []  # the budget changes quietly
    job = world.table.jobs[key]
    assert job.tensorflow  # ...and uses them
    assert job.rule.name == "py"
    assert job.budget.threads == thread_budget(2, True, None, 8).threads


def test_over_budget_job_gets_its_libraries_read_before_a_violation() -> None:
    # A job that went over budget since its maps were last read may just have loaded
    # TensorFlow: the core reads them again before counting the sample.
    world = World(PYTHON_RULE.replace("cpus = 2", "cpus = 1") + "[defaults]\ngrace = 1\n")
    key = world.spawn(500, threads=2, libraries=PLAIN_LIBS)
    for at in range(0, 40):
        world.step(at)
    reads = len(world.read_times(key))
    budget = world.table.jobs[key].budget.threads
    assert budget == thread_budget(1, False, None, 8).threads
    world.set(key, threads=budget + 5, libraries=TF_LIBS)  # `import tensorflow`, 2 s ago
    assert world.step(40) == []
    assert key in world.table.libraries_wanted  # re-read now, not at the doubling age
    assert world.step(41) == []
    assert len(world.read_times(key)) == reads + 1
    job = world.table.jobs[key]
    assert job.tensorflow
    assert job.budget.threads == thread_budget(1, True, None, 8).threads
    for at in range(42, 60):
        assert world.step(at) == []  # within the TensorFlow budget: no violation
    assert not world.table.violations


def test_over_budget_without_tensorflow_is_a_violation_one_scan_later() -> None:
    world = World(PYTHON_RULE + "[defaults]\ngrace = 1\nviolation_after = 3\n")
    key = world.spawn(500, threads=2, libraries=PLAIN_LIBS)
    for at in range(0, 40):
        world.step(at)
    world.set(key, threads=100)
    assert world.step(40) == []  # threads changed since the last read: read first
    assert world.step(41) == []  # read, plain Python: 1st over sample
    assert world.step(42) == []  # 2nd
    onset = only(world.step(43), ViolationStarted)
    assert onset.threads == 100


# -- reload ------------------------------------------------------------------------------

TWO_RULES = """
[[rules]]
name = "train"
match.cmdline = "train"
cpus = 2

[[rules]]
name = "serve"
match.cmdline = "serve"
cpus = 2
"""


def test_replace_policy_reallocates_and_ends_unmatched_jobs() -> None:
    world = World(TWO_RULES, online=range(8))
    train = world.spawn(500, cmdline=("python3", "train.py"))
    child = world.spawn(501, ppid=500)
    serve = world.spawn(502, cmdline=("python3", "serve.py"))
    world.spawn(503, exe="/usr/bin/bash", cmdline=("bash", "serve"))
    world.step(1)
    assert set(world.table.jobs) == {train, serve}

    world.table.replace_policy(
        policy(
            '[daemon]\nreserved_cpus = "0-1"\n'
            '[[rules]]\nname = "serve"\nmatch.cmdline = "serve"\ncpus = 3\n'
            '[[rules]]\nname = "bash"\nmatch.exe = ["bash"]\ncpus = 1\n'
        )
    )
    events = world.step(2)
    ended = of_type(events, JobEnded)
    assert len(ended) == 1
    assert isinstance(ended[0], JobEnded)
    assert ended[0].pid == 500
    assert ended[0].reason == "no rule matches any more"
    assert ended[0].live_pids == (500, 501)  # the backend must let them go
    assert train not in world.table.jobs and child not in world.table.jobs
    changed = of_type(events, JobChanged)
    assert len(changed) == 1 and changed[0].pid == 502
    assert len(world.cpus(serve)) == 3
    assert not world.cpus(serve) & {0, 1}
    # A process the old policy ignored is classified afresh.
    started = of_type(events, JobStarted)
    assert len(started) == 1 and started[0].pid == 503
    for job in world.table.jobs.values():
        assert not job.cpus & {0, 1}


def test_replace_policy_without_changes_is_quiet() -> None:
    world = World(TWO_RULES)
    world.spawn(500, cmdline=("python3", "train.py"))
    world.step(1)
    world.table.replace_policy(policy(TWO_RULES))
    assert world.step(2) == []


def test_job_ended_by_reload_reports_the_cpus_it_held() -> None:
    world = World(TWO_RULES)
    train = world.spawn(500, cmdline=("python3", "train.py"))
    world.step(1)
    held = world.cpus(train)
    world.table.replace_policy(policy('[[rules]]\nname = "x"\nmatch.exe = ["none"]\n'))
    ended = only(world.step(2), JobEnded)
    assert ended.cpus == held


def test_reload_that_lowers_a_cap_is_respected() -> None:
    world = World(PYTHON_RULE, online=range(8))
    keys = [world.spawn(500 + n) for n in range(3)]
    world.step(1)
    assert len(frozenset().union(*(world.cpus(k) for k in keys))) == 6
    world.table.replace_policy(policy(PYTHON_RULE + "[users.alice]\nmax_cpus = 2\n"))
    world.step(2)
    assert len(frozenset().union(*(world.cpus(k) for k in keys))) == 2


# -- monitor mode ------------------------------------------------------------------------


def test_monitor_mode_tracks_jobs_and_violations() -> None:
    world = World(TIGHT, enforcing=False)
    key = world.spawn(500, threads=9)
    started = only(world.step(0), JobStarted)
    assert not started.enforced
    assert "would confine" in started.message()
    assert key in world.table.jobs
    assert world.table.jobs[key].cpus == frozenset({0})
    world.run(1, 12)
    assert len(of_type(world.step(12), ViolationStarted)) == 1
    world.kill(key)
    assert [type(e) for e in world.step(13)] == [ViolationEndedWithJob, JobEnded]


# -- nothing kept for processes that are gone ---------------------------------------------


def private_state(table: JobTable) -> dict[str, int]:
    """Sizes of the table's per-process bookkeeping (implementation details)."""
    names = ("_member_of", "_ignored", "_waiting", "_library_reads", "_recheck")
    return {name: len(getattr(table, name)) for name in names}


def test_no_state_left_for_exited_plain_processes() -> None:
    world = World(SHIPPED_RULES)
    keys = [world.spawn(500 + n, threads=2) for n in range(5)]
    world.spawn(600, exe="/usr/bin/bash")
    world.spawn(601, ppid=500)
    world.run(0, 20)
    world.kill(*world.procs)
    world.run(20, 22)
    assert world.table.jobs == {}
    assert all(key not in world.table.libraries_wanted for key in keys)
    assert private_state(world.table) == dict.fromkeys(private_state(world.table), 0)


def test_no_state_left_for_a_job_that_exits_right_after_going_over_budget() -> None:
    world = World(TIGHT.replace("max_threads = 5\n", ""))  # a derived budget: TF would matter
    for n in range(50):
        key = world.spawn(1000 + n, threads=1, started_at=T0 + 2 * n - 20)
        world.step(2 * n)
        world.step(2 * n + 0.5)  # maps read; next read due at twice its age
        world.set(key, threads=50)  # over budget, thread count changed since that read
        assert world.step(2 * n + 1) == []  # -> libraries wanted again before judging
        assert key in world.table.libraries_wanted
        world.kill(key)
    world.run(100, 102)
    assert world.table.jobs == {}
    assert private_state(world.table) == dict.fromkeys(private_state(world.table), 0)


# -- CPU use -----------------------------------------------------------------------------


def test_cpu_percent_from_cpu_seconds() -> None:
    world = World()
    key = world.spawn(500)
    child = world.spawn(501, ppid=500)
    world.step(1)
    world.set(key, cpu_seconds=1.0)
    world.set(child, cpu_seconds=0.5)
    world.step(3)
    assert world.table.jobs[key].cpu_percent == pytest.approx(75.0)


# -- invariants over random histories --------------------------------------------------

RANDOM_POLICY = """
[daemon]
reserved_cpus = "0"

[defaults]
grace = 2
violation_after = 2

[[rules]]
name = "tf"
match.loads = ["tensorflow"]
cpus = 3

[[rules]]
name = "py"
match.exe = ["python*"]
cpus = 2
max_threads = 6

[users.alice]
max_cpus = 3
"""

USERS = {"alice": 1000, "bob": 1001, "root": 0}


@dataclass(frozen=True)
class Op:
    kind: str  # "spawn", "kill", "threads", "libraries"
    who: int  # an index into the live processes (or the parent, for spawn)
    value: int


ops = st.lists(
    st.builds(
        Op,
        st.sampled_from(["spawn", "spawn", "kill", "threads", "libraries"]),
        st.integers(min_value=0, max_value=50),
        st.integers(min_value=0, max_value=12),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(min_value=2, max_value=6))
def test_invariants_over_random_histories(history: list[Op], ncpus: int) -> None:
    world = World(RANDOM_POLICY, online=range(ncpus))
    eligible = frozenset(range(1, ncpus))
    next_pid = 1000
    for at, op in enumerate(history):
        live = sorted(world.procs)
        if op.kind == "spawn":
            parent = live[op.who % len(live)].pid if live and op.who % 3 else 1
            user = list(USERS)[op.value % 3]
            world.spawn(
                next_pid,
                ppid=parent,
                user=user,
                uid=USERS[user],
                exe=PYTHON if op.value % 4 else "/usr/bin/bash",
                threads=1 + op.value,
                started_at=T0 + at,
            )
            next_pid += 1
        elif live and op.kind == "kill":
            world.kill(live[op.who % len(live)])
        elif live and op.kind == "threads":
            world.set(live[op.who % len(live)], threads=1 + op.value)
        elif live:
            world.set(live[op.who % len(live)], libraries=TF_LIBS if op.value % 2 else PLAIN_LIBS)

        before = {key.pid for key in world.table.jobs}
        events = world.step(at)
        after = {key.pid for key in world.table.jobs}
        started = {e.pid for e in of_type(events, JobStarted)}
        ended = {e.pid for e in of_type(events, JobEnded)}
        assert not started & before and ended <= before
        assert after == (before - ended) | started  # PIDs are not reused here

        members: set[ProcKey] = set()
        for key, job in world.table.jobs.items():
            assert job.id == key
            assert job.members, "a job without members should have ended"
            assert job.members <= world.procs.keys()
            assert not members & job.members, "a process in two jobs"
            members |= job.members
            assert job.cpus and job.cpus <= eligible
            assert job.threads == sum(world.procs[k].sample.threads for k in job.members)
            if key in world.procs:  # root was not named: never the head of a job
                assert world.procs[key].identity.uid >= 1000
            if job.record is not None:
                assert job.violation.active
                assert job.record.ended is None
        alice = [job.cpus for job in world.table.jobs.values() if job.user == "alice"]
        assert len(frozenset().union(*alice)) <= 3
        ongoing = [r for r in world.table.violations if r.ended is None]
        assert len(ongoing) == sum(1 for j in world.table.jobs.values() if j.record is not None)


# -- the exec fast path ------------------------------------------------------------------


def execs(world: World, key: ProcKey, exe: str, cmdline: tuple[str, ...], mark: int) -> Observed:
    """The process `key` runs a new program: same PID and start, new exe and exec mark."""
    old = world.procs[key]
    world.procs[key] = replace(
        old,
        sample=replace(old.sample, exec_mark=mark),
        identity=replace(old.identity, exe=exe, cmdline=cmdline),
        libraries=None,
    )
    return world.procs[key]


def test_admit_places_a_matching_exec_before_any_scan() -> None:
    world = World()
    key = world.spawn(500)
    events, job = world.table.admit(world.procs[key], T0)
    assert [type(e) for e in events] == [JobStarted]
    assert job is not None and job.id == key and len(job.cpus) == 2
    assert world.step(1) == []  # the scan finds it placed already: no second JobStarted
    assert world.table.jobs[key].members == {key}


def test_admit_joins_a_child_of_a_job_to_that_job() -> None:
    world = World()
    parent = world.spawn(500)
    world.step(0)
    child = world.spawn(501, ppid=500, cmdline=("python3", "-c", "worker"))
    events, job = world.table.admit(world.procs[child], T0 + 0.5)
    assert events == [] and job is world.table.jobs[parent]
    assert job.members == {parent, child}


def test_admit_of_an_unmatched_exec_is_no_job() -> None:
    world = World()
    key = world.spawn(500, exe="/usr/bin/bash", cmdline=("bash",))
    assert world.table.admit(world.procs[key], T0) == ([], None)


def test_a_process_that_execs_python_is_classified_again() -> None:
    world = World()
    shell = world.spawn(500, exe="/usr/bin/bash", cmdline=("bash", "run.sh"))
    assert world.step(0) == [] and world.table.jobs == {}
    execs(world, shell, PYTHON, ("python3", "train.py"), mark=2)
    started = of_type(world.step(1), JobStarted)  # the scan alone notices the new program
    assert [e.pid for e in started] == [500]


def test_admit_decides_again_for_an_ignored_process_that_execd() -> None:
    world = World()
    shell = world.spawn(500, exe="/usr/bin/bash", cmdline=("bash",))
    world.step(0)
    process = execs(world, shell, PYTHON, ("python3", "train.py"), mark=2)
    events, job = world.table.admit(process, T0 + 0.2)
    assert job is not None and [type(e) for e in events] == [JobStarted]


def test_exe_prefilter_follows_the_rules_and_reloads() -> None:
    world = World()  # PYTHON_RULE: exe python*
    assert world.table.may_match_exe("python3.11")
    assert not world.table.may_match_exe("bash")
    world.table.replace_policy(policy('[[rules]]\nname = "b"\nmatch.exe = ["ba*"]\n'))
    assert world.table.may_match_exe("bash")
    assert not world.table.may_match_exe("python3")
    default_python = World('[[rules]]\nname = "u"\nmatch.users = ["alice"]\n').table
    assert default_python.may_match_exe("pypy3") and not default_python.may_match_exe("sh")
    assert not World("rules = []\n").table.may_match_exe("python3")  # no rules: nothing can match


def test_exit_events_end_a_job_with_its_last_process() -> None:
    world = World()
    parent = world.spawn(500)
    world.step(0)
    child = world.spawn(501, ppid=500)
    world.table.admit(world.procs[child], T0 + 0.1)
    assert world.table.exited(999, T0 + 0.2) == []  # in no job
    assert world.table.exited(501, T0 + 0.2) == []  # the job goes on
    assert world.table.jobs[parent].members == {parent}
    [ended] = world.table.exited(500, T0 + 0.3)
    assert isinstance(ended, JobEnded) and ended.pid == 500 and ended.reason == "exited"
    assert world.table.jobs == {} and world.table.job_of(500) is None
    world.kill(parent, child)
    assert world.step(1) == []  # the scan finds nothing left to end


FORESIGHT_POLICY = """
[[rules]]
name = "big"
match.cmdline = "big"
cpus = 3

[[rules]]
name = "py"
match.exe = ["python*"]
cpus = 1

[users.carol]
max_cpus = 2
"""


def foreseen(table: JobTable, process: Observed) -> frozenset[int] | None:
    """What the exec path asks, from what it has read before the stat file."""
    return table.foreseen_cpus(process.key.pid, process.sample.ppid, process.identity)


def test_the_exec_path_foresees_a_new_jobs_cpus() -> None:
    world = World(FORESIGHT_POLICY, online=range(4))
    world.table.foresee()
    first = world.procs[world.spawn(500)]
    assert foreseen(world.table, first) == frozenset({0})
    _, job = world.table.admit(first, T0)
    assert job is not None and job.cpus == frozenset({0})
    assert foreseen(world.table, world.procs[world.spawn(501)]) is None  # stale now
    world.table.foresee()
    second = world.procs[world.spawn(502, cmdline=("python3", "big.py"))]
    assert foreseen(world.table, second) == frozenset({1, 2, 3})
    child = world.procs[world.spawn(503, ppid=500)]
    assert foreseen(world.table, child) == frozenset({0})  # its parent's job's
    capped = world.procs[world.spawn(504, user="carol")]
    assert foreseen(world.table, capped) is None
    assert foreseen(world.table, world.procs[world.spawn(DAEMON_PID)]) is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["spawn", "child", "exec again", "exit", "foresee"]),
            st.sampled_from(["alice", "bob", "carol"]),
            st.booleans(),  # "big" on the command line
            st.sampled_from([None, frozenset({2, 3}), frozenset({0})]),  # an outer cpuset
            st.integers(0, 30),
        ),
        max_size=40,
    )
)
def test_foreseen_cpus_are_what_admit_grants(
    steps: list[tuple[str, str, bool, frozenset[int] | None, int]],
) -> None:
    """Whatever happened before, a foreseen grant is the grant: the exec path sets it
    before `admit` places the job."""
    world = World(FORESIGHT_POLICY, online=range(4))
    pid = 1000
    for action, user, big, cpuset, pick in steps:
        members = sorted(world.table._member_pids)
        if action == "foresee":
            world.table.foresee()
            continue
        if action == "exit":
            if members:
                world.table.exited(members[pick % len(members)], T0)
            continue
        if action == "exec again" and members:  # a job's process runs another program
            again = world.procs[world.table._member_pids[members[pick % len(members)]]]
            expected = foreseen(world.table, again)
            _, job = world.table.admit(again, T0)
            assert job is not None and job.cpus == expected
            continue
        pid += 1
        ppid = members[pick % len(members)] if action == "child" and members else 1
        cmdline = ("python3", "big.py" if big else "job.py")
        key = world.spawn(pid, ppid=ppid, user=user, cmdline=cmdline)
        process = world.procs[key]
        process = replace(process, identity=replace(process.identity, cpuset=cpuset))
        expected = foreseen(world.table, process)
        _, job = world.table.admit(process, T0)
        if expected is not None:
            assert job is not None and job.cpus == expected


# -- jobs are process trees (issue 11) ----------------------------------------------------

TREE_POLICY = """
[defaults]
grace = 1

[[rules]]
name = "parent"
match.cmdline = "launch"
cpus = 1

[[rules]]
name = "child"
match.exe = ["python*"]
cpus = 2
"""


def lineage_of(world: World, ppid: int) -> tuple[list[Sample], int]:
    """What the exec path reads (daemon._lineage): the parents the table does not know,
    nearest first, and the PID of the first it knows."""
    by_pid = {key.pid: key for key in world.procs}
    lineage: list[Sample] = []
    while not world.table.ancestry_known(ppid) and ppid in by_pid:
        lineage.append(world.procs[by_pid[ppid]].sample)
        ppid = lineage[-1].ppid
    return lineage, ppid


def exec_python(world: World, key: ProcKey, cmdline: tuple[str, ...]) -> tuple[list[Event], Any]:
    """`key` execs Python, and the exec path decides, as daemon._admit does."""
    process = execs(world, key, PYTHON, cmdline, mark=key.pid)
    lineage, ancestor = lineage_of(world, process.sample.ppid)
    expected = world.table.foreseen_cpus(key.pid, ancestor, process.identity)
    events, job = world.table.admit(process, T0 + 0.5, lineage)
    if expected is not None:
        assert job is not None and job.cpus == expected
    return events, job


@pytest.mark.parametrize(
    "between",
    [
        [("/usr/bin/dash", ("sh", "-c", "python3 trial.py; true"))],  # os.system
        [("/usr/bin/bash", ("bash", "run.sh"))],
        [("/usr/bin/timeout", ("timeout", "60", "python3"))],
        [("/usr/bin/env", ("env", "A=1", "sh", "-c", "x")), ("/usr/bin/dash", ("sh", "-c"))],
    ],
    ids=["sh -c", "bash run.sh", "timeout", "env + sh"],
)
def test_python_below_unmatched_processes_joins_the_job_at_exec(
    between: list[tuple[str, tuple[str, ...]]],
) -> None:
    world = World(TREE_POLICY, online=range(4))
    launcher = world.spawn(500, cmdline=("python3", "launch.py"))
    world.step(0)
    parent = launcher
    for n, (exe, cmdline) in enumerate(between):  # forked since the scan: unknown to it
        parent = world.spawn(501 + n, ppid=parent.pid, exe=exe, cmdline=cmdline)
    trial = world.spawn(600, ppid=parent.pid, cmdline=("python3", "trial.py"))
    events, job = exec_python(world, trial, ("python3", "trial.py"))
    assert events == [] and job is world.table.jobs[launcher]  # not a job under "child"
    assert job.members == set(world.procs)  # the processes between are members too
    assert world.table.ancestry_known(parent.pid)  # the next trial costs no read
    assert lineage_of(world, parent.pid) == ([], parent.pid)
    assert not of_type(world.step(1), JobStarted) and set(world.table.jobs) == {launcher}
    assert job.members == set(world.procs)


def test_a_process_left_out_joins_once_its_ancestry_says_so() -> None:
    world = World(TREE_POLICY, online=range(4))
    shell = world.spawn(500, exe="/usr/bin/bash", cmdline=("bash",))
    script = world.spawn(501, ppid=500, exe="/usr/bin/dash", cmdline=("sh", "run.sh"))
    helper = world.spawn(502, ppid=501, cmdline=("python3", "-m", "http.server"), uid=33)
    assert world.step(0) == [] and world.table.jobs == {}  # a system user's: ignored
    # The shell execs the launcher: the script and its Python are below a job now.
    world.procs[shell] = execs(world, shell, PYTHON, ("python3", "launch.py"), mark=9)
    events, job = world.table.admit(world.procs[shell], T0 + 1)
    assert [type(e) for e in events] == [JobStarted] and job is not None
    assert world.step(1) == []  # joining is no event
    assert world.table.jobs[shell].members == {shell, script, helper}


def test_a_job_found_below_another_job_is_taken_into_it() -> None:
    world = World(TREE_POLICY, online=range(4))
    shell = world.spawn(500, exe="/usr/bin/bash", cmdline=("bash", "go.sh"))
    worker = world.spawn(501, ppid=500, cmdline=("python3", "worker.py"))
    world.step(0)
    assert set(world.table.jobs) == {worker}  # "child": the shell is in no job
    world.procs[shell] = execs(world, shell, PYTHON, ("python3", "launch.py"), mark=9)
    world.table.admit(world.procs[shell], T0 + 0.5)
    events = world.step(1)
    [ended] = of_type(events, JobEnded)
    assert ended.pid == 501 and "descends from job 500" in ended.reason
    assert ended.live_pids == ()  # its processes stay confined, to the enclosing grant
    assert set(world.table.jobs) == {shell}
    assert world.table.jobs[shell].members == {shell, worker}
    assert world.table.job_of(501) is world.table.jobs[shell]


def test_a_member_whose_parent_exits_stays_in_its_job() -> None:
    world = World(TREE_POLICY, online=range(4))
    launcher = world.spawn(500, cmdline=("python3", "launch.py"))
    shell = world.spawn(501, ppid=500, exe="/usr/bin/dash", cmdline=("sh", "-c", "x &"))
    orphan = world.spawn(502, ppid=501, cmdline=("python3", "trial.py"))
    world.step(0)
    assert world.table.jobs[launcher].members == {launcher, shell, orphan}
    world.kill(shell)
    world.table.exited(501, T0 + 0.5)
    world.procs[orphan] = replace(
        world.procs[orphan], sample=replace(world.procs[orphan].sample, ppid=1)
    )  # reparented to init
    for at in range(1, 4):
        assert world.step(at) == []
    assert world.table.jobs[launcher].members == {launcher, orphan}
    world.kill(launcher)
    assert world.step(4) == []  # the job goes on with the orphan
    world.kill(orphan)
    assert [e.pid for e in of_type(world.step(5), JobEnded)] == [500]


def test_exits_make_a_pid_unknown_to_the_exec_path_again() -> None:
    world = World(TREE_POLICY, online=range(4))
    world.spawn(400, exe="/usr/bin/bash", cmdline=("bash",))
    world.step(0)
    assert world.table.ancestry_known(400) and not world.table.ancestry_known(401)
    world.table.exited(400, T0)
    assert not world.table.ancestry_known(400)  # a reused PID may be a job's descendant
    assert world.table.ancestry_known(1)


# -- facts from every member --------------------------------------------------------------


def test_tensorflow_in_a_child_is_found_and_budgets_the_whole_job() -> None:
    world = World(TREE_POLICY.replace("cpus = 1", "cpus = 2"), online=range(4))
    launcher = world.spawn(500, cmdline=("python3", "launch.py"), threads=1)
    world.spawn(501, ppid=500, exe="/usr/bin/dash", cmdline=("sh", "-c", "x"))
    trial = world.spawn(502, ppid=501, cmdline=("python3", "w_tf.py"), libraries=PLAIN_LIBS)
    world.step(0)
    job = world.table.jobs[launcher]
    python, tensorflow = 4 + 2 * 2, 6 + 7 * 2
    assert job.budget.threads == 2 * python + 1 + 8  # launcher + trial + the shell, + slack
    assert not job.tensorflow
    world.set(trial, libraries=TF_LIBS, threads=19)  # `import tensorflow`, a default fit
    at = 0.0
    while not job.tensorflow and at < 10:
        at = round(at + 0.1, 1)
        world.step(at)
    assert job.tensorflow and 0 < at <= 4  # read on the trial's own doubling schedule
    assert job.budget.threads == python + tensorflow + 1 + 8
    assert "1 TensorFlow" in job.budget.basis and "1 other" in job.budget.basis
    for later in range(5, 30):
        world.set(launcher, threads=2)
        assert not of_type(world.step(later), ViolationStarted)  # 21 threads < 39: no alarm
    assert trial not in world.table.libraries_wanted  # TensorFlow: never read again
    world.kill(trial)
    world.step(30)
    assert not job.tensorflow and job.budget.threads == python + 1 + 8


def test_members_libraries_are_read_at_doubling_ages_each() -> None:
    world = World(TREE_POLICY, online=range(4))
    launcher = world.spawn(500, cmdline=("python3", "launch.py"))
    world.step(0)
    trial = world.spawn(501, ppid=500, started_at=T0 + 50)
    for tick in range(1, 1001):
        world.step(tick / 10)
    for key, born in ((launcher, 0.0), (trial, 50.0)):
        ages = [t - born for t in world.read_times(key) if t > born]
        assert 4 <= len(ages) <= 12, ages
        for earlier, later in itertools.pairwise(ages):
            assert 2 * earlier <= later <= 2 * earlier + 0.21, ages


def test_a_child_over_budget_gets_its_libraries_read_before_a_violation() -> None:
    world = World(TREE_POLICY)
    launcher = world.spawn(500, cmdline=("python3", "launch.py"), threads=1)
    trial = world.spawn(501, ppid=500, threads=1, libraries=PLAIN_LIBS)
    world.run(0, 40)
    world.set(trial, threads=25, libraries=TF_LIBS)  # over the two-Python budget
    assert world.step(40) == []
    assert trial in world.table.libraries_wanted and launcher not in world.table.libraries_wanted
    world.run(41, 60)
    assert world.table.jobs[launcher].tensorflow and not world.table.violations


def test_an_oversized_trial_below_a_shell_is_a_violation_of_the_parent_job() -> None:
    world = World(TREE_POLICY)
    launcher = world.spawn(500, cmdline=("python3", "launch.py"))
    world.step(0)
    shell = world.spawn(501, ppid=500, exe="/usr/bin/dash", cmdline=("sh", "-c", "t"))
    trial = world.spawn(502, ppid=501, cmdline=("python3", "w_tf.py", "--intra", "16"))
    exec_python(world, trial, ("python3", "w_tf.py"))
    world.set(trial, threads=42, libraries=TF_LIBS)
    events = world.run(1, 10)
    [onset] = of_type(events, ViolationStarted)
    assert onset.pid == 500 and onset.threads == 44  # launcher + shell + the trial's 42
    assert onset.budget == (4 + 2) + (6 + 7) + 1 + 8
    assert world.table.jobs[launcher].members == {launcher, shell, trial}


# -- invariants over random process trees -------------------------------------------------

PROGRAMS = [
    ("/usr/bin/dash", ("sh", "-c", "x")),
    (PYTHON, ("python3", "launch.py")),  # rule "parent"
    (PYTHON, ("python3", "trial.py")),  # rule "child"
    ("/usr/bin/timeout", ("timeout", "60")),
]


@dataclass(frozen=True)
class TreeOp:
    kind: str  # "fork", "exec", "exit", "scan"
    who: int
    what: int


tree_ops = st.lists(
    st.builds(
        TreeOp,
        st.sampled_from(["fork", "fork", "exec", "exec", "exit", "scan"]),
        st.integers(0, 60),
        st.integers(0, len(PROGRAMS) - 1),
    ),
    max_size=50,
)


# "trial" makes sub-jobs: 2 CPUs each, carved out of the 3 of a "parent" job
SUB_JOB_POLICY = TREE_POLICY.replace('name = "child"', 'name = "child"\nsub_job = true').replace(
    "cpus = 1", "cpus = 3"
)


@settings(max_examples=300, deadline=None)
@given(history=tree_ops)
@pytest.mark.parametrize("rules", [TREE_POLICY, SUB_JOB_POLICY], ids=["members", "sub-jobs"])
def test_invariants_over_random_fork_exec_exit(rules: str, history: list[TreeOp]) -> None:
    """Forks, execs (the exec path, with its ancestry walk) and exits in any order, scans
    between: every process in at most one job; a job's process runs on CPUs within its
    grant, and after a scan so does every process below a job (masks as the daemon sets
    them: inherited at fork, set at exec and at every scan; a process forked before its
    ancestor became a job waits for that scan); after a scan, a process whose parent is in
    a job is in that job or in a sub-job of it; a sub-job's CPUs are within its enclosing
    job's; no job outlives its last member and its last sub-job."""
    online = frozenset(range(6))
    world = World(rules, online=online)
    init = world.spawn(100, ppid=0, exe="/sbin/init", cmdline=("init",), uid=0, user="root")
    masks = {init: online}
    next_pid = 1000
    for at, op in enumerate(history):
        live = sorted(world.procs)
        target = live[op.who % len(live)]
        if op.kind == "fork":
            seen = world.procs[target]
            child = world.spawn(
                next_pid, ppid=target.pid, exe=seen.identity.exe, cmdline=seen.identity.cmdline
            )
            masks[child] = masks[target]
            next_pid += 1
        elif op.kind == "exec" and target != init:
            exe, cmdline = PROGRAMS[op.what]
            process = execs(world, target, exe, cmdline, mark=at + 1)
            if world.table.may_match_exe(os.path.basename(exe)):
                lineage, _ = lineage_of(world, process.sample.ppid)
                enclosing = nearest_job(world, process.sample.ppid)
                _, job = world.table.admit(process, T0 + at, lineage)
                if job is not None:  # the exec path confines it and the processes between
                    for key in (target, *(sample.key for sample in lineage)):
                        masks[key] = job.cpus
                if enclosing is not None:  # never a job of its own under another rule
                    assert job is not None and job.id in (enclosing.id, target)
        elif op.kind == "exit" and target != init:
            world.kill(target)
            del masks[target]
            for key, seen in list(world.procs.items()):
                if seen.sample.ppid == target.pid:  # reparented to init
                    world.procs[key] = replace(seen, sample=replace(seen.sample, ppid=init.pid))
            world.table.exited(target.pid, T0 + at)
        elif op.kind == "scan":
            world.step(at)
            for job in world.table.jobs.values():
                for key in job.members:
                    masks[key] = job.cpus
            for key, seen in world.procs.items():
                parent = world.table.job_of(seen.sample.ppid)
                if parent is not None:
                    assert parent.id in enclosing_jobs(world, key.pid), "below a job, not in it"

        members: set[ProcKey] = set()
        jobs = world.table.jobs
        for job in jobs.values():
            assert job.members <= world.procs.keys(), "a member that is gone"
            assert job.members or any(sub.parent == job.id for sub in jobs.values()), (
                "a job without members"
            )
            assert not members & job.members, "a process in two jobs"
            members |= job.members
            if job.parent is not None:
                assert job.cpus <= jobs[job.parent].cpus, "a sub-job outside its job's grant"
        for key in world.procs:
            job = nearest_job(world, key.pid)
            if job is not None and (op.kind == "scan" or key in members):
                assert masks[key] <= job.cpus, "a descendant outside its job's grant"


def enclosing_jobs(world: World, pid: int) -> list[ProcKey]:
    """The job of `pid` and every job enclosing it, innermost first."""
    job = world.table.job_of(pid)
    found: list[ProcKey] = []
    while job is not None:
        found.append(job.id)
        job = None if job.parent is None else world.table.jobs[job.parent]
    return found


def nearest_job(world: World, pid: int) -> Any:
    """The job of `pid` or of its nearest ancestor in one, by the current parent links."""
    by_pid = {key.pid: key for key in world.procs}
    while pid in by_pid:
        job = world.table.job_of(pid)
        if job is not None:
            return job
        pid = world.procs[by_pid[pid]].sample.ppid
    return None


def test_a_process_whose_parent_exited_unseen_joins_the_job_its_fence_names() -> None:
    """`sh -c "python train.py &"`: the shell is gone before the Python's exec is read,
    so no parent link leads to the job; the cgroup it inherited at fork does."""
    world = World(TREE_POLICY, online=range(4))
    launcher = world.spawn(500, cmdline=("python3", "launch.py"))
    world.step(0)
    name = world.table.jobs[launcher].name
    orphan = world.spawn(600, ppid=1, cmdline=("python3", "trial.py"))
    world.procs[orphan] = replace(
        world.procs[orphan], identity=replace(world.procs[orphan].identity, fence=name)
    )
    assert foreseen(world.table, world.procs[orphan]) == world.cpus(launcher)
    events, job = world.table.admit(world.procs[orphan], T0 + 0.5)
    assert events == [] and job is world.table.jobs[launcher]
    # Found by a scan alone too; a fence of a job that is gone names nothing.
    late = world.spawn(601, ppid=1, cmdline=("python3", "trial.py"))
    stale = world.spawn(602, ppid=1, cmdline=("python3", "other.py"))
    for key, fence in ((late, name), (stale, "999-1")):
        seen = world.procs[key]
        world.procs[key] = replace(seen, identity=replace(seen.identity, fence=fence))
    started = of_type(world.step(1), JobStarted)
    assert world.table.jobs[launcher].members == {launcher, orphan, late}
    assert [e.pid for e in started] == [602]  # "child": a job of its own


def test_one_user_holds_at_most_max_registered_jobs() -> None:
    """A registration outlives its connection: without a bound one user's fork, register,
    exec loop held 1,000 jobs and the daemon's scans took 60% of a core."""
    world = World(online=range(2))
    declared = Registration(Declaration(cpus=1))

    def register(pid: int, uid: int, user: str) -> ProcKey:
        key = world.spawn(pid, exe="/bin/sleep", cmdline=("sleep",), uid=uid, user=user)
        world.table.register(world.procs[key], declared, T0)
        return key

    alice = [register(1000 + n, 1000, "alice") for n in range(MAX_REGISTERED_PER_USER)]
    with pytest.raises(RegistrationRefused, match=f"alice has {MAX_REGISTERED_PER_USER}"):
        register(5000, 1000, "alice")
    assert len(world.table.jobs) == MAX_REGISTERED_PER_USER  # nothing changed
    world.table.register(world.procs[alice[0]], declared, T0)  # its own again: an update
    register(6000, 1001, "bob")  # another user is not held back by alice
    for n in range(3):
        register(7000 + n, 0, "root")  # nor is root, by anyone
    world.kill(alice[1])
    world.step(T0 + 1)
    register(5001, 1000, "alice")  # one ended: room for one
