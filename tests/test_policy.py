"""parse_policy / load_policy: the schema, its defaults, and errors that say where and what."""

from __future__ import annotations

import datetime
import math
import os
import re
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corecapd.cpulist import format_cpulist
from corecapd.policy import (
    DEFAULT_SOCKET,
    DaemonSettings,
    Defaults,
    Match,
    Policy,
    PolicyError,
    daemon_socket,
    load_policy,
    parse_policy,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "etc" / "corecap.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corecap.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- good policies ---------------------------------------------------------------------


def test_shipped_policy_loads() -> None:
    policy = load_policy(SHIPPED_POLICY)
    assert policy.source == str(SHIPPED_POLICY)
    # The shipped default is safe: it only watches, and keeps CPU 0 for the system.
    assert policy.daemon.mode == "monitor"
    assert policy.daemon.reserved_cpus == frozenset({0})
    assert policy.daemon.socket.startswith("/")
    assert [rule.name for rule in policy.rules] == ["tensorflow", "python"]
    assert policy.rules[0].match.loads == ("tensorflow",)
    assert policy.rules[1].match.exe == ("python*",)


# A policy without [[rules]] must say so (`rules = []`): see test_no_rules_* below.
NO_RULES = "rules = []\n"


def test_empty_policy_is_all_defaults() -> None:
    policy = parse_policy(NO_RULES, source="empty.toml")
    assert policy.daemon == DaemonSettings()
    assert policy.defaults == Defaults()
    assert policy.rules == ()
    assert dict(policy.users) == {}
    assert policy.source == "empty.toml"


def test_documented_default_values() -> None:
    policy = parse_policy(NO_RULES)
    assert policy.daemon.mode == "enforce"
    assert policy.daemon.backend == "auto"
    assert policy.daemon.scan_interval == 1.0
    assert policy.daemon.reserved_cpus == frozenset()
    assert policy.daemon.socket == DEFAULT_SOCKET
    assert policy.defaults.cpus == 4
    assert policy.defaults.thread_slack == 8
    assert policy.defaults.grace == 10.0
    assert policy.defaults.violation_after == 3


def test_absent_sections_default_independently() -> None:
    policy = parse_policy(NO_RULES + "[defaults]\ncpus = 2\n")
    assert policy.daemon == DaemonSettings()
    assert policy.defaults == Defaults(cpus=2)


def test_partial_sections_keep_the_other_defaults() -> None:
    policy = parse_policy(NO_RULES + '[daemon]\nmode = "monitor"\n[defaults]\ngrace = 0\n')
    assert policy.daemon == DaemonSettings(mode="monitor")
    assert policy.defaults == Defaults(grace=0.0)
    assert isinstance(policy.defaults.grace, float)


def test_full_policy(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [daemon]
        mode = "monitor"
        backend = "affinity"
        scan_interval = 0.5
        reserved_cpus = "0,2-3"
        socket = "/tmp/corecap-test.sock"

        [defaults]
        cpus = 6
        thread_slack = 0
        grace = 2
        violation_after = 5

        [[rules]]
        name = "tf-training"
        match = { exe = ["python*"], cmdline = "tr", users = ["@ml", "al"], loads = ["tensorflow"] }
        cpus = 8
        max_threads = 24

        [[rules]]
        name = "fallback"
        match.exe = "pypy3"

        [users.alice]
        max_cpus = 16

        [users."bob.smith"]
        """,
    )
    policy = load_policy(path)
    assert policy.daemon == DaemonSettings(
        mode="monitor",
        backend="affinity",
        scan_interval=0.5,
        reserved_cpus=frozenset({0, 2, 3}),
        socket="/tmp/corecap-test.sock",
    )
    assert policy.defaults == Defaults(cpus=6, thread_slack=0, grace=2.0, violation_after=5)
    first, second = policy.rules
    assert first.name == "tf-training"
    assert first.match.exe == ("python*",)
    assert first.match.cmdline is not None and first.match.cmdline.pattern == "tr"
    assert first.match.users == ("@ml", "al")
    assert first.match.loads == ("tensorflow",)
    assert (first.cpus, first.max_threads) == (8, 24)
    # A rule without cpus takes defaults.cpus; a single string is a list of one.
    assert second.match == Match(exe=("pypy3",))
    assert (second.cpus, second.max_threads) == (6, None)
    assert policy.users["alice"].max_cpus == 16
    assert policy.users["bob.smith"].max_cpus >= 8192  # no cap
    assert policy.source == str(path)


def test_rules_keep_file_order() -> None:
    text = "".join(f'[[rules]]\nname = "r{i}"\nmatch.exe = ["p{i}"]\n' for i in range(10))
    assert [rule.name for rule in parse_policy(text).rules] == [f"r{i}" for i in range(10)]


def test_empty_reserved_cpus_means_none() -> None:
    policy = parse_policy(NO_RULES + '[daemon]\nreserved_cpus = ""\n')
    assert policy.daemon.reserved_cpus == frozenset()


@pytest.mark.parametrize("value", ["0.05", "3600", "1"])
def test_scan_interval_bounds_are_inclusive(value: str) -> None:
    policy = parse_policy(f"{NO_RULES}[daemon]\nscan_interval = {value}\n")
    assert policy.daemon.scan_interval == float(value)


# -- bad policies ----------------------------------------------------------------------

RULE = '[[rules]]\nname = "ok"\nmatch.exe = ["python*"]\n'

# (id, policy text, key path at the head of the message, fragments that must follow it)
BAD_POLICIES: list[tuple[str, str, str, tuple[str, ...]]] = [
    # [daemon]
    ("daemon-not-table", "daemon = 5\n", "daemon", ("expected a table", "integer 5")),
    (
        "daemon-mode-choice",
        '[daemon]\nmode = "enforcing"\n',
        "daemon.mode",
        ("'enforce' or 'monitor'", "found 'enforcing'"),
    ),
    (
        "daemon-mode-type",
        "[daemon]\nmode = 1\n",
        "daemon.mode",
        ("expected a string", "integer 1"),
    ),
    (
        "daemon-backend",
        '[daemon]\nbackend = "cgroup3"\n',
        "daemon.backend",
        ("'auto' or 'affinity' or 'cgroup1' or 'cgroup2' or 'systemd'", "found 'cgroup3'"),
    ),
    (
        "daemon-scan-interval-low",
        "[daemon]\nscan_interval = 0.0\n",
        "daemon.scan_interval",
        ("from 0.05 to 3600", "found 0.0"),
    ),
    (
        "daemon-scan-interval-high",
        "[daemon]\nscan_interval = 3601\n",
        "daemon.scan_interval",
        ("from 0.05 to 3600", "found 3601"),
    ),
    (
        "daemon-scan-interval-nan",
        "[daemon]\nscan_interval = nan\n",
        "daemon.scan_interval",
        ("from 0.05 to 3600", "found nan"),
    ),
    (
        "daemon-scan-interval-type",
        '[daemon]\nscan_interval = "1s"\n',
        "daemon.scan_interval",
        ("expected a number of seconds", "string '1s'"),
    ),
    (
        "daemon-scan-interval-bool",
        "[daemon]\nscan_interval = true\n",
        "daemon.scan_interval",
        ("expected a number of seconds", "boolean True"),
    ),
    (
        "daemon-reserved-bad-list",
        '[daemon]\nreserved_cpus = "0-"\n',
        "daemon.reserved_cpus",
        ('expected a CPU list like "0,2-3"', "'0-'"),
    ),
    (
        "daemon-reserved-descending",
        '[daemon]\nreserved_cpus = "0,3-1"\n',
        "daemon.reserved_cpus",
        ('expected a CPU list like "0,2-3"', "'3-1'"),
    ),
    (
        "daemon-reserved-type",
        "[daemon]\nreserved_cpus = 0\n",
        "daemon.reserved_cpus",
        ("expected a string", "integer 0"),
    ),
    (
        "daemon-socket-relative",
        '[daemon]\nsocket = "run/corecap.sock"\n',
        "daemon.socket",
        ("expected an absolute path", "found 'run/corecap.sock'"),
    ),
    (
        "daemon-socket-empty",
        '[daemon]\nsocket = ""\n',
        "daemon.socket",
        ("expected a non-empty string",),
    ),
    (
        "daemon-unknown-key",
        "[daemon]\nscan_intervall = 1.0\n",
        "daemon.scan_intervall",
        ("unknown key", "scan_interval"),
    ),
    # [defaults]
    (
        "defaults-cpus-zero",
        "[defaults]\ncpus = 0\n",
        "defaults.cpus",
        ("expected an integer from 1 to 8192", "found 0"),
    ),
    (
        "defaults-cpus-float",
        "[defaults]\ncpus = 2.5\n",
        "defaults.cpus",
        ("expected an integer", "float 2.5"),
    ),
    (
        "defaults-slack-negative",
        "[defaults]\nthread_slack = -1\n",
        "defaults.thread_slack",
        ("from 0 to 1000000", "found -1"),
    ),
    (
        "defaults-grace-negative",
        "[defaults]\ngrace = -1\n",
        "defaults.grace",
        ("seconds from 0 to 86400", "found -1"),
    ),
    (
        "defaults-violation-after-zero",
        "[defaults]\nviolation_after = 0\n",
        "defaults.violation_after",
        ("from 1 to 1000", "found 0"),
    ),
    (
        "defaults-unknown-key",
        "[defaults]\ngraze = 1\n",
        "defaults.graze",
        ("unknown key", "grace"),
    ),
    # [[rules]]
    (
        "rules-not-array",
        '[rules]\nname = "x"\n',
        "rules",
        ("expected an array of tables ([[rules]])", "table"),
    ),
    ("rules-item-not-table", "rules = [1]\n", "rules[0]", ("expected a table", "integer 1")),
    (
        "rules-cpus-type-second-rule",
        RULE + '[[rules]]\nname = "two"\nmatch.exe = ["x"]\ncpus = "2"\n',
        "rules[1].cpus",
        ("expected an integer", "string '2'"),
    ),
    (
        "rules-cpus-zero",
        RULE + "cpus = 0\n",
        "rules[0].cpus",
        ("expected an integer from 1 to 8192", "found 0"),
    ),
    (
        "rules-max-threads-bool",
        RULE + "max_threads = true\n",
        "rules[0].max_threads",
        ("expected an integer", "boolean True"),
    ),
    (
        "rules-max-threads-zero",
        RULE + "max_threads = 0\n",
        "rules[0].max_threads",
        ("from 1 to 1000000", "found 0"),
    ),
    (
        "rules-unknown-key",
        RULE + "priority = 1\n",
        "rules[0].priority",
        ("unknown key", "max_threads"),
    ),
    (
        "rules-missing-name",
        '[[rules]]\nmatch.exe = ["python*"]\n',
        "rules[0].name",
        ("missing",),
    ),
    (
        "rules-empty-name",
        '[[rules]]\nname = " "\nmatch.exe = ["python*"]\n',
        "rules[0].name",
        ("expected a non-empty string",),
    ),
    (
        "rules-name-type",
        '[[rules]]\nname = 3\nmatch.exe = ["python*"]\n',
        "rules[0].name",
        ("expected a string", "integer 3"),
    ),
    (
        "rules-duplicate-name",
        RULE + RULE.replace("python*", "pypy*"),
        "rules[1].name",
        ("duplicate rule name 'ok'",),
    ),
    ("rules-missing-match", '[[rules]]\nname = "x"\ncpus = 2\n', "rules[0].match", ("missing",)),
    (
        "rules-empty-match",
        '[[rules]]\nname = "x"\nmatch = {}\n',
        "rules[0].match",
        ("expected at least one of exe, cmdline, users, loads",),
    ),
    (
        "rules-match-not-table",
        '[[rules]]\nname = "x"\nmatch = "python"\n',
        "rules[0].match",
        ("expected a table", "string 'python'"),
    ),
    # rules[i].match
    (
        "match-unknown-key",
        '[[rules]]\nname = "x"\nmatch = { comm = "train" }\n',
        "rules[0].match.comm",
        ("unknown key", "cmdline"),
    ),
    (
        "match-bad-regex",
        '[[rules]]\nname = "x"\nmatch.cmdline = "train("\n',
        "rules[0].match.cmdline",
        ("invalid regular expression", "missing ) at position"),
    ),
    (
        "match-regex-type",
        '[[rules]]\nname = "x"\nmatch.cmdline = ["train"]\n',
        "rules[0].match.cmdline",
        ("expected a string", "array ['train']"),
    ),
    (
        "match-exe-item-type",
        '[[rules]]\nname = "x"\nmatch.exe = ["python*", 1]\n',
        "rules[0].match.exe[1]",
        ("expected a string", "integer 1"),
    ),
    (
        "match-exe-type",
        '[[rules]]\nname = "x"\nmatch.exe = 5\n',
        "rules[0].match.exe",
        ("expected an array of strings", "integer 5"),
    ),
    (
        "match-loads-empty-item",
        '[[rules]]\nname = "x"\nmatch.loads = [""]\n',
        "rules[0].match.loads[0]",
        ("expected a non-empty string",),
    ),
    (
        "match-users-space",
        '[[rules]]\nname = "x"\nmatch.users = ["root", "alice smith"]\n',
        "rules[0].match.users[1]",
        ('expected a user name or "@group"', "'alice smith'"),
    ),
    (
        "match-users-bare-at",
        '[[rules]]\nname = "x"\nmatch.users = ["@"]\n',
        "rules[0].match.users[0]",
        ('expected a user name or "@group"', "'@'"),
    ),
    # [users.NAME]
    ("users-not-table", 'users = ["alice"]\n', "users", ("expected a table", "array ['alice']")),
    (
        "users-entry-not-table",
        "[users]\nalice = 4\n",
        "users.alice",
        ("expected a table", "integer 4"),
    ),
    (
        "users-max-cpus-zero",
        "[users.alice]\nmax_cpus = 0\n",
        "users.alice.max_cpus",
        ("from 1 to 8192", "found 0"),
    ),
    (
        "users-max-cpus-type",
        '[users.alice]\nmax_cpus = "8"\n',
        "users.alice.max_cpus",
        ("expected an integer", "string '8'"),
    ),
    (
        "users-unknown-key",
        "[users.alice]\ncpus = 4\n",
        "users.alice.cpus",
        ("unknown key", "max_cpus"),
    ),
    # top level
    (
        "top-unknown-key",
        RULE.replace("[[rules]]", "[[rule]]"),
        "rule",
        ("unknown key", "daemon", "defaults", "rules", "users"),
    ),
    (
        "long-value-described-by-type",
        '[daemon]\nmode = ["' + "x" * 60 + '"]\n',
        "daemon.mode",
        ("expected a string, found array",),
    ),
]


@pytest.mark.parametrize(
    ("text", "key_path", "fragments"),
    [pytest.param(text, path, frags, id=name) for name, text, path, frags in BAD_POLICIES],
)
def test_bad_policy_names_key_path_and_expectation(
    tmp_path: Path, text: str, key_path: str, fragments: tuple[str, ...]
) -> None:
    if "rules" not in text:  # one error each: a missing [[rules]] would be a second
        text = NO_RULES + text
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    # "<file>: <key path>: what was expected, what was found"
    assert message.startswith(f"{path}: {key_path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message


def test_bad_policy_table_is_big_enough() -> None:
    assert len(BAD_POLICIES) >= 25
    assert len({name for name, *_ in BAD_POLICIES}) == len(BAD_POLICIES)


def test_long_values_are_not_quoted_in_full() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy('[daemon]\nmode = ["' + "x" * 60 + '"]\n')
    assert "x" * 60 not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ('[daemon]\nmode = "enforce"\n[defaults]\ncpus = = 4\n', 4, 8),
        ('[[rules]]\nname = "a"\nname = "b"\n', 3, 11),
        ('[daemon]\nmode = "monitor"\n[daemon]\n', 3, 8),
        ("[daemon]\nmode = enforce\n", 2, 8),
        ("[daemon]\n\n\nmode = 'x' # ok\n  = 3\n", 5, 3),
    ],
)
def test_toml_syntax_error_names_file_line_and_column(
    tmp_path: Path, text: str, line: int, column: int
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}:{column}: TOML syntax error: "), message
    assert "(at line" not in message  # the position is said once, at the front


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[daemon]\nmode = 'enforce\n", 2),
        ('[[rules]]\nname = "x"\nmatch.exe = ["python*"\n', 3),
        ("[daemon", 1),
    ],
)
def test_toml_syntax_error_at_end_of_document_still_has_line_and_column(
    text: str, line: int
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="p.toml")
    assert re.match(rf"^p\.toml:{line}:\d+: ", str(caught.value)), str(caught.value)


@pytest.mark.parametrize("pattern", ["a{4294967296}", "(" * 2000 + ")" * 2000])
def test_pathological_regex_is_a_policy_error(pattern: str) -> None:
    text = f'[[rules]]\nname = "x"\nmatch.cmdline = "{pattern}"\n'
    with pytest.raises(PolicyError, match=r"^p\.toml: rules\[0\]\.match\.cmdline: "):
        parse_policy(text, source="p.toml")


@pytest.mark.parametrize("nesting", [("[", "]"), ("{a=", "}")])
def test_deeply_nested_toml_is_a_policy_error(nesting: tuple[str, str]) -> None:
    opening, closing = nesting
    text = "x = " + opening * 3000 + "1" * (opening == "{a=") + closing * 3000 + "\n"
    with pytest.raises(PolicyError, match=r"^p\.toml"):
        parse_policy(text, source="p.toml")


def test_load_policy_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot read policy"), message
    assert "No such file" in message


def test_load_policy_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path)


def test_load_policy_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[daemon]\nmode = "monitor"  # \xe9t\xe9\n\xff\xfe')
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    # the first bad byte: line 2, after the 20 characters of 'mode = "monitor"  # '
    assert message.startswith(f"{path}:2:21: not UTF-8 text: byte 0xe9"), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("raw", "line", "column", "byte"),
    [
        (b"\xff\xfe[\x00d\x00", 1, 1, "0xff"),  # UTF-16 with its byte order mark
        (b"rules = []\n# \xc3\xa9t\xc3\xa9 ok\n[daemon]\nmode = 'caf\xe9'\n", 4, 12, "0xe9"),
        (b"rules = []\n# \xe2\x9c\x93 \xe2\x9c\x93 \xe2\x9c\n", 2, 7, "0xe2"),  # cut short
    ],
)
def test_not_utf8_names_line_and_column_of_the_first_bad_byte(
    tmp_path: Path, raw: bytes, line: int, column: int, byte: str
) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(raw)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}:{line}:{column}: not UTF-8 text: byte {byte}")


def test_load_policy_utf8_comments_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "utf8.toml"
    path.write_text('rules = []\n[daemon]\nmode = "monitor"  # été ✓\n', encoding="utf-8")
    assert load_policy(path).daemon.mode == "monitor"


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


# -- every error at once -------------------------------------------------------------------


def test_every_schema_error_is_reported_each_on_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [daemon]
        mode = "sometimes"
        scan_intervall = 1
        reserved_cpus = "0-"

        [defaults]
        cpus = 0

        [[rules]]
        name = "a"
        match = {}

        [[rules]]
        name = "a"
        match.exe = 5
        cpus = "2"

        [users.alice]
        max_cpus = 0
        """,
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert [line.removeprefix(f"{path}: ").split(": ")[0] for line in caught.value.errors] == [
        "daemon.mode",
        "daemon.reserved_cpus",
        "daemon.scan_intervall",
        "defaults.cpus",
        "rules[0].match",
        "rules[1].name",
        "rules[1].match.exe",
        "rules[1].cpus",
        "users.alice.max_cpus",
    ]
    assert str(caught.value) == "\n".join(caught.value.errors)
    assert caught.value.counted().splitlines()[-1] == "9 errors in this policy"
    assert "duplicate rule name 'a'" in caught.value.errors[5]


def test_every_unknown_key_is_reported() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(NO_RULES + "[defaults]\ngraze = 1\ncpu = 2\n[bogus]\n", source="p.toml")
    assert [line.split(": ")[1] for line in caught.value.errors] == [
        "defaults.cpu",
        "defaults.graze",
        "bogus",
    ]


def test_a_single_error_is_a_single_line_with_a_count_of_one() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(NO_RULES + "[defaults]\ncpus = 0\n", source="p.toml")
    assert caught.value.errors == (
        "p.toml: defaults.cpus: expected an integer from 1 to 8192, found 0",
    )
    assert caught.value.counted().splitlines()[-1] == "1 error in this policy"


def test_a_rule_with_an_error_is_not_judged_by_its_empty_match_too() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy('[[rules]]\nname = "x"\nmatch.exe = 5\n', source="p.toml")
    assert len(caught.value.errors) == 1 and "rules[0].match.exe" in str(caught.value)


# -- a policy without rules must say so ----------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "  \n# x\n"])
def test_an_empty_policy_is_refused(text: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="p.toml")
    (message,) = caught.value.errors
    assert message.startswith("p.toml: empty policy: a policy without [[rules]]"), message
    assert "`rules = []`" in message


@pytest.mark.parametrize(
    "text",
    [
        '[daemon]\nmode = "monitor"\n',  # cut after the first table
        '[daemon]\nmode = "monitor"\n[defaults]\ncpus = 2\n[users.alice]\nmax_cpus = 2\n',
    ],
)
def test_a_policy_without_rules_is_refused(text: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="p.toml")
    (message,) = caught.value.errors
    assert message.startswith("p.toml: rules: missing: "), message
    assert "would let go of every job" in message and "`rules = []` at the top" in message


def test_rules_written_inside_a_table_is_an_unknown_key_and_no_rules() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy('[daemon]\nmode = "monitor"\nrules = []\n', source="p.toml")
    assert [line.split(": ")[1] for line in caught.value.errors] == ["daemon.rules", "rules"]


def test_explicitly_no_rules_is_accepted(tmp_path: Path) -> None:
    assert parse_policy("rules = []\n").rules == ()
    assert load_policy(write(tmp_path, "rules = []\n[daemon]\nmode = 'monitor'\n")).rules == ()


def test_an_empty_policy_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "corecap.toml"
    path.write_bytes(b"")
    with pytest.raises(PolicyError, match=rf"^{re.escape(str(path))}: empty policy: "):
        load_policy(path)


# -- huge numbers, long values -------------------------------------------------------------

DIGITS = "1" * 5000


@pytest.mark.parametrize(
    ("text", "line", "column", "digits"),
    [
        (f"{NO_RULES}[defaults]\ncpus = {DIGITS}\n", 3, 8, 5000),
        (f"{NO_RULES}[defaults]\ncpus = -{DIGITS}\n", 3, 8, 5000),
        (f"{NO_RULES}[defaults]\ncpus = 1_{DIGITS}\n", 3, 8, 5001),
        (f'{NO_RULES}[daemon]\nmode = "monitor"\n[defaults]\ncpus = [1, {DIGITS}]\n', 5, 12, 5000),
        # long runs of digits in a comment, a string and a bare key are no integers
        (f'# {DIGITS}\nrules = []\nx = "{DIGITS}"\ny = {{ {DIGITS} = {DIGITS} }}\n', 4, 5010, 5000),
        (f"{NO_RULES}[users.alice]\nmax_cpus = {'9' * 4301}\n", 3, 12, 4301),
        # 4,301 characters but 2,201 digits: readable; the one after it is not
        (f"{NO_RULES}x = {'1_' * 2200}1\n[defaults]\ncpus = {'9' * 4400}\n", 4, 8, 4400),
    ],
)
def test_an_integer_too_long_to_read_is_located(
    text: str, line: int, column: int, digits: int
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="p.toml")
    (message,) = caught.value.errors
    assert message == (
        f"p.toml:{line}:{column}: integer of {digits} digits: too large"
        " (no setting takes more than 7 digits)"
    )


@pytest.mark.parametrize(
    ("text", "key_path", "found"),
    [
        # hexadecimal has no digit limit in Python: read, then refused by its size
        (
            f"[defaults]\ncpus = 0x{'f' * 5000}\n",
            "defaults.cpus",
            "an integer of about 6021 digits",
        ),
        (f"[defaults]\ngrace = 0x{'f' * 5000}\n", "defaults.grace", "an integer of about"),
        (f"[daemon]\nmode = 0x{'f' * 5000}\n", "daemon.mode", "an integer of about"),
        (f"[daemon]\nmode = [0x{'f' * 5000}]\n", "daemon.mode", "found array"),
        (f"[defaults]\nviolation_after = {'9' * 300}\n", "defaults.violation_after", "about 300"),
        # floats: too large is infinity, however it is written
        ("[daemon]\nscan_interval = 1e99999\n", "daemon.scan_interval", "found inf"),
        (f"[defaults]\ngrace = {DIGITS}.5\n", "defaults.grace", "found inf"),
        (f"[defaults]\ngrace = -{DIGITS}e-4999\n", "defaults.grace", "found -1.1111"),
        (f'[daemon]\nreserved_cpus = "0-{DIGITS}"\n', "daemon.reserved_cpus", "go up to 8191"),
        (f'[daemon]\nreserved_cpus = "{DIGITS}"\n', "daemon.reserved_cpus", "go up to 8191"),
        (f'[daemon]\nreserved_cpus = "0,{"0" * 5000}9999"\n', "daemon.reserved_cpus", "8191"),
        (f'[daemon]\nmode = "{"x" * 5000}"\n', "daemon.mode", "(5000 characters)"),
        (f'[daemon]\nsocket = "{"x" * 5000}"\n', "daemon.socket", "(5000 characters)"),
        (f"[daemon]\n{'k' * 5000} = 1\n", "daemon." + "k" * 32 + "...", "unknown key"),
    ],
)
def test_huge_values_are_located_and_not_quoted_in_full(
    text: str, key_path: str, found: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(NO_RULES + text, source="p.toml")
    (message,) = caught.value.errors
    assert message.startswith(f"p.toml: {key_path}: "), message
    assert found in message and len(message) < 400, message


def test_grace_may_have_many_digits_when_it_is_in_range() -> None:
    policy = parse_policy(f"{NO_RULES}[defaults]\ngrace = 1.{DIGITS}\n")
    assert policy.defaults.grace == pytest.approx(1.1111111)


def test_a_socket_path_longer_than_the_kernel_takes_is_refused() -> None:
    longest = "/run/" + "s" * 102
    assert parse_policy(f'{NO_RULES}[daemon]\nsocket = "{longest}"\n').daemon.socket == longest
    with pytest.raises(PolicyError, match=r"daemon\.socket: expected a path of at most 107 bytes"):
        parse_policy(f'{NO_RULES}[daemon]\nsocket = "{longest}s"\n')


# -- files that are not policies -----------------------------------------------------------


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "corecap.toml"
    os.mkfifo(path)
    with pytest.raises(PolicyError, match=r": cannot read policy: not a regular file$"):
        load_policy(path)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    expected = rf"^{re.escape(str(tmp_path))}: cannot read policy: a directory$"
    with pytest.raises(PolicyError, match=expected):
        load_policy(tmp_path)


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "corecap.toml"
    path.write_text(NO_RULES + "#" * (1 << 20))
    with pytest.raises(PolicyError, match=r": cannot read policy: larger than 1024 KiB$"):
        load_policy(path)


def test_a_symlink_to_a_policy_is_read(tmp_path: Path) -> None:
    target = write(tmp_path, NO_RULES)
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    assert load_policy(link).source == str(link)


# -- random documents ------------------------------------------------------------------
# Random TOML built from the real key names with random values of random types, written
# by a tiny TOML writer, so that most documents parse and reach the schema checks.

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_string(key)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_document(data: Mapping[str, object]) -> str:
    """Top-level keys one per line, everything below as inline tables and arrays."""
    return "".join(f"{toml_key(key)} = {toml_value(value)}\n" for key, value in data.items())


def same_data(a: object, b: object) -> bool:
    """Equality, with NaN equal to itself."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_data(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_data(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


_PLAUSIBLE = st.sampled_from(
    [
        "enforce",
        "monitor",
        "auto",
        "affinity",
        "",
        "0",
        "0-3",
        "1,3",
        "3-1",
        "/run/corecap.sock",
        "relative.sock",
        "python*",
        "train",
        "(",
        "@ml",
        "@",
        "root",
        "alice",
        "a b",
        "tensorflow",
    ]
)
_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-3, max_value=20),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=100),
    _PLAUSIBLE,
    st.text(max_size=10),
    st.dates(),
    st.datetimes(),
    st.times(),
)
_ANY = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=6), inner, max_size=3),
    ),
    max_leaves=6,
)


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually `good` (4 in 5), so that most documents get past the first check."""
    return st.sampled_from(range(5)).flatmap(lambda n: good if n else bad)


def _table(keys: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """A table of known keys (each optional, sometimes with a wrong key), or any value."""
    known = st.fixed_dictionaries({}, optional=keys)
    with_typo = st.fixed_dictionaries({}, optional={**keys, "bogus": _ANY})
    return _mostly(known, st.one_of(with_typo, _ANY))


def _either(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return _mostly(good, _ANY)


def _field(good: st.SearchStrategy[Any], *bad: Any) -> st.SearchStrategy[Any]:
    """A key's value: usually valid, else one of the given wrong values or anything at all."""
    return _mostly(good, st.one_of(st.sampled_from(bad), _ANY) if bad else _ANY)


_NAMES = st.lists(st.sampled_from(["python*", "pypy3", "@ml", "root", "alice", "tensorflow"]))
_STRINGS = st.one_of(_NAMES.filter(bool), st.lists(_PLAUSIBLE, max_size=3))
_DAEMON = _table(
    {
        "mode": _field(st.sampled_from(["enforce", "monitor"]), "enforcing", "MONITOR"),
        "backend": _field(st.sampled_from(["auto", "affinity", "cgroup1"]), "cgroup3"),
        "scan_interval": _field(st.floats(min_value=0.05, max_value=3600), 0.0, 3601, -1),
        "reserved_cpus": _field(st.sampled_from(["", "0", "0,2-3"]), "0-", "x", "9999"),
        "socket": _field(st.just("/run/c.sock"), "c.sock", "", " "),
    }
)
_DEFAULTS = _table(
    {
        "cpus": _field(st.integers(min_value=1, max_value=8192), 0, 8193),
        "thread_slack": _field(st.integers(min_value=0, max_value=10), -1),
        "grace": _field(st.floats(min_value=0, max_value=100), -0.5, 86401),
        "violation_after": _field(st.integers(min_value=1, max_value=1000), 0, 1001),
    }
)
_MATCH_KEYS = {
    "exe": _field(_STRINGS, [1], [""]),
    "cmdline": _field(st.sampled_from(["train", "x+", "^python"]), "(", "", "[a-"),
    "users": _field(_STRINGS, ["@"], ["a b"], [""]),
    "loads": _field(_STRINGS, [""], {"a": 1}),
}
_MATCH = _mostly(st.fixed_dictionaries({}, optional=_MATCH_KEYS).filter(bool), _table(_MATCH_KEYS))
_RULE_NAME = _field(st.sampled_from(["a", "b", "tf", "python"]), "", " ", 1)
_RULE_OPTIONAL = {
    "cpus": _field(st.integers(min_value=1, max_value=10), 0),
    "max_threads": _field(st.integers(min_value=1, max_value=100), 0, True),
}
_RULE = _mostly(
    st.fixed_dictionaries({"name": _RULE_NAME, "match": _MATCH}, optional=_RULE_OPTIONAL),
    _table({"name": _RULE_NAME, "match": _MATCH, **_RULE_OPTIONAL}),
)
_USERS = _either(
    st.dictionaries(
        st.one_of(st.sampled_from(["alice", "root", "bob.smith"]), st.text(max_size=6)),
        _table({"max_cpus": _field(st.integers(min_value=1, max_value=8192), 0, "8")}),
        max_size=3,
    )
)
_POLICY_DATA = st.fixed_dictionaries(
    {},
    optional={
        "daemon": _DAEMON,
        "defaults": _DEFAULTS,
        "rules": _either(st.lists(_RULE, max_size=3)),
        "users": _USERS,
    },
)
POLICY_DATA = _mostly(_POLICY_DATA, st.builds(lambda d, v: {**d, "bogus": v}, _POLICY_DATA, _ANY))


def check_outcome(text: str, source: str) -> Policy | PolicyError:
    """Either a Policy or a PolicyError located in `source`; nothing else may escape."""
    try:
        policy = parse_policy(text, source=source)
    except PolicyError as err:
        message = str(err)
        assert err.errors and message == "\n".join(err.errors)
        for line in err.errors:  # every error on its own line, each located in `source`
            assert line.startswith(f"{source}:"), line
            assert len(source) + 2 < len(line) < 1000, line
        return err
    assert policy.source == source
    names = [rule.name for rule in policy.rules]
    assert len(names) == len(set(names))
    assert all(rule.match != Match() for rule in policy.rules)
    assert all(1 <= rule.cpus <= 8192 for rule in policy.rules)
    assert policy.daemon.mode in ("enforce", "monitor")
    assert policy.daemon.socket.startswith("/")
    assert 0.05 <= policy.daemon.scan_interval <= 3600
    return policy


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(POLICY_DATA)
def test_random_policy_documents_give_a_policy_or_a_located_error(
    data: dict[str, Any],
) -> None:
    text = toml_document(data)
    assert same_data(tomllib.loads(text), data), text  # the writer itself is right
    check_outcome(text, "random.toml")


@settings(max_examples=200)
@given(POLICY_DATA, st.text(max_size=40), st.integers(min_value=0, max_value=10_000))
def test_garbled_policy_documents_give_a_policy_or_a_located_error(
    data: dict[str, Any], noise: str, where: int
) -> None:
    text = toml_document(data)
    cut = where % (len(text) + 1)
    check_outcome(text[:cut] + noise + text[cut:], "garbled.toml")


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_arbitrary_text_gives_a_policy_or_a_located_error(text: str) -> None:
    check_outcome(text, "/etc/corecap.toml")


@settings(max_examples=100)
@given(st.text(alphabet="[]{}=\"',.#\n abc01", max_size=80))
def test_toml_like_text_gives_a_policy_or_a_located_error(text: str) -> None:
    check_outcome(text, "s.toml")


# Pieces of policies, numbers of every size and every way TOML writes them among them.
_PIECES = st.sampled_from(
    [
        "rules = []\n",
        "[daemon]\n",
        "[defaults]\n",
        "[[rules]]\n",
        "[users.a]\n",
        'name = "r"\n',
        'match.exe = "p*"\n',
        "cpus = ",
        "max_threads = ",
        "grace = ",
        "scan_interval = ",
        "max_cpus = ",
        "reserved_cpus = ",
        "mode = ",
        "x = ",
        "1" * 4301,
        "9" * 5000,
        "0x" + "f" * 3000,
        "0o7",
        "0b1",
        "1_000",
        "-",
        "+",
        ".",
        "5",
        "e",
        "e-",
        "1e999",
        "inf",
        "nan",
        '"',
        "'",
        '"0-',
        '"0,',
        "#",
        "\n",
        " = ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "\xe9",
        "\x00",
    ]
)


_NUMBERS = st.sampled_from(
    [
        *("0", "5", "-1", "1e99999", "1" * 4301, "-" + "9" * 5000, "+" + "2" * 4400),
        *("1_" + "1" * 4400, "0x" + "f" * 3000, "0" * 5000 + "7"),
        *("1" * 5000 + ".5", "0." + "1" * 5000),
    ]
)
# (table, line): where a number can stand; "" is the top level, before every table
_NUMBER_PLACES = st.sampled_from(
    [
        ("defaults", "cpus = {}"),
        ("defaults", "grace = {}"),
        ("daemon", 'reserved_cpus = "0-{}"'),
        ("daemon", 'reserved_cpus = "{},1"'),
        ("daemon", "scan_interval = {}"),
        ("users.a", "max_cpus = [{}]"),
        ("[rules]", 'name = "r"\nmatch.exe = "p"\ncpus = {}'),
        ("", "x = {{ a = {} }}"),
        ("", "# {}"),
        ("", 'y = "{}"'),
        ("", "{} = 1"),
    ]
)


def _numbers_document(prefix: str, placed: list[tuple[tuple[str, str], str]], noise: str) -> str:
    """A policy with numbers in their places, each table once, then some noise."""
    tables: dict[str, list[str]] = {}
    for (table, line), number in placed:
        tables.setdefault(table, []).append(line.format(number))
    lines = [prefix, *tables.pop("", [])]
    for table, body in tables.items():
        lines += [f"[{table}]", *body]
    return "\n".join(lines) + "\n" + noise


_POLICY_PIECES = st.builds(
    _numbers_document,
    st.sampled_from(["", "rules = []"]),
    st.lists(st.tuples(_NUMBER_PLACES, _NUMBERS), max_size=4, unique_by=lambda pair: pair[0]),
    st.one_of(st.just(""), st.lists(_PIECES, max_size=3).map("".join)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_POLICY_PIECES)
def test_policy_pieces_with_numbers_of_any_size_give_a_policy_or_a_located_error(
    text: str,
) -> None:
    check_outcome(text, "n.toml")


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=200),
        # latin-1: "\xe9" is then a lone byte, not UTF-8
        _POLICY_PIECES.map(lambda text: text.encode("latin-1")),
    )
)
def test_arbitrary_bytes_give_a_policy_or_a_located_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "corecap.toml"
    path.write_bytes(raw)
    try:
        policy = load_policy(path)
    except PolicyError as err:
        assert err.errors and str(err) == "\n".join(err.errors)
        for line in err.errors:
            assert line.startswith(f"{path}:"), line
            assert len(line) < 1000, line
        return
    assert policy.source == str(path)


_GOOD_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_.0123456789@", min_size=1, max_size=8)
_GOOD_USERS = _GOOD_NAMES.filter(lambda name: name != "@")
GOOD_POLICY_DATA = st.fixed_dictionaries(
    {  # rules always, [] when there are none: a policy without the key is refused
        "rules": st.lists(
            st.fixed_dictionaries(
                {
                    "name": _GOOD_NAMES,
                    "match": st.fixed_dictionaries(
                        {},
                        optional={
                            "exe": st.lists(_GOOD_NAMES, min_size=1, max_size=3),
                            "cmdline": st.sampled_from(["train", r"\bjob-[0-9]+", "^python"]),
                            "users": st.lists(_GOOD_USERS, min_size=1, max_size=3),
                            "loads": st.lists(_GOOD_NAMES, max_size=2),
                        },
                    ).filter(lambda match: any(match.values())),
                },
                optional={
                    "cpus": st.integers(min_value=1, max_value=8192),
                    "max_threads": st.integers(min_value=1, max_value=1_000_000),
                },
            ),
            max_size=4,
            unique_by=lambda rule: str(rule["name"]),
        ),
    },
    optional={
        "daemon": st.fixed_dictionaries(
            {},
            optional={
                "mode": st.sampled_from(["enforce", "monitor"]),
                "backend": st.sampled_from(["auto", "affinity"]),
                "scan_interval": st.floats(min_value=0.05, max_value=3600),
                "reserved_cpus": st.frozensets(st.integers(0, 300)).map(format_cpulist),
                "socket": _GOOD_NAMES.map(lambda name: f"/run/{name}"),
            },
        ),
        "defaults": st.fixed_dictionaries(
            {},
            optional={
                "cpus": st.integers(min_value=1, max_value=8192),
                "thread_slack": st.integers(min_value=0, max_value=1_000_000),
                "grace": st.integers(min_value=0, max_value=86400),
                "violation_after": st.integers(min_value=1, max_value=1000),
            },
        ),
        "users": st.dictionaries(
            _GOOD_USERS.filter(lambda name: not name.startswith("@")),  # limits are per user
            st.fixed_dictionaries({}, optional={"max_cpus": st.integers(1, 8192)}),
            max_size=3,
        ),
    },
)


@settings(max_examples=150)
@given(GOOD_POLICY_DATA)
def test_valid_random_policies_load_with_their_values(data: dict[str, Any]) -> None:
    policy = parse_policy(toml_document(data), source="good.toml")
    daemon, defaults = data.get("daemon", {}), data.get("defaults", {})
    assert policy.daemon.mode == daemon.get("mode", "enforce")
    assert policy.daemon.backend == daemon.get("backend", "auto")
    assert policy.daemon.scan_interval == daemon.get("scan_interval", 1.0)
    assert format_cpulist(policy.daemon.reserved_cpus) == daemon.get("reserved_cpus", "")
    assert policy.daemon.socket == daemon.get("socket", DEFAULT_SOCKET)
    assert policy.defaults.cpus == defaults.get("cpus", 4)
    assert policy.defaults.thread_slack == defaults.get("thread_slack", 8)
    assert policy.defaults.grace == defaults.get("grace", 10.0)
    assert policy.defaults.violation_after == defaults.get("violation_after", 3)
    rules = data.get("rules", [])
    assert [rule.name for rule in policy.rules] == [rule["name"] for rule in rules]
    for rule, written in zip(policy.rules, rules, strict=True):
        match = written["match"]
        assert rule.match.exe == tuple(match.get("exe", ()))
        assert rule.match.users == tuple(match.get("users", ()))
        assert rule.match.loads == tuple(match.get("loads", ()))
        pattern = rule.match.cmdline.pattern if rule.match.cmdline else None
        assert pattern == match.get("cmdline")
        assert rule.cpus == written.get("cpus", policy.defaults.cpus)
        assert rule.max_threads == written.get("max_threads")
    users = data.get("users", {})
    assert set(policy.users) == set(users)
    for name, limits in users.items():
        assert policy.users[name].max_cpus == limits.get("max_cpus", 8192)


def test_clients_find_the_socket_given_then_the_environment_then_the_host_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = write(tmp_path, 'rules = []\n[daemon]\nsocket = "/run/elsewhere/corecap.sock"\n')
    monkeypatch.delenv("CORECAP_SOCKET", raising=False)
    assert daemon_socket(None, host) == Path("/run/elsewhere/corecap.sock")
    assert daemon_socket("/tmp/given.sock", host) == Path("/tmp/given.sock")
    monkeypatch.setenv("CORECAP_SOCKET", "/tmp/from-env.sock")
    assert daemon_socket(None, host) == Path("/tmp/from-env.sock")
    assert daemon_socket("/tmp/given.sock", host) == Path("/tmp/given.sock")
    monkeypatch.delenv("CORECAP_SOCKET")
    host.write_text("[daemon]\nsocket = 3\n")  # not valid: the built-in default, no error
    assert daemon_socket(None, host) == Path(DEFAULT_SOCKET)
    assert daemon_socket(None, tmp_path / "missing.toml") == Path(DEFAULT_SOCKET)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            '[[rules]]\nname = "x"\nmatch = { users = ["a\\u0000b"] }\ncpus = 1\n',
            "rules[0].match.users[0]: expected a user name or \"@group\", found 'a\\x00b'",
        ),
        (
            'rules = []\n[users."a\\u0000b"]\nmax_cpus = 2\n',
            "expected a user name, found 'a\\x00b'",
        ),
        (
            'rules = []\n[users."@staff"]\nmax_cpus = 2\n',
            "users.@staff: expected a user name, found '@staff'",
        ),
    ],
)
def test_an_account_name_no_host_can_have_is_refused(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy(write(tmp_path, text))
    assert error in str(raised.value)
