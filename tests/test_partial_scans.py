"""Partial scans (issue 12): with exec, fork and exit events, a scan reads only what the core
watches (the jobs' processes, those waiting on their libraries); the core's work follows
them, not the host's processes, and it asks for a complete scan when only one can tell.
On synthetic processes; the real daemon's side runs in the whole suite (events are on
there) and in bench/scan_cost.py."""

from __future__ import annotations

from dataclasses import replace

from test_core import T0, TF_LIBS, World
from test_core_effects import scan as complete

from corecapd.effects import ExecStat, NextScan, Outcome, ReplacePolicy, Scan
from corecapd.events import JobStarted
from corecapd.model import ProcKey
from corecapd.policy import parse_policy

RULES = """
[defaults]
grace = 0
violation_after = 1

[[rules]]
name = "train"
match.cmdline = "train"
cpus = 2
max_threads = 10

[[rules]]
name = "tf"
match.loads = ["tensorflow"]
cpus = 1
"""


def partial(world: World, at: float) -> Outcome:
    """A partial scan as the daemon makes it: only what the core watches, libraries read
    for those it asked."""
    watched = world.table.watched()
    for key in world.table.libraries_wanted & world.procs.keys():
        world.read[key] = world.procs[key].libraries or frozenset()
    seen = {
        key: replace(world.procs[key], libraries=world.read.get(key))
        for key in watched
        if key in world.procs
    }
    return world.table.handle(Scan(seen, complete=False), T0 + at)


def next_scan(outcome: Outcome) -> NextScan:
    [found] = [effect for effect in outcome.effects if isinstance(effect, NextScan)]
    return found


def test_a_partial_scan_samples_the_jobs_and_leaves_the_rest_alone() -> None:
    world = World(RULES, online=range(4))
    crowd = [world.spawn(2000 + n, exe="/bin/sleep", cmdline=("sleep", "1d")) for n in range(500)]
    job = world.spawn(500, cmdline=("python3", "train.py"))
    assert next_scan(complete(world, 0)).complete is False
    assert world.table.watched() == {job}  # none of the 500
    world.set(job, threads=11)
    partial(world, 1)
    sampled = world.table.jobs[job]
    assert sampled.threads == 11 and sampled.violation.active  # its onset awaits evidence
    world.kill(*crowd[:100])  # gone, unseen: a complete scan lets go of them
    assert next_scan(partial(world, 2)).complete is False
    assert all(world.table.job_of(key.pid) is None for key in crowd)
    complete(world, 3)
    assert world.table.watched() == {job}


def test_a_jobs_fork_joins_it_at_once() -> None:
    """The daemon hands a fork of a job's process to the core as it reads it."""
    world = World(RULES, online=range(4))
    job = world.spawn(500, cmdline=("python3", "train.py"))
    complete(world, 0)
    worker = world.spawn(501, ppid=500, cmdline=("python3", "train.py"))
    world.table.handle(ExecStat(world.procs[worker], ()), T0 + 0.5)
    assert world.table.job_of(501) is world.table.jobs[job]
    assert worker in world.table.watched()


def test_a_job_found_by_a_partial_scan_asks_for_a_complete_one() -> None:
    """A process that matched only once TensorFlow loaded may have forked before: its
    children were in no job then, so no event named them; a complete scan does."""
    world = World(RULES, online=range(4))
    notebook = world.spawn(600, cmdline=("python3", "-m", "notebook"), libraries=TF_LIBS)
    complete(world, 0)  # waiting on its libraries, read next
    child = world.spawn(601, ppid=600, cmdline=("python3", "-m", "notebook"))
    outcome = partial(world, 1)
    assert [e.pid for e in outcome.events if isinstance(e, JobStarted)] == [600]
    assert next_scan(outcome).complete is True
    assert world.table.job_of(601) is None
    assert next_scan(complete(world, 2)).complete is False
    assert world.table.job_of(child.pid) is world.table.jobs[notebook]


def test_a_reload_asks_for_a_complete_scan() -> None:
    world = World(RULES, online=range(4))
    other = world.spawn(700, cmdline=("python3", "eval.py"))
    complete(world, 0)
    wider = parse_policy(RULES.replace('"train"', '"train|eval"'), source="reload.toml")
    outcome = world.table.handle(ReplacePolicy(wider), T0 + 1)
    assert outcome.effects == [NextScan(world.table.libraries_wanted, complete=True)]
    complete(world, 1)
    assert world.table.job_of(other.pid) is not None


def test_a_reused_pid_in_a_partial_scan_is_a_new_process() -> None:
    world = World(RULES, online=range(4))
    job = world.spawn(500, cmdline=("python3", "train.py"))
    complete(world, 0)
    world.kill(job)  # its exit event was lost; its PID runs another job's process now
    again = world.spawn(500, cmdline=("python3", "train.py", "--again"))
    watched = world.table.watched()
    seen = {again: world.procs[again]}  # what the scanner finds under a watched PID
    assert {key.pid for key in watched} == {500}
    outcome = world.table.handle(Scan(seen, complete=False), T0 + 1)
    assert world.table.job_of(500) is world.table.jobs[again]
    assert ProcKey(500, job.start_ticks) not in world.table.jobs
    assert [e.pid for e in outcome.events if isinstance(e, JobStarted)] == [500]
