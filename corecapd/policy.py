"""The policy file: schema, defaults and validation, with errors that say where and what.

Pure apart from `load_policy`, which reads the file. Every key is documented in
`etc/corecap.toml`; unknown keys are errors so that a typo never silently changes behaviour.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from corecapd.cpulist import CpuListError, parse_cpulist

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

DEFAULT_POLICY_PATH = Path("/etc/corecap.toml")
DEFAULT_SOCKET = "/run/corecap/corecap.sock"

Mode = Literal["enforce", "monitor"]
MODES: tuple[Mode, ...] = ("enforce", "monitor")
BACKENDS = ("auto", "affinity", "cgroup1", "cgroup2", "systemd")


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the file and the place."""


@dataclass(frozen=True)
class DaemonSettings:
    mode: Mode = "enforce"
    backend: str = "auto"
    scan_interval: float = 1.0
    reserved_cpus: frozenset[int] = frozenset()
    socket: str = DEFAULT_SOCKET
    exec_events: bool = True
    realtime_priority: int = 0
    cgroup: str = "corecap"
    state_dir: str = "/run/corecap"


@dataclass(frozen=True)
class Defaults:
    cpus: int = 4
    thread_slack: int = 8
    grace: float = 10.0
    violation_after: int = 3


@dataclass(frozen=True)
class Match:
    """All given criteria must hold; absent criteria match anything."""

    exe: tuple[str, ...] = ()
    cmdline: re.Pattern[str] | None = None
    users: tuple[str, ...] = ()
    loads: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    cpus: int
    max_threads: int | None = None


@dataclass(frozen=True)
class UserLimits:
    max_cpus: int


@dataclass(frozen=True)
class Policy:
    daemon: DaemonSettings = DaemonSettings()
    defaults: Defaults = Defaults()
    rules: tuple[Rule, ...] = ()
    users: Mapping[str, UserLimits] = field(default_factory=dict)
    source: str = "<default>"


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise PolicyError(f"{path}: cannot read policy: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise PolicyError(f"{path}: policy is not UTF-8 text: {err.reason}") from err
    return parse_policy(text, source=str(path))


_TOML_POSITION = re.compile(r"^(?P<what>.*?) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")
_TOML_AT_END = re.compile(r"^(?P<what>.*?) \(at end of document\)$")


def _toml_error_position(message: str, text: str) -> tuple[str, int, int]:
    """tomllib's message without its position suffix, and the 1-based line and column."""
    found = _TOML_POSITION.match(message)
    if found:
        return found["what"], int(found["line"]), int(found["col"])
    lines = text.rstrip().split("\n")  # "at end of document": point at the last line written
    at_end = _TOML_AT_END.match(message)
    return (at_end["what"] if at_end else message), len(lines), len(lines[-1]) + 1


def parse_policy(text: str, source: str = "<string>") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        what, line, column = _toml_error_position(str(err), text)
        raise PolicyError(f"{source}:{line}:{column}: TOML syntax error: {what}") from None
    except RecursionError:
        raise PolicyError(f"{source}: TOML syntax error: nested too deeply") from None
    try:
        return _build_policy(_Table(data, ""), source)
    except _SchemaError as err:
        raise PolicyError(f"{source}: {err}") from None


class _SchemaError(Exception):
    pass


T = TypeVar("T")


def _describe(value: object) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}.get(
        type(value), "table" if isinstance(value, dict) else type(value).__name__
    )
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 40 else kind


class _Table:
    """A TOML table being read: remembers its key path and which keys were consumed."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self.data = data
        self.path = path
        self.seen: set[str] = set()

    def where(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, convert: Callable[[str, object], T], default: T) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        return convert(self.where(key), self.data[key])

    def subtable(self, key: str) -> _Table:
        self.seen.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise _SchemaError(f"{self.where(key)}: expected a table, found {_describe(value)}")
        return _Table(value, self.where(key))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            allowed = ", ".join(sorted(self.seen)) or "none"
            raise _SchemaError(f"{self.where(unknown[0])}: unknown key (allowed here: {allowed})")


def _integer(minimum: int, maximum: int) -> Callable[[str, object], int]:
    def convert(where: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _SchemaError(f"{where}: expected an integer, found {_describe(value)}")
        if not minimum <= value <= maximum:
            raise _SchemaError(
                f"{where}: expected an integer from {minimum} to {maximum}, found {value}"
            )
        return value

    return convert


def _seconds(minimum: float, maximum: float) -> Callable[[str, object], float]:
    def convert(where: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _SchemaError(f"{where}: expected a number of seconds, found {_describe(value)}")
        if not minimum <= value <= maximum:
            raise _SchemaError(
                f"{where}: expected seconds from {minimum:g} to {maximum:g}, found {value}"
            )
        return float(value)

    return convert


def _boolean(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _SchemaError(f"{where}: expected true or false, found {_describe(value)}")
    return value


def _string(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise _SchemaError(f"{where}: expected a string, found {_describe(value)}")
    return value


def _nonempty_string(where: str, value: object) -> str:
    text = _string(where, value)
    if not text.strip():
        raise _SchemaError(f"{where}: expected a non-empty string")
    return text


def _choice(options: tuple[str, ...]) -> Callable[[str, object], str]:
    def convert(where: str, value: object) -> str:
        text = _string(where, value)
        if text not in options:
            expected = " or ".join(repr(o) for o in options)
            raise _SchemaError(f"{where}: expected {expected}, found {text!r}")
        return text

    return convert


def _string_list(where: str, value: object) -> tuple[str, ...]:
    """A list of non-empty strings; a single string is accepted as a list of one."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _SchemaError(f"{where}: expected an array of strings, found {_describe(value)}")
    for index, item in enumerate(items):
        _nonempty_string(f"{where}[{index}]", item)
    return tuple(items)


