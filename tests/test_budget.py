"""thread_budget(): a rule's max_threads as written, else derived from cores and TensorFlow."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corecapd.budget import (
    PYTHON_FIXED_THREADS,
    PYTHON_THREADS_PER_CPU,
    TF_FIXED_THREADS,
    TF_THREADS_PER_CPU,
    Budget,
    thread_budget,
)


@pytest.mark.parametrize("tensorflow", [False, True])
@pytest.mark.parametrize("cpus", [1, 4, 64])
def test_max_threads_taken_as_is(tensorflow: bool, cpus: int) -> None:
    budget = thread_budget(cpus, tensorflow, max_threads=24, slack=8)
    assert budget == Budget(24, "rule max_threads")  # no slack added, cores ignored


def test_documented_formulas() -> None:
    # As etc/corecap.toml documents them: TF 6 + 7 x cpus, other Python 4 + 2 x cpus, + slack.
    assert (TF_FIXED_THREADS, TF_THREADS_PER_CPU) == (6, 7)
    assert (PYTHON_FIXED_THREADS, PYTHON_THREADS_PER_CPU) == (4, 2)


@pytest.mark.parametrize(
    ("cpus", "slack", "expected"),
    [(1, 0, 13), (2, 0, 20), (2, 8, 28), (4, 8, 42), (16, 3, 121)],
)
def test_tensorflow_default(cpus: int, slack: int, expected: int) -> None:
    budget = thread_budget(cpus, True, None, slack)
    assert budget.threads == expected
    assert "TensorFlow" in budget.basis
    assert f"{cpus} CPUs" in budget.basis
    assert f"{slack} slack" in budget.basis


@pytest.mark.parametrize(
    ("cpus", "slack", "expected"),
    [(1, 0, 6), (2, 0, 8), (2, 8, 16), (4, 8, 20), (16, 3, 39)],
)
def test_python_default(cpus: int, slack: int, expected: int) -> None:
    budget = thread_budget(cpus, False, None, slack)
    assert budget.threads == expected
    assert budget.basis.startswith("Python default")
    assert f"{slack} slack" in budget.basis


@pytest.mark.parametrize(("cpus", "peak"), [(1, 13), (2, 19)])
def test_default_keras_fit_is_not_flagged_even_without_slack(cpus: int, peak: int) -> None:
    # SPEC: a default Keras fit peaks at 13 threads on 1 CPU and 19 on 2.
    assert thread_budget(cpus, True, None, slack=0).threads >= peak


def test_numpy_openblas_fits_the_python_default() -> None:
    # OpenBLAS: one thread per CPU plus the main one.
    for cpus in (1, 2, 8, 64):
        assert thread_budget(cpus, False, None, slack=0).threads >= cpus + 1


@settings(max_examples=200)
@given(
    st.integers(min_value=1, max_value=8192),
    st.booleans(),
    st.integers(min_value=0, max_value=1_000_000),
)
def test_derived_budget_is_monotone_in_cpus(cpus: int, tensorflow: bool, slack: int) -> None:
    fewer = thread_budget(cpus, tensorflow, None, slack).threads
    more = thread_budget(cpus + 1, tensorflow, None, slack).threads
    assert more > fewer


@settings(max_examples=200)
@given(st.integers(min_value=1, max_value=8192), st.integers(min_value=0, max_value=1_000_000))
def test_tensorflow_gets_more_and_slack_adds_exactly(cpus: int, slack: int) -> None:
    plain = thread_budget(cpus, False, None, slack).threads
    tf = thread_budget(cpus, True, None, slack).threads
    assert tf > plain > cpus
    for tensorflow in (False, True):
        without = thread_budget(cpus, tensorflow, None, 0).threads
        assert thread_budget(cpus, tensorflow, None, slack).threads == without + slack


@settings(max_examples=100)
@given(
    st.integers(min_value=1, max_value=1_000_000),
    st.integers(min_value=1, max_value=8192),
    st.booleans(),
    st.integers(min_value=0, max_value=100),
)
def test_max_threads_wins_over_everything(
    max_threads: int, cpus: int, tensorflow: bool, slack: int
) -> None:
    assert thread_budget(cpus, tensorflow, max_threads, slack).threads == max_threads
