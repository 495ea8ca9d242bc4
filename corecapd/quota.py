"""A process's CPU quota (CFS bandwidth), from its cgroups: an edge, read for a diagnosis.

A quota limits how much CPU time a cgroup's threads get per period; it changes no thread
count. Frameworks size their pools from the affinity mask, so a job under a quota of 0.5
CPUs with a 2-CPU mask runs pools of 2 that take turns (docs/diagnosis.md). cgroup v1:
`cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us` in the cpu controller's hierarchy;
cgroup v2: `cpu.max` ("max 100000", or "50000 100000"). A limit of any ancestor applies
too, so the smallest along the path is the job's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from corecapd.diagnosis import Quota
from corecapd.procfs import read_bytes, vanishing


def cpu_quota(
    pid: int, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> Quota | None:
    """The smallest CPU quota over the cgroups of `pid` and their ancestors, None when
    there is none (or no cpu controller is mounted where looked for).

    Raises:
        ProcessGone: `pid` exited.
    """
    with vanishing(pid):
        lines = read_bytes(f"{proc}/{pid}/cgroup").decode(errors="replace").splitlines()
    found: list[Quota] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2's one hierarchy
            found += _quotas(cgroup_root, path, _v2)
        elif "cpu" in controllers.split(","):
            mount = cgroup_root / controllers
            if not mount.is_dir():
                mount = cgroup_root / "cpu"
            found += _quotas(mount, path, _v1)
    return min(found, key=lambda quota: quota.cpus, default=None)


def _quotas(mount: Path, path: str, read: Callable[[Path], Quota | None]) -> list[Quota]:
    """The quotas set on the cgroup at `path` under `mount` and on its ancestors."""
    directory = mount / path.strip("/")
    quotas = []
    for where in (directory, *directory.parents):
        if where == mount.parent:
            break
        quota = read(where)
        if quota is not None:
            quotas.append(quota)
    return quotas


def _v1(where: Path) -> Quota | None:
    try:
        quota = int((where / "cpu.cfs_quota_us").read_text())
        period = int((where / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None  # -1: no limit
    return Quota(quota / period, f"cpu.cfs_quota_us={quota}, cpu.cfs_period_us={period} in {where}")


def _v2(where: Path) -> Quota | None:
    try:
        fields = (where / "cpu.max").read_text().split()
        quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None  # no file here, or "max 100000": no limit
    if quota <= 0 or period <= 0:
        return None
    return Quota(quota / period, f"cpu.max={quota} {period} in {where}")
