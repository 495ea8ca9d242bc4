"""A daemon restart: the grants it adopts (fences, masks) and the registrations it restores.

First the pure part (JobTable.adopt / restore on synthetic processes, hypothesis over
adopted grants and new jobs), then the real daemon killed with kill -9 while jobs run, with
the cgroup v1 and the affinity backends, and a state file that must not be trusted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import CPUSET, Daemon, Processes, StartDaemon, marked_rule, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from corecapd.client import DaemonUnreachable
from corecapd.core import JobTable
from corecapd.declaration import Declaration, Registration
from corecapd.events import Event, JobStarted, StateProblem
from corecapd.model import Identity, KeptRegistration, Observed, ProcKey, Sample
from corecapd.policy import parse_policy

T0 = 1_000_000.0
PYTHON = "/usr/bin/python3.11"


def rule(cpus: int, loads: str = "") -> str:
    return f"""
[daemon]
reserved_cpus = "{{reserved}}"
[[rules]]
name = "py"
match = {{{{ exe = ["python*"]{loads} }}}}
cpus = {cpus}
"""


class Host:
    """Synthetic processes and a JobTable: a restarted daemon's first scans."""

    def __init__(
        self, cpus: int = 2, online: Iterable[int] = range(8), reserved: str = "", loads: str = ""
    ) -> None:
        text = rule(cpus, f', loads = ["{loads}"]' if loads else "").format(reserved=reserved)
        self.text = text
        self.table = JobTable(parse_policy(text, "test.toml"), frozenset(online), 1, True)
        self.procs: dict[ProcKey, Observed] = {}

    def spawn(
        self,
        pid: int,
        ticks: int,
        uid: int = 1000,
        user: str = "alice",
        ppid: int = 1,
        libraries: frozenset[str] | None = frozenset(),
    ) -> ProcKey:
        key = ProcKey(pid, ticks)
        sample = Sample(key, ppid, 1, 0.0, T0 + ticks / 100, False)
        identity = Identity(uid, user, frozenset({user}), PYTHON, ("python3", "job.py"))
        self.procs[key] = Observed(sample, identity, libraries)
        return key

    def step(self, at: float = 0.0) -> list[Event]:
        return self.table.step(self.procs, T0 + at)

    def cpus(self, key: ProcKey) -> frozenset[int]:
        return self.table.jobs[key].cpus


def name(key: ProcKey) -> str:
    return f"{key.pid}-{key.start_ticks}"


# --- the pure part: JobTable.adopt ------------------------------------------------------------


def test_survivors_keep_their_fences_and_new_jobs_get_the_free_cores() -> None:
    host = Host(cpus=1, online=range(4))
    survivors = [host.spawn(100, 10), host.spawn(101, 11)]
    new = [host.spawn(200, 50), host.spawn(201, 51)]
    # Free-first by id would give the survivors 0 and 1: they held 3 and 1.
    host.table.adopt({name(survivors[0]): frozenset({3}), name(survivors[1]): frozenset({1})})
    started = [e for e in host.step() if isinstance(e, JobStarted)]
    assert [host.cpus(k) for k in survivors] == [{3}, {1}]
    assert {host.cpus(k) for k in new} == {frozenset({0}), frozenset({2})}
    assert all(not e.notes for e in started)


def test_fences_that_no_longer_fit_the_policy_are_placed_afresh() -> None:
    host = Host(cpus=2, online=range(4), reserved="0")
    wrong_size, reserved, fine = host.spawn(100, 10), host.spawn(101, 11), host.spawn(102, 12)
    host.table.adopt(
        {
            name(wrong_size): frozenset({1}),  # the rule was cpus = 1
            name(reserved): frozenset({0, 1}),  # CPU 0 is reserved now
            name(fine): frozenset({2, 3}),
        }
    )
    host.step()
    assert host.cpus(fine) == {2, 3}
    assert len(host.cpus(wrong_size)) == 2 and 0 not in host.cpus(reserved)
    notes = host.table.jobs[wrong_size].notes
    assert notes[0] == (
        "held CPUs 1 before corecapd restarted, but that is 1 CPUs, and its grant now is 2:"
        " placed afresh"
    )
    assert "CPUs 0 are not eligible now" in host.table.jobs[reserved].notes[0]


