"""classify(): which rule, if any, a process falls under."""

from __future__ import annotations

import time

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from corecapd.matching import FIRST_REGULAR_UID, classify, is_python, loads_library
from corecapd.model import Identity, Observed, ProcKey, Sample
from corecapd.policy import Match, Rule

DAEMON_PID = 4242


def proc(
    exe: str = "/usr/bin/python3.11",
    cmdline: tuple[str, ...] = ("python3", "train.py"),
    *,
    pid: int = 1234,
    uid: int = 1000,
    user: str = "alice",
    groups: frozenset[str] = frozenset({"alice"}),
    libraries: frozenset[str] | None = None,
    kernel_thread: bool = False,
) -> Observed:
    sample = Sample(ProcKey(pid, 555), 1, 1, 0.0, 0.0, kernel_thread)
    return Observed(sample, Identity(uid, user, groups, exe, cmdline), libraries)


def rule(
    name: str = "r",
    exe: tuple[str, ...] = (),
    cmdline: str | None = None,
    users: tuple[str, ...] = (),
    loads: tuple[str, ...] = (),
) -> Rule:
    pattern = regex.compile(cmdline) if cmdline is not None else None
    return Rule(name, Match(exe=exe, cmdline=pattern, users=users, loads=loads), cpus=2)


def winner(process: Observed, *rules: Rule) -> str | None:
    found = classify(process, rules, DAEMON_PID).rule
    return found.name if found else None


# -- exe --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exe", "patterns", "matches"),
    [
        ("/usr/bin/python3.11", ("python*",), True),
        ("/usr/bin/python3.11", ("python3.1?",), True),
        ("/usr/bin/python3.11", ("python2*",), False),
        ("/opt/conda/bin/python", ("python",), True),
        ("/usr/bin/pypy3", ("python*", "pypy*"), True),
        ("/usr/bin/pypy3", ("python*",), False),
        ("/usr/bin/python3", ("Python*",), False),  # case-sensitive
        ("/usr/bin/python3", ("/usr/bin/*",), False),  # the basename, not the path
        ("/usr/local/bin/myjob", ("myjob",), True),  # any executable, not only Python
        ("/usr/bin/bash", ("*",), True),
        ("", ("python*",), False),  # exe unreadable
    ],
)
def test_exe_globs_on_basename(exe: str, patterns: tuple[str, ...], matches: bool) -> None:
    assert (winner(proc(exe), rule(exe=patterns)) == "r") is matches


@pytest.mark.parametrize(
    "exe",
    [
        "/usr/bin/python",
        "/usr/bin/python3",
        "/usr/bin/python3.11",
        "/home/u/.pyenv/versions/3.13.0t/bin/python3.13t",
        "/usr/bin/pypy3",
        "/usr/bin/pypy",
        "/srv/venv/bin/python3.12",
    ],
)
def test_python_interpreters_are_the_default(exe: str) -> None:
    assert is_python(Identity(1000, "alice", frozenset(), exe, ()))
    assert winner(proc(exe), rule(cmdline="train")) == "r"


@pytest.mark.parametrize(
    "exe",
    [
        "/usr/bin/bash",
        "/usr/bin/perl",
        "/usr/bin/python3-config",
        "/usr/bin/ipython3",
        "/usr/bin/cython",
        "/usr/bin/node",
        "",
    ],
)
def test_other_executables_are_not_python(exe: str) -> None:
    assert not is_python(Identity(1000, "alice", frozenset(), exe, ()))
    # A rule that does not name exe matches Python interpreters only.
    assert winner(proc(exe), rule(cmdline="train")) is None
    assert winner(proc(exe), rule(users=("alice",))) is None


def test_script_name_in_cmdline_does_not_make_bash_python() -> None:
    assert winner(proc("/usr/bin/bash", ("bash", "python3", "x.py")), rule(cmdline="")) is None


# -- cmdline ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "cmdline", "matches"),
    [
        ("train", ("python3", "/home/a/train.py"), True),
        ("train", ("python3", "/home/a/eval.py"), False),
        (r"train\.py --epochs 3", ("python3", "train.py", "--epochs", "3"), True),  # joined
        (r"^python3 -m mypkg\b", ("python3", "-m", "mypkg"), True),
        (r"^python3 -m mypkg\b", ("python3", "-m", "mypkg2"), False),
        ("TRAIN", ("python3", "train.py"), False),  # case-sensitive
        ("(?i)TRAIN", ("python3", "train.py"), True),
        ("x", (), False),
    ],
)
def test_cmdline_regex_searches_the_joined_arguments(
    pattern: str, cmdline: tuple[str, ...], matches: bool
) -> None:
    assert (winner(proc(cmdline=cmdline), rule(cmdline=pattern)) == "r") is matches


