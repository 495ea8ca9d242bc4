"""cgroup v1 cpuset: a fence the job cannot widen (sched_setaffinity outside it fails).

Each job gets `<cpuset>/<cgroup>/job-<name>`; one write of a PID to `cgroup.procs` moves
all its threads (6-12 ms here), and its children are born inside. corecapd fences only
processes that sit in the root cpuset: one that Slurm, Kubernetes or a container already put
in a cpuset stays there (its affinity still narrows within it), so outer bounds are never
widened and cgroups corecapd does not own are never written.

Setting up a fence is idempotent and repairs what it finds: a kill -9 can leave a directory
made but its `cpuset.cpus` or `cpuset.mems` never written (the kernel then refuses every
process: ENOSPC), so both are checked, and filled, in our subtree and in the job's cpuset
each time, whether or not the directory was there already.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

from corecapd.cpulist import CpuListError, format_cpulist, parse_cpulist
from corecapd.enforcement import cgroupfs
from corecapd.enforcement.base import Backend, EnforcementError
from corecapd.procfs import ProcessGone, vanishing

JOB_PREFIX = "job-"


class Cgroup1Backend(Backend):
    name = "cgroup1"

    @property
    def mount(self) -> Path:
        return self.host.cgroup_root / "cpuset"

    @property
    def subtree(self) -> Path:
        return self.mount / self.host.cgroup

    def problem(self) -> str | None:
        if not (self.mount / "cpuset.cpus").is_file():
            return f"no cgroup v1 cpuset hierarchy at {self.mount}"
        return None

    def describe(self) -> str:
        return f"cgroup1 ({self.subtree})"

    def confine(self, job: str, pids: Sequence[int], cpus: frozenset[int]) -> int:
        fence = self._fence(job, cpus)
        moved = 0
        for pid in pids:
            where = self._cpuset_of(pid)
            if where is None or where == f"/{self.host.cgroup}/{JOB_PREFIX}{job}":
                continue  # gone, or inside already
            if where != "/":
                continue  # someone else's cpuset: theirs to bound, ours only to narrow within
            moved += cgroupfs.move(pid, fence)
        return moved

    def release(self, job: str, pids: Sequence[int]) -> None:
        fence = self.subtree / f"{JOB_PREFIX}{job}"
        if not fence.is_dir():
            return
        for pid in cgroupfs.procs(fence):  # whatever is still inside goes back where it came from
            cgroupfs.move(pid, self.mount)
        try:
            fence.rmdir()
            if not any(path.is_dir() for path in self.subtree.iterdir()):
                self.subtree.rmdir()  # the last job: leave nothing behind
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.EBUSY):  # EBUSY: a job started meanwhile
                raise EnforcementError(f"cannot remove {fence}: {err.strerror}") from err

    def adopt(self) -> dict[str, frozenset[int]]:
        """Our job cpusets (job name -> CPUs); a half-made one (no CPUs yet) or an
        unreadable one is listed with none, so that it is repaired or removed."""
        return cgroupfs.job_cgroups(self.subtree, JOB_PREFIX, "cpuset.cpus")

    def _fence(self, job: str, cpus: frozenset[int]) -> Path:
        """The job's cpuset with `cpus`: made (with our subtree) when missing, completed
        when half-made."""
        wanted = format_cpulist(cpus)
        fence = self.subtree / f"{JOB_PREFIX}{job}"
        try:
            self.subtree.mkdir(exist_ok=True)
            if not cpus <= _cpus(self.subtree):  # never written, or CPUs came online since
                cgroupfs.write(
                    self.subtree / "cpuset.cpus",
                    cgroupfs.read(self.mount / "cpuset.effective_cpus"),
                )
            if not cgroupfs.read(self.subtree / "cpuset.mems"):
                cgroupfs.write(
                    self.subtree / "cpuset.mems",
                    cgroupfs.read(self.mount / "cpuset.effective_mems"),
                )
            fence.mkdir(exist_ok=True)
            if not cgroupfs.read(fence / "cpuset.mems"):
                cgroupfs.write(fence / "cpuset.mems", cgroupfs.read(self.subtree / "cpuset.mems"))
            if _cpus(fence) != cpus:
                cgroupfs.write(fence / "cpuset.cpus", wanted)
        except OSError as err:
            raise EnforcementError(
                f"cannot make cpuset {self.subtree}/{JOB_PREFIX}{job} with CPUs {wanted}:"
                f" {err.strerror}"
            ) from err
        return fence

    def _cpuset_of(self, pid: int) -> str | None:
        try:
            with vanishing(pid):
                return (self.host.procfs.root / str(pid) / "cpuset").read_text().strip()
        except ProcessGone:
            return None


def _cpus(cpuset: Path) -> frozenset[int]:
    """A cpuset's CPUs; none when what it holds is not a CPU list (then it is written)."""
    try:
        return parse_cpulist(cgroupfs.read(cpuset / "cpuset.cpus"))
    except CpuListError:
        return frozenset()