def test_a_users_cap_lowered_meanwhile_moves_the_job_that_goes_over_it() -> None:
    host = Host(cpus=1, online=range(4))
    text = host.text + "\n[users.alice]\nmax_cpus = 1\n"
    host.table = JobTable(parse_policy(text, "test.toml"), frozenset(range(4)), 1, True)
    first, second = host.spawn(100, 10), host.spawn(101, 11)
    host.table.adopt({name(first): frozenset({2}), name(second): frozenset({3})})
    host.step()
    assert host.cpus(first) == host.cpus(second) == {2}  # the cap: one core for alice
    assert "would hold more than its cap of 1 CPUs" in host.table.jobs[second].notes[0]


def test_cores_shared_before_stay_shared_and_new_jobs_get_the_free_ones() -> None:
    """Four jobs on two CPUs shared them; the two on CPU 0 ended while corecapd was down."""
    host = Host(cpus=1, online=range(2))
    b, d = host.spawn(101, 11), host.spawn(103, 13)
    new = [host.spawn(200, 50), host.spawn(201, 51)]
    host.table.adopt({name(b): frozenset({1})}, {name(d): frozenset({1})})  # a fence, a mask
    host.step()
    assert host.cpus(b) == host.cpus(d) == {1}
    assert [host.cpus(k) for k in new] == [{0}, {0}]
    assert host.table.jobs[d].notes == ("kept across a restart, sharing CPUs 1 with other jobs",)


def test_a_mask_that_is_a_valid_grant_is_kept() -> None:
    host = Host(cpus=2, online=range(4))
    job = host.spawn(100, 10)
    host.table.adopt({}, {name(job): frozenset({1, 3}), "garbage": frozenset({0})})
    host.step()
    assert host.cpus(job) == {1, 3}


def test_a_survivor_waiting_on_its_libraries_keeps_its_fence_from_new_jobs() -> None:
    """A `loads` rule matches only once the libraries are read (the second scan); a new job
    placed in the first scan must not take the survivor's cores meanwhile."""
    host = Host(cpus=1, online=range(2), loads="tensorflow")
    tf = frozenset({"libtensorflow_framework.so.2"})
    survivor = host.spawn(100, 10, libraries=None)
    new = host.spawn(200, 50, libraries=tf)
    host.table.adopt({name(survivor): frozenset({0})})
    host.step()
    assert survivor not in host.table.jobs and host.cpus(new) == {1}
    assert host.table.kept_for_later() == {name(survivor)}  # its fence stays meanwhile
    host.procs[survivor] = replace(host.procs[survivor], libraries=tf)
    host.step(1)
    assert host.cpus(survivor) == {0}


def test_adopted_grants_of_gone_processes_are_forgotten() -> None:
    host = Host(cpus=1, online=range(2))
    host.table.adopt({"300-30": frozenset({0})})
    host.step()
    later = host.spawn(300, 30)  # cannot happen (same start): stands for "not seen at first"
    host.step(1)
    assert host.cpus(later) == {0}
    assert not host.table.jobs[later].notes


# --- the pure part: JobTable.restore ------------------------------------------------------------

DECLARED = Registration(Declaration(cpus=1, intra_op=3))


