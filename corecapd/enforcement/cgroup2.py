"""cgroup v2 cpuset in a subtree corecapd owns: a fence the job cannot widen.

Which subtree is corecapd's: on a systemd host, the cgroup systemd delegated to its service
(`Delegate=yes`, marked by systemd's `trusted.delegate` / `user.delegate` xattr), with corecapd
itself in a subgroup of it (`DelegateSubgroup=supervisor`, systemd >= 254: a cgroup that hands
controllers to its children may hold no processes); without systemd, the cgroup2 mount (the
mount is `/sys/fs/cgroup`, or `.../unified` on a hybrid host, whose unified hierarchy usually
has no cpuset controller). corecapd enables `+cpuset` down to `<owned>/<cgroup>`, and each job
gets a leaf `<owned>/<cgroup>/job-<name>` whose `cpuset.cpus` is the grant. One write of a PID
to `cgroup.procs` moves all its threads; children are born inside.

With `KillMode=process` (systemd/cgroup2.conf) a stop, a restart or a crash of corecapd ends
corecapd only: systemd starts the next one in the subgroup again, the jobs stay in their
fences, and the new daemon adopts them by name. Run in the root of its delegated cgroup,
corecapd refuses: systemd could not start it there again once jobs are fenced (219/CGROUP),
and the jobs would go with the service.

Only that subtree is ever written. A process whose cgroup (other than the root and ours) has a
narrower effective cpuset than the host stays where it is: Slurm, Kubernetes or a container
bounds it, and its affinity still narrows within. A job that ends with processes left has its
cgroup widened to all its parent's CPUs, and removed once empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corecapd.cpulist import CpuListError, format_cpulist, parse_cpulist
from corecapd.enforcement import cgroupfs
from corecapd.enforcement.base import Backend, EnforcementError, Host
from corecapd.procfs import ProcessGone, vanishing

JOB_PREFIX = "job-"
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")  # systemd >= 251 sets them
EXIT_WAIT_STEP, EXIT_WAIT_STEPS = 0.01, 100  # up to a second for exiting tasks to leave


@dataclass(frozen=True)
class Layout:
    """Where corecapd may write: `owned` (the root, or its delegated cgroup) and below."""

    mount: Path  # the cgroup2 mount
    owned: Path
    subtree: Path  # owned / <cgroup>: the job cgroups' parent

    def cgroup(self, path: Path) -> str:
        """The kernel's name of the cgroup at `path`, as in /proc/PID/cgroup."""
        relative = path.relative_to(self.mount).as_posix()
        return "/" if relative == "." else f"/{relative}"


