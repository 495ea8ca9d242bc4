"""Reading and writing cgroup files, the same in v1 and v2: one place for their errors."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

from corecapd.enforcement.base import EnforcementError


def read(path: Path) -> str:
    return path.read_text().strip()


def write(path: Path, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def procs(cgroup: Path) -> list[int]:
    """The processes in `cgroup`; none when it is gone."""
    with contextlib.suppress(FileNotFoundError):
        return [int(line) for line in read(cgroup / "cgroup.procs").split()]
    return []


def move(pid: int, cgroup: Path) -> int:
    """Move the whole process (all its threads) into `cgroup`: 1, or 0 if it exited."""
    try:
        write(cgroup / "cgroup.procs", str(pid))
    except ProcessLookupError:
        return 0
    except OSError as err:
        if err.errno == errno.ESRCH:
            return 0
        raise EnforcementError(f"cannot move PID {pid} into {cgroup}: {err.strerror}") from err
    return 1