def test_a_restored_registration_needs_the_uid_that_registered() -> None:
    host = Host(cpus=2, online=range(4))
    host.table = JobTable(  # a policy matching nobody: only registrations make jobs
        parse_policy('[[rules]]\nname = "none"\nmatch.cmdline = "x^"\n', "t"),
        frozenset(range(4)),
        1,
        True,
    )
    forged = host.spawn(100, 10, uid=0, user="root")  # entry saved as uid 1000
    legit_root = host.spawn(101, 11, uid=0, user="root")  # root registered before
    alice = host.spawn(102, 12)
    host.table.restore(
        {
            name(forged): KeptRegistration(1000, DECLARED),
            name(legit_root): KeptRegistration(0, DECLARED),
            name(alice): KeptRegistration(1000, DECLARED),
            "103-13": KeptRegistration(1000, DECLARED),  # gone
        }
    )
    events = host.step()
    assert forged not in host.table.jobs
    assert host.table.jobs[legit_root].registration == DECLARED
    assert host.table.jobs[alice].budget.basis.startswith("declared: intra 3")
    [problem] = [e for e in events if isinstance(e, StateProblem)]
    assert problem.error == (
        "the saved registration of job 100-10 was made by uid 1000; its process runs as"
        " uid 0: not applied"
    )
    assert sorted(n for n, _ in host.table.registrations()) == ["101-11", "102-12"]
    assert dict(host.table.registrations())["102-12"] == KeptRegistration(1000, DECLARED)


def test_a_jobs_child_that_registered_is_its_sub_job_again() -> None:
    host = Host(cpus=2, online=range(4))
    parent = host.spawn(100, 10)
    worker = host.spawn(101, 11, ppid=100)
    # what they held before: the worker's fence within its job's, as a sub-job's is
    host.table.adopt({name(parent): frozenset({2, 3}), name(worker): frozenset({3})})
    host.table.restore({name(worker): KeptRegistration(1000, DECLARED)})
    host.step()
    assert host.table.jobs[worker].registration == DECLARED
    assert host.table.job_of(101) is host.table.jobs[worker]
    assert host.table.jobs[worker].parent == parent
    assert host.cpus(parent) == {2, 3} and host.cpus(worker) < host.cpus(parent)


# --- the pure part, exhaustively ------------------------------------------------------------------


@st.composite
def restarts(
    draw: st.DrawFn,
) -> tuple[int, frozenset[int], int, list[tuple[frozenset[int], bool]], int]:
    online = draw(st.integers(1, 8))
    reserved = draw(st.frozensets(st.integers(0, online - 1), max_size=online - 1))
    size = draw(st.integers(1, 4))
    cpu = st.integers(0, online - 1)
    of_its_size = st.frozensets(cpu, min_size=min(size, online), max_size=min(size, online))
    grant = st.one_of(of_its_size, st.frozensets(cpu, min_size=1))  # mostly the rule's size
    grants = draw(st.lists(st.tuples(grant, st.booleans()), max_size=8))
    new = draw(st.integers(0, 6))
    return online, reserved, size, grants, new


@settings(max_examples=400, deadline=None)
@given(restarts())
def test_adopted_grants_and_new_jobs(
    case: tuple[int, frozenset[int], int, list[tuple[frozenset[int], bool]], int],
) -> None:
    """Survivors (older) with adopted grants, fences or masks, then new jobs, in one scan."""
    online, reserved, size, grants, new = case
    host = Host(cpus=size, online=range(online), reserved=",".join(map(str, sorted(reserved))))
    eligible = frozenset(range(online)) - reserved
    grant_size = min(size, len(eligible))
    survivors = [host.spawn(100 + i, 10 + i) for i in range(len(grants))]
    newcomers = [host.spawn(500 + i, 500 + i) for i in range(new)]
    fences = {name(k): cpus for k, (cpus, fence) in zip(survivors, grants, strict=True) if fence}
    masks = {name(k): cpus for k, (cpus, fence) in zip(survivors, grants, strict=True) if not fence}
    host.table.adopt(fences, masks)
    host.step()
    jobs = host.table.jobs
    assert all(key in jobs for key in newcomers)
    # never outside the eligible CPUs, always the rule's size
    assert all(j.cpus <= eligible and len(j.cpus) == grant_size for j in jobs.values())

    for key, (cpus, _) in zip(survivors, grants, strict=True):
        if cpus <= eligible and len(cpus) == grant_size:  # a valid grant: unchanged
            assert jobs[key].cpus == cpus, (key, cpus, jobs[key].notes)
        else:
            assert "before corecapd restarted, but" in jobs[key].notes[0]
    # never overlapping where free cores exist, but for grants shared before the restart
    held = Counter(cpu for j in jobs.values() for cpu in j.cpus)
    if eligible - held.keys():
        kept = {
            key for key, (cpus, _) in zip(survivors, grants, strict=True) if jobs[key].cpus == cpus
        }
        for cpu in (cpu for cpu, count in held.items() if count > 1):
            holders = {key for key, j in jobs.items() if cpu in j.cpus}
            assert holders <= kept, (cpu, holders)


