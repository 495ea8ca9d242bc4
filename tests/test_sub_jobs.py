"""Sub-jobs (issue 11, item 2): trials of a search get cores carved out of their enclosing
job's grant, on synthetic processes (no /proc, no clock). The real daemon's side is in
test_process_trees.py."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st
from test_core import PYTHON, T0, TF_LIBS, World, execs, lineage_of, of_type

from corecapd.core import JobTable
from corecapd.declaration import Declaration, Registration
from corecapd.effects import Confine, ExecStat, Register, ReplacePolicy, Scan
from corecapd.events import JobChanged, JobEnded, JobStarted
from corecapd.model import ProcKey
from corecapd.policy import parse_policy

SEARCH = """
[defaults]
grace = 1

[[rules]]
name = "trial"
match.cmdline = "trial\\\\.py"
cpus = 1
sub_job = true

[[rules]]
name = "search"
match.cmdline = "search\\\\.py"
cpus = 3
"""
DASH = "/usr/bin/dash"


def search_with_trials(world: World, trials: int) -> tuple[ProcKey, list[ProcKey]]:
    """A search driver (a job) that started `trials` trials through `/bin/sh -c`, each
    found by the exec path (the shell first, then its exec of Python)."""
    driver = world.spawn(500, cmdline=("python3", "search.py"))
    world.step(0)
    found = []
    for n in range(trials):
        shell = world.spawn(600 + 2 * n, ppid=500, exe=DASH, cmdline=("sh", "-c", "x"))
        trial = world.spawn(601 + 2 * n, ppid=shell.pid, exe=DASH, cmdline=("sh",))
        process = execs(world, trial, PYTHON, ("python3", "trial.py", str(n)), mark=n + 1)
        lineage, _ = lineage_of(world, process.sample.ppid)
        world.table.admit(process, T0 + 0.5, lineage)
        found.append(trial)
    return driver, found


def test_trials_get_disjoint_cores_inside_their_search_grant() -> None:
    world = World(SEARCH, online=range(6))
    driver, (first, second) = search_with_trials(world, 2)
    jobs = world.table.jobs
    assert jobs[first].parent == jobs[second].parent == driver
    assert jobs[first].cpus | jobs[second].cpus <= jobs[driver].cpus
    assert len(jobs[first].cpus) == len(jobs[second].cpus) == 1
    assert not jobs[first].cpus & jobs[second].cpus
    assert jobs[driver].members == {
        driver,
        ProcKey(600, jobs[driver].id.start_ticks + 1),
        ProcKey(602, jobs[driver].id.start_ticks + 3),
    }
    assert "carved out of that job's" in jobs[first].notes[0]
    view = world.table.view(jobs[first])
    assert view.parent == 500 and world.table.view(jobs[driver]).parent is None
    # a trial's own workers (forked, or its DataLoader's Python) stay in the trial
    world.spawn(700, ppid=first.pid, cmdline=("python3", "trial.py", "0"))
    world.step(1)
    assert world.table.job_of(700) is jobs[first]


def test_a_trial_is_confined_to_its_own_cores_on_the_exec_path() -> None:
    world = World(SEARCH, online=range(6))
    driver, _ = search_with_trials(world, 0)
    trial = world.spawn(601, ppid=500, exe=DASH, cmdline=("sh",))
    process = execs(world, trial, PYTHON, ("python3", "trial.py"), mark=9)
    outcome = world.table.handle(ExecStat(process, ()), T0 + 0.5)
    started = of_type(outcome.events, JobStarted)
    assert [e.pid for e in started] == [601]
    assert outcome.effects == [Confine(world.table.jobs[trial].name, (601,), started[0].cpus)]
    assert started[0].cpus < world.cpus(driver)


def test_more_trials_than_cores_share_within_the_grant() -> None:
    world = World(SEARCH, online=range(6))
    driver, trials = search_with_trials(world, 4)
    grants = [world.cpus(trial) for trial in trials]
    assert all(grant <= world.cpus(driver) for grant in grants)
    assert len(set().union(*grants[:3])) == 3  # the first three apart
    assert "sharing the least loaded" in " ".join(world.table.jobs[trials[3]].notes)


def test_a_sub_job_rule_outside_every_job_makes_a_top_level_job() -> None:
    world = World(SEARCH, online=range(6))
    alone = world.spawn(800, cmdline=("python3", "trial.py"))
    started = of_type(world.step(0), JobStarted)
    assert [e.pid for e in started] == [800]
    assert world.table.jobs[alone].parent is None and len(world.cpus(alone)) == 1


def test_without_sub_job_a_trial_stays_a_plain_member() -> None:
    world = World(SEARCH.replace("sub_job = true", ""), online=range(6))
    driver, (trial,) = search_with_trials(world, 1)
    assert world.table.job_of(trial.pid) is world.table.jobs[driver]
    assert list(world.table.jobs) == [driver]


def test_a_trial_found_by_a_scan_alone_is_a_sub_job() -> None:
    """Exec events lost: the scan finds the trial below the driver."""
    world = World(SEARCH, online=range(6))
    driver = world.spawn(500, cmdline=("python3", "search.py"))
    world.step(0)
    shell = world.spawn(600, ppid=500, exe=DASH, cmdline=("sh", "-c", "x"))
    trial = world.spawn(601, ppid=600, cmdline=("python3", "trial.py"))
    started = of_type(world.step(1), JobStarted)
    assert [e.pid for e in started] == [601]
    assert world.table.jobs[trial].parent == driver
    assert world.table.job_of(shell.pid) is world.table.jobs[driver]


def test_a_trial_that_became_a_job_before_its_driver_is_taken_in_as_a_sub_job() -> None:
    world = World(SEARCH, online=range(6))
    driver = world.spawn(500, cmdline=("python3", "search.py"))
    trial = world.spawn(601, ppid=500, cmdline=("python3", "trial.py"))
    table = world.table
    table.admit(world.procs[trial], T0)  # its exec read first: its parent unknown yet
    assert table.jobs[trial].parent is None
    changed = of_type(world.step(1), JobChanged)
    assert table.jobs[trial].parent == driver and [e.pid for e in changed] == [601]
    assert world.cpus(trial) <= world.cpus(driver)


def test_the_search_lives_while_its_trials_run_then_ends() -> None:
    world = World(SEARCH, online=range(6))
    driver, (first, second) = search_with_trials(world, 2)
    world.kill(*(key for key in world.procs if key.pid in (500, 600, 602)))
    world.step(1)
    assert driver in world.table.jobs and not world.table.jobs[driver].members
    world.kill(first)
    assert world.table.exited(first.pid, T0 + 2) != []
    assert driver in world.table.jobs
    world.kill(second)
    ended = of_type(world.table.exited(second.pid, T0 + 3), JobEnded)
    assert [e.pid for e in ended] == [601 + 2, 500]
    assert world.table.jobs == {}


def test_a_reload_that_turns_sub_jobs_off_and_on() -> None:
    world = World(SEARCH, online=range(6))
    driver, (first, second) = search_with_trials(world, 2)
    table = world.table
    plain = parse_policy(SEARCH.replace("sub_job = true", ""), source="reload.toml")
    table.handle(ReplacePolicy(plain), T0 + 1)
    ended = of_type(world.step(1), JobEnded)
    assert sorted(e.pid for e in ended) == [601, 603]
    assert all("no rule makes it a sub-job any more" in e.reason for e in ended)
    assert list(table.jobs) == [driver] and table.job_of(601) is table.jobs[driver]
    table.handle(ReplacePolicy(parse_policy(SEARCH, source="again.toml")), T0 + 2)
    started = of_type(world.step(2), JobStarted)
    assert sorted(e.pid for e in started) == [601, 603]
    assert table.jobs[first].parent == table.jobs[second].parent == driver
    assert not world.cpus(first) & world.cpus(second)


def test_a_reload_that_shrinks_the_search_places_its_trials_again() -> None:
    world = World(SEARCH, online=range(6))
    driver, trials = search_with_trials(world, 2)
    smaller = parse_policy(SEARCH.replace("cpus = 3", "cpus = 1"), source="reload.toml")
    world.table.handle(ReplacePolicy(smaller), T0 + 1)
    world.step(1)
    assert len(world.cpus(driver)) == 1
    assert all(world.cpus(trial) == world.cpus(driver) for trial in trials)


def test_a_job_process_that_registers_gets_a_sub_job_in_its_grant() -> None:
    """Before, a worker that registered got cores anywhere: outside its job's grant."""
    world = World(SEARCH, online=range(6))
    driver = world.spawn(500, cmdline=("python3", "search.py"))
    worker = world.spawn(501, ppid=500, cmdline=("python3", "worker.py"))
    world.spawn(502, ppid=501, cmdline=("python3", "worker.py"))  # the worker's own child
    world.step(0)
    assert world.table.job_of(501) is world.table.job_of(502) is world.table.jobs[driver]
    outcome = world.table.handle(
        Register(world.procs[worker], Registration(Declaration(cpus=2))), T0 + 1
    )
    assert outcome.job is not None and outcome.job.parent == 500
    assert outcome.job.cpus < world.cpus(driver) and len(outcome.job.cpus) == 2  # as asked
    world.step(1)  # the worker's child follows it at the next scan
    assert world.table.job_of(502) is world.table.jobs[worker]
    assert world.table.jobs[driver].members == {driver}


