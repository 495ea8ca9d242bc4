"""allocate(): free cores first, least loaded when the pool runs out, per-user caps."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corecapd.allocator import Grant, Holding, allocate


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


@settings(max_examples=200)
@given(
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
