"""systemd transient scopes over the system D-Bus: the fence on systemd hosts.

systemd is the single writer of the cgroup tree it manages, so corecapd asks it rather than
writing cgroups: each job becomes `corecap-<job>.scope` in `corecap.slice` (the prefix is
the policy's `daemon.cgroup`), started by `StartTransientUnit` with the job's PIDs and
`AllowedCPUs=` (a CPU bit mask). `SetUnitProperties` changes the CPUs and
`AttachProcessesToUnit` (systemd >= 238) takes in new members, which systemd allows only for
delegated units: the scope is made with `Delegate=yes`. systemd removes the scope when its
last process has exited. A job that ends with processes left gets its scope widened to all
online CPUs (systemd does not re-apply an emptied `AllowedCPUs=`), and goes when they do.

Reads need no D-Bus: /proc/PID/cgroup says whether a process is in its scope and the scope's
cgroup shows the CPUs systemd applied, so a scan that finds nothing to change costs no round
trip. A process whose cgroup (not the root, not ours) has a narrower effective cpuset than the
host stays where it is, as with the other fences.

Messages are data (`MethodCall`, built by the functions below and tested without a bus);
`SystemBus` sends them with jeepney's blocking client, on the daemon's fence worker thread.
jeepney is imported when the first message is sent: it comes with the daemon's dependencies
(`corecap[daemon]`), and `corecapctl` reaches this module (through corecapd.preflight) in an
environment that may have only the job library's.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corecapd.cpulist import format_cpulist, parse_cpulist
from corecapd.enforcement.base import Backend, EnforcementError, Host
from corecapd.enforcement.cgroup2 import cgroup_of, effective_cpus, pid1_is_systemd, within

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
SCOPE = "org.freedesktop.systemd1.Scope"
PROPERTIES = "org.freedesktop.DBus.Properties"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
UNIT_EXISTS = "org.freedesktop.systemd1.UnitExists"
PID_UNKNOWN = "org.freedesktop.DBus.Error.UnixProcessIdUnknown"
MIN_VERSION = 244  # AllowedCPUs= (AttachProcessesToUnit came with 238)
CALL_TIMEOUT = 30.0  # seconds, for a reply or a job: a loaded host's systemd can be slow
UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.-]+")


@dataclass(frozen=True)
class MethodCall:
    path: str
    interface: str
    method: str
    signature: str
    body: tuple[Any, ...]


class BusError(Exception):
    """An error reply (its D-Bus error name and message), or a failed connection."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class Bus(Protocol):
    def call(self, call: MethodCall) -> tuple[Any, ...]:
        """The reply's body; BusError for an error reply or a broken bus."""

    def start_job(self, call: MethodCall) -> str:
        """Make a call that queues a systemd job, wait for the job, return its result."""