# -- users ------------------------------------------------------------------------------


def test_users_by_name() -> None:
    assert winner(proc(user="alice"), rule(users=("bob", "alice"))) == "r"
    assert winner(proc(user="carol"), rule(users=("bob", "alice"))) is None


def test_users_by_group() -> None:
    member = proc(user="alice", groups=frozenset({"alice", "ml"}))
    outsider = proc(user="bob", groups=frozenset({"bob"}))
    assert winner(member, rule(users=("@ml",))) == "r"
    assert winner(outsider, rule(users=("@ml",))) is None
    # A group is not a user name, and a user name is not a group.
    assert winner(proc(user="ml", groups=frozenset({"x"})), rule(users=("@ml",))) is None
    assert winner(member, rule(users=("ml",))) is None


def test_no_users_criterion_matches_any_regular_user() -> None:
    assert winner(proc(uid=FIRST_REGULAR_UID, user="u"), rule(exe=("python*",))) == "r"
    assert winner(proc(uid=60000, user="v"), rule(exe=("python*",))) == "r"


@pytest.mark.parametrize("uid", [0, 1, 100, FIRST_REGULAR_UID - 1])
def test_system_users_only_when_named(uid: int) -> None:
    system = proc(uid=uid, user="svc", groups=frozenset({"svc", "ml"}))
    assert winner(system, rule(exe=("python*",))) is None
    assert winner(system, rule(cmdline="train")) is None
    assert winner(system, rule(users=("@ml",))) is None  # a group is not naming the user
    assert winner(system, rule(users=("@svc",))) is None
    assert winner(system, rule(users=("bob",))) is None
    assert winner(system, rule(users=("svc",))) == "r"
    assert winner(system, rule(users=("bob", "svc"), exe=("python*",))) == "r"


def test_root_when_named() -> None:
    root = proc(uid=0, user="root", groups=frozenset({"root"}))
    assert winner(root, rule(users=("root",), cmdline="train")) == "r"
    assert winner(root, rule(users=("root",), cmdline="nothing")) is None


# -- never ------------------------------------------------------------------------------


def test_kernel_threads_never() -> None:
    kthread = proc(exe="", cmdline=(), uid=0, user="root", kernel_thread=True)
    found = classify(kthread, [rule(users=("root",), exe=("*",))], DAEMON_PID)
    assert found.rule is None
    assert not found.waiting_on_libraries
    # even with an exe that looks like Python
    python_kthread = proc(kernel_thread=True)
    assert winner(python_kthread, rule(exe=("python*",))) is None


def test_the_daemon_itself_never() -> None:
    me = proc(pid=DAEMON_PID, uid=0, user="root", cmdline=("python3", "-m", "corecapd"))
    rules = [rule(users=("root",)), rule("loads", loads=("tensorflow",), users=("root",))]
    found = classify(me, rules, DAEMON_PID)
    assert found.rule is None
    assert not found.waiting_on_libraries
    # ...but another process with the same identity is matched
    assert winner(proc(pid=DAEMON_PID + 1, uid=0, user="root"), *rules) == "r"


# -- loads ------------------------------------------------------------------------------

TF_LIBRARIES = frozenset(
    {"libc.so.6", "libtensorflow_framework.so.2", "_pywrap_tensorflow_internal.so"}
)


def test_loads_never_matches_unread_libraries() -> None:
    found = classify(proc(libraries=None), [rule(loads=("tensorflow",))], DAEMON_PID)
    assert found.rule is None
    assert found.waiting_on_libraries


def test_loads_matches_once_libraries_are_loaded() -> None:
    found = classify(proc(libraries=TF_LIBRARIES), [rule(loads=("tensorflow",))], DAEMON_PID)
    assert found.rule is not None and found.rule.name == "r"
    assert not found.waiting_on_libraries


def test_loads_without_the_library_keeps_waiting() -> None:
    # Read, but TensorFlow may not be imported yet: the answer may still change.
    plain = proc(libraries=frozenset({"libc.so.6", "libm.so.6"}))
    found = classify(plain, [rule(loads=("tensorflow",))], DAEMON_PID)
    assert found.rule is None
    assert found.waiting_on_libraries


def test_loads_needs_every_named_library() -> None:
    both = rule(loads=("tensorflow", "openblas"))
    assert winner(proc(libraries=TF_LIBRARIES), both) is None
    libs = TF_LIBRARIES | {"libopenblas64_p-r0-0cf96a72.3.23.dev.so"}
    assert winner(proc(libraries=libs), both) == "r"


def test_loads_is_a_part_of_the_file_name() -> None:
    assert loads_library(["libtensorflow_framework.so.2"], "tensorflow")
    assert loads_library(["_pywrap_tensorflow_internal.so"], "tensorflow")
    assert not loads_library(["libtensor.so"], "tensorflow")
    assert not loads_library([], "tensorflow")