def _cpus(where: str, value: object) -> frozenset[int]:
    try:
        return parse_cpulist(_string(where, value))
    except CpuListError as err:
        raise _SchemaError(f'{where}: expected a CPU list like "0,2-3": {err}') from None


def _regex(where: str, value: object) -> re.Pattern[str]:
    try:
        return re.compile(_nonempty_string(where, value))
    except re.error as err:
        raise _SchemaError(f"{where}: invalid regular expression: {err}") from None
    except (OverflowError, RecursionError):
        raise _SchemaError(f"{where}: regular expression too large or nested too deeply") from None


def _users(where: str, value: object) -> tuple[str, ...]:
    names = _string_list(where, value)
    for index, name in enumerate(names):
        if name == "@" or any(c.isspace() for c in name):
            raise _SchemaError(
                f'{where}[{index}]: expected a user name or "@group", found {name!r}'
            )
    return names


def _cgroup_name(where: str, value: object) -> str:
    name = _nonempty_string(where, value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise _SchemaError(
            f"{where}: expected a directory name (letters, digits, _ . -), found {name!r}"
        )
    return name


def _absolute_path(where: str, value: object) -> str:
    path = _nonempty_string(where, value)
    if not path.startswith("/"):
        raise _SchemaError(f"{where}: expected an absolute path, found {path!r}")
    return path


MAX_CPUS = 8192
MAX_THREADS = 1_000_000


def _build_policy(root: _Table, source: str) -> Policy:
    section = root.subtable("daemon")
    daemon = DaemonSettings(
        mode=section.get("mode", _choice(MODES), "enforce"),  # type: ignore[arg-type]
        backend=section.get("backend", _choice(BACKENDS), "auto"),
        scan_interval=section.get("scan_interval", _seconds(0.05, 3600), 1.0),
        reserved_cpus=section.get("reserved_cpus", _cpus, frozenset()),
        socket=section.get("socket", _absolute_path, DEFAULT_SOCKET),
        exec_events=section.get("exec_events", _boolean, True),
        realtime_priority=section.get("realtime_priority", _integer(0, 99), 0),
        cgroup=section.get("cgroup", _cgroup_name, "corecap"),
        state_dir=section.get("state_dir", _absolute_path, "/run/corecap"),
    )
    section.finish()

    section = root.subtable("defaults")
    defaults = Defaults(
        cpus=section.get("cpus", _integer(1, MAX_CPUS), 4),
        thread_slack=section.get("thread_slack", _integer(0, MAX_THREADS), 8),
        grace=section.get("grace", _seconds(0, 86400), 10.0),
        violation_after=section.get("violation_after", _integer(1, 1000), 3),
    )
    section.finish()

    rules = _build_rules(root, defaults)

    users: dict[str, UserLimits] = {}
    users_table = root.subtable("users")
    for name in users_table.data:
        limits = users_table.subtable(name)
        users[name] = UserLimits(max_cpus=limits.get("max_cpus", _integer(1, MAX_CPUS), MAX_CPUS))
        limits.finish()

    root.finish()
    return Policy(daemon=daemon, defaults=defaults, rules=rules, users=users, source=source)


def _build_rules(root: _Table, defaults: Defaults) -> tuple[Rule, ...]:
    root.seen.add("rules")
    entries = root.data.get("rules", [])
    if not isinstance(entries, list):
        raise _SchemaError(
            f"rules: expected an array of tables ([[rules]]), found {_describe(entries)}"
        )
    rules: list[Rule] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"rules[{index}]"
        if not isinstance(entry, dict):
            raise _SchemaError(f"{where}: expected a table, found {_describe(entry)}")
        table = _Table(entry, where)
        if "name" not in entry:
            raise _SchemaError(f"{where}.name: missing; every rule needs a name")
        name = table.get("name", _nonempty_string, "")
        if name in names:
            raise _SchemaError(f"{where}.name: duplicate rule name {name!r}")
        names.add(name)
        if "match" not in entry:
            raise _SchemaError(f"{where}.match: missing; a rule must say what it matches")
        criteria = table.subtable("match")
        match = Match(
            exe=criteria.get("exe", _string_list, ()),
            cmdline=criteria.get("cmdline", _regex, None),
            users=criteria.get("users", _users, ()),
            loads=criteria.get("loads", _string_list, ()),
        )
        criteria.finish()
        if match == Match():
            raise _SchemaError(
                f"{where}.match: expected at least one of exe, cmdline, users, loads"
            )
        rules.append(
            Rule(
                name=name,
                match=match,
                cpus=table.get("cpus", _integer(1, MAX_CPUS), defaults.cpus),
                max_threads=table.get("max_threads", _integer(1, MAX_THREADS), None),
            )
        )
        table.finish()
    return tuple(rules)