def cpu_mask(cpus: Iterable[int]) -> bytes:
    """`AllowedCPUs=` as systemd's D-Bus API takes it: CPU n is bit n % 8 of byte n // 8."""
    ordered = sorted(set(cpus))
    mask = bytearray(ordered[-1] // 8 + 1 if ordered else 0)
    for cpu in ordered:
        mask[cpu // 8] |= 1 << (cpu % 8)
    return bytes(mask)


def mask_cpus(mask: bytes) -> frozenset[int]:
    return frozenset(n * 8 + b for n, byte in enumerate(mask) for b in range(8) if byte >> b & 1)


def slice_cgroup(slice_name: str) -> str:
    """A slice's cgroup: every dash names a parent, "a-b.slice" is "/a.slice/a-b.slice"."""
    parts = slice_name.removesuffix(".slice").split("-")
    return "".join(f"/{'-'.join(parts[: i + 1])}.slice" for i in range(len(parts)))


def start_scope(
    unit: str, pids: Sequence[int], cpus: frozenset[int], slice_name: str, job: str
) -> MethodCall:
    properties = [
        ("Description", ("s", f"corecap job {job}")),
        ("Slice", ("s", slice_name)),
        ("PIDs", ("au", list(pids))),
        ("AllowedCPUs", ("ay", cpu_mask(cpus))),
        ("Delegate", ("b", True)),  # AttachProcessesToUnit takes in new members only then
        ("CollectMode", ("s", "inactive-or-failed")),  # no failed scope left behind
    ]
    return _manager("StartTransientUnit", "ssa(sv)a(sa(sv))", unit, "fail", properties, [])


def set_cpus(unit: str, cpus: frozenset[int]) -> MethodCall:
    allowed = [("AllowedCPUs", ("ay", cpu_mask(cpus)))]
    return _manager("SetUnitProperties", "sba(sv)", unit, True, allowed)  # runtime only


def attach(unit: str, pids: Sequence[int]) -> MethodCall:
    return _manager("AttachProcessesToUnit", "ssau", unit, "", list(pids))


def stop(unit: str) -> MethodCall:
    return _manager("StopUnit", "ss", unit, "replace")


def list_units(pattern: str) -> MethodCall:
    return _manager("ListUnitsByPatterns", "asas", [], [pattern])


def get_property(path: str, interface: str, name: str) -> MethodCall:
    return MethodCall(path, PROPERTIES, "Get", "ss", (interface, name))


def _manager(method: str, signature: str, *body: Any) -> MethodCall:
    return MethodCall(MANAGER_PATH, MANAGER, method, signature, body)


class SystemdBackend(Backend):
    name = "systemd"

    def __init__(self, host: Host, bus: Bus | None = None) -> None:
        super().__init__(host)
        self.bus: Bus = bus if bus is not None else SystemBus()
        self.slice = f"{host.cgroup}.slice"
        self._slice_cgroup = slice_cgroup(self.slice)
        # Job names are "<pid>-<start ticks>" (core.Job.name): another daemon.cgroup's scopes,
        # "corecap-test-1-2.scope" when ours is "corecap", do not match.
        self._unit_name = re.compile(re.escape(host.cgroup) + r"-([0-9]+-[0-9]+)\.scope")

    def problem(self) -> str | None:
        if not pid1_is_systemd(self.host):
            return "PID 1 is not systemd"
        controllers = self.host.cgroup_root / "cgroup.controllers"
        if not controllers.is_file():
            return (
                f"not cgroup v2: {self.host.cgroup_root} is a cgroup v1 or hybrid hierarchy"
                " (AllowedCPUs= needs the unified one)"
            )
        if "cpuset" not in controllers.read_text().split():
            return f"no cpuset controller in the cgroup v2 hierarchy at {self.host.cgroup_root}"
        if not UNIT_CHARS.fullmatch(self.host.cgroup) or not all(self.host.cgroup.split("-")):
            return f"{self.slice!r} is not a valid slice name (daemon.cgroup)"
        try:
            ((_, version),) = self.bus.call(get_property(MANAGER_PATH, MANAGER, "Version"))
        except BusError as err:
            return f"systemd is not reachable on the system D-Bus: {err}"
        found = re.match(r"[0-9]+", str(version))
        if found is None or int(found[0]) < MIN_VERSION:
            return f"systemd {version} is too old: AllowedCPUs= needs {MIN_VERSION} or newer"
        return None

    def describe(self) -> str:
        return f"systemd ({self.slice})"

    def confine(self, job: str, pids: Sequence[int], cpus: frozenset[int]) -> int:
        unit = self._unit(job)
        scope = f"{self._slice_cgroup}/{unit}"
        movable = [pid for pid in pids if self._movable(pid, scope)]
        here = self._path(scope)
        if not here.is_dir():
            return self._start(job, unit, movable, cpus) if movable else 0
        if _cpus_of(here) != cpus:
            self._call(set_cpus(unit, cpus), unit)
        return self._attach(unit, movable) if movable else 0

    def release(self, job: str, pids: Sequence[int]) -> None:
        unit = self._unit(job)
        here = self._path(f"{self._slice_cgroup}/{unit}")
        if not here.is_dir():
            return  # the scope went with its last process
        # With processes left, let them go; an empty scope goes (stopping it kills nobody).
        call = set_cpus(unit, self.host.online_cpus) if _populated(here) else stop(unit)
        try:
            self.bus.call(call)
        except BusError as err:
            if err.name != NO_SUCH_UNIT:
                raise _error(call, unit, err) from err

    def adopt(self) -> dict[str, frozenset[int]]:
        query = list_units(f"{self.host.cgroup}-*.scope")
        try:
            (units,) = self.bus.call(query)
        except BusError as err:
            raise _error(query, self.slice, err) from err
        fences: dict[str, frozenset[int]] = {}
        for name, _, _, active, _, _, path, *_ in units:
            found = self._unit_name.fullmatch(name)
            if found is None or active != "active":
                continue  # another daemon.cgroup's ("corecap-test-x-1-2.scope"), or going
            read = get_property(path, SCOPE, "AllowedCPUs")
            try:
                ((_, mask),) = self.bus.call(read)
            except BusError as err:
                if err.name == NO_SUCH_UNIT or "UnknownObject" in err.name:
                    continue  # gone meanwhile
                raise _error(read, name, err) from err
            fences[found[1]] = mask_cpus(bytes(mask))
        return fences

    def _unit(self, job: str) -> str:
        if not UNIT_CHARS.fullmatch(job):
            raise EnforcementError(f"job name {job!r} cannot be part of a unit name")
        return f"{self.host.cgroup}-{job}.scope"

    def _path(self, cgroup: str) -> Path:
        return self.host.cgroup_root / cgroup.lstrip("/")

    def _movable(self, pid: int, scope: str) -> bool:
        """Not in the scope yet, and not bounded by someone else's cpuset."""
        where = cgroup_of(self.host, pid)
        if where is None or within(where, scope):
            return False
        if where == "/" or within(where, self._slice_cgroup):
            return True
        bound = effective_cpus(self.host.cgroup_root, where)
        return bound is None or self.host.online_cpus <= bound

    def _start(self, job: str, unit: str, pids: list[int], cpus: frozenset[int]) -> int:
        call = start_scope(unit, pids, cpus, self.slice, job)
        try:
            result = self.bus.start_job(call)
        except BusError as err:
            if err.name == PID_UNKNOWN:  # one of them exited: start with the others
                alive = self._alive(pids)
                if alive != pids:
                    return self._start(job, unit, alive, cpus) if alive else 0
            if err.name == UNIT_EXISTS:  # made meanwhile, its cgroup not there yet
                return self._attach(unit, pids)
            raise _error(call, unit, err) from err
        if result != "done":
            raise EnforcementError(
                f"systemd could not start {unit} in {self.slice} for PIDs"
                f" {', '.join(map(str, pids))} with CPUs {format_cpulist(cpus)}: job {result}"
            )
        return len(pids)

    def _attach(self, unit: str, pids: list[int]) -> int:
        call = attach(unit, pids)
        try:
            self.bus.call(call)
        except BusError as err:
            alive = self._alive(pids) if err.name == PID_UNKNOWN else pids
            if alive == pids:
                raise _error(call, unit, err) from err
            return self._attach(unit, alive) if alive else 0
        return len(pids)

    def _call(self, call: MethodCall, unit: str) -> tuple[Any, ...]:
        try:
            return self.bus.call(call)
        except BusError as err:
            raise _error(call, unit, err) from err

    def _alive(self, pids: list[int]) -> list[int]:
        return [pid for pid in pids if (self.host.procfs.root / str(pid)).exists()]


def _error(call: MethodCall, what: str, err: BusError) -> EnforcementError:
    return EnforcementError(f"systemd {call.method} for {what} failed: {err}")


def _cpus_of(scope: Path) -> frozenset[int] | None:
    try:
        return parse_cpulist((scope / "cpuset.cpus").read_text())
    except FileNotFoundError:
        return None


def _populated(cgroup: Path) -> bool:
    try:
        return "populated 0" not in (cgroup / "cgroup.events").read_text().splitlines()
    except FileNotFoundError:
        return False  # removed meanwhile


class SystemBus:
    """The system bus through jeepney's blocking client: connected on first use, and again
    after a failure. A lock keeps one call at a time (the fence worker's, or `adopt`)."""

    def __init__(self, timeout: float = CALL_TIMEOUT, bus: str = "SYSTEM") -> None:
        self.timeout = timeout
        self._bus = bus
        self._connection: Any = None
        self._lock = threading.Lock()

    def call(self, call: MethodCall) -> tuple[Any, ...]:
        with self._lock:
            return self._send(self._connect(), to_message(call))

    def start_job(self, call: MethodCall) -> str:
        with self._lock:
            connection = self._connect()
            # Filter first: the job can end before its reply is read.
            with connection.filter(job_removed(local=True), queue=deque()) as removed:
                (job,) = self._send(connection, to_message(call))
                while True:
                    try:
                        message = connection.recv_until_filtered(removed, timeout=self.timeout)
                    except (OSError, ValueError) as err:  # TimeoutError is an OSError
                        self.close()
                        raise BusError("timeout", f"{job} did not end in {self.timeout} s") from err
                    _, path, _, result = message.body
                    if path == job:
                        return str(result)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> Any:
        if self._connection is not None:
            return self._connection
        try:
            from jeepney.bus_messages import message_bus  # type: ignore[import-untyped]
            from jeepney.io.blocking import open_dbus_connection  # type: ignore[import-untyped]
        except ImportError as err:  # the job library alone: pip install corecap
            raise BusError(
                "connection", f"jeepney is not installed ({err}): pip install 'corecap[daemon]'"
            ) from err
        try:
            connection = open_dbus_connection(self._bus, auth_timeout=self.timeout)
        except (OSError, ValueError) as err:  # no socket, refused, authentication failed
            raise BusError("connection", f"cannot connect to the {self._bus} bus: {err}") from err
        self._connection = connection
        # systemd sends JobRemoved to the client that queued the job; the bus needs a match.
        self._send(connection, message_bus.AddMatch(job_removed()))
        return connection

    def _send(self, connection: Any, message: Any) -> tuple[Any, ...]:
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg  # type: ignore[import-untyped]

        try:
            reply = connection.send_and_get_reply(message, timeout=self.timeout)
            return tuple(unwrap_msg(reply))
        except DBusErrorResponse as err:
            text = err.data[0] if err.data and isinstance(err.data[0], str) else str(err.data)
            raise BusError(str(err.name), text) from None
        except (OSError, ValueError) as err:  # the bus went away, or no reply in time
            self.close()
            raise BusError("connection", f"system D-Bus: {err or type(err).__name__}") from err


def to_message(call: MethodCall) -> Any:
    from jeepney import DBusAddress, new_method_call  # type: ignore[import-untyped]

    address = DBusAddress(call.path, SYSTEMD, call.interface)
    return new_method_call(address, call.method, call.signature, call.body)


def job_removed(local: bool = False) -> Any:
    """Match systemd's JobRemoved. The bus daemon knows systemd's well-known name; jeepney's
    own filter sees only its unique name, so that one matches without a sender."""
    from jeepney import MatchRule

    return MatchRule(
        type="signal",
        sender=None if local else SYSTEMD,
        interface=MANAGER,
        member="JobRemoved",
        path=MANAGER_PATH,
    )
