"""Reading and writing cgroup files, the same in v1 and v2: one place for their errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from corecapd.cpulist import CpuListError, parse_cpulist
from corecapd.enforcement.base import EnforcementError


def read(path: Path) -> str:
    return path.read_text().strip()


def write(path: Path, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


# `procs` and `move` are on the exec path's fence work: plain strings and os calls, as in
# procfs.read_bytes (pathlib and file objects cost several times the syscalls there).


def procs(cgroup: Path | str) -> list[int]:
    """The processes in `cgroup`; none when it is gone. Read to the end: the kernel gives
    a page of a cgroup file per read (~500 PIDs), however large the buffer."""
    chunks = []
    try:
        fd = os.open(f"{cgroup}/cgroup.procs", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return [int(pid) for pid in b"".join(chunks).split()]


def move(pid: int, cgroup: Path | str) -> int:
    """Move the whole process (all its threads) into `cgroup`: 1, or 0 if it exited."""
    try:
        fd = os.open(f"{cgroup}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"%d" % pid)
        finally:
            os.close(fd)
    except ProcessLookupError:
        return 0
    except OSError as err:
        if err.errno == errno.ESRCH:
            return 0
        raise EnforcementError(f"cannot move PID {pid} into {cgroup}: {err.strerror}") from err
    return 1


def job_cgroups(parent: Path, prefix: str, cpus_file: str) -> dict[str, frozenset[int]]:
    """The job cgroups below `parent` (job name -> their CPUs), as a previous daemon left
    them: one made but never given CPUs (a crash between two writes), or whose CPUs cannot
    be read, is listed with none; what is not a directory is not a job's."""
    jobs: dict[str, frozenset[int]] = {}
    try:
        entries = list(parent.iterdir())
    except FileNotFoundError:
        return jobs
    except OSError as err:
        raise EnforcementError(f"cannot list {parent}: {err.strerror}") from err
    for path in entries:
        if not path.name.startswith(prefix) or not path.is_dir():
            continue
        try:
            cpus = parse_cpulist(read(path / cpus_file))
        except (OSError, CpuListError):
            cpus = frozenset()
        jobs[path.name.removeprefix(prefix)] = cpus
    return jobs
