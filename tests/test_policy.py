"""parse_policy / load_policy: the schema, its defaults, and errors that say where and what."""

from __future__ import annotations

import datetime
import math
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


def test_empty_policy_is_all_defaults() -> None:
    policy = parse_policy("", source="empty.toml")
    assert policy.daemon == DaemonSettings()
    assert policy.defaults == Defaults()
    assert policy.rules == ()
    assert dict(policy.users) == {}
    assert policy.source == "empty.toml"


def test_documented_default_values() -> None:
    policy = parse_policy("")
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
    policy = parse_policy("[defaults]\ncpus = 2\n")
    assert policy.daemon == DaemonSettings()
    assert policy.defaults == Defaults(cpus=2)


def test_partial_sections_keep_the_other_defaults() -> None:
    policy = parse_policy('[daemon]\nmode = "monitor"\n[defaults]\ngrace = 0\n')
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
    assert parse_policy('[daemon]\nreserved_cpus = ""\n').daemon.reserved_cpus == frozenset()


@pytest.mark.parametrize("value", ["0.05", "3600", "1"])
def test_scan_interval_bounds_are_inclusive(value: str) -> None:
    policy = parse_policy(f"[daemon]\nscan_interval = {value}\n")
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
        ("invalid regular expression", "missing ), unterminated subpattern"),
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
    assert message.startswith(f"{path}: "), message
    assert "UTF-8" in message


def test_load_policy_utf8_comments_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "utf8.toml"
    path.write_text('[daemon]\nmode = "monitor"  # été ✓\n', encoding="utf-8")
    assert load_policy(path).daemon.mode == "monitor"


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


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
        assert message.startswith(f"{source}:"), message
        assert len(message) > len(source) + 2
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


_GOOD_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_.0123456789@", min_size=1, max_size=8)
_GOOD_USERS = _GOOD_NAMES.filter(lambda name: name != "@")
GOOD_POLICY_DATA = st.fixed_dictionaries(
    {},
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
        "users": st.dictionaries(
            _GOOD_USERS,
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
