"""ViolationState.observe: hysteresis, one transition at onset and one at resolution."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corecapd.violations import Transition, ViolationState


def run(samples: list[bool], after: int) -> list[Transition | None]:
    state = ViolationState()
    transitions: list[Transition | None] = []
    for over in samples:
        state, transition = state.observe(over, after)
        transitions.append(transition)
    return transitions


def test_starts_inactive() -> None:
    assert ViolationState() == ViolationState(active=False, streak=0)


@pytest.mark.parametrize("after", [1, 2, 3, 5])
def test_onset_exactly_after_n_consecutive_over_samples(after: int) -> None:
    transitions = run([True] * (after + 2), after)
    assert transitions[after - 1] is Transition.ONSET
    assert transitions.count(Transition.ONSET) == 1
    assert all(t is None for i, t in enumerate(transitions) if i != after - 1)


@pytest.mark.parametrize("after", [1, 2, 3, 5])
def test_resolution_after_n_consecutive_under_samples(after: int) -> None:
    transitions = run([True] * after + [False] * (after + 2), after)
    assert transitions[after - 1] is Transition.ONSET
    assert transitions[2 * after - 1] is Transition.RESOLVED
    assert [t for t in transitions if t] == [Transition.ONSET, Transition.RESOLVED]


def test_state_after_onset_and_resolution() -> None:
    state = ViolationState()
    for _ in range(3):
        state, _t = state.observe(True, 3)
    assert state.active
    state, transition = state.observe(False, 3)
    assert (state.active, state.streak, transition) == (True, 1, None)
    state, _t = state.observe(False, 3)
    state, transition = state.observe(False, 3)
    assert (state.active, state.streak, transition) == (False, 0, Transition.RESOLVED)


def test_under_budget_never_transitions() -> None:
    assert run([False] * 20, 1) == [None] * 20


def test_alternating_samples_never_flap() -> None:
    assert run([True, False] * 20, 2) == [None] * 40


def test_alternating_while_active_stays_active() -> None:
    state = ViolationState()
    state, transition = state.observe(True, 2)
    state, transition = state.observe(True, 2)
    assert transition is Transition.ONSET
    for over in [False, True] * 10:
        state, transition = state.observe(over, 2)
        assert transition is None
        assert state.active


def test_interrupted_streak_starts_over() -> None:
    # Two over, one under, two over: with after=3 no onset; a third over then gives one.
    assert run([True, True, False, True, True], 3) == [None] * 5
    assert run([True, True, False, True, True, True], 3)[-1] is Transition.ONSET


def test_after_one_follows_every_change() -> None:
    transitions = run([True, False, True, False], 1)
    assert transitions == [
        Transition.ONSET,
        Transition.RESOLVED,
        Transition.ONSET,
        Transition.RESOLVED,
    ]


def test_observe_does_not_mutate() -> None:
    state = ViolationState()
    new_state, _t = state.observe(True, 3)
    assert state == ViolationState()
    assert new_state.streak == 1


@settings(max_examples=200)
@given(st.lists(st.booleans(), max_size=60), st.integers(min_value=1, max_value=6))
def test_transitions_alternate_and_need_after_agreeing_samples(
    samples: list[bool], after: int
) -> None:
    transitions = run(samples, after)
    happened = [(i, t) for i, t in enumerate(transitions) if t is not None]
    # Onsets and resolutions alternate, starting with an onset.
    for n, (_i, transition) in enumerate(happened):
        assert transition is (Transition.ONSET if n % 2 == 0 else Transition.RESOLVED)
    # A transition happens only after `after` samples agreeing with the new state, all
    # since the previous transition.
    previous = -1
    for i, transition in happened:
        assert i - previous >= after
        wanted = transition is Transition.ONSET
        assert samples[i - after + 1 : i + 1] == [wanted] * after
        previous = i
    # ...and it does happen then: `after` disagreeing samples since the last transition
    # always make one.
    active = False
    streak = 0
    for i, over in enumerate(samples):
        streak = streak + 1 if over != active else 0
        if streak == after:
            assert transitions[i] is not None, (i, samples, after)
            active, streak = over, 0
        else:
            assert transitions[i] is None


@settings(max_examples=200)
@given(st.lists(st.booleans(), max_size=60), st.integers(min_value=1, max_value=6))
def test_active_matches_the_transitions(samples: list[bool], after: int) -> None:
    state = ViolationState()
    active = False
    for over in samples:
        state, transition = state.observe(over, after)
        if transition is Transition.ONSET:
            active = True
        elif transition is Transition.RESOLVED:
            active = False
        assert state.active == active
        assert 0 <= state.streak < after
