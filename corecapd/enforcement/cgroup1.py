"""cgroup v1 cpuset: a fence the job cannot widen (sched_setaffinity outside it fails).

Each job gets `<cpuset>/<cgroup>/job-<name>`; one write of a PID to `cgroup.procs` moves
all its threads (6-12 ms here), and its children are born inside. corecapd fences only
processes that sit in the root cpuset: one that Slurm, Kubernetes or a container already put
in a cpuset stays there (its affinity still narrows within it), so outer bounds are never
widened and cgroups corecapd does not own are never written.

Setting up a fence is idempotent and repairs what it finds: a kill -9 can leave a directory
made but its `cpuset.cpus` or `cpuset.mems` never written (the kernel then refuses every
process: ENOSPC), so both are checked, and filled, in our subtree and in the job's cpuset
whenever a job's fence is set up (a new job, a new grant, one adopted from a previous daemon,
or one removed behind our back), whether or not the directory was there already. A job's later
confines (every scan) only move what is not inside yet.

A run of short jobs (a shell loop of Python scripts) makes no cpuset per job: an ended job's
emptied cpuset is renamed `spare-<n>` (cgroup v1 renames within a parent) and renamed again for
the next job, and the subtree stays. Both go once the fence work has been idle a moment
(`tidy`), so that nothing is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

from corecapd.cpulist import CpuListError, format_cpulist, parse_cpulist
from corecapd.enforcement import cgroupfs
from corecapd.enforcement.base import Backend, EnforcementError, Host
from corecapd.procfs import ProcessGone, read_bytes, vanishing

JOB_PREFIX = "job-"
SPARE_PREFIX = "spare-"
MAX_SPARES = 4


class Cgroup1Backend(Backend):
    name = "cgroup1"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        # What this daemon set up and nobody has undone since (job -> CPUs; the subtree's
        # CPUs), so that a scan's confine of a job fenced already reads nothing of it again
        # (every scan confines every job: four cpuset reads per job, each time, before).
        self._fenced: dict[str, frozenset[int]] = {}
        self._subtree_cpus: frozenset[int] = frozenset()
        # Emptied job cpusets kept for the next jobs (name -> CPUs): renaming one took 8 us
        # here, making a cpuset and writing its CPUs and memory nodes 160 us (hot loops).
        self._spares: dict[str, frozenset[int]] = {}
        self._serial = itertools.count()

    @functools.cached_property
    def mount(self) -> Path:
        return self.host.cgroup_root / "cpuset"

    @functools.cached_property
    def subtree(self) -> Path:
        return self.mount / self.host.cgroup

    def problem(self) -> str | None:
        if not (self.mount / "cpuset.cpus").is_file():
            return f"no cgroup v1 cpuset hierarchy at {self.mount}"
        return None

    def describe(self) -> str:
        return f"cgroup1 ({self.subtree})"

    def confine(self, job: str, pids: Sequence[int], cpus: frozenset[int]) -> int:
        fence = self._fence_path(job)
        if self._fenced.get(job) != cpus:
            self._fence(job, cpus)
        inside = f"/{self.host.cgroup}/{JOB_PREFIX}{job}"
        moved = 0
        for pid in pids:
            where = self._cpuset_of(pid)
            if where is None or where == inside:
                continue  # gone, or inside already
            if where != "/":
                continue  # someone else's cpuset: theirs to bound, ours only to narrow within
            try:
                moved += cgroupfs.move(pid, fence)
            except EnforcementError:  # the fence was removed behind our back: set it up again
                if self._fenced.pop(job, None) is None:
                    raise
                self._subtree_cpus = frozenset()
                self._fence(job, cpus)
                moved += cgroupfs.move(pid, fence)
        return moved

    def release(self, job: str, pids: Sequence[int]) -> None:
        cpus = self._fenced.pop(job, None)
        fence = self._fence_path(job)
        try:
            for pid in cgroupfs.procs(fence):  # what is still inside goes back
                cgroupfs.move(pid, self.mount)
            if cpus is not None and len(self._spares) < MAX_SPARES:
                spare = f"{SPARE_PREFIX}{next(self._serial)}"
                os.rename(fence, f"{self.subtree}/{spare}")
                self._spares[spare] = cpus
            else:
                os.rmdir(fence)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.EBUSY):  # EBUSY: a task is still leaving
                raise EnforcementError(f"cannot remove {fence}: {err.strerror}") from err

    def tidy(self) -> None:
        """The spare cpusets go, and the subtree once it holds no job's cpuset (rmdir
        refuses a cgroup with children: EBUSY), so that nothing is left behind. Spares a
        previous daemon left are found by name."""
        self._spares.clear()
        try:
            with os.scandir(self.subtree) as entries:
                spares = [e.path for e in entries if e.name.startswith(SPARE_PREFIX)]
            for spare in spares:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(spare)
            if not self._fenced:
                self._subtree_cpus = frozenset()
                self.subtree.rmdir()
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.EBUSY):  # EBUSY: an adopted job's is left
                raise EnforcementError(f"cannot tidy {self.subtree}: {err.strerror}") from err

    def adopt(self) -> dict[str, frozenset[int]]:
        """Our job cpusets (job name -> CPUs); a half-made one (no CPUs yet) or an
        unreadable one is listed with none, so that it is repaired or removed."""
        return cgroupfs.job_cgroups(self.subtree, JOB_PREFIX, "cpuset.cpus")

    def _fence(self, job: str, cpus: frozenset[int]) -> None:
        """The job's cpuset with `cpus`: made (with our subtree) when missing, completed
        when half-made. A cpuset just made has nothing to read: the writes follow."""
        fence = Path(self._fence_path(job))
        wanted = format_cpulist(cpus)
        try:
            if not cpus <= self._subtree_cpus:
                self._subtree_cpus = self._set_up_subtree(cpus)
            if self._reuse_spare(fence, cpus):
                self._fenced[job] = cpus
                return
            try:
                fence.mkdir()
                fresh = True
            except FileExistsError:
                fresh = False
            if fresh or not cgroupfs.read(fence / "cpuset.mems"):
                cgroupfs.write(fence / "cpuset.mems", cgroupfs.read(self.subtree / "cpuset.mems"))
            if fresh or _cpus(fence) != cpus:
                cgroupfs.write(fence / "cpuset.cpus", wanted)
        except OSError as err:
            self._subtree_cpus = frozenset()  # found again, in full, next time
            raise EnforcementError(
                f"cannot make cpuset {fence} with CPUs {wanted}: {err.strerror}"
            ) from err
        self._fenced[job] = cpus

    def _fence_path(self, job: str) -> str:
        """The job's cpuset, as a string: see cgroupfs.move."""
        return f"{self.subtree}/{JOB_PREFIX}{job}"

    def _reuse_spare(self, fence: Path, cpus: frozenset[int]) -> bool:
        """Rename a spare cpuset (one with `cpus` if there is one) to `fence`, and give it
        `cpus`: one rename for a mkdir and two writes. False when there is none, or the
        rename fails (`fence` exists, or the spare went): the caller makes `fence`."""
        if not self._spares:
            return False
        spare = next((name for name, held in self._spares.items() if held == cpus), None)
        spare = spare or next(iter(self._spares))
        held = self._spares.pop(spare)
        try:
            os.rename(f"{self.subtree}/{spare}", fence)
        except OSError:
            self._spares[spare] = held
            return False
        if held != cpus:
            cgroupfs.write(fence / "cpuset.cpus", format_cpulist(cpus))
        return True

    def _set_up_subtree(self, cpus: frozenset[int]) -> frozenset[int]:
        """Our subtree, made when missing and given every CPU and memory node when it has
        too few (never written, or CPUs came online since). Returns its CPUs."""
        self.subtree.mkdir(exist_ok=True)
        held = _cpus(self.subtree)
        if not cpus <= held:
            cgroupfs.write(
                self.subtree / "cpuset.cpus", cgroupfs.read(self.mount / "cpuset.effective_cpus")
            )
            held = _cpus(self.subtree)
        if not cgroupfs.read(self.subtree / "cpuset.mems"):
            cgroupfs.write(
                self.subtree / "cpuset.mems", cgroupfs.read(self.mount / "cpuset.effective_mems")
            )
        return held

    def _cpuset_of(self, pid: int) -> str | None:
        try:
            with vanishing(pid):
                return read_bytes(f"{self.host.procfs.root}/{pid}/cpuset").decode().strip()
        except ProcessGone:
            return None


def _cpus(cpuset: Path) -> frozenset[int]:
    """A cpuset's CPUs; none when what it holds is not a CPU list (then it is written)."""
    try:
        return parse_cpulist(cgroupfs.read(cpuset / "cpuset.cpus"))
    except CpuListError:
        return frozenset()
