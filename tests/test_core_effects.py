"""JobTable.handle: one input in, events and effects out (h11's shape), on synthetic
processes. The decisions behind them are tested in test_core.py; here, what the edges are
told to do, and that queries get copies."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core import PYTHON_RULE, T0, World, policy

from corecapd.core import Refused
from corecapd.declaration import Declaration, Pool, Registration
from corecapd.diagnosis import Evidence, ThreadLayer
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
    NextScan,
    Outcome,
    Pin,
    Prepare,
    Register,
    Release,
    ReplacePolicy,
    Report,
    SaveState,
    Scan,
)
from corecapd.events import (
    EnforcementFailed,
    JobEnded,
    JobEscaped,
    JobStarted,
    LayerOversized,
    ViolationStarted,
)
from corecapd.model import ProcKey

CAPPED = """
[[rules]]
name = "py"
match.exe = ["python*"]
cpus = 2
max_threads = 4
"""


def scan(world: World, at: float) -> Outcome:
    """One scan through `handle`, reading the libraries the last one asked for."""
    wanted = frozenset(world.table.libraries_wanted)
    for key in wanted & world.procs.keys():
        world.read[key] = world.procs[key].libraries or frozenset()
    seen = {key: replace(p, libraries=world.read.get(key)) for key, p in world.procs.items()}
    return world.table.handle(Scan(seen), T0 + at)


def kinds(effects: list[Effect]) -> list[type]:
    return [type(effect) for effect in effects]


def name(key: ProcKey) -> str:
    return f"{key.pid}-{key.start_ticks}"


def test_a_scan_tells_the_edges_to_confine_each_job_and_what_to_read_next() -> None:
    world = World()
    key = world.spawn(500)
    outcome = scan(world, 0)
    [started] = outcome.events
    assert isinstance(started, JobStarted) and started.pid == 500
    confine, next_scan = outcome.effects
    assert confine == Confine(name(key), (500,), started.cpus)
    assert next_scan == NextScan(world.table.libraries_wanted, complete=False)
    assert world.table.watched() == {key}


def test_monitor_mode_decides_but_touches_nothing() -> None:
    world = World(enforcing=False)
    world.spawn(500)
    outcome = scan(world, 0)
    assert [type(e) for e in outcome.events] == [JobStarted]
    assert kinds(outcome.effects) == [NextScan]
    exec_key = world.spawn(600)
    process = world.procs[exec_key]
    assert world.table.handle(Exec(600, 1, process.identity), T0).effects == []
    assert world.table.handle(ExecStat(process), T0).effects == []


def test_an_exec_is_pinned_ahead_and_confined_to_the_same_cpus() -> None:
    world = World()
    scan(world, 0)
    world.table.foresee()
    key = world.spawn(500)
    process = world.procs[key]
    [pin] = world.table.handle(Exec(500, 1, process.identity), T0).effects
    assert isinstance(pin, Pin) and pin.pids == (500,)
    placed = world.table.handle(ExecStat(process), T0)
    assert placed.effects == [Confine(name(key), (500,), pin.cpus)]
    assert [type(e) for e in placed.events] == [JobStarted]


def test_the_foresight_follows_the_holdings_back_and_forth_and_the_policy() -> None:
    """A run of short jobs swings between the same holdings, whose foretold grants are
    kept: each exec is still pinned to what placing it gives, and a reload that changes
    the eligible CPUs foretells afresh."""
    world = World(online=range(4))
    scan(world, 0)
    pinned: list[frozenset[int]] = []
    for pid in (500, 501, 502):  # one after the other: each ends before the next starts
        world.table.handle(Prepare(), T0)
        key = world.spawn(pid)
        [pin] = world.table.handle(Exec(pid, 1, world.procs[key].identity), T0).effects
        assert isinstance(pin, Pin)
        placed = world.table.handle(ExecStat(world.procs[key]), T0)
        assert placed.effects == [Confine(name(key), (pid,), pin.cpus)]
        del world.procs[key]
        world.table.handle(Exit(pid), T0 + 1)
        pinned.append(pin.cpus)
    assert pinned[0] == pinned[1] == pinned[2] and len(pinned[0]) == 2
    reserved = f'[daemon]\nreserved_cpus = "{",".join(map(str, sorted(pinned[0])))}"\n'
    world.table.handle(ReplacePolicy(policy(reserved + PYTHON_RULE)), T0 + 2)
    world.table.handle(Prepare(), T0 + 2)
    key = world.spawn(503)
    [pin] = world.table.handle(Exec(503, 1, world.procs[key].identity), T0 + 2).effects
    assert isinstance(pin, Pin) and not pin.cpus & pinned[0]


def test_the_shell_between_a_job_and_its_python_is_confined_with_it() -> None:
    world = World()
    parent = world.spawn(500)
    scan(world, 0)
    shell = world.spawn(501, ppid=500, exe="/bin/sh", cmdline=("sh", "-c", "python3 x.py"))
    child = world.spawn(502, ppid=501)
    lineage = (world.procs[shell].sample,)
    outcome = world.table.handle(ExecStat(world.procs[child], lineage), T0 + 0.1)
    cpus = world.table.jobs[parent].cpus
    assert outcome.effects == [Confine(name(parent), (502, 501), cpus)] and outcome.events == []


def test_the_last_exit_ends_the_job_and_releases_it() -> None:
    world = World()
    key = world.spawn(500)
    scan(world, 0)
    outcome = world.table.handle(Exit(500), T0 + 1)
    [ended] = outcome.events
    assert isinstance(ended, JobEnded) and ended.reason == "exited"
    assert outcome.effects == [Release(name(key), ())]
    assert world.table.handle(Exit(500), T0 + 1) == Outcome()  # said once


def test_a_violation_waits_for_its_evidence_then_carries_its_diagnosis() -> None:
    world = World(CAPPED)
    key = world.spawn(500)
    scan(world, 0)
    world.set(key, threads=9)
    gathered: list[GatherEvidence] = []
    for at in range(1, 16):  # past the grace and `violation_after` samples
        outcome = scan(world, at)
        assert not [e for e in outcome.events if isinstance(e, ViolationStarted)]
        gathered += [e for e in outcome.effects if isinstance(e, GatherEvidence)]
    assert gathered == [GatherEvidence(name(key), (500,))]
    omp = ThreadLayer(500, 501, "python", "openmp", "libgomp", "libgomp.so.1", "gomp")
    threads = tuple(replace(omp, tid=501 + n) for n in range(8))
    evidence = Evidence({"OMP_NUM_THREADS": "16"}, threads, mask_cpus=2)
    onset, layer = world.table.handle(EvidenceRead(name(key), evidence), T0 + 16).events
    assert isinstance(onset, ViolationStarted) and "OMP_NUM_THREADS=16" in onset.diagnosis
    assert isinstance(layer, LayerOversized) and (layer.layer_threads, layer.expected) == (9, 2)
    record, layer_record = world.table.snapshot().violations
    assert record.diagnosis == onset.diagnosis and record.ended is None
    assert [found["layer"] for found in record.layers] == ["openmp"]
    assert (layer_record.kind, layer_record.layer, layer_record.threads) == ("layer", "openmp", 9)
    assert world.table.handle(EvidenceRead(name(key), evidence), T0 + 16).events == []


def test_an_onset_with_threads_of_unknown_layer_gets_a_second_look_once() -> None:
    """A TF pool's thread just started may not show its pool's name yet: c13 failed once in
    5 runs with "16 threads of unknown layer"; the onset waits one scan for another look."""
    world = World(CAPPED)
    key = world.spawn(500)
    scan(world, 0)
    world.set(key, threads=9)
    for at in range(1, 16):
        scan(world, at)
    unknown = ThreadLayer(500, 501, "python", "unknown", "", "", "its pool's name is unreadable")
    blurred = Evidence({}, (unknown,), mask_cpus=2)
    assert world.table.handle(EvidenceRead(name(key), blurred), T0 + 16).events == []
    again = [e for e in scan(world, 17).effects if isinstance(e, GatherEvidence)]
    assert again == [GatherEvidence(name(key), (500,))]
    [onset] = world.table.handle(EvidenceRead(name(key), blurred), T0 + 17).events
    assert isinstance(onset, ViolationStarted) and "unknown layer" in onset.diagnosis
    assert not [e for e in scan(world, 18).effects if isinstance(e, GatherEvidence)]


def test_registration_confines_and_saves_state_a_report_saves_the_pools() -> None:
    world = World()
    key = world.spawn(500)
    registration = Registration(Declaration(cpus=1))
    outcome = world.table.handle(Register(world.procs[key], registration), T0)
    assert outcome.job is not None and outcome.job.pid == 500 and len(outcome.job.cpus) == 1
    assert kinds(outcome.effects) == [Confine, NextScan, SaveState]
    assert outcome.effects[1] == NextScan(frozenset(), complete=True)
    pools = (Pool("tf-intra-op", 1),)
    reported = world.table.handle(Report(world.procs[key], pools=pools), T0 + 1)
    [saved] = reported.effects
    assert isinstance(saved, SaveState) and saved.registrations[0][1].registration.pools == pools
    assert reported.job is not None and reported.job.pools == pools
    again = world.table.handle(Report(world.procs[key], pools=pools), T0 + 2)
    assert again.effects == []  # nothing changed: nothing to save


def test_reports_from_outside_a_job_or_from_a_member_are_refused() -> None:
    world = World()
    stranger = world.spawn(400, exe="/usr/bin/bash", cmdline=("bash",))
    parent = world.spawn(500)
    child = world.spawn(501, ppid=500)
    world.table.handle(Register(world.procs[parent], Registration(Declaration())), T0)
    scan(world, 0)
    with pytest.raises(Refused, match="in no job"):
        world.table.handle(Report(world.procs[stranger], pools=()), T0)
    with pytest.raises(Refused, match="did not register"):
        world.table.handle(Report(world.procs[child], pools=()), T0)


def test_fences_a_previous_daemon_left_for_gone_jobs_are_released_after_the_first_scan() -> None:
    world = World()
    survivor = world.spawn(500)
    left = {name(survivor): frozenset({0, 1}), "999-5": frozenset({2, 3})}
    world.table.handle(Adopt(left, {}), T0)
    outcome = scan(world, 0)
    assert Release("999-5", ()) in outcome.effects
    assert Confine(name(survivor), (500,), frozenset({0, 1})) in outcome.effects
    assert not [e for e in scan(world, 1).effects if isinstance(e, Release)]


def test_a_failure_to_confine_is_reported_once_per_job_and_escapes_name_their_job() -> None:
    world = World()
    key = world.spawn(500)
    scan(world, 0)
    [failed] = world.table.handle(ConfineFailed(name(key), "EPERM"), T0).events
    assert isinstance(failed, EnforcementFailed) and failed.error == "EPERM"
    assert world.table.handle(ConfineFailed(name(key), "EPERM"), T0).events == []
    assert world.table.handle(ConfineFailed("1-1", "EPERM"), T0).events == []  # no such job
    [escaped] = world.table.handle(Escapes({name(key): 3, "1-1": 2}), T0).events
    assert isinstance(escaped, JobEscaped) and escaped.escaped_threads == 3


def test_views_are_frozen_copies() -> None:
    world = World()
    key = world.spawn(500)
    scan(world, 0)
    before = world.table.snapshot()
    with pytest.raises(FrozenInstanceError):
        before.jobs[0].threads = 99  # type: ignore[misc]
    world.set(key, threads=7)
    scan(world, 1)
    assert before.jobs[0].threads == 1 and world.table.snapshot().jobs[0].threads == 7


steps = st.lists(
    st.tuples(st.sampled_from(["spawn", "child", "exit", "scan", "threads"]), st.integers(0, 5)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_effects_follow_the_decisions(history: list[tuple[str, int]]) -> None:
    """Whatever happens: every `Confine` names a live job with its CPUs and members, every
    job that ends is released, and a scan confines every job."""
    world = World(CAPPED, online=range(4))
    pids = iter(range(1000, 2000))
    at = 0.0
    for op, n in history:
        at += 0.5
        outcomes: list[Outcome] = []
        if op in ("spawn", "child"):
            parents = [k.pid for k in world.procs] if op == "child" else []
            pid = next(pids)
            ppid = parents[n % len(parents)] if parents else 1
            key = world.spawn(pid, ppid=ppid)
            identity = world.procs[key].identity
            outcomes.append(world.table.handle(Exec(pid, ppid, identity), T0 + at))
            outcomes.append(world.table.handle(ExecStat(world.procs[key]), T0 + at))
        elif op == "exit" and world.procs:
            gone = sorted(world.procs)[n % len(world.procs)]
            world.kill(gone)
            outcomes.append(world.table.handle(Exit(gone.pid), T0 + at))
        elif op == "threads" and world.procs:
            world.set(sorted(world.procs)[n % len(world.procs)], threads=n * 3 + 1)
        else:
            outcomes.append(scan(world, at))
        jobs = {job.name: job for job in world.table.snapshot().jobs}
        for outcome in outcomes:
            ended = {e.job for e in outcome.events if isinstance(e, JobEnded)}
            released = {e.job for e in outcome.effects if isinstance(e, Release)}
            assert ended <= released
            for effect in outcome.effects:
                if isinstance(effect, Confine):
                    job = jobs[effect.job]
                    assert effect.cpus == job.cpus and set(effect.pids) <= set(job.pids)
            if any(isinstance(e, NextScan) for e in outcome.effects):  # a scan
                confined = {e.job for e in outcome.effects if isinstance(e, Confine)}
                assert confined == set(jobs)
