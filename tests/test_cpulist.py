"""parse_cpulist / format_cpulist: the kernel's CPU list format, both ways."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corecapd.cpulist import MAX_CPU_ID, CpuListError, format_cpulist, parse_cpulist


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", set()),
        ("   ", set()),
        ("\n", set()),
        ("0", {0}),
        ("7", {7}),
        ("0,2-3", {0, 2, 3}),
        ("0-3", {0, 1, 2, 3}),
        ("2-2", {2}),
        ("0-1,4-5,8", {0, 1, 4, 5, 8}),
        ("3,1,2", {1, 2, 3}),  # order does not matter
        ("1-3,2-4", {1, 2, 3, 4}),  # overlaps merge
        ("0-3\n", {0, 1, 2, 3}),  # as read from sysfs, with its newline
        (" 0 , 2-3 ", {0, 2, 3}),
        (f"{MAX_CPU_ID}", {MAX_CPU_ID}),
        (f"{MAX_CPU_ID - 1}-{MAX_CPU_ID}", {MAX_CPU_ID - 1, MAX_CPU_ID}),
    ],
)
def test_parse_examples(text: str, expected: set[int]) -> None:
    assert parse_cpulist(text) == frozenset(expected)


def test_parse_returns_frozenset() -> None:
    assert isinstance(parse_cpulist("0-1"), frozenset)


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        (set(), ""),
        ({0}, "0"),
        ({0, 1}, "0-1"),
        ({0, 1, 2, 5}, "0-2,5"),
        ({5, 2, 1, 0}, "0-2,5"),
        ([3, 3, 3], "3"),  # duplicates collapse
        ({0, 2, 4}, "0,2,4"),
        ({1, 2, 3, 7, 8, 10}, "1-3,7-8,10"),
        (range(0, 64), "0-63"),
    ],
)
def test_format_examples(cpus: set[int] | list[int] | range, expected: str) -> None:
    assert format_cpulist(cpus) == expected


def test_format_accepts_generators() -> None:
    assert format_cpulist(c for c in (4, 5, 6)) == "4-6"


@pytest.mark.parametrize(
    ("text", "bad_part"),
    [
        ("a", "'a'"),
        ("0,x", "'x'"),
        ("1-", "'1-'"),
        ("-1", "'-1'"),
        ("1-2-3", "'1-2-3'"),
        ("0;1", "'0;1'"),
        ("0 1", "'0 1'"),
        ("1.5", "'1.5'"),
        ("3-1", "'3-1'"),
        (f"{MAX_CPU_ID + 1}", f"'{MAX_CPU_ID + 1}'"),
        (f"0-{MAX_CPU_ID + 1}", f"'0-{MAX_CPU_ID + 1}'"),
        ("0,4-2,6", "'4-2'"),
    ],
)
def test_parse_errors_name_the_bad_part(text: str, bad_part: str) -> None:
    with pytest.raises(CpuListError) as caught:
        parse_cpulist(text)
    message = str(caught.value)
    assert bad_part in message
    assert repr(text) in message  # and the whole list it came from


@pytest.mark.parametrize("text", [",", "1,", ",1", "1,,2", "0, ,1"])
def test_empty_items_are_errors(text: str) -> None:
    with pytest.raises(CpuListError, match="empty item") as caught:
        parse_cpulist(text)
    assert repr(text) in str(caught.value)


def test_descending_range_message_says_what_is_expected() -> None:
    with pytest.raises(CpuListError, match=rf"ascending, within 0-{MAX_CPU_ID}"):
        parse_cpulist("5-2")


def test_cpulist_error_is_a_value_error() -> None:
    assert issubclass(CpuListError, ValueError)


@pytest.mark.parametrize("text", ["+1", "1_0", "\u0663", "0-+3"])
def test_only_ascii_digits_are_cpu_numbers(text: str) -> None:
    with pytest.raises(CpuListError):
        parse_cpulist(text)


# -- properties ------------------------------------------------------------------------

cpu_sets = st.frozensets(st.integers(min_value=0, max_value=MAX_CPU_ID), max_size=64)
# Dense sets near each other, to get long runs as well as singles.
dense_sets = st.frozensets(st.integers(min_value=0, max_value=40), max_size=41)

_KERNEL_FORMAT = re.compile(r"^(\d+(-\d+)?(,\d+(-\d+)?)*)?$")


@settings(max_examples=200)
@given(st.one_of(cpu_sets, dense_sets))
def test_format_then_parse_gives_the_set_back(cpus: frozenset[int]) -> None:
    text = format_cpulist(cpus)
    assert _KERNEL_FORMAT.match(text), text
    assert parse_cpulist(text) == cpus


@settings(max_examples=200)
@given(st.one_of(cpu_sets, dense_sets))
def test_format_is_the_shortest_form(cpus: frozenset[int]) -> None:
    text = format_cpulist(cpus)
    runs = [tuple(int(n) for n in item.split("-")) for item in text.split(",")] if text else []
    previous_end = -2
    for run in runs:
        start, end = run[0], run[-1]
        if len(run) == 2:
            assert end > start, f"degenerate range in {text!r}"
        # Runs ascend and are never adjacent (they would have been merged).
        assert start > previous_end + 1, text
        previous_end = end


@settings(max_examples=200)
@given(st.text(max_size=30))
def test_parse_raises_only_cpulist_error(text: str) -> None:
    try:
        cpus = parse_cpulist(text)
    except CpuListError:
        return
    assert all(0 <= cpu <= MAX_CPU_ID for cpu in cpus)
    assert parse_cpulist(format_cpulist(cpus)) == cpus


@settings(max_examples=200)
@given(st.text(alphabet="0123456789-, \n", max_size=20))
def test_parse_of_likely_lists_raises_only_cpulist_error(text: str) -> None:
    try:
        cpus = parse_cpulist(text)
    except CpuListError:
        return
    assert parse_cpulist(format_cpulist(cpus)) == cpus


# -- ids of any length ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["9" * 5000, "0-" + "9" * 5000, "1" * 4301 + "-2", "0," + "1" * 100_000, "00081920"],
)
def test_ids_beyond_the_bound_are_errors_however_long(text: str) -> None:
    with pytest.raises(CpuListError, match=rf"CPU ids go up to {MAX_CPU_ID}$") as caught:
        parse_cpulist(text)
    assert len(str(caught.value)) < 200  # the list is quoted by its start and its length
    if len(text) > 40:
        assert f"({len(text)} characters)" in str(caught.value)


def test_leading_zeros_are_read_however_many() -> None:
    assert parse_cpulist("0" * 5000 + "3-" + "0" * 5000 + "5") == frozenset({3, 4, 5})


_PIECES = st.sampled_from(
    ["0", "7", "8191", "8192", "1" * 4301, "9" * 5000, "0" * 5000 + "3", "-", ",", " ", "\n", "x"]
)


@settings(max_examples=300)
@given(st.lists(_PIECES, max_size=8).map("".join))
def test_ids_of_any_length_give_cpus_or_a_short_cpulist_error(text: str) -> None:
    try:
        cpus = parse_cpulist(text)
    except CpuListError as err:
        assert len(str(err)) < 300, str(err)
        return
    assert all(0 <= cpu <= MAX_CPU_ID for cpu in cpus)
