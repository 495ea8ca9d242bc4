"""Which rule, if any, a process falls under. Pure: data in, decision out."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import regex

from corecapd.model import Identity, Observed
from corecapd.policy import Match, Rule

# Accounts below this uid are system services: never touched unless a rule names the user.
FIRST_REGULAR_UID = 1000

# Interpreter names as Debian, pyenv, conda and venvs install them (python, python3,
# python3.11, python3.13t, pypy3). exe, not comm: comm is the script name for shebang scripts.
# Seconds one `cmdline` search may take; a sound pattern takes microseconds over the 64 KiB
# of a command line that are read (procfs.MAX_CMDLINE).
CMDLINE_TIMEOUT = 0.005
# Tries of a search that CMDLINE_TIMEOUT cut off. `regex` times it by the process's CPU
# time, not wall time (measured: a SIGSTOP of 20 ms inside a 2 ms search does not cut it; a
# thread busy in the kernel beside 1 ms searches cut 18 of 40 at a 2 ms limit), and that
# clock can jump by milliseconds within a microsecond search: a VM's steal time, QEMU's TCG
# running one vCPU at a time, the fence thread's cgroup writes. Such a cut is chance, and
# the process it hit was left as matching no rule for its whole life (the VM tier's
# corecapd missed 2 short jobs in ~200 so); a pattern that backtracks badly is cut off
# every time.
CMDLINE_TRIES = 2
_PYTHON_EXE = re.compile(r"^(python|pypy)[0-9.]*[a-z]?$")


def is_python(identity: Identity) -> bool:
    return bool(_PYTHON_EXE.match(os.path.basename(identity.exe)))


def loads_library(libraries: Iterable[str], wanted: str) -> bool:
    """`wanted` names a library by a part of its file name: "tensorflow" finds
    libtensorflow_framework.so.2 and _pywrap_tensorflow_internal.so."""
    return any(wanted in library for library in libraries)


@dataclass(frozen=True)
class Classification:
    rule: Rule | None
    # A rule ahead of (or instead of) the winner failed only on `loads` with the process's
    # libraries not read yet or still loading: the answer may change on a later read.
    waiting_on_libraries: bool


def classify(process: Observed, rules: Iterable[Rule], daemon_pid: int) -> Classification:
    """First match wins, on what is known now; `loads` never matches unread libraries."""
    if process.sample.kernel_thread or process.key.pid == daemon_pid:
        return Classification(None, False)
    return classify_identity(process.identity, process.libraries, rules)


def classify_identity(
    identity: Identity, libraries: frozenset[str] | None, rules: Iterable[Rule]
) -> Classification:
    """`classify` for a user process known by who it is alone (the exec path, before it
    has read the stat file)."""
    waiting = False
    for rule in rules:
        if not _matches_cheaply(rule.match, identity):
            continue
        if all(loads_library(libraries or (), name) for name in rule.match.loads):
            return Classification(rule, waiting)
        waiting = True
    return Classification(None, waiting)


def exe_may_match(rules: Iterable[Rule], exe_name: str) -> bool:
    """Whether any rule could match a program of this file name: the exec path's first,
    cheapest test (one readlink), which lets unrelated execs cost almost nothing."""
    return any(_exe_matches(rule.match, exe_name) for rule in rules)


def _exe_matches(match: Match, exe_name: str) -> bool:
    if match.exe:
        return any(fnmatch.fnmatchcase(exe_name, pattern) for pattern in match.exe)
    return bool(_PYTHON_EXE.match(exe_name))


def _matches_cheaply(match: Match, identity: Identity) -> bool:
    """Everything but `loads`: the fields read once when the process is first seen."""
    if identity.uid < FIRST_REGULAR_UID and identity.user not in match.users:
        return False
    if not _exe_matches(match, os.path.basename(identity.exe)):
        return False
    if match.cmdline is not None and not _cmdline_matches(match.cmdline, identity.cmdline):
        return False
    return not match.users or any(_user_matches(entry, identity) for entry in match.users)


def _cmdline_matches(pattern: regex.Pattern[str], cmdline: tuple[str, ...]) -> bool:
    """Whether `pattern` is found in the arguments, given at most CMDLINE_TIMEOUT per try
    (CMDLINE_TRIES): a job chooses its arguments, and against a pattern that backtracks
    badly ("(\\w+\\s?)+$") some 40 of them would hold Python's `re` for hours, on the exec
    path. Past the timeout every time it is no match: the process is left as no rule
    matched it."""
    text = " ".join(cmdline)
    for _ in range(CMDLINE_TRIES):
        try:
            return pattern.search(text, timeout=CMDLINE_TIMEOUT) is not None
        except TimeoutError:
            continue
    return False


def _user_matches(entry: str, identity: Identity) -> bool:
    if entry.startswith("@"):
        return entry[1:] in identity.groups
    return entry == identity.user
