"""allocate(): free cores first, least loaded when the pool runs out, per-user caps;
with a topology whole cores and one NUMA node; never outside the job's cpuset."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corecapd.allocator import Grant, Holding, _pick_free, allocate
from corecapd.topology import Cpu, Topology


def cpus(*ids: int) -> frozenset[int]:
    return frozenset(ids)


EIGHT = frozenset(range(8))


def test_free_pool_in_id_order() -> None:
    grant = allocate(3, "alice", EIGHT, [], None)
    assert grant == Grant(cpus=cpus(0, 1, 2), shared=False, notes=())


def test_free_cores_first() -> None:
    holdings = [Holding("bob", cpus(0, 1, 2)), Holding("carol", cpus(4))]
    grant = allocate(3, "alice", EIGHT, holdings, None)
    assert grant.cpus == cpus(3, 5, 6)
    assert not grant.shared
    assert grant.notes == ()


def test_only_eligible_cpus_are_granted() -> None:
    eligible = cpus(1, 3, 5)  # e.g. 0, 2, 4 reserved
    grant = allocate(2, "alice", eligible, [], None)
    assert grant.cpus == cpus(1, 3)


def test_least_loaded_when_the_pool_runs_out() -> None:
    holdings = [
        Holding("bob", cpus(0, 1, 2, 3)),
        Holding("bob", cpus(0, 1)),
        Holding("carol", cpus(0)),
    ]  # load: cpu0=3, cpu1=2, cpu2=1, cpu3=1
    grant = allocate(2, "alice", cpus(0, 1, 2, 3), holdings, None)
    assert grant.cpus == cpus(2, 3)
    assert grant.shared
    assert len(grant.notes) == 1
    assert "no free CPUs left" in grant.notes[0]
    assert "2-3" in grant.notes[0]


def test_partly_free_partly_shared() -> None:
    holdings = [Holding("bob", cpus(0, 1, 2))]
    grant = allocate(2, "alice", cpus(0, 1, 2, 3), holdings, None)
    assert grant.cpus == cpus(0, 3)  # the free one, then the least loaded (lowest id)
    assert grant.shared
    assert any("sharing" in note and "(0)" in note for note in grant.notes)


def test_holdings_outside_eligible_do_not_count_as_load() -> None:
    # CPU 0 was reserved after bob's job got it: it is no longer in the pool at all.
    holdings = [Holding("bob", cpus(0, 5))]
    grant = allocate(2, "alice", cpus(1, 2, 3, 4, 5), holdings, None)
    assert grant.cpus == cpus(1, 2)
    assert not grant.shared


def test_requested_larger_than_eligible() -> None:
    grant = allocate(16, "alice", cpus(2, 3, 4, 5), [], None)
    assert grant.cpus == cpus(2, 3, 4, 5)
    assert not grant.shared
    assert len(grant.notes) == 1
    assert "asked for 16 CPUs, only 4 are eligible" in grant.notes[0]
    assert "2-5" in grant.notes[0]


def test_requested_larger_than_eligible_and_shared() -> None:
    grant = allocate(4, "alice", cpus(0, 1), [Holding("bob", cpus(0))], None)
    assert grant.cpus == cpus(0, 1)
    assert grant.shared
    assert len(grant.notes) == 2


def test_user_cap_limits_one_job() -> None:
    grant = allocate(6, "alice", EIGHT, [], user_cap=2)
    assert grant.cpus == cpus(0, 1)
    assert any("user alice is capped at 2 CPUs" in note for note in grant.notes)
    assert not grant.shared


def test_user_cap_across_jobs_reuses_own_cores() -> None:
    first = allocate(2, "alice", EIGHT, [], user_cap=3)
    assert first.cpus == cpus(0, 1)
    second = allocate(2, "alice", EIGHT, [Holding("alice", first.cpus)], user_cap=3)
    # One new core fits under the cap; the other must be one alice already holds.
    assert len(second.cpus) == 2
    assert len(first.cpus | second.cpus) == 3
    assert len(second.cpus - first.cpus) == 1
    assert second.shared


def test_user_at_cap_shares_own_cores_even_with_free_ones() -> None:
    holdings = [Holding("alice", cpus(4, 5)), Holding("bob", cpus(0))]
    grant = allocate(2, "alice", EIGHT, holdings, user_cap=2)
    assert grant.cpus == cpus(4, 5)
    assert grant.shared


def test_user_at_cap_gets_its_least_loaded_own_core() -> None:
    holdings = [Holding("alice", cpus(0, 1)), Holding("alice", cpus(0))]  # cpu0=2, cpu1=1
    grant = allocate(1, "alice", cpus(0, 1, 2, 3), holdings, user_cap=2)
    assert grant.cpus == cpus(1)
    assert grant.shared


def test_other_users_holdings_do_not_count_against_the_cap() -> None:
    holdings = [Holding("bob", cpus(0, 1, 2, 3))]
    grant = allocate(2, "alice", EIGHT, holdings, user_cap=2)
    assert grant.cpus == cpus(4, 5)
    assert not grant.shared


def test_no_eligible_cpus_is_an_error() -> None:
    with pytest.raises(ValueError, match="no eligible CPUs"):
        allocate(1, "alice", frozenset(), [], None)


def test_holdings_may_be_any_iterable() -> None:
    grant = allocate(1, "alice", cpus(0, 1), (h for h in [Holding("bob", cpus(0))]), None)
    assert grant.cpus == cpus(1)


# -- properties over sequences of jobs -------------------------------------------------

USERS = ("alice", "bob", "carol")


@dataclass(frozen=True)
class Scenario:
    online: frozenset[int]
    reserved: frozenset[int]
    caps: dict[str, int]
    # ("start", user, CPUs requested) or ("end", "", which running job ends)
    steps: list[tuple[str, str, int]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    online = frozenset(range(draw(st.integers(min_value=1, max_value=12))))
    reserved = draw(st.frozensets(st.sampled_from(sorted(online)), max_size=len(online) - 1))
    caps = draw(
        st.dictionaries(st.sampled_from(USERS), st.integers(min_value=1, max_value=8), max_size=3)
    )
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(
                    st.just("start"), st.sampled_from(USERS), st.integers(min_value=1, max_value=9)
                ),
                st.tuples(st.just("end"), st.just(""), st.integers(min_value=0, max_value=20)),
            ),
            min_size=1,
            max_size=25,
        )
    )
    return Scenario(online, reserved, caps, steps)


@settings(max_examples=200)
@given(scenarios())
def test_allocation_invariants_over_job_sequences(scenario: Scenario) -> None:
    eligible = scenario.online - scenario.reserved
    running: list[Holding] = []
    for action, user, number in scenario.steps:
        if action == "end":
            if running:
                running.pop(number % len(running))
            continue
        cap = scenario.caps.get(user)
        load = Counter(cpu for holding in running for cpu in holding.cpus)
        held = frozenset().union(*(h.cpus for h in running))
        user_held = frozenset().union(*(h.cpus for h in running if h.user == user))
        free = eligible - held

        grant = allocate(number, user, eligible, list(running), cap)

        # Never empty, never a reserved (non-eligible) CPU.
        assert grant.cpus
        assert grant.cpus <= eligible
        # Exactly as many as asked, within the pool and the user's cap.
        assert len(grant.cpus) == min(number, len(eligible), cap or len(eligible))
        if number > len(eligible):
            assert any("eligible" in note for note in grant.notes)
        if cap is not None and number > cap and cap < len(eligible):
            assert any("capped" in note for note in grant.notes)
        # `shared` says exactly whether a granted CPU is held by another job.
        assert grant.shared == bool(grant.cpus & held)
        assert grant.shared == any("sharing" in note for note in grant.notes)
        # No CPU is given to two jobs while a free one (that the cap allows) is left.
        new_cores = grant.cpus - user_held
        headroom = None if cap is None else max(0, cap - len(user_held))
        if grant.shared:
            assert free <= grant.cpus or (headroom is not None and len(new_cores) == headroom)
        # Least loaded first: for a user without a cap, nothing left out is less loaded.
        if cap is None and eligible - grant.cpus:
            assert max(load[c] for c in grant.cpus) <= min(load[c] for c in eligible - grant.cpus)

        running.append(Holding(user, grant.cpus))
        # A user's jobs together never hold more distinct CPUs than the cap.
        for name, limit in scenario.caps.items():
            mine = frozenset().union(*(h.cpus for h in running if h.user == name))
            assert len(mine) <= limit


# (requested, eligible, holdings, cap) for a user "alice" among others
arbitrary_allocations = given(
    st.integers(min_value=1, max_value=16),
    st.frozensets(st.integers(min_value=0, max_value=15), min_size=1),
    st.lists(
        st.builds(
            Holding,
            st.sampled_from(USERS),
            st.frozensets(st.integers(min_value=0, max_value=15), max_size=6),
        ),
        max_size=6,
    ),
    st.one_of(st.none(), st.integers(min_value=1, max_value=16)),
)


@settings(max_examples=200)
@arbitrary_allocations
def test_arbitrary_holdings_give_a_sane_grant(
    requested: int,
    eligible: frozenset[int],
    holdings: list[Holding],
    cap: int | None,
) -> None:
    grant = allocate(requested, "alice", eligible, holdings, cap)
    assert grant.cpus
    assert grant.cpus <= eligible
    assert len(grant.cpus) == min(requested, len(eligible), cap or requested)
    # Deterministic: the same question gets the same answer.
    assert allocate(requested, "alice", eligible, holdings, cap) == grant


# -- topology: whole cores, one NUMA node ----------------------------------------------

ONE_SOCKET = Topology.synthetic(sockets=1, cores_per_socket=8, threads_per_core=2)  # n, n+8
# node 0: 0-3,8-11; node 1: 4-7,12-15
TWO_SOCKETS = Topology.synthetic(sockets=2, cores_per_socket=4, threads_per_core=2)
# nodes 0-1 on package 0: 0-1,8-9 and 2-3,10-11; nodes 2-3 on package 1: 4-5,12-13, 6-7,14-15
SUB_NUMA = Topology.synthetic(sockets=2, cores_per_socket=4, threads_per_core=2, numa_per_socket=2)


def on(machine: Topology, requested: int, *holdings: Holding, cap: int | None = None) -> Grant:
    return allocate(requested, "alice", machine.online, list(holdings), cap, topology=machine)


def test_whole_cores_first() -> None:
    assert on(ONE_SOCKET, 4) == Grant(cpus=cpus(0, 8, 1, 9), shared=False, notes=())


def test_an_odd_request_takes_a_broken_core_before_splitting_a_whole_one() -> None:
    assert on(ONE_SOCKET, 3, Holding("bob", cpus(2))).cpus == cpus(0, 8, 10)
    assert on(ONE_SOCKET, 3).cpus == cpus(0, 8, 1)  # none broken: split one


def test_single_siblings_when_no_whole_core_is_free() -> None:
    grant = on(ONE_SOCKET, 3, Holding("bob", frozenset(range(8))))
    assert grant == Grant(cpus=cpus(8, 9, 10), shared=False, notes=())


def test_the_sibling_of_a_reserved_cpu_is_a_broken_core() -> None:
    eligible = ONE_SOCKET.online - {0}
    assert allocate(1, "alice", eligible, [], None, topology=ONE_SOCKET).cpus == cpus(8)
    assert allocate(2, "alice", eligible, [], None, topology=ONE_SOCKET).cpus == cpus(1, 9)


def test_one_numa_node_where_it_fits() -> None:
    bob = Holding("bob", cpus(0, 1, 8))  # node 0 has 2, 3, 9, 10, 11 free
    assert on(TWO_SOCKETS, 4, bob).cpus == cpus(2, 10, 3, 11)
    assert on(TWO_SOCKETS, 6, bob) == Grant(cpus(4, 12, 5, 13, 6, 14), shared=False, notes=())


def test_the_fullest_node_that_fits_keeps_room_for_big_jobs() -> None:
    assert on(TWO_SOCKETS, 2, Holding("bob", cpus(4, 12))).cpus == cpus(5, 13)


def test_a_node_with_whole_cores_beats_one_with_broken_cores() -> None:
    bob = Holding("bob", cpus(0, 1, 2, 3))  # node 0: 8-11 free, all single siblings
    assert on(TWO_SOCKETS, 4, bob).cpus == cpus(4, 12, 5, 13)
    assert on(TWO_SOCKETS, 1, bob).cpus == cpus(8)  # but a single CPU fits a broken core


def test_one_package_before_several() -> None:
    grant = on(SUB_NUMA, 8)
    assert grant.cpus == cpus(0, 1, 2, 3, 8, 9, 10, 11)
    assert grant.notes == ("spread over NUMA nodes 0-1",)
    grant = on(SUB_NUMA, 8, Holding("bob", cpus(0)))  # package 0 has only 7 free
    assert grant.cpus == cpus(4, 5, 6, 7, 12, 13, 14, 15)
    assert grant.notes == ("spread over NUMA nodes 2-3",)


def test_the_fewest_nodes_when_no_package_fits() -> None:
    grant = on(SUB_NUMA, 10, Holding("bob", cpus(0, 8)))  # free per node: 2, 4, 4, 4
    assert grant.cpus == cpus(2, 3, 10, 11, 4, 5, 12, 13, 6, 14)
    assert grant.notes == ("spread over NUMA nodes 1-3",)


def test_sharing_stays_near_the_free_part_of_the_grant() -> None:
    bob = Holding("bob", TWO_SOCKETS.online - {4})
    grant = on(TWO_SOCKETS, 2, bob)
    assert grant.cpus == cpus(4, 5)  # CPU 5 is on node 1 with CPU 4; CPU 0 is not
    assert grant.shared
    assert grant.notes == ("no free CPUs left: sharing the least loaded (5)",)


def test_caps_count_the_same_with_a_topology() -> None:
    grant = on(ONE_SOCKET, 4, Holding("alice", cpus(0, 8)), cap=3)
    assert grant.cpus == cpus(0, 8, 1)  # one new CPU under the cap, then alice's own
    assert grant.shared
    assert grant.notes[0] == "user alice is capped at 3 CPUs"


def test_a_flat_topology_changes_nothing() -> None:
    flat = Topology(tuple(Cpu(id=cpu, core=cpu, package=0, node=0) for cpu in range(8)))
    holdings = [Holding("bob", cpus(0, 1, 2, 3)), Holding("bob", cpus(0, 1))]
    for requested in range(1, 9):
        assert allocate(requested, "alice", EIGHT, holdings, None, topology=flat) == allocate(
            requested, "alice", EIGHT, holdings, None
        )


@given(st.sets(st.integers(0, 15)), st.integers(0, 16), st.booleans())
def test_on_a_uniform_topology_the_topology_picks_the_lowest_free_cpus(
    free: set[int], count: int, two_packages: bool
) -> None:
    """Why `allocate` may skip the topology when it is uniform (one node, no SMT)."""
    uniform = Topology(
        tuple(
            Cpu(id=cpu, core=cpu % 8, package=cpu // 8, node=0)
            if two_packages
            else Cpu(id=cpu, core=cpu, package=0, node=0)
            for cpu in range(16)
        )
    )
    assert uniform.uniform and not ONE_SOCKET.uniform
    ordered = sorted(free)
    count = min(count, len(ordered))
    assert _pick_free(count, ordered, uniform) == ordered[:count]


def test_eligible_cpus_outside_the_topology_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"eligible CPUs 16-17 are not in the topology \(online"):
        allocate(1, "alice", ONE_SOCKET.online | {16, 17}, [], None, topology=ONE_SOCKET)


# -- coexistence: never outside the job's cpuset -----------------------------------------


def test_only_cpus_within_the_cpuset() -> None:
    grant = allocate(2, "alice", EIGHT, [], None, allowed=cpus(4, 5, 6, 7))
    assert grant == Grant(cpus=cpus(4, 5), shared=False, notes=())
    grant = allocate(2, "alice", ONE_SOCKET.online, [], None, ONE_SOCKET, allowed=cpus(3, 4, 11))
    assert grant.cpus == cpus(3, 11)  # the whole core inside the cpuset


def test_a_small_cpuset_says_so() -> None:
    grant = allocate(4, "alice", EIGHT - {0}, [], None, allowed=cpus(0, 1, 2))
    assert grant.cpus == cpus(1, 2)
    assert grant.notes == (
        "asked for 4 CPUs, only 2 of the eligible CPUs (1-7) are within the job's cpuset (0-2)",
    )


def test_holdings_outside_the_cpuset_are_no_load() -> None:
    grant = allocate(2, "alice", EIGHT, [Holding("bob", cpus(0, 1, 2))], None, allowed=cpus(2, 3))
    assert grant.cpus == cpus(2, 3)
    assert grant.notes == ("no free CPUs left: sharing the least loaded (2)",)


@pytest.mark.parametrize(
    ("allowed", "message"),
    [
        (cpus(8, 9), r"none of the eligible CPUs \(1-7\) is within the job's cpuset \(8-9\)"),
        (cpus(0), r"\(1-7\) is within the job's cpuset \(0\)"),
        (frozenset(), r"cpuset \(empty\)"),
    ],
)
def test_no_eligible_cpu_in_the_cpuset_is_an_error(allowed: frozenset[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        allocate(1, "alice", EIGHT - {0}, [], None, allowed=allowed)


def test_a_cap_used_up_outside_the_cpuset_grants_one_cpu_beyond_it() -> None:
    grant = allocate(2, "alice", EIGHT, [Holding("alice", cpus(0, 1))], 2, allowed=cpus(4, 5))
    assert grant.cpus == cpus(4)
    assert not grant.shared
    assert grant.notes == (
        "user alice already holds its cap of 2 CPUs (0-1), none of them within the job's"
        " cpuset (4-5): granted 1 CPU beyond the cap",
    )


def test_a_cap_used_up_partly_outside_the_cpuset_says_so() -> None:
    grant = allocate(2, "alice", EIGHT, [Holding("alice", cpus(0, 2))], 2, allowed=cpus(0, 1))
    assert grant.cpus == cpus(0)
    assert grant.shared
    assert grant.notes[0] == (
        "user alice already holds its cap of 2 CPUs (0,2), 1 of them within the job's cpuset (0-1)"
    )


# -- properties with topology and cpusets ------------------------------------------------


@st.composite
def machines(draw: st.DrawFn, threads: tuple[int, ...] = (1, 2, 4)) -> Topology:
    numa = draw(st.sampled_from((1, 2)))
    return Topology.synthetic(
        sockets=draw(st.integers(min_value=1, max_value=2)),
        cores_per_socket=numa * draw(st.integers(min_value=1, max_value=3)),
        threads_per_core=draw(st.sampled_from(threads)),
        numa_per_socket=numa,
    )


@dataclass(frozen=True)
class MachineScenario:
    machine: Topology
    reserved: frozenset[int]
    caps: dict[str, int]
    # ("start", user, CPUs requested, the job's cpuset or None) or ("end", "", which, None)
    steps: list[tuple[str, str, int, frozenset[int] | None]]


@st.composite
def machine_scenarios(draw: st.DrawFn) -> MachineScenario:
    machine = draw(machines())
    online = sorted(machine.online)
    reserved = draw(st.frozensets(st.sampled_from(online), max_size=len(online) // 4))
    cpusets = st.one_of(st.none(), st.frozensets(st.sampled_from(online), max_size=len(online)))
    caps = draw(
        st.dictionaries(st.sampled_from(USERS), st.integers(min_value=1, max_value=10), max_size=3)
    )
    start = st.tuples(
        st.just("start"), st.sampled_from(USERS), st.integers(min_value=1, max_value=12), cpusets
    )
    end = st.tuples(st.just("end"), st.just(""), st.integers(min_value=0, max_value=20), st.none())
    steps = draw(st.lists(st.one_of(start, end), min_size=1, max_size=20))
    return MachineScenario(machine, reserved, caps, steps)


@settings(max_examples=150, deadline=None)
@given(machine_scenarios())
def test_topology_allocation_invariants(scenario: MachineScenario) -> None:
    machine = scenario.machine
    eligible = machine.online - scenario.reserved
    running: list[Holding] = []
    beyond: Counter[str] = Counter()  # grants past the cap, each noted
    for action, user, number, allowed in scenario.steps:
        if action == "end":
            if running:
                running.pop(number % len(running))
            continue
        pool = eligible if allowed is None else eligible & allowed
        if not pool:
            with pytest.raises(ValueError, match="within the job's cpuset"):
                allocate(number, user, eligible, running, None, machine, allowed)
            continue
        cap = scenario.caps.get(user)
        held = frozenset().union(*(h.cpus for h in running))
        user_held = frozenset().union(*(h.cpus for h in running if h.user == user))
        free = pool - held

        grant = allocate(number, user, eligible, list(running), cap, machine, allowed)

        # Never empty, never reserved, never outside the job's cpuset.
        assert grant.cpus
        assert grant.cpus <= pool
        size = min(number, len(pool))
        if cap is not None:
            # The cap counts the user's cores outside this cpuset too.
            size = min(size, cap, max(0, cap - len(user_held)) + len(user_held & pool))
        if size == 0:
            assert any("granted 1 CPU beyond the cap" in note for note in grant.notes)
            beyond[user] += 1
        assert len(grant.cpus) == max(size, 1)
        if size < min(number, len(pool), cap or number):
            assert any("within the job's cpuset" in note for note in grant.notes)
        assert grant.shared == bool(grant.cpus & held)
        assert grant.shared == any("sharing" in note for note in grant.notes)
        # No CPU is given to two jobs while a free one (that the cap allows) is left.
        headroom = None if cap is None else max(0, cap - len(user_held & eligible))
        if grant.shared:
            taken = len(grant.cpus - user_held)
            assert free <= grant.cpus or (headroom is not None and taken == headroom)
        # The grant is on one NUMA node whenever one node had room for it all.
        nodes = {machine.by_id[cpu].node for cpu in grant.cpus}
        roomy = [n for n, cpus_ in machine.nodes.items() if len(cpus_ & free) >= len(grant.cpus)]
        if roomy and not grant.shared:
            assert len(nodes) == 1
        assert (len(nodes) > 1) == any("spread over NUMA nodes" in n for n in grant.notes)

        running.append(Holding(user, grant.cpus))
        for name, limit in scenario.caps.items():
            mine = frozenset().union(*(h.cpus for h in running if h.user == name))
            assert len(mine) <= limit + beyond[name]


@settings(max_examples=100, deadline=None)
@given(machines(threads=(2, 4)), st.integers(min_value=1, max_value=12))
def test_an_idle_smt_machine_grants_whole_cores(machine: Topology, cores: int) -> None:
    threads = len(machine.siblings(0))
    grant = allocate(cores * threads, "alice", machine.online, [], None, topology=machine)
    assert len(grant.cpus) == min(cores * threads, len(machine.online))
    for cpu in grant.cpus:
        assert machine.siblings(cpu) <= grant.cpus
    node_size = len(machine.nodes[0])
    if len(grant.cpus) <= node_size:
        assert len({machine.by_id[cpu].node for cpu in grant.cpus}) == 1


@settings(max_examples=100, deadline=None)
@arbitrary_allocations
def test_a_flat_topology_is_the_same_as_none(
    requested: int,
    eligible: frozenset[int],
    holdings: list[Holding],
    cap: int | None,
) -> None:
    flat = Topology(tuple(Cpu(id=cpu, core=cpu, package=0, node=0) for cpu in range(16)))
    with_flat = allocate(requested, "alice", eligible, holdings, cap, topology=flat)
    assert with_flat == allocate(requested, "alice", eligible, holdings, cap)
