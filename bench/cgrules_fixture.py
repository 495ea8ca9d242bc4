"""A temporary cgrulesengd setup for bench/exec_latency.py, restored exactly afterwards.

cgrulesengd (Debian's cgroup-tools, libcgroup 2.0.2) reads its rules only from
/etc/cgrules.conf and refuses to start without /etc/cgconfig.conf and the directory
/etc/cgconfig.d. It also leaves its socket /run/cgred.socket behind when stopped. So:

- what exists at those paths is recorded first (kind, mode, owner, size, sha256, mtime);
- an existing /etc/cgrules.conf is renamed aside (same inode, mode, owner and times) and
  renamed back afterwards; a missing cgconfig.conf / cgconfig.d is created empty and removed
  afterwards; an existing one is left untouched (our rule names no template);
- one cgroup v1 cpuset, <cpuset mount>/corecap-bench-TAG, with `cpuset.cpus` = the target CPU
  and `cpuset.mems` copied from its parent, is made and removed (never moving any task:
  only our own children are ever classified into it, and they are gone by then);
- afterwards every path is recorded again and compared with the first record.

Usage: `with CgrulesFixture(exe_name, tag, cpu) as fixture: ...` (restores on any exit).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CGRULES = Path("/etc/cgrules.conf")
CGCONFIG = Path("/etc/cgconfig.conf")
CGCONFIG_D = Path("/etc/cgconfig.d")
CGRED_SOCKET = Path("/run/cgred.socket")
WATCHED = (CGRULES, CGCONFIG, CGCONFIG_D, CGRED_SOCKET)


class FixtureError(Exception):
    pass


@dataclass(frozen=True)
class PathRecord:
    """What was at a path: enough to tell whether it was restored exactly."""

    path: Path
    kind: str  # "absent" | "file" | "dir" | "symlink" | "socket" | "other"
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    ino: int = 0
    digest: str = ""  # sha256 of a file, sorted listing of a directory, target of a symlink

    def describe(self) -> str:
        if self.kind == "absent":
            return f"{self.path}: absent"
        detail = f"{self.path}: {self.kind}, mode {stat.S_IMODE(self.mode):04o}"
        detail += f", uid {self.uid} gid {self.gid}"
        if self.kind == "file":
            detail += f", {self.size} bytes, sha256 {self.digest[:16]}"
        elif self.kind in ("dir", "symlink"):
            detail += f", {self.digest or 'empty'}"
        return detail


def record(path: Path) -> PathRecord:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return PathRecord(path, "absent")
    digest = ""
    if stat.S_ISREG(st.st_mode):
        kind = "file"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    elif stat.S_ISDIR(st.st_mode):
        kind = "dir"
        digest = "entries: " + ", ".join(sorted(os.listdir(path))) if os.listdir(path) else ""
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
        digest = "-> " + os.readlink(path)
    elif stat.S_ISSOCK(st.st_mode):
        kind = "socket"
    else:
        kind = "other"
    return PathRecord(
        path, kind, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino, digest
    )


def cpuset_mount() -> Path:
    """The cgroup v1 hierarchy that has the cpuset controller."""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 4 and fields[2] == "cgroup" and "cpuset" in fields[3].split(","):
                return Path(fields[1])
    raise FixtureError("no cgroup v1 cpuset hierarchy is mounted (cgrulesengd needs one here)")


def running_cgrulesengd() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == "cgrulesengd":
                    pids.append(int(entry))
    return pids


class CgrulesFixture:
    """Rule `*:EXE_NAME cpuset corecap-bench-TAG/` and its cpuset, for the duration of a `with`."""

    def __init__(self, exe_name: str, tag: str, cpu: int) -> None:
        if len(exe_name) > 15:
            # cgrulesengd compares /proc/PID/status Name (15 chars) with the exe's basename.
            raise FixtureError(f"{exe_name!r}: keep the name within 15 characters")
        self.exe_name = exe_name
        self.cpu = cpu
        self.group_name = f"corecap-bench-{tag}"
        self.group = cpuset_mount() / self.group_name
        self.rule = f"*:{exe_name}\tcpuset\t{self.group_name}/\n"
        self.aside = CGRULES.with_name(f"{CGRULES.name}.corecap-bench-{tag}")
        self.before: dict[Path, PathRecord] = {}
        self.after: dict[Path, PathRecord] = {}
        self._created: list[Path] = []
        self._moved_aside = False
        self._group_made = False
        self.problems: list[str] = []

    def __enter__(self) -> CgrulesFixture:
        others = running_cgrulesengd()
        if others:
            raise FixtureError(f"a cgrulesengd is already running (PID {others}); not touching it")
        self.before = {path: record(path) for path in WATCHED}
        try:
            self._set_up()
        except BaseException:
            self.restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def _set_up(self) -> None:
        if self.before[CGRULES].kind != "absent":
            os.rename(CGRULES, self.aside)
            self._moved_aside = True
        self._created.append(CGRULES)
        fd = os.open(CGRULES, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as rules:
            rules.write(f"# corecap bench/exec_latency.py, temporary\n{self.rule}")
        if self.before[CGCONFIG].kind == "absent":
            self._created.append(CGCONFIG)
            os.close(os.open(CGCONFIG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        if self.before[CGCONFIG_D].kind == "absent":
            self._created.append(CGCONFIG_D)
            os.mkdir(CGCONFIG_D, 0o755)
        os.mkdir(self.group)
        self._group_made = True
        mems = (self.group.parent / "cpuset.mems").read_text().strip()
        (self.group / "cpuset.mems").write_text(mems)
        (self.group / "cpuset.cpus").write_text(str(self.cpu))

    def group_tasks(self) -> list[int]:
        try:
            return [int(line) for line in (self.group / "tasks").read_text().split()]
        except FileNotFoundError:
            return []

    def restore(self) -> None:
        """Undo everything; each step runs even when an earlier one failed."""
        steps = [self._remove_group, *self._path_steps()]
        for step in steps:
            try:
                step()
            except (OSError, FixtureError) as err:
                self.problems.append(str(err))
        self.after = {path: record(path) for path in WATCHED}
        for path, old in self.before.items():
            new = self.after[path]
            same = (old.kind, old.mode, old.uid, old.gid, old.digest) == (
                new.kind,
                new.mode,
                new.uid,
                new.gid,
                new.digest,
            )
            if old.kind in ("file", "symlink", "other") and same:
                same = (old.ino, old.mtime_ns) == (new.ino, new.mtime_ns)
            if not same:
                self.problems.append(f"not restored: was {old.describe()}; now {new.describe()}")

    def _remove_group(self) -> None:
        if not self._group_made:
            return
        # Exited tasks leave the cgroup asynchronously; never move a task out of it.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                os.rmdir(self.group)
                self._group_made = False
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise FixtureError(
                        f"cgroup {self.group} still holds tasks {self.group_tasks()};"
                        " left in place (remove it with rmdir once they are gone)"
                    ) from None
                time.sleep(0.05)

    def _path_steps(self) -> list[Callable[[], None]]:
        steps: list[Callable[[], None]] = []
        for path in reversed(self._created):
            if path == CGCONFIG_D:
                steps.append(
                    functools.partial(os.rmdir, CGCONFIG_D)
                )  # fails, reported, if not empty
            else:
                steps.append(functools.partial(path.unlink, missing_ok=True))
        self._created = []
        if self._moved_aside:
            steps.append(functools.partial(os.rename, self.aside, CGRULES))
            self._moved_aside = False
        steps.append(self._remove_socket)
        return steps

    def _remove_socket(self) -> None:
        """cgrulesengd leaves /run/cgred.socket behind; remove it only if we caused it."""
        if self.before[CGRED_SOCKET].kind == "absent" and record(CGRED_SOCKET).kind == "socket":
            CGRED_SOCKET.unlink()