# --- the real daemon, killed -------------------------------------------------------------------

CPUS = sorted(os.sched_getaffinity(0))
SLEEPER = """
import sys, threading
for _ in range(3):
    threading.Thread(target=sys.stdin.read, daemon=True).start()
sys.stdin.read()
"""  # 4 threads, until stdin closes
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
needs_cpuset = pytest.mark.skipif(not (CPUSET / "cpuset.cpus").is_file(), reason="no cgroup v1")


def cpuset_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cpuset").read_text().strip()


def masked(pid: int, cpus: set[int]) -> Callable[[], bool]:
    return lambda: os.sched_getaffinity(pid) == cpus


def fenced(subtree: Path, pid: int) -> Callable[[], bool]:
    return lambda: cpuset_of(pid).startswith(f"/{subtree.name}/job-{pid}-")


def served_job(daemon: Daemon, pid: int) -> dict[str, Any] | None:
    """The job in status, or None (also while the daemon does not answer yet)."""
    try:
        return daemon.job(pid)
    except (OSError, DaemonUnreachable):
        return None


def kill9(daemon: Daemon) -> None:
    """kill -9 the daemon by its PID: no goodbye, nothing cleaned up."""
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait()


def placed(daemon: Daemon, pids: Iterable[int]) -> dict[int, list[int]]:
    """Each job's CPUs from status, once every one of `pids` is a job."""

    def jobs() -> dict[int, list[int]] | None:
        found = {job["pid"]: job["cpus"] for job in daemon.status()["jobs"]}
        return found if all(pid in found for pid in pids) else None

    found: dict[int, list[int]] = wait_for(jobs, 15, "every job placed")
    return {pid: found[pid] for pid in pids}


def fence_of(subtree: Path, pid: int) -> tuple[str, str]:
    """The job's cpuset (as /proc/PID/cpuset says) and that cpuset's CPUs."""
    where = cpuset_of(pid)
    assert where.startswith(f"/{subtree.name}/job-{pid}-"), where
    return where, (CPUSET / where.lstrip("/") / "cpuset.cpus").read_text().strip()


def start_jobs(daemon: Daemon, processes: Processes, count: int) -> list[subprocess.Popen[bytes]]:
    """`count` jobs, each placed before the next starts (so the placement is the live
    allocator's: free cores first, then the least loaded)."""
    jobs = []
    for _ in range(count):
        jobs.append(processes.python(SLEEPER, stdin=subprocess.PIPE))
        daemon.wait_job(jobs[-1].pid)
    return jobs


