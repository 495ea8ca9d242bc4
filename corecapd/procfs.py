"""Reading processes from /proc: the one place that knows its formats and races.

A process can exit between any two reads; every reader turns that into `ProcessGone`, and
callers skip the PID for this scan. `Scanner` reads what the core needs each scan with one
/proc/PID/stat read per process (start time, parent, threads, CPU time all come from it:
psutil would read stat and status separately, see bench/scan_cost.py), and the slower,
once-per-process facts (exe, cmdline, users, libraries) only on first sight or on request.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
from collections.abc import Generator, Iterable
from functools import lru_cache
from pathlib import Path

from corecapd.cpulist import parse_cpulist
from corecapd.model import Identity, Observed, ProcKey, Sample

PF_KTHREAD = 0x00200000  # include/linux/sched.h
PF_EXITING = 0x00000004
SIGKILL_BIT = 1 << 8  # signal 9 in the SigPnd mask of /proc/PID/task/TID/status
_VANISHED = (errno.ENOENT, errno.ESRCH)
READ_SIZE = 16384  # stat, status, cmdline and cpuset fit in one read
# Bytes of a command line read and matched (rules' `cmdline`): a job chooses its arguments,
# up to ARG_MAX (2 MiB here), and a 1 MB one cost the exec path 2.3 ms to read and search
# (measured) against ~0.12 ms for the whole path; a rule's words sit near the start.
MAX_CMDLINE = 64 * 1024
SCAN_BREAK = 16  # processes, ~0.3 ms of a scan here; each break costs one recv (~3 us)


class ProcessGone(Exception):
    """The process exited (or turned zombie) while we were reading it."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"process {pid} is gone")
        self.pid = pid


class vanishing:  # lower case: it reads like a function, `with vanishing(pid):`
    """Translate the errors of a process that exited mid-read into `ProcessGone`.

    A class, not @contextmanager: it wraps every read of every scan, and a generator-based
    context manager costs about as much as the read itself."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: object
    ) -> None:
        if isinstance(err, OSError) and err.errno in _VANISHED:
            raise ProcessGone(self.pid) from err


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """A whole /proc file (at most about `limit` bytes) with os.open/os.read: builtin
    open() builds file objects that cost more than the read itself (the exec path reads
    four files: ~100 us saved there, measured with fresh processes)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, READ_SIZE)]
        read = len(chunks[0])
        # procfs reads are short only at the end
        while len(chunks[-1]) == READ_SIZE and (limit is None or read < limit):
            chunks.append(os.read(fd, READ_SIZE))
            read += len(chunks[-1])
        return b"".join(chunks)
    finally:
        os.close(fd)


def online_cpus(sys_root: Path = Path("/sys")) -> frozenset[int]:
    return parse_cpulist((sys_root / "devices/system/cpu/online").read_text())