def test_a_sub_job_rule_that_loads_a_library_takes_the_member_once_read() -> None:
    rules = SEARCH.replace('match.cmdline = "trial\\\\.py"', 'match.loads = ["tensorflow"]')
    world = World(rules, online=range(6))
    driver = world.spawn(500, cmdline=("python3", "search.py"))
    world.step(0)
    trial = world.spawn(601, ppid=500, cmdline=("python3", "trial.py"), libraries=TF_LIBS)
    execs(world, trial, PYTHON, ("python3", "trial.py"), mark=3)
    world.procs[trial] = replace(world.procs[trial], libraries=TF_LIBS)
    world.step(1)  # a member: its libraries are read next
    assert world.table.job_of(601) is world.table.jobs[driver]
    started = of_type(world.step(2), JobStarted)
    assert [e.pid for e in started] == [601] and world.table.jobs[trial].parent == driver


def test_a_scan_confines_a_sub_jobs_processes_apart_from_its_jobs() -> None:
    world = World(SEARCH, online=range(6))
    driver, (trial,) = search_with_trials(world, 1)
    scan = {key: seen for key, seen in world.procs.items()}
    confines = [e for e in world.table.handle(Scan(scan), T0 + 1).effects if type(e) is Confine]
    by_name = {effect.job: effect for effect in confines}
    tables = world.table.jobs
    assert by_name[tables[trial].name].pids == (601,)
    assert 601 not in by_name[tables[driver].name].pids