@needs_two_cpus
@needs_cpuset
@pytest.mark.parametrize("backend", ["cgroup1", "affinity"])
def test_after_kill9_survivors_keep_their_cores_and_new_jobs_get_the_free_ones(
    start_daemon: StartDaemon, processes: Processes, marker: str, backend: str
) -> None:
    """Four jobs of 1 CPU on two CPUs (two share each); kill -9; the two on the first CPU
    end and two new ones start while corecapd is down; restart. Each survivor keeps its CPU
    (and fence), the new ones get the CPU freed, the ended jobs' fences go."""
    settings = {"backend": backend, "reserved_cpus": ",".join(map(str, CPUS[2:]))}
    first = start_daemon(daemon=settings, rules=marked_rule(marker, cpus=1))
    jobs = start_jobs(first, processes, 4)
    cpus = placed(first, [job.pid for job in jobs])
    assert sorted(c for cs in cpus.values() for c in cs) == [CPUS[0]] * 2 + [CPUS[1]] * 2
    subtree = CPUSET / f"corecap-test-{marker}"
    if backend == "cgroup1":
        wait_for(lambda: all(cpuset_of(j.pid).startswith(f"/{subtree.name}/job-") for j in jobs))
        fences = {job.pid: fence_of(subtree, job.pid) for job in jobs}
    kill9(first)

    ending = [job for job in jobs if cpus[job.pid] == [CPUS[0]]]
    survivors = [job for job in jobs if job not in ending]
    for job in ending:
        job.kill()
        job.wait()
    new = [processes.python(SLEEPER, stdin=subprocess.PIPE) for _ in range(2)]
    second = start_daemon(daemon=settings, rules=marked_rule(marker, cpus=1))
    after = placed(second, [job.pid for job in survivors + new])
    assert {job.pid: after[job.pid] for job in survivors} == {
        job.pid: [CPUS[1]] for job in survivors
    }  # the old code placed afresh, oldest first: the first survivor moved to CPU 0
    assert [after[job.pid] for job in new] == [[CPUS[0]], [CPUS[0]]]
    for job in survivors:
        wait_for(masked(job.pid, {CPUS[1]}), what="the survivor's mask")
        notes = (second.job(job.pid) or {})["notes"]
        assert all(note.startswith("kept across a restart") for note in notes), notes
    for job in new:
        wait_for(masked(job.pid, {CPUS[0]}), what="the new job's mask")
    if backend == "cgroup1":
        for job in survivors:
            assert fence_of(subtree, job.pid) == fences[job.pid]  # the same fence, untouched
        for job in new:
            wait_for(fenced(subtree, job.pid), what="the new job fenced")
            assert fence_of(subtree, job.pid)[1] == str(CPUS[0])
        ended = [fences[job.pid][0] for job in ending]
        wait_for(
            lambda: not any((CPUSET / f.lstrip("/")).exists() for f in ended),
            10,
            "fences of ended jobs removed",
        )
    else:
        assert not subtree.exists()


