"""The policy file: schema, defaults and validation, with errors that say where and what.

Pure apart from `load_policy`, which reads the file. Every key is documented in
`etc/corecap.toml`; unknown keys are errors so that a typo never silently changes behaviour.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import regex

from corecapd.cpulist import CpuListError, parse_cpulist, shown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

DEFAULT_POLICY_PATH = Path("/etc/corecap.toml")
DEFAULT_SOCKET = "/run/corecap/corecap.sock"
MAX_POLICY_BYTES = 1 << 20  # a policy is a few kB; a larger file is a mistake (or /dev/zero)
MAX_SOCKET_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes with its terminating NUL
# Where the clients (corecapctl, corecap, the job library) look for corecapd: `daemon_socket`.
SOCKET_DEFAULT = (
    f"$CORECAP_SOCKET, else daemon.socket of {DEFAULT_POLICY_PATH}, else {DEFAULT_SOCKET}"
)

Mode = Literal["enforce", "monitor"]
MODES: tuple[Mode, ...] = ("enforce", "monitor")
BACKENDS = ("auto", "affinity", "cgroup1", "cgroup2", "systemd")


class PolicyError(ValueError):
    """A policy that cannot be used: every problem found, each one line that starts with the
    file's name and then says where (`file:line:column: ` or `file: key.path: `) and what.

    `errors` holds the lines; `str()` is all of them, one per line (one error: one line).
    """

    def __init__(self, *errors: str) -> None:
        super().__init__("\n".join(errors))
        self.errors: tuple[str, ...] = errors

    def counted(self) -> str:
        """The errors one per line, then how many there were ("2 errors in this policy")."""
        count = len(self.errors)
        return f"{self}\n{count} error{'s' if count != 1 else ''} in this policy"


@dataclass(frozen=True)
class DaemonSettings:
    mode: Mode = "enforce"
    backend: str = "auto"
    scan_interval: float = 1.0
    reconcile_interval: float = 120.0
    reserved_cpus: frozenset[int] = frozenset()
    socket: str = DEFAULT_SOCKET
    exec_events: bool = True
    realtime_priority: int = 0
    cgroup: str = "corecap"
    state_dir: str = "/run/corecap"
    metrics: str = ""  # "HOST:PORT" of the Prometheus metrics; "" = none


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
    # `regex`, not `re`: its searches take a timeout (matching.CMDLINE_TIMEOUT)
    cmdline: regex.Pattern[str] | None = None
    users: tuple[str, ...] = ()
    loads: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    cpus: int
    max_threads: int | None = None
    # Its matches below another job's process become sub-jobs of that job (cores carved out
    # of its grant), not plain members; outside every job it makes a job like any rule.
    sub_job: bool = False


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


def daemon_socket(given: str | None = None, policy_path: Path = DEFAULT_POLICY_PATH) -> Path:
    """corecapd's socket for a client: `given` (a --socket), else $CORECAP_SOCKET (what
    `corecap run` leaves a job), else the `daemon.socket` of the host's policy, else
    DEFAULT_SOCKET when that policy cannot be read or is not valid. Never raises."""
    if given:
        return Path(given)
    if os.environ.get("CORECAP_SOCKET"):
        return Path(os.environ["CORECAP_SOCKET"])
    try:
        return Path(load_policy(policy_path).daemon.socket)
    except PolicyError:
        return Path(DEFAULT_SOCKET)


def load_policy(path: Path) -> Policy:
    """The policy in the file at `path`.

    Raises:
        PolicyError: the file cannot be read (missing, not a regular file, over
            MAX_POLICY_BYTES), is not UTF-8 (line and column of the first bad byte), is not
            TOML (line and column), or breaks the schema (every key path that does).
    """
    try:
        # O_NONBLOCK: a FIFO in its place must not hang a reload; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise PolicyError(f"{path}: cannot read policy: {what}")
            with os.fdopen(fd, "rb", closefd=False) as file:
                raw = file.read(MAX_POLICY_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as err:
        raise PolicyError(f"{path}: cannot read policy: {err.strerror or err}") from err
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}: cannot read policy: larger than {MAX_POLICY_BYTES // 1024} KiB")
    return parse_policy(_decoded(raw, str(path)), source=str(path))


def _decoded(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line = raw.count(b"\n", 0, err.start) + 1
        column = len(raw[line_start : err.start].decode("utf-8")) + 1  # in characters
        raise PolicyError(
            f"{source}:{line}:{column}: not UTF-8 text: byte 0x{raw[err.start]:02x}"
            f" ({err.reason}); write the policy in UTF-8"
        ) from None


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
    """The policy in `text`; `source` names it in messages (the file's path).

    Raises:
        PolicyError: not TOML (`source:line:column: ...`, the first syntax error), or
            against the schema: every problem found, one per line (`source: key.path: ...`).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        what, line, column = _toml_error_position(str(err), text)
        raise PolicyError(f"{source}:{line}:{column}: TOML syntax error: {what}") from None
    except RecursionError:
        raise PolicyError(f"{source}: TOML syntax error: nested too deeply") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise PolicyError(_huge_integer(text, source, err)) from None
    errors: list[str] = []
    policy = _build_policy(_Table(data, "", errors), source)
    if errors:
        raise PolicyError(*(f"{source}: {error}" for error in errors))
    return policy


# A decimal integer as TOML writes it, not part of a float: what int() may refuse to read.
_DECIMAL_RUN = re.compile(r"(?<![0-9_.eE])[+-]?[0-9](?:_?[0-9])*(?![0-9_.eE])")


def _huge_integer(text: str, source: str, err: ValueError) -> str:
    """Where tomllib met an integer too long for int() (sys.get_int_max_str_digits()):
    its error has no position, so the long runs of digits are masked with letters, which
    the same parse then stops at as an invalid value (inside strings and comments, and as
    bare keys, letters are as good as digits)."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)() or 4300
    runs = [m for m in _DECIMAL_RUN.finditer(text) if sum(c.isdigit() for c in m[0]) > limit]
    masked = list(text)
    for run in runs:
        start = run.start() + (run[0][0] in "+-")
        masked[start : run.end()] = "x" * (run.end() - start)
    try:
        tomllib.loads("".join(masked))
    except tomllib.TOMLDecodeError as masked_err:
        _, line, column = _toml_error_position(str(masked_err), text)
        at = next((r for r in runs if _line_column(text, r.start()) == (line, column)), None)
        if at is not None:
            digits = sum(c.isdigit() for c in at[0])
            return (
                f"{source}:{line}:{column}: integer of {digits} digits: too large"
                f" (no setting takes more than {len(str(MAX_THREADS))} digits)"
            )
    except (ValueError, RecursionError):
        pass
    return f"{source}: an integer too large to read: {err}"


def _line_column(text: str, offset: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


class _SchemaError(Exception):
    """One problem with one key; `_Table.get` records it and reading goes on."""


T = TypeVar("T")


def _describe(value: object) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}.get(
        type(value), "table" if isinstance(value, dict) else type(value).__name__
    )
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {_digits(value)} digits"
    try:
        text = repr(value)
    except ValueError:  # an integer in an array beyond what repr() converts
        return kind
    return f"{kind} {text}" if len(text) <= 40 else kind


def _digits(value: int) -> int:
    """Decimal digits of `value`, within one, without converting it (that can be refused)."""
    return max(1, round(value.bit_length() * 0.30103))


def _number(value: float) -> str:
    """A number for a message: huge integers (TOML's hexadecimal has no limit) by size."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of about {_digits(value)} digits"
    return str(value)


class _Table:
    """A TOML table being read: remembers its key path and which keys were consumed, and
    records every problem in `errors` (shared by the whole document), so that one reading
    finds them all; a key in error reads as its default meanwhile."""

    def __init__(self, data: Mapping[str, Any], path: str, errors: list[str]) -> None:
        self.data = data
        self.path = path
        self.errors = errors
        self.seen: set[str] = set()

    def where(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        if len(key) > 40:  # a key of thousands of characters is named by its start
            key = f"{key[:32]}..."
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str) -> None:
        self.errors.append(message)

    def get(self, key: str, convert: Callable[[str, object], T], default: T) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        try:
            return convert(self.where(key), self.data[key])
        except _SchemaError as err:
            self.error(str(err))
            return default

    def subtable(self, key: str) -> _Table:
        self.seen.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            self.error(f"{self.where(key)}: expected a table, found {_describe(value)}")
            value = {}
        return _Table(value, self.where(key), self.errors)

    def finish(self) -> None:
        allowed = ", ".join(sorted(self.seen)) or "none"
        for key in sorted(set(self.data) - self.seen):
            self.error(f"{self.where(key)}: unknown key (allowed here: {allowed})")


def _integer(minimum: int, maximum: int) -> Callable[[str, object], int]:
    def convert(where: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _SchemaError(f"{where}: expected an integer, found {_describe(value)}")
        if not minimum <= value <= maximum:
            raise _SchemaError(
                f"{where}: expected an integer from {minimum} to {maximum}, found {_number(value)}"
            )
        return value

    return convert


def _seconds(minimum: float, maximum: float) -> Callable[[str, object], float]:
    def convert(where: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _SchemaError(f"{where}: expected a number of seconds, found {_describe(value)}")
        if not minimum <= value <= maximum:
            raise _SchemaError(
                f"{where}: expected seconds from {minimum:g} to {maximum:g}, found {_number(value)}"
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
            raise _SchemaError(f"{where}: expected {expected}, found {shown(text)}")
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


def _regex(where: str, value: object) -> regex.Pattern[str]:
    try:
        return regex.compile(_nonempty_string(where, value))
    except regex.error as err:
        raise _SchemaError(f"{where}: invalid regular expression: {err}") from None
    except (OverflowError, RecursionError):
        raise _SchemaError(f"{where}: regular expression too large or nested too deeply") from None


def _account_name(name: str) -> bool:
    """Whether a user or group could have `name`: not empty, no space, no NUL."""
    return bool(name) and not any(c.isspace() or c == "\0" for c in name)


def _users(where: str, value: object) -> tuple[str, ...]:
    names = _string_list(where, value)
    for index, name in enumerate(names):
        if not _account_name(name.removeprefix("@")):
            raise _SchemaError(
                f'{where}[{index}]: expected a user name or "@group", found {shown(name)}'
            )
    return names


def _cgroup_name(where: str, value: object) -> str:
    name = _nonempty_string(where, value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise _SchemaError(
            f"{where}: expected a directory name (letters, digits, _ . -), found {shown(name)}"
        )
    return name


def _absolute_path(where: str, value: object) -> str:
    path = _nonempty_string(where, value)
    if not path.startswith("/"):
        raise _SchemaError(f"{where}: expected an absolute path, found {shown(path)}")
    return path


def _socket_path(where: str, value: object) -> str:
    path = _absolute_path(where, value)
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise _SchemaError(
            f"{where}: expected a path of at most {MAX_SOCKET_PATH_BYTES} bytes (the kernel's"
            f" limit for a Unix socket), found {size} bytes"
        )
    return path


def split_address(address: str) -> tuple[str, int]:
    """An address "HOST:PORT" (HOST an IPv4 address, or an IPv6 one in brackets) as
    (host, port).

    Raises:
        ValueError: not of that form, or the port is not 1-65535.
    """
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected a port from 1 to 65535 after the last colon")
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{shown(host)} is not an IP address") from None
    if parsed.version != version:
        raise ValueError("an IPv6 address, and only one, goes in brackets")
    return host, int(port)


def _listen_address(where: str, value: object) -> str:
    address = _string(where, value)
    if address:
        try:
            split_address(address)
        except ValueError as err:
            raise _SchemaError(
                f'{where}: expected "" or "HOST:PORT" with HOST an IP address ("127.0.0.1:9787",'
                f' "[::1]:9787", "0.0.0.0:9787"), found {shown(address)}: {err}'
            ) from None
    return address


MAX_CPUS = 8192
MAX_THREADS = 1_000_000


def _build_policy(root: _Table, source: str) -> Policy:
    section = root.subtable("daemon")
    daemon = DaemonSettings(
        mode=section.get("mode", _choice(MODES), "enforce"),  # type: ignore[arg-type]
        backend=section.get("backend", _choice(BACKENDS), "auto"),
        scan_interval=section.get("scan_interval", _seconds(0.05, 3600), 1.0),
        reconcile_interval=section.get("reconcile_interval", _seconds(0.05, 86400), 120.0),
        reserved_cpus=section.get("reserved_cpus", _cpus, frozenset()),
        socket=section.get("socket", _socket_path, DEFAULT_SOCKET),
        exec_events=section.get("exec_events", _boolean, True),
        realtime_priority=section.get("realtime_priority", _integer(0, 99), 0),
        cgroup=section.get("cgroup", _cgroup_name, "corecap"),
        state_dir=section.get("state_dir", _absolute_path, "/run/corecap"),
        metrics=section.get("metrics", _listen_address, ""),
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
        if name.startswith("@") or not _account_name(name):  # limits are per user
            users_table.error(
                f"{users_table.where(name)}: expected a user name, found {shown(name)}"
            )
            continue
        users[name] = UserLimits(max_cpus=limits.get("max_cpus", _integer(1, MAX_CPUS), MAX_CPUS))
        limits.finish()

    root.finish()
    return Policy(daemon=daemon, defaults=defaults, rules=rules, users=users, source=source)


NO_RULES = (
    "a policy without [[rules]] would let go of every job (an empty or half-written file?);"
    " to run without rules on purpose, write `rules = []` at the top, before any [table]"
)


def _build_rules(root: _Table, defaults: Defaults) -> tuple[Rule, ...]:
    """The rules in file order. No `rules` key at all is an error (NO_RULES): only an
    explicit `rules = []` means no rules, so a truncated file never releases every job."""
    root.seen.add("rules")
    if "rules" not in root.data:
        root.error(f"empty policy: {NO_RULES}" if not root.data else f"rules: missing: {NO_RULES}")
        return ()
    entries = root.data["rules"]
    if not isinstance(entries, list):
        root.error(f"rules: expected an array of tables ([[rules]]), found {_describe(entries)}")
        return ()
    rules: list[Rule] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        errors_before = len(root.errors)
        rule = _build_rule(_Table({}, f"rules[{index}]", root.errors), entry, defaults, names)
        if rule is not None and len(root.errors) == errors_before:
            rules.append(rule)
    return tuple(rules)


def _build_rule(table: _Table, entry: object, defaults: Defaults, names: set[str]) -> Rule | None:
    where = table.path
    if not isinstance(entry, dict):
        table.error(f"{where}: expected a table, found {_describe(entry)}")
        return None
    table.data = entry
    if "name" not in entry:
        table.error(f"{where}.name: missing; every rule needs a name")
    name = table.get("name", _nonempty_string, "")
    if name and name in names:
        table.error(f"{where}.name: duplicate rule name {shown(name)}")
    names.add(name)
    if "match" not in entry:
        table.error(f"{where}.match: missing; a rule must say what it matches")
    errors_before = len(table.errors)
    criteria = table.subtable("match")
    match = Match(
        exe=criteria.get("exe", _string_list, ()),
        cmdline=criteria.get("cmdline", _regex, None),
        users=criteria.get("users", _users, ()),
        loads=criteria.get("loads", _string_list, ()),
    )
    criteria.finish()
    if match == Match() and "match" in entry and len(table.errors) == errors_before:
        table.error(f"{where}.match: expected at least one of exe, cmdline, users, loads")
    rule = Rule(
        name=name,
        match=match,
        cpus=table.get("cpus", _integer(1, MAX_CPUS), defaults.cpus),
        max_threads=table.get("max_threads", _integer(1, MAX_THREADS), None),
        sub_job=table.get("sub_job", _boolean, False),
    )
    table.finish()
    return rule