class Cgroup2Backend(Backend):
    name = "cgroup2"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._layout: Layout | str | None = None  # the layout, or why there is none
        self._prepared = False
        self._released: set[str] = set()  # widened job cgroups to remove once empty

    def problem(self) -> str | None:
        layout = self._find_layout()
        return layout if isinstance(layout, str) else None

    def describe(self) -> str:
        layout = self._find_layout()
        return f"cgroup2 ({layout.subtree})" if isinstance(layout, Layout) else "cgroup2"

    def confine(self, job: str, pids: Sequence[int], cpus: frozenset[int]) -> int:
        layout = self._ready()
        self._sweep(layout)
        fence = self._fence(layout, job, cpus)
        inside, ours = layout.cgroup(fence), layout.cgroup(layout.subtree)
        moved = 0
        for pid in pids:
            where = cgroup_of(self.host, pid)
            if where is None or within(where, inside):
                continue  # gone, or inside already
            if where != "/" and not within(where, ours):
                bound = effective_cpus(layout.mount, where)
                if bound is not None and not self.host.online_cpus <= bound:
                    continue  # someone else's cpuset: theirs to bound, ours only to narrow within
            moved += cgroupfs.move(pid, fence)
        return moved

    def release(self, job: str, pids: Sequence[int]) -> None:
        layout = self._find_layout()
        if not isinstance(layout, Layout):
            return
        self._sweep(layout)
        fence = layout.subtree / f"{JOB_PREFIX}{job}"
        if not fence.is_dir() or _remove(fence) or _remove_once_exited(fence):
            self._remove_subtree(layout)
            return
        try:  # processes are left: let them go now, remove the cgroup once they are gone
            # (all the parent's CPUs: the kernel refuses an empty cpuset.cpus with tasks)
            cgroupfs.write(
                fence / "cpuset.cpus", cgroupfs.read(layout.subtree / "cpuset.cpus.effective")
            )
        except FileNotFoundError:
            return  # removed meanwhile
        except OSError as err:
            raise EnforcementError(f"cannot widen {fence} for the processes left: {err}") from err
        self._released.add(job)

    def adopt(self) -> dict[str, frozenset[int]]:
        """Our job cgroups (job name -> CPUs); a half-made one (no CPUs yet, or no cpuset
        controller yet) or an unreadable one is listed with none, to be repaired or removed."""
        layout = self._find_layout()
        if not isinstance(layout, Layout):
            return {}
        return cgroupfs.job_cgroups(layout.subtree, JOB_PREFIX, "cpuset.cpus")

    def _find_layout(self) -> Layout | str:
        if self._layout is None:
            self._layout = find_layout(self.host)
        return self._layout

    def _ready(self, check: bool = False) -> Layout:
        """The layout, with `+cpuset` enabled down to our subtree: checked, and enabled
        where it is not (a crash can leave the subtree made but not enabled), at the first
        confine and when `check`; afterwards only while the subtree is there."""
        layout = self._find_layout()
        if isinstance(layout, str):
            raise EnforcementError(f"cgroup2 cannot work here: {layout}")
        if self._prepared and not check and layout.subtree.is_dir():
            return layout
        try:
            _enable_cpuset(layout.owned)
            layout.subtree.mkdir(exist_ok=True)
            _enable_cpuset(layout.subtree)
        except OSError as err:
            raise EnforcementError(
                f"cannot enable the cpuset controller down to {layout.subtree}: {err}"
            ) from err
        self._prepared = True
        return layout

    def _fence(self, layout: Layout, job: str, cpus: frozenset[int]) -> Path:
        """The job's cgroup with `cpus`: made when missing, completed when half-made (made,
        its CPUs never written, or made before the subtree had the cpuset controller);
        checked against the kernel."""
        fence = layout.subtree / f"{JOB_PREFIX}{job}"
        wanted = format_cpulist(cpus)
        try:
            fence.mkdir(exist_ok=True)
            if not (fence / "cpuset.cpus").is_file():  # no controller there: enable it again
                self._ready(check=True)
            if _cpus(fence / "cpuset.cpus") != cpus:
                cgroupfs.write(fence / "cpuset.cpus", wanted)
            effective = fence / "cpuset.cpus.effective"
            granted = parse_cpulist(cgroupfs.read(effective)) if effective.is_file() else cpus
        except OSError as err:
            raise EnforcementError(f"cannot make {fence} with CPUs {wanted}: {err}") from err
        if granted != cpus:  # the kernel falls back to the parent's CPUs: never a fence
            parent = effective_cpus(layout.mount, layout.cgroup(layout.subtree)) or ()
            raise EnforcementError(
                f"{fence} has effective CPUs {format_cpulist(granted)}, not {wanted}:"
                f" outside its parent's ({format_cpulist(parent)})"
            )
        self._released.discard(job)
        return fence

    def _sweep(self, layout: Layout) -> None:
        """Remove the widened job cgroups whose last process has gone."""
        for job in list(self._released):
            if _remove(layout.subtree / f"{JOB_PREFIX}{job}"):
                self._released.discard(job)

    def _remove_subtree(self, layout: Layout) -> None:
        """The last job took the subtree with it: leave nothing behind."""
        with contextlib.suppress(OSError):  # EBUSY: a job started meanwhile
            if not any(path.is_dir() for path in layout.subtree.iterdir()):
                layout.subtree.rmdir()
                self._prepared = False