@needs_two_cpus
@needs_cpuset
def test_a_job_of_a_loads_rule_stays_in_its_fence_through_a_restart(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    """A `loads` rule (TensorFlow's usual kind; libc stands in here) matches only once the
    restarted daemon has read the job's libraries, a scan later: meanwhile its fence stays."""
    rules = marked_rule(marker, cpus=1).replace(
        'users = ["root"]', 'users = ["root"], loads = ["libc"]'
    )
    settings = {"backend": "cgroup1", "scan_interval": 0.5, "reserved_cpus": str(CPUS[0])}
    first = start_daemon(daemon=settings, rules=rules)
    job = processes.python(SLEEPER, stdin=subprocess.PIPE)
    first.wait_job(job.pid)
    subtree = CPUSET / f"corecap-test-{marker}"
    wait_for(fenced(subtree, job.pid), what="the job fenced")
    fence = fence_of(subtree, job.pid)
    kill9(first)
    second = start_daemon(daemon=settings, rules=rules, wait=False)
    seen = set()
    deadline = time.monotonic() + 20
    while served_job(second, job.pid) is None:  # polled all the while the daemon starts
        seen.add(cpuset_of(job.pid))
        assert time.monotonic() < deadline, second.log()
    for _ in range(100):  # and a while after
        seen.add(cpuset_of(job.pid))
        time.sleep(0.01)
    assert seen == {fence[0]} and fence_of(subtree, job.pid) == fence
    assert (second.job(job.pid) or {})["cpus"] == [CPUS[1]]


@needs_two_cpus
@needs_cpuset
def test_after_kill9_a_half_made_fence_is_completed(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    """What a kill -9 between mkdir and the writes leaves: our subtree with no CPUs or
    memory nodes, and a job's cpuset likewise. The next daemon completes both."""
    job = processes.python(SLEEPER, stdin=subprocess.PIPE)
    subtree = CPUSET / f"corecap-test-{marker}"
    subtree.mkdir()
    (subtree / f"job-{job.pid}-{start_ticks(job.pid)}").mkdir()  # half-made, and empty
    daemon = start_daemon(daemon={"backend": "cgroup1"}, rules=marked_rule(marker, cpus=1))
    granted = daemon.wait_job(job.pid)["cpus"]
    wait_for(fenced(subtree, job.pid), what="the job fenced")
    assert fence_of(subtree, job.pid)[1] == ",".join(map(str, granted))
    assert (subtree / "cpuset.mems").read_text().strip()
    assert not daemon.events("fence-failed")


def start_ticks(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


# --- the real daemon and a state file it must not trust ---------------------------------------


def registered_job(processes: Processes, daemon: Daemon, cpus: int = 1) -> subprocess.Popen[bytes]:
    """A root job of the test that registers (the rule does not match it: unmarked argv)."""
    code = (
        f"import json, sys, corecapd; plan = corecapd.register(cpus={cpus}, intra_op=3);"
        " print(json.dumps(plan.manifest()), flush=True); sys.stdin.read()"
    )
    job = processes.run(
        [sys.executable, "-c", code, "unmarked-" + processes.marker[-6:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, CORECAP_SOCKET=str(daemon.socket)),
    )
    assert job.stdout is not None and json.loads(job.stdout.readline())
    return job


def test_a_forged_entry_enrols_no_root_process(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    """An entry naming a root process (PID and start right) that no rule names, saved as if
    a regular user had registered it: not applied, and said so. A root job that did
    register comes back registered."""
    state = tmp_path / "state"
    first = start_daemon(daemon={"state_dir": str(state)}, rules=marked_rule(marker, cpus=1))
    legit = registered_job(processes, first)
    first.wait_job(legit.pid)
    kill9(first)
    bystander = processes.run(  # root, unmarked: no rule would ever take it
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    document = json.loads((state / "state.json").read_text())
    entry = document["registrations"][f"{legit.pid}-{start_ticks(legit.pid)}"]
    assert entry["uid"] == 0  # who registered is kept
    document["registrations"][f"{bystander.pid}-{start_ticks(bystander.pid)}"] = entry | {
        "uid": 1000
    }
    (state / "state.json").write_text(json.dumps(document))

    second = start_daemon(daemon={"state_dir": str(state)}, rules=marked_rule(marker, cpus=1))
    restored = second.wait_job(legit.pid)
    assert restored["budget_basis"].startswith("declared: intra 3")
    problem = second.wait_event("state-problem")
    assert f"job {bystander.pid}-" in problem["error"] and "uid 1000" in problem["error"]
    assert second.job(bystander.pid) is None
    assert os.sched_getaffinity(bystander.pid) == set(CPUS)


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        ("huge", "bytes, more than the"),
        ("world-writable", "writable by group or others"),
        ("version 1", "a version 1 state file"),
    ],
)
def test_a_state_file_that_cannot_be_trusted_is_not_used(
    start_daemon: StartDaemon,
    processes: Processes,
    marker: str,
    tmp_path: Path,
    damage: str,
    error: str,
) -> None:
    """The daemon starts quickly without it and says why; the job is an ordinary one."""
    state = tmp_path / "state"
    first = start_daemon(daemon={"state_dir": str(state)}, rules=marked_rule(marker, cpus=1))
    job = registered_job(processes, first)
    first.wait_job(job.pid)
    kill9(first)
    path = state / "state.json"
    if damage == "huge":
        with open(path, "ab") as file:
            file.truncate(300 * 1024 * 1024)  # sparse
    elif damage == "world-writable":
        path.chmod(0o666)
    else:
        document = json.loads(path.read_text())
        for entry in document["registrations"].values():
            del entry["uid"]
        path.write_text(json.dumps({"version": 1, "registrations": document["registrations"]}))
    second = start_daemon(daemon={"state_dir": str(state)}, rules=marked_rule(marker, cpus=1))
    assert error in second.wait_event("state-problem")["error"]
    assert second.status()  # serving
    assert second.job(job.pid) is None  # unmarked: only its registration made it a job