def test_loads_falls_through_to_a_later_rule_while_waiting() -> None:
    rules = [rule("tf", loads=("tensorflow",)), rule("python", exe=("python*",))]
    found = classify(proc(libraries=None), rules, DAEMON_PID)
    assert found.rule is not None and found.rule.name == "python"
    assert found.waiting_on_libraries  # the tf rule may still win later
    found = classify(proc(libraries=TF_LIBRARIES), rules, DAEMON_PID)
    assert found.rule is not None and found.rule.name == "tf"
    assert not found.waiting_on_libraries


def test_loads_rule_after_the_winner_does_not_wait() -> None:
    rules = [rule("python", exe=("python*",)), rule("tf", loads=("tensorflow",))]
    found = classify(proc(libraries=None), rules, DAEMON_PID)
    assert found.rule is not None and found.rule.name == "python"
    assert not found.waiting_on_libraries


def test_loads_rule_that_fails_on_other_criteria_does_not_wait() -> None:
    rules = [rule("tf", loads=("tensorflow",), users=("bob",))]
    found = classify(proc(user="alice", libraries=None), rules, DAEMON_PID)
    assert found.rule is None
    assert not found.waiting_on_libraries


def test_no_rules_no_match() -> None:
    found = classify(proc(), [], DAEMON_PID)
    assert found.rule is None
    assert not found.waiting_on_libraries


# -- first match wins -------------------------------------------------------------------


def test_first_match_wins() -> None:
    rules = [
        rule("first", cmdline="train"),
        rule("second", exe=("python*",)),
        rule("third", users=("alice",)),
    ]
    assert winner(proc(), *rules) == "first"
    assert winner(proc(cmdline=("python3", "serve.py")), *rules) == "second"
    assert winner(proc(cmdline=("python3", "serve.py")), *reversed(rules)) == "third"


def test_all_criteria_must_hold() -> None:
    strict = rule(exe=("python3*",), cmdline="train", users=("@ml",), loads=("tensorflow",))
    good = proc(groups=frozenset({"ml"}), libraries=TF_LIBRARIES)
    assert winner(good, strict) == "r"
    assert (
        winner(proc("/usr/bin/pypy3", groups=frozenset({"ml"}), libraries=TF_LIBRARIES), strict)
        is None
    )
    assert (
        winner(
            proc(cmdline=("python3", "x"), groups=frozenset({"ml"}), libraries=TF_LIBRARIES), strict
        )
        is None
    )
    assert winner(proc(groups=frozenset(), libraries=TF_LIBRARIES), strict) is None
    assert winner(proc(groups=frozenset({"ml"}), libraries=frozenset()), strict) is None


@settings(max_examples=100)
@given(
    st.lists(
        st.builds(
            rule,
            name=st.sampled_from("abcdef"),
            exe=st.sampled_from([(), ("python*",), ("bash",)]),
            cmdline=st.sampled_from([None, "train", "serve"]),
            users=st.sampled_from([(), ("alice",), ("@ml",), ("root",)]),
            loads=st.sampled_from([(), ("tensorflow",)]),
        ),
        max_size=5,
    ),
    st.sampled_from(["/usr/bin/python3", "/usr/bin/bash"]),
    st.sampled_from([("python3", "train.py"), ("python3", "serve.py")]),
    st.sampled_from([(1000, "alice"), (0, "root"), (1001, "bob")]),
    st.sampled_from([None, frozenset(), TF_LIBRARIES]),
)
def test_winner_is_the_first_rule_that_matches_alone(
    rules: list[Rule],
    exe: str,
    cmdline: tuple[str, ...],
    who: tuple[int, str],
    libraries: frozenset[str] | None,
) -> None:
    process = proc(exe, cmdline, uid=who[0], user=who[1], libraries=libraries)
    alone = [classify(process, [r], DAEMON_PID).rule is not None for r in rules]
    found = classify(process, rules, DAEMON_PID).rule
    expected = next((r for r, ok in zip(rules, alone, strict=True) if ok), None)
    assert found is expected


def test_a_pattern_that_backtracks_badly_cannot_hold_the_exec_path() -> None:
    """With Python's `re`, 27 characters of arguments held this search for 20 s and each more
    one doubles it; the daemon matches on its only loop. Past the timeout: no match."""
    backtracking = rule("bt", cmdline=r"JOB (\w+\s?)+$")
    hostile = proc(cmdline=("python3", "-c", "pass", "JOB " + "a" * 5000 + "!"))
    started = time.monotonic()
    assert winner(hostile, backtracking) is None
    assert time.monotonic() - started < 0.5
    assert winner(proc(cmdline=("python3", "JOB", "ok")), backtracking) == "bt"