def find_layout(host: Host) -> Layout | str:
    """Where corecapd's cgroup v2 subtree is on this host, or why it has none."""
    mount = unified_mount(host.cgroup_root)
    if mount is None:
        return f"no cgroup v2 hierarchy at {host.cgroup_root} or {host.cgroup_root / 'unified'}"
    try:
        own = _cgroup_in((host.procfs.root / "self" / "cgroup").read_text())
    except OSError as err:
        return f"cannot read corecapd's own cgroup: {err}"
    if pid1_is_systemd(host):
        if own is None or own == "/":
            return "systemd is PID 1 but corecapd runs in the root cgroup: no delegated cgroup"
        owned = mount / own.lstrip("/")
        if delegated(owned):
            return (
                f"corecapd runs in the root of its delegated cgroup {own}: once jobs are fenced"
                " below it, systemd could not start corecapd there again (a cgroup that hands"
                " the cpuset controller to its children may hold no processes), and the jobs"
                " would be stopped with the service. Run it in a subgroup and let a stop end"
                " corecapd only: DelegateSubgroup=supervisor and KillMode=process (systemd >="
                ' 254; the drop-in systemd/cgroup2.conf), or use backend = "systemd"'
            )
        owned = owned.parent
        if owned == mount or not delegated(owned):
            return (
                f"neither corecapd's cgroup {own} nor its parent is delegated to it (run it as a"
                " systemd service with Delegate=yes and DelegateSubgroup=supervisor: the drop-in"
                " systemd/cgroup2.conf)"
            )
    else:
        owned = mount
    try:
        controllers = cgroupfs.read(owned / "cgroup.controllers").split()
    except OSError as err:
        return f"cannot read the controllers of {owned}: {err.strerror}"
    if "cpuset" not in controllers:
        hybrid = mount != host.cgroup_root
        return f"no cpuset controller in the cgroup v2 hierarchy at {owned}" + (
            " (a hybrid host: cpuset belongs to cgroup v1 here)" if hybrid else ""
        )
    for name in ("cgroup.subtree_control", "cgroup.procs"):
        if not os.access(owned / name, os.W_OK):
            return (
                f"cannot write {owned / name}: read-only (under systemd, ProtectKernelTunables="
                f" and ProtectControlGroups= make it so; ReadWritePaths={owned} undoes that)"
            )
    return Layout(mount, owned, owned / host.cgroup)


def unified_mount(cgroup_root: Path) -> Path | None:
    """The cgroup2 mount: `cgroup_root` itself (pure v2), or `unified` below it (hybrid)."""
    for mount in (cgroup_root, cgroup_root / "unified"):
        if (mount / "cgroup.controllers").is_file():
            return mount
    return None


def pid1_is_systemd(host: Host) -> bool:
    try:
        return (host.procfs.root / "1" / "comm").read_text().strip() == "systemd"
    except OSError:
        return False


def delegated(cgroup: Path) -> bool:
    """systemd marks the cgroup of a unit with Delegate=yes (trusted.* needs CAP_SYS_ADMIN)."""
    for name in DELEGATE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(cgroup, name) == b"1":
                return True
    return False


def cgroup_of(host: Host, pid: int) -> str | None:
    """The process's cgroup v2 path ("0::" in /proc/PID/cgroup), or None when it is gone."""
    try:
        with vanishing(pid):
            return _cgroup_in((host.procfs.root / str(pid) / "cgroup").read_text())
    except ProcessGone:
        return None


def _cgroup_in(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def within(cgroup: str, ancestor: str) -> bool:
    return cgroup == ancestor or cgroup.startswith(ancestor.rstrip("/") + "/")


def effective_cpus(mount: Path, cgroup: str) -> frozenset[int] | None:
    """The CPUs that bound a cgroup: its nearest ancestor-or-self with the cpuset controller."""
    where = mount / cgroup.lstrip("/")
    for directory in (where, *where.parents):
        try:
            return parse_cpulist(cgroupfs.read(directory / "cpuset.cpus.effective"))
        except FileNotFoundError:
            if directory == mount:
                break
    return None


def _cpus(path: Path) -> frozenset[int]:
    """A cgroup's CPU list; none when it holds no list (then it is written)."""
    try:
        return parse_cpulist(cgroupfs.read(path))
    except CpuListError:
        return frozenset()


def _enable_cpuset(cgroup: Path) -> None:
    if "cpuset" not in cgroupfs.read(cgroup / "cgroup.subtree_control").split():
        cgroupfs.write(cgroup / "cgroup.subtree_control", "+cpuset")


def _remove(cgroup: Path) -> bool:
    """rmdir a job cgroup; False while processes are left in it."""
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        return True
    except OSError as err:
        if err.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise EnforcementError(f"cannot remove {cgroup}: {err.strerror}") from err
    return True


def _remove_once_exited(cgroup: Path) -> bool:
    """rmdir a cgroup whose last tasks are still exiting (not in cgroup.procs any more, but
    the cgroup stays populated for a moment): a short wait on the fence worker."""
    for _ in range(EXIT_WAIT_STEPS):
        if cgroupfs.procs(cgroup):
            return False  # live processes: not a matter of waiting
        time.sleep(EXIT_WAIT_STEP)
        if _remove(cgroup):
            return True
    return False