class ProcFS:
    def __init__(
        self,
        root: Path = Path("/proc"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        own_cgroup: str = "corecap",
    ) -> None:
        self.root = root
        self.cgroup_root = cgroup_root
        self.own_cgroup = own_cgroup
        self._prefix = f"{root}/"  # plain strings: pathlib costs a third of a scan here
        self.clock_ticks = os.sysconf("SC_CLK_TCK")
        self.boot_time = self._boot_time()

    def _boot_time(self) -> float:
        for line in (self.root / "stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
        raise RuntimeError(f"no btime line in {self.root / 'stat'}")

    def pids(self) -> list[int]:
        return [int(name) for name in os.listdir(self.root) if name.isdigit()]

    def thread_ids(self, pid: int) -> list[int]:
        with vanishing(pid):
            return [int(name) for name in os.listdir(f"{self._prefix}{pid}/task")]

    def sample(self, pid: int) -> Sample:
        with vanishing(pid):
            raw = read_bytes(f"{self._prefix}{pid}/stat")
        # comm (field 2) may hold spaces and parentheses: split after its last ")".
        fields = raw[raw.rindex(b")") + 2 :].split()
        marks = fields[23:26]  # startcode, endcode, startstack
        if fields[0] in (b"Z", b"X"):
            if fields[17] == b"1":
                raise ProcessGone(pid)
            # The leader thread exited (pthread_exit in main is legal) and other threads run
            # on: the process lives until its last thread ends. The leader's stat lost the
            # memory map; a live thread's has it (one mm per process).
            marks = self._live_thread_marks(pid)
        start_ticks = int(fields[19])
        return Sample(
            key=ProcKey(pid, start_ticks),
            ppid=int(fields[1]),
            threads=int(fields[17]),
            cpu_seconds=(int(fields[11]) + int(fields[12])) / self.clock_ticks,
            started_at=self.boot_time + start_ticks / self.clock_ticks,
            kernel_thread=bool(int(fields[6]) & PF_KTHREAD),
            exec_mark=hash(tuple(marks)),
        )

    def _live_thread_marks(self, pid: int) -> list[bytes]:
        """startcode, endcode and startstack from a live thread of a process whose leader
        exited; ProcessGone when none runs on."""
        for tid in self.thread_ids(pid):
            try:
                with vanishing(pid):
                    raw = read_bytes(f"{self._prefix}{pid}/task/{tid}/stat")
            except ProcessGone:
                continue
            fields = raw[raw.rindex(b")") + 2 :].split()
            if fields[0] not in (b"Z", b"X"):
                return fields[23:26]
        raise ProcessGone(pid)

    def lives_on(self, pid: int) -> bool:
        """Whether the process of a leader thread that exited still runs: a thread of it is
        neither exiting nor killed. A process ends with its last thread: after pthread_exit
        in main the others run on, while exit_group (exit(), a fatal signal) first queues
        SIGKILL to every other thread, so they show it pending or are exiting already."""
        try:
            tids = self.thread_ids(pid)
        except ProcessGone:
            return False
        for tid in tids:
            if tid == pid:
                continue
            task = f"{self._prefix}{pid}/task/{tid}"
            try:
                with vanishing(pid):
                    stat = read_bytes(f"{task}/stat")
                    status = read_bytes(f"{task}/status")
            except ProcessGone:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            exiting = fields[0] in (b"Z", b"X") or int(fields[6]) & PF_EXITING
            if not exiting and not int(_status_field(status, b"SigPnd")[0], 16) & SIGKILL_BIT:
                return True
        return False

    def identity(self, pid: int) -> Identity:
        return self.identity_and_parent(pid)[0]

    def identity_and_parent(self, pid: int, exe: str | None = None) -> tuple[Identity, int]:
        """Who the process is, and its parent's PID, without the stat file: the exec path
        confines on these alone. `exe` when the caller read it already (its pre-filter)."""
        base = f"{self._prefix}{pid}"
        with vanishing(pid):
            status = read_bytes(f"{base}/status")
            cmdline = read_bytes(f"{base}/cmdline", MAX_CMDLINE)
        if exe is None:
            exe = self.exe(pid)
        uid = int(_status_field(status, b"Uid")[1])  # effective
        gids = {int(_status_field(status, b"Gid")[1])}
        gids.update(int(gid) for gid in _status_field(status, b"Groups"))
        with vanishing(pid):
            cpuset = read_bytes(f"{base}/cpuset").decode().strip()
        identity = _identity(
            uid, frozenset(gids), exe, cmdline, self._bound(cpuset), self._fence(cpuset)
        )
        return identity, int(_status_field(status, b"PPid")[0])

    def cpuset_cpus(self, pid: int) -> frozenset[int] | None:
        """The CPUs of the process's cpuset when someone other than corecapd bounds it."""
        with vanishing(pid):
            path = read_bytes(f"{self._prefix}{pid}/cpuset").decode().strip()
        return self._bound(path)

    def _bound(self, path: str) -> frozenset[int] | None:
        """`cpuset_cpus` for the cpuset at `path` (as /proc/PID/cpuset names it)."""
        if path == "/" or self._ours(path):
            return None  # the whole host, or a fence of ours (a job's grant may change)
        v1 = self.cgroup_root / "cpuset"
        if (v1 / "cpuset.cpus").is_file():
            where, name = v1 / path.lstrip("/"), "cpuset.effective_cpus"
        else:
            where, name = self.cgroup_root / path.lstrip("/"), "cpuset.cpus.effective"
        for directory in (where, *where.parents):
            if directory == self.cgroup_root.parent:
                break
            try:
                return parse_cpulist((directory / name).read_text())
            except FileNotFoundError:
                continue  # no cpuset controller here (cgroup v2): the nearest ancestor's
        return None

    def _fence(self, path: str) -> str | None:
        """The job whose fence of ours `path` is (`<cgroup>/job-<name>`, or
        `<cgroup>.slice/<cgroup>-<name>.scope` with systemd), else None."""
        if not self._ours(path):
            return None
        leaf = path.rstrip("/").rsplit("/", 1)[-1]
        for prefix, suffix in (("job-", ""), (f"{self.own_cgroup}-", ".scope")):
            if leaf.startswith(prefix) and leaf.endswith(suffix):
                return leaf[len(prefix) : len(leaf) - len(suffix)]
        return None

    def _ours(self, path: str) -> bool:
        """A fence corecapd made: `<cgroup>/job-*` (cgroup v1, or v2 below a delegated
        service cgroup) or `<cgroup>.slice/<cgroup>-*.scope` (systemd)."""
        parts = path.strip("/").split("/")
        return self.own_cgroup in parts or f"{self.own_cgroup}.slice" in parts

    def environment(self, pid: int, names: Iterable[str]) -> dict[str, str]:
        """The values of `names` in the process's environment (as it was at exec)."""
        wanted = set(names)
        with vanishing(pid):
            raw = read_bytes(f"{self._prefix}{pid}/environ")
        found = {}
        for entry in raw.split(b"\0"):
            name, sep, value = entry.decode(errors="replace").partition("=")
            if sep and name in wanted:
                found[name] = value
        return found

    def exe(self, pid: int) -> str:
        """The path of the program the process runs; "" when it is hidden from us."""
        try:
            with vanishing(pid):
                return os.readlink(f"{self._prefix}{pid}/exe").removesuffix(" (deleted)")
        except PermissionError:
            return ""

    def libraries(self, pid: int) -> frozenset[str]:
        """File names of the shared objects mapped into the process (~2 ms for TensorFlow)."""
        names = set()
        with vanishing(pid), open(self.root / str(pid) / "maps", "rb") as maps:
            for line in maps:
                if b".so" in line:
                    names.add(os.path.basename(line.rstrip().split(maxsplit=5)[-1]).decode())
        return frozenset(names)


def _status_field(status: bytes, name: bytes) -> list[bytes]:
    """The values of one line of /proc/PID/status (found by search: no line-by-line loop)."""
    start = status.index(b"\n" + name + b":") + len(name) + 2
    return status[start : status.index(b"\n", start)].split()


@lru_cache(maxsize=4096)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@lru_cache(maxsize=4096)
def _identity(
    uid: int,
    gids: frozenset[int],
    exe: str,
    cmdline: bytes,
    cpuset: frozenset[int] | None,
    fence: str | None,
) -> Identity:
    """One Identity for all the processes that are the same program run the same way (a
    host's thousands of workers, shells and sleeps): the scanner keeps one per process, and
    shared they cost 1.1 KB less each (RSS at 10,000 processes: bench/idle_cost.py)."""
    return Identity(
        cpuset=cpuset,
        fence=fence,
        uid=uid,
        user=_user_name(uid),
        groups=frozenset(_group_name(gid) for gid in gids),
        exe=exe,
        cmdline=tuple(a.decode(errors="replace") for a in cmdline.split(b"\0") if a),
    )


@lru_cache(maxsize=4096)
def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class Scanner:
    """Builds one scan's view of every process, caching what does not change per process."""

    def __init__(self, procfs: ProcFS) -> None:
        self.procfs = procfs
        self._identities: dict[ProcKey, tuple[int | None, Identity]] = {}  # by exec mark
        self._libraries: dict[ProcKey, frozenset[str]] = {}

    def scan(
        self,
        libraries_wanted: frozenset[ProcKey],
        watched: frozenset[ProcKey] | None = None,
    ) -> dict[ProcKey, Observed]:
        """Every process now (or the `watched` ones), in one go."""
        scanning = self.scanning(libraries_wanted, watched)
        while True:
            try:
                next(scanning)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def scanning(
        self,
        libraries_wanted: frozenset[ProcKey],
        watched: frozenset[ProcKey] | None = None,
    ) -> Generator[None, None, dict[ProcKey, Observed]]:
        """Every process now (the generator's return value), or with `watched` only those
        and whatever runs under their PIDs now (a reused PID: a new process), yielding
        every SCAN_BREAK processes: with thousands of processes a scan takes tens of ms
        (30 ms for 1,500 here), too long to keep the exec path waiting, so the caller
        handles its events at each yield. Only a complete scan lets go of what is cached
        for processes that are gone."""
        seen: dict[ProcKey, Observed] = {}
        pids = self.procfs.pids() if watched is None else sorted({k.pid for k in watched})
        for count, pid in enumerate(pids):
            if count % SCAN_BREAK == 0:
                yield
            try:
                observed = self.observe(pid, libraries_wanted)
            except (ProcessGone, PermissionError):
                continue  # exited, or hidden from us (hidepid, an LSM): not ours to manage
            if observed is not None:
                seen[observed.key] = observed
        if watched is None:
            for cache in (self._identities, self._libraries):
                for key in cache.keys() - seen.keys():
                    del cache[key]
        return seen

    def observe(
        self,
        pid: int,
        libraries_wanted: frozenset[ProcKey] = frozenset(),
        identity: Identity | None = None,
    ) -> Observed | None:
        """One process now (None for a kernel thread, or a PID reused as we read it).

        `identity` when the exec path read it already, before the stat file: it is kept
        unverified (a second exec in between would go unnoticed), so the next scan reads it
        again."""
        sample = self.procfs.sample(pid)
        key = sample.key
        if sample.kernel_thread:
            return None
        cached = self._identities.get(key)
        if identity is None and cached is not None and cached[0] == sample.exec_mark:
            identity = cached[1]
        else:
            verified_for: int | None = None  # the exec mark it was read under
            if identity is None:
                identity = self.procfs.identity(pid)
                again = self.procfs.sample(pid)
                if (again.key, again.exec_mark) != (key, sample.exec_mark):
                    return None  # reused or exec'd while we read it: the next look sees it
                verified_for = sample.exec_mark
            self._identities[key] = (verified_for, identity)
            self._libraries.pop(key, None)  # a new program maps new libraries
        if key in libraries_wanted:
            self._libraries[key] = self.procfs.libraries(pid)
        return Observed(sample, identity, self._libraries.get(key))