# -- random trees with sub-jobs and reloads ------------------------------------------------

PROGRAMS = [
    (DASH, ("sh", "-c", "x")),
    (PYTHON, ("python3", "trial.py")),
    (PYTHON, ("python3", "search.py")),
    (PYTHON, ("python3", "worker.py")),
]


@dataclass(frozen=True)
class Op:
    kind: str  # "fork", "exec", "exit", "scan", "reload", "register"
    who: int
    what: int


ops = st.lists(
    st.builds(
        Op,
        st.sampled_from(
            ["fork", "fork", "exec", "exec", "exec", "exit", "scan", "reload", "register"]
        ),
        st.integers(0, 40),
        st.integers(0, len(PROGRAMS) - 1),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_sub_job_invariants_over_random_trees_and_reloads(history: list[Op]) -> None:
    """Below one search driver: forks, execs, exits, registrations, scans and reloads that
    turn sub-jobs on and off, in any order. After each: every process in at most one job;
    a sub-job's CPUs within its enclosing job's; no job without members and sub-jobs; and
    after a scan, a process below a job's process is in that job or one it encloses."""
    world = World(SEARCH, online=range(6))
    table = world.table
    world.spawn(500, cmdline=("python3", "search.py"))
    world.step(0)
    policies = [
        parse_policy(text, source="p.toml")
        for text in (SEARCH.replace("sub_job = true", ""), SEARCH)
    ]
    next_pid = 1000
    for at, op in enumerate(history, start=1):
        live = sorted(world.procs)
        target = live[op.who % len(live)]
        if op.kind == "fork":
            seen = world.procs[target]
            world.spawn(
                next_pid, ppid=target.pid, exe=seen.identity.exe, cmdline=seen.identity.cmdline
            )
            next_pid += 1
        elif op.kind == "exec":
            exe, cmdline = PROGRAMS[op.what]
            process = execs(world, target, exe, cmdline, mark=at)
            lineage, _ = lineage_of(world, process.sample.ppid)
            table.handle(ExecStat(process, tuple(lineage)), T0 + at)
        elif op.kind == "exit" and len(live) > 1:
            world.kill(target)
            table.exited(target.pid, T0 + at)
        elif op.kind == "scan":
            world.step(at)
            for key, seen in world.procs.items():
                parent = table.job_of(seen.sample.ppid)
                if parent is not None:
                    assert parent.id in enclosing(table, key.pid), "below a job, not in it"
        elif op.kind == "reload":
            table.handle(ReplacePolicy(policies[op.what % 2]), T0 + at)
            world.step(at)
        elif op.kind == "register" and table.job_of(target.pid) is not None:
            table.handle(Register(world.procs[target], Registration(Declaration())), T0 + at)
        members: set[ProcKey] = set()
        for job in table.jobs.values():
            assert job.members <= world.procs.keys()
            assert job.members or any(sub.parent == job.id for sub in table.jobs.values())
            assert not members & job.members, "a process in two jobs"
            members |= job.members
            if job.parent is not None:
                assert job.parent in table.jobs and job.cpus <= table.jobs[job.parent].cpus


def enclosing(table: JobTable, pid: int) -> list[ProcKey]:
    """The job of `pid` and every job enclosing it, innermost first."""
    job = table.job_of(pid)
    found: list[ProcKey] = []
    while job is not None:
        found.append(job.id)
        job = None if job.parent is None else table.jobs[job.parent]
    return found
