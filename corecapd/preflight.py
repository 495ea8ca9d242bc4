"""What corecapd checks of a policy before it uses it, in one place: `corecapd` at start and
at reload, and `corecapctl check`, call the same functions, so they accept the same policies.

Two steps: the file (`policy.load_policy`: readable, UTF-8, TOML, the schema, every error at
once), then what only this host can tell (`check_host`), each problem named by its key:

- `daemon.reserved_cpus` leaves a CPU for jobs among this host's online CPUs;
- `daemon.backend` can work here (the backend's own `problem()`, as `"auto"` tries them);
- `daemon.realtime_priority` > 0: SCHED_FIFO at that priority can be had (tried on a
  short-lived thread, which then ends: nothing of the caller changes);
- `daemon.socket` is absent or a socket (corecapd replaces a stale socket and nothing else),
  below a directory;
- the users and groups that rules and `[users.NAME]` name exist here: a finding, never an
  error (an account may come later, or from a directory service), so that a typo shows.

`corecapctl check` runs beside corecapd, not as it: as another user, or outside the service's
cgroup, a backend or realtime problem may be this process's alone, so it is shown there as
a finding, not counted as an error (`as_daemon=False`).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from corecapd.core import eligible_cpus
from corecapd.cpulist import format_cpulist
from corecapd.enforcement import AffinityBackend, Backend, Host, NoBackend, choose_backend
from corecapd.enforcement.cgroup2 import pid1_is_systemd
from corecapd.policy import DaemonSettings, Policy, PolicyError, load_policy
from corecapd.procfs import ProcFS, online_cpus
from corecapd.topology import Topology, TopologyError, read_topology


@dataclass(frozen=True)
class HostCheck:
    """What `check_host` found: `problems` refuse the policy here (each starts with its key
    path), `findings` say what was checked and how it came out (one line each)."""

    problems: tuple[str, ...]
    findings: tuple[str, ...]
    backend: Backend | None = None  # the backend chosen, when it was checked and works
    backend_reason: str = ""


@dataclass(frozen=True)
class Checked:
    """A policy file that passed every check, with what the checks read of this host."""

    policy: Policy
    topology: Topology | None  # None: sysfs unreadable, CPUs are allocated by id alone
    host: Host
    host_check: HostCheck


def check_policy_file(path: Path, *, as_daemon: bool = True) -> Checked:
    """The file at `path` checked as corecapd checks it at start (`corecapctl check` too).

    Raises:
        PolicyError: every problem found, one per line: the file's first (schema problems
            all at once); once the file is valid, this host's.
    """
    policy = load_policy(path)
    findings: list[str] = []
    topology: Topology | None
    try:
        topology = read_topology()
        online = topology.online
    except TopologyError as err:  # odd sysfs (some containers): allocate by CPU id alone
        findings.append(f"CPU topology unreadable, CPUs allocated by id alone: {err}")
        topology, online = None, online_cpus()
    procfs = ProcFS(own_cgroup=policy.daemon.cgroup)
    host = Host(procfs, online, cgroup=policy.daemon.cgroup)
    checked = check_host(policy, host, as_daemon=as_daemon)
    if checked.problems:
        raise PolicyError(*(f"{policy.source}: {problem}" for problem in checked.problems))
    checked = replace(checked, findings=(*findings, *checked.findings))
    return Checked(policy, topology, host, checked)


def check_host(
    policy: Policy,
    host: Host,
    *,
    in_force: DaemonSettings | None = None,
    as_daemon: bool = True,
) -> HostCheck:
    """What only this host can tell about `policy` (see the module's docstring).

    `in_force`: at reload, the daemon settings corecapd runs with; the ones that take effect
    only at a restart (backend, realtime priority, socket) are checked when they change.
    `as_daemon=False`: the caller is not corecapd (corecapctl check): problems that may be
    the caller's alone become findings. Reads sysfs, /proc and the filesystem; never raises
    for what it finds.
    """
    settings = policy.daemon
    problems: list[str] = []
    findings: list[str] = []

    jobs_cpus = eligible_cpus(policy, host.online_cpus)
    online, reserved = format_cpulist(host.online_cpus), format_cpulist(settings.reserved_cpus)
    if not jobs_cpus:
        problems.append(
            f"daemon.reserved_cpus: {reserved!r} leaves no CPU for jobs on this host"
            f" (online CPUs: {online})"
        )
    else:
        findings.append(
            f"CPUs online: {online}; reserved: {reserved or 'none'};"
            f" for jobs: {format_cpulist(jobs_cpus)}"
        )

    def changed(key: str) -> bool:
        return in_force is None or getattr(in_force, key) != getattr(settings, key)

    def refuse(problem: str, caveat: str | None) -> None:
        """A problem, or only a finding when it may be the caller's alone (the caveat)."""
        if caveat is None or as_daemon:
            problems.append(problem)
        else:
            findings.append(f"{problem}; not counted as an error: {caveat}")

    backend, reason = None, ""
    if changed("backend") or changed("cgroup"):
        try:
            backend, reason = choose_backend(
                settings.backend, replace(host, cgroup=settings.cgroup)
            )
        except NoBackend as err:
            caveat = _caller_caveat()
            if caveat is None and settings.backend == "cgroup2" and pid1_is_systemd(host):
                caveat = (
                    "under systemd, cgroup2 depends on the service's own cgroup (Delegate=,"
                    " DelegateSubgroup=), which corecapctl does not run in"
                )
            said = str(err).removeprefix("daemon.backend = ")  # the key leads already
            refuse(f"daemon.backend: {said}", caveat)
        else:
            fenced = not isinstance(backend, AffinityBackend)
            described = f"affinity + {backend.describe()}" if fenced else "affinity"
            findings.append(f"backend: {described} ({reason})")

    priority = settings.realtime_priority
    if priority and changed("realtime_priority"):
        refused = _realtime_refused(priority)
        if refused is None:
            findings.append(f"realtime_priority: SCHED_FIFO {priority} can be had here")
        else:
            refuse(
                f"daemon.realtime_priority: {priority}: cannot switch to SCHED_FIFO on this host:"
                f" {refused} (under systemd, use the unit's CPUSchedulingPolicy= instead)",
                _caller_caveat(),
            )

    if changed("socket"):
        problem = _socket_problem(Path(settings.socket))
        if problem is not None:
            problems.append(f"daemon.socket: {problem}")
        else:
            findings.append(f"socket: {settings.socket}")
    if not as_daemon:  # the daemon has no use for it, and a directory service can be slow
        findings += _unknown_accounts(policy)
    return HostCheck(tuple(problems), tuple(findings), backend, reason)


def _unknown_accounts(policy: Policy) -> list[str]:
    """A finding per user or group named in the policy that this host does not know. A
    number is a user or group without a name (`procfs` names those by their id)."""
    rules = "it matches no process until there is"
    named = [
        (f"rules[{index}].match.users ({rule.name})", entry, rules)
        for index, rule in enumerate(policy.rules)
        for entry in rule.match.users
    ] + [(f"users.{name}", name, "the limit holds no one until there is") for name in policy.users]
    unknown = []
    for where, entry, effect in named:
        group = entry.startswith("@")  # never in [users]: the schema refuses it there
        kind, name = ("group", entry[1:]) if group else ("user", entry)
        if name.isdigit():
            continue
        try:
            (grp.getgrnam if group else pwd.getpwnam)(name)
        except KeyError:
            unknown.append(f"{where}: no {kind} {name!r} on this host: {effect} (a typo?)")
    return unknown


def _caller_caveat() -> str | None:
    """Why what this process may do can differ from what corecapd may, or None."""
    if os.geteuid() == 0:
        return None
    return f"checked as uid {os.geteuid()}, and corecapd runs as root"


def _realtime_refused(priority: int) -> str | None:
    """Why SCHED_FIFO at `priority` cannot be had, tried on a thread that then ends."""
    refused: list[str] = []

    def attempt() -> None:
        try:  # pid 0: the calling thread only
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        except OSError as err:
            refused.append(err.strerror or str(err))

    probe = threading.Thread(target=attempt, name="corecap-realtime-probe")
    probe.start()
    probe.join()
    return refused[0] if refused else None


def _socket_problem(path: Path) -> str | None:
    """Why corecapd could not make its socket at `path`, when this host already says so."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        return f"{path}: cannot be checked: {err.strerror}"
    if mode is not None and not stat.S_ISSOCK(mode):
        return (
            f"{path} exists and is not a socket (corecapd replaces a stale socket, nothing"
            " else): name a free path"
        )
    for parent in path.parents:
        try:
            parent_mode = os.stat(parent).st_mode
        except FileNotFoundError:
            continue  # corecapd creates the missing directories
        except OSError as err:
            return f"{parent}: cannot be checked: {err.strerror}"
        if not stat.S_ISDIR(parent_mode):
            return f"{parent} is not a directory, so {path} cannot be made"
        break
    return None
