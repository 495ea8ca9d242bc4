"""Exec-time confinement: is a marked Python child confined by its first statement?

Spawns N children of a copy of the real Python interpreter under a unique name
(`pybench<hex>`, so no other enforcer or process is involved), one after the other: the next
starts when the last has exited or after 100 ms (so a slow enforcer's children wait side by
side), plus random jitter of 0-30 ms (a 1-second poller would otherwise phase-lock to them).
Sequential starts keep the children from loading the one target CPU themselves: a normal
start here costs ~30 ms of CPU, and confined children all run on that CPU. Two kinds: a
normal start (`python -c CODE`) and a fast start (`python -S -I -c CODE`, the hard case).
Each child records at its first statement its CPU mask and CLOCK_MONOTONIC; if it is not
confined yet it polls every 0.5 ms (up to 3 s) until it is. "Confined" = the mask is exactly
the highest CPU.

Three enforcers, each idle and with 2 CPU hogs, in the same run:
  corecapd     the daemon of this repository (rule on the unique exe name, 1 CPU; the policy
               reserves every other CPU, so the grant is the highest CPU), and once more with
               `realtime_priority = 10` (corecapd-rt); corecapd-metrics and
               corecapd-rt-metrics add `metrics = "127.0.0.1:PORT"` and a scrape of
               /metrics every second from this process during the cell;
  cgrulesengd  Debian's cgroup-tools, a cgrules.conf rule `*:pybench<hex>` into a cgroup v1
               cpuset of the highest CPU (see bench/cgrules_fixture.py: /etc is restored exactly);
  pyfloor      bench/python_floor.py: the least a Python enforcer does per matched exec
               (asyncio under SCHED_FIFO, netlink, the exe link, status and stat files, the
               leader's mask, a cgroup move on a thread, two log lines) into a cpuset of the
               highest CPU: the floor of corecapd's CPU per child in Python here;
  poller       a Python loop that every 1.0 s lists /proc and pins every thread of every
               process whose exe is the unique name.
Each enforcer is started fresh for each cell. Its CPU time is read from the kernel per thread
(/proc/PID/task/*/schedstat, ns; /proc/PID/stat's utime+stime has 10 ms ticks and is kept as a
cross-check in --json), divided by the execs of the cell; RSS is VmRSS at the end of the cell.
A last phase per enforcer runs 1,000 unrelated execs (`/bin/true` from a shell loop) in a
2.5-second window, against an equally long window without them, 3 times (medians).

`--repeats N` measures every cell N times and adds medians over the repeats (min-max):
on this shared machine one cell's p99 moves with whatever else runs.
`--crowd N` adds N idle processes for the whole run: each scan reads every process, so on a
host with thousands of them a scan takes tens of ms, and execs land inside scans.

Needs root. Run from the repository root:

    .venv/bin/python bench/exec_latency.py [--children 200] [--quick] [--repeats N] [--crowd N]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from cgrules_fixture import CgrulesFixture, FixtureError, cpuset_mount

from corecapd import __version__ as CORECAPD_VERSION
from corecapd.client import DaemonUnreachable, call
from corecapd.protocol import ProtocolError

REPO = Path(__file__).resolve().parent.parent
ENFORCERS = (
    "none",
    "corecapd",
    "corecapd-rt",
    "corecapd-metrics",
    "corecapd-rt-metrics",
    "cgrulesengd",
    "pyfloor",
    "poller",
)
SCRAPE_INTERVAL = 1.0  # seconds: -metrics cells are scraped this often (Prometheus: 15-60 s)
KINDS: dict[str, list[str]] = {"normal": [], "fast": ["-S", "-I"]}
LOADS = ("idle", "2 hogs")
HOGS = 2
POLL_INTERVAL = 1.0
CHILD_TIMEOUT_NS = 3_000_000_000

# The child's first statement is its first line. It must stay cheap: `os` is imported at
# interpreter start-up anyway, `time` is a built-in module.
CHILD_CODE = """\
import os, time; mask = os.sched_getaffinity(0); first = time.monotonic_ns()
want = {int(os.environ["CB_CPU"])}
confined = first if mask == want else 0
deadline = first + int(os.environ["CB_TIMEOUT_NS"])
while not confined and time.monotonic_ns() < deadline:
    time.sleep(0.0005)
    if os.sched_getaffinity(0) == want:
        confined = time.monotonic_ns()
import json
with open("/proc/self/cpuset") as cpuset:
    print(json.dumps({
        "pid": os.getpid(), "spawn": int(os.environ["CB_T0"]), "first": first,
        "first_confined": mask == want, "confined": confined, "mask": sorted(mask),
        "cpuset": cpuset.read().strip(),
    }))
"""

POLLER_CODE = """\
import os, sys, time
name, want, interval = sys.argv[1], {int(sys.argv[2])}, float(sys.argv[3])
tick = time.monotonic()
while True:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) != name:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), want)
                except OSError:
                    pass
        except OSError:
            pass
    tick += interval
    time.sleep(max(0.0, tick - time.monotonic()))
"""


class Unavailable(Exception):
    """This enforcer cannot run here (the row says why)."""


# --- our processes: every one is registered and killed by PID on the way out -----------------


class Reaper:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.groups: list[int] = []  # process groups of our own, killed whole

    def spawn(self, args: Sequence[str | Path], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([str(arg) for arg in args], **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def crowd(self, size: int) -> None:
        """`size` idle processes in a process group of their own: on a host with thousands
        of processes each scan takes tens of ms (and an exec may land inside one)."""
        leader = self.spawn(
            ["sh", "-c", f"for i in $(seq {size}); do sleep 86400 & done; echo ready; wait"],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.groups.append(leader.pid)
        assert leader.stdout is not None and leader.stdout.readline() == b"ready\n"

    def kill_all(self) -> None:
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for proc in list(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self.stop(proc, grace=5.0)


class _Signals:
    seen = False

    @classmethod
    def handler(cls, signum: int, frame: FrameType | None) -> None:
        if cls.seen:  # already unwinding: let the clean-up finish
            return
        cls.seen = True
        raise SystemExit(128 + signum)


# --- measurements from /proc ------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    """CPU time of all live threads of `pid`, ns (schedstat's first field)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def stat_cpu_ns(pid: int) -> int:
    """utime + stime of /proc/PID/stat (all threads, clock ticks), ns."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def sched_summary(pid: int) -> str:
    names = {os.SCHED_OTHER: "other", os.SCHED_FIFO: "fifo", os.SCHED_RR: "rr"}
    seen: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            policy = os.sched_getscheduler(int(tid))
            prio = os.sched_getparam(int(tid)).sched_priority
            key = names.get(policy, str(policy)) + (f"/{prio}" if prio else "")
            seen[key] = seen.get(key, 0) + 1
    return ", ".join(f"{count} thread(s) {key}" for key, count in sorted(seen.items()))


def host_forks() -> int:
    """New tasks created on the whole host since boot (/proc/stat `processes`)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


@dataclass
class CpuSample:
    sched: int
    stat: int
    wall: int
    forks: int

    @classmethod
    def of(cls, pid: int) -> CpuSample:
        return cls(cpu_ns(pid), stat_cpu_ns(pid), time.monotonic_ns(), host_forks())


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (inf stands for "never confined")."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --- the marked children ------------------------------------------------------------------------


def copy_interpreter(tmp: Path, name: str) -> Path:
    """The real interpreter binary (not a venv link or a pyenv shim) as tmp/bin/NAME.

    Python finds its standard library from the binary's location (../lib/pythonX.Y), so the
    original prefix's lib directories are linked next to the copy; PYTHONHOME would not do,
    `-I` ignores it.
    """
    real = Path(os.path.realpath(sys.executable))
    with real.open("rb") as binary:
        if binary.read(4) != b"\x7fELF":
            raise SystemExit(f"{real} (from {sys.executable}) is not an ELF binary")
    (tmp / "bin").mkdir()
    copy = tmp / "bin" / name
    shutil.copy2(real, copy)
    for lib in ("lib", "lib64"):
        if (real.parent.parent / lib).is_dir():
            (tmp / lib).symlink_to(real.parent.parent / lib)
    for flags in ([], ["-S", "-I"]):
        check = subprocess.run(
            [str(copy), *flags, "-c", "import json, os; print(os.readlink('/proc/self/exe'))"],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
            check=False,
        )
        if check.returncode != 0 or check.stdout.strip() != str(copy):
            raise SystemExit(f"the copy {copy} of {real} does not run: {check.stderr.strip()}")
    return copy


@dataclass
class Child:
    pid: int
    spawn: int
    first: int
    first_confined: bool
    confined: int  # 0 = not within the timeout
    mask: list[int]
    cpuset: str

    @property
    def to_confined_ms(self) -> float:
        return (self.confined - self.spawn) / 1e6 if self.confined else math.inf


@dataclass
class Cell:
    children: list[Child] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    execs: int = 0


def spawn_children(
    reaper: Reaper,
    interp: Path,
    kind: str,
    count: int,
    cpu: int,
    jitter: float = 0.0,
    overlap: float = 0.1,
    timeout_ns: int = CHILD_TIMEOUT_NS,
) -> Cell:
    args: list[str | Path] = [interp, *KINDS[kind], "-c", CHILD_CODE]
    base_env = {
        "PATH": "/usr/bin:/bin",
        "CB_CPU": str(cpu),
        "CB_TIMEOUT_NS": str(timeout_ns),
    }
    cell = Cell(execs=count)
    running: list[subprocess.Popen[bytes]] = []

    def collect(proc: subprocess.Popen[bytes], timeout: float | None) -> None:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            cell.errors.append(f"PID {proc.pid} did not finish")
        else:
            try:
                cell.children.append(Child(**json.loads(out)))
            except (ValueError, TypeError) as bad:
                tail = err.decode(errors="replace").strip().splitlines()[-1:]
                cell.errors.append(f"PID {proc.pid} exit {proc.returncode}: {tail or bad}")
        reaper.stop(proc)

    for _ in range(count):
        spawn = time.monotonic_ns()
        child = reaper.spawn(
            args,
            env={**base_env, "CB_T0": str(spawn)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        running.append(child)
        # The next one starts when this one is done (no self-made load on the target CPU),
        # or after `overlap` (a slow enforcer's children wait in parallel), then jitter.
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(overlap)
        for proc in [proc for proc in running if proc.poll() is not None]:
            running.remove(proc)
            collect(proc, None)
        time.sleep(random.uniform(0, jitter))
    deadline = time.monotonic() + timeout_ns / 1e9 + 10
    for proc in running:
        collect(proc, max(0.1, deadline - time.monotonic()))
    return cell


@contextlib.contextmanager
def hogs(reaper: Reaper, count: int) -> Iterator[None]:
    procs = [reaper.spawn([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for proc in procs:
            reaper.stop(proc, grace=1.0)


# --- the enforcers ----------------------------------------------------------------------------


class Enforcer:
    label = ""

    def __init__(self, reaper: Reaper, workdir: Path) -> None:
        self.reaper = reaper
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.label}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str | Path]:
        raise NotImplementedError

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = self.reaper.spawn(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        time.sleep(0.3)
        self.check_alive()

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise Unavailable(f"exited with {self.proc.returncode}: {self.log_tail()}")

    def log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return " / ".join(lines[-3:]) or "(no output)"

    def stop(self) -> None:
        if self.proc is not None:
            self.reaper.stop(self.proc)
            self.proc = None

    def figures(self) -> dict[str, Any] | None:
        return None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        try:
            self.start()
            yield
        finally:
            self.stop()


class Corecapd(Enforcer):
    label = "corecapd"

    def __init__(self, reaper: Reaper, workdir: Path, exe_name: str, cpu: int, label: str) -> None:
        self.label = label  # corecapd, corecapd-rt, corecapd-metrics, corecapd-rt-metrics
        super().__init__(reaper, workdir)
        self.socket = workdir / f"{self.label}.sock"
        self.policy = workdir / f"{self.label}.toml"
        self.metrics_port = free_port() if label.endswith("-metrics") else None
        self.scraper: Scraper | None = None
        others = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)) if c != cpu)
        self.policy.write_text(
            "[daemon]\n"
            'mode = "enforce"\n'
            "scan_interval = 1.0\n"
            f'reserved_cpus = "{others}"  # every CPU but {cpu}: the grant is CPU {cpu}\n'
            f'socket = "{self.socket}"\n'
            + ("realtime_priority = 10\n" if "-rt" in label else "")
            + (f'metrics = "127.0.0.1:{self.metrics_port}"\n' if self.metrics_port else "")
            + "\n[[rules]]\n"
            'name = "bench"\n'
            f'match = {{ exe = ["{exe_name}"], users = ["root"] }}\n'
            "cpus = 1\n"
        )
        binary = Path(sys.executable).with_name("corecapd")
        self.binary = binary if binary.exists() else Path(shutil.which("corecapd") or binary)

    def command(self) -> list[str | Path]:
        return [self.binary, "--config", self.policy]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            self.check_alive_corecapd()
            try:
                call(self.socket, "ping", timeout=1.0)
                break
            except (DaemonUnreachable, ProtocolError):
                if time.monotonic() > deadline:
                    raise Unavailable(f"no answer on {self.socket}: {self.log_tail()}") from None
                time.sleep(0.05)
        if self.metrics_port is not None:
            self.scraper = Scraper(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def stop(self) -> None:
        if self.scraper is not None:
            self.scraper.stop()
        super().stop()

    def check_alive_corecapd(self) -> None:
        try:
            self.check_alive()
        except Unavailable as err:
            text = self.log_path.read_text(errors="replace")
            if "realtime_priority" in text and "unknown key" in text:
                raise Unavailable("n/a: key not supported yet") from err
            raise

    def figures(self) -> dict[str, Any] | None:
        try:
            host = call(self.socket, "status")["host"]
        except (DaemonUnreachable, ProtocolError) as err:
            return {"error": str(err)}
        found = {key: host.get(key) for key in ("exec_events", "exec_confine_us")}
        if self.scraper is not None:
            found["scrapes"] = {"ok": self.scraper.ok, "failed": self.scraper.failed}
        return found


class Scraper:
    """GETs `url` every SCRAPE_INTERVAL from a thread until stopped, as Prometheus would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    answer.read()
                self.ok += 1
            except OSError:
                self.failed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cgrulesengd(Enforcer):
    label = "cgrulesengd"

    def command(self) -> list[str | Path]:
        return ["cgrulesengd", "-n", "-f", self.log_path]


class PythonFloor(Enforcer):
    label = "pyfloor"

    def __init__(self, reaper: Reaper, workdir: Path, exe_name: str, cpu: int, tag: str) -> None:
        super().__init__(reaper, workdir)
        self.exe_name = exe_name
        self.cpu = cpu
        self.group_name = f"corecap-bench-floor-{tag}"
        self.mount = Path()  # the cpuset hierarchy, found at `start`

    def command(self) -> list[str | Path]:
        script = REPO / "bench" / "python_floor.py"
        return [sys.executable, script, self.exe_name, str(self.cpu), self.mount / self.group_name]

    def start(self) -> None:
        try:
            self.mount = cpuset_mount()
        except FixtureError as err:
            raise Unavailable(f"n/a: {err}") from None
        for left in self.mount.glob("corecap-bench-floor-*"):  # a killed run's
            self._remove(left)
        cpuset = self.mount / self.group_name
        cpuset.mkdir()
        (cpuset / "cpuset.cpus").write_text(str(self.cpu))
        (cpuset / "cpuset.mems").write_text((self.mount / "cpuset.mems").read_text())
        super().start()

    def stop(self) -> None:
        super().stop()
        self._remove(self.mount / self.group_name)

    def _remove(self, cpuset: Path) -> None:
        """Move what is left inside (our children) back out, then remove it; say so when
        that fails within 5 s (it would hide the cell's own error to raise here)."""
        deadline = time.monotonic() + 5
        while cpuset.is_dir():
            for pid in (cpuset / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.mount / "cgroup.procs").write_text(pid)
            try:
                cpuset.rmdir()
            except OSError as err:
                if time.monotonic() > deadline:
                    print(f"  pyfloor: cannot remove {cpuset}: {err.strerror}")
                    return
                time.sleep(0.05)


class Poller(Enforcer):
    label = "poller"

    def __init__(self, reaper: Reaper, workdir: Path, exe_name: str, cpu: int) -> None:
        super().__init__(reaper, workdir)
        self.exe_name = exe_name
        self.cpu = cpu

    def command(self) -> list[str | Path]:
        return [sys.executable, "-c", POLLER_CODE, self.exe_name, str(self.cpu), str(POLL_INTERVAL)]


# --- one row of the table ---------------------------------------------------------------------


@dataclass
class Row:
    enforcer: str
    kind: str
    load: str
    children: int = 0
    errors: int = 0
    first_pct: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    never: int = 0
    cpu_per_1k_ms: float = math.nan
    stat_cpu_per_1k_ms: float = math.nan
    cpu_pct: float = math.nan
    rss_mb: float = math.nan
    execs: int = 0
    seconds: float = 0.0
    note: str = ""
    figures: dict[str, Any] | None = None
    quiet_ms: float = math.nan  # unrelated phase: CPU in a window without execs
    busy_ms: float = math.nan  # ... and in an equally long one with them
    net_per_1k_ms: float = math.nan
    quiet_forks: int = 0
    busy_forks: int = 0
    in_group: int = 0
    first_p50_ms: float = math.nan  # spawn -> first statement, confined or not
    first_p99_ms: float = math.nan
    load1: float = math.nan  # 1-minute load average at the end of the cell

    def account(self, before: CpuSample, after: CpuSample) -> None:
        self.seconds = (after.wall - before.wall) / 1e9
        self.busy_forks = after.forks - before.forks
        self.cpu_per_1k_ms = (after.sched - before.sched) / 1e6 / self.execs * 1000
        self.stat_cpu_per_1k_ms = (after.stat - before.stat) / 1e6 / self.execs * 1000
        self.cpu_pct = (after.sched - before.sched) / (after.wall - before.wall) * 100

    def summarise(self, cell: Cell, group: str) -> None:
        self.children = len(cell.children)
        self.errors = len(cell.errors)
        if not cell.children:
            return
        firsts = [(child.first - child.spawn) / 1e6 for child in cell.children]
        self.first_p50_ms = percentile(firsts, 50)
        self.first_p99_ms = percentile(firsts, 99)
        self.load1 = float(Path("/proc/loadavg").read_text().split()[0])
        latencies = [child.to_confined_ms for child in cell.children]
        self.first_pct = 100 * sum(c.first_confined for c in cell.children) / self.children
        self.p50_ms = percentile(latencies, 50)
        self.p99_ms = percentile(latencies, 99)
        self.max_ms = max(latencies)
        self.never = sum(1 for latency in latencies if latency == math.inf)
        self.in_group = sum(1 for child in cell.children if child.cpuset == group)


def run_cell(
    enforcer: Enforcer,
    reaper: Reaper,
    interp: Path,
    kind: str,
    load: str,
    args: argparse.Namespace,
    cpu: int,
    group: str,
) -> Row:
    row = Row(enforcer.label, kind, load)
    with enforcer.running():
        probe = spawn_children(reaper, interp, "normal", 1, cpu)
        if not probe.children or not probe.children[0].confined:
            raise Unavailable(f"a probe child was not confined: {probe.errors or probe.children}")
        before = CpuSample.of(enforcer.pid)
        cell = spawn_children(
            reaper, interp, kind, args.children, cpu, args.jitter_ms / 1000, args.overlap_ms / 1000
        )
        row.execs = cell.execs
        enforcer.check_alive()
        row.account(before, CpuSample.of(enforcer.pid))
        row.rss_mb = rss_mb(enforcer.pid)
        row.figures = enforcer.figures()
        row.note = sched_summary(enforcer.pid)
    row.summarise(cell, group)
    if cell.errors:
        row.note += f"; {len(cell.errors)} child errors, first: {cell.errors[0]}"
    return row


def run_baseline(
    reaper: Reaper, interp: Path, kind: str, load: str, args: argparse.Namespace, cpu: int
) -> Row:
    """No enforcer: when do the children reach their first statement at all?"""
    row = Row("none", kind, load)
    cell = spawn_children(
        reaper,
        interp,
        kind,
        args.children,
        cpu,
        args.jitter_ms / 1000,
        args.overlap_ms / 1000,
        timeout_ns=0,
    )
    row.summarise(cell, "/")
    row.note = "no enforcer: spawn -> first statement only"
    return row


def run_unrelated(enforcer: Enforcer, execs: int, window: float, repeats: int = 3) -> Row:
    """Enforcer CPU in a window of `window` s with `execs` unrelated execs, and in one as long
    without them, `repeats` times (medians): a scanning enforcer's cost is per second, not
    per exec, and other processes on the host exec too."""
    row = Row(enforcer.label, "unrelated /bin/true", "idle", execs=execs + 1)
    loop = f'i=0; while [ "$i" -lt {execs} ]; do /bin/true; i=$((i+1)); done'
    cpu: list[float] = []  # ms per window, quiet and busy ones
    forks: list[int] = []  # host-wide new tasks per window
    bursts: list[float] = []
    with enforcer.running():
        time.sleep(0.5)
        for _ in range(repeats):
            start = CpuSample.of(enforcer.pid)
            time.sleep(window)
            before = CpuSample.of(enforcer.pid)
            subprocess.run(["/bin/sh", "-c", loop], check=True)
            bursts.append((time.monotonic_ns() - before.wall) / 1e9)
            time.sleep(max(0.0, window - bursts[-1]))
            enforcer.check_alive()
            after = CpuSample.of(enforcer.pid)
            for a, b in ((start, before), (before, after)):
                cpu.append((b.sched - a.sched) / 1e6)
                forks.append(b.forks - a.forks)
        row.rss_mb = rss_mb(enforcer.pid)
    row.seconds = window
    row.quiet_ms = statistics.median(cpu[0::2])
    row.busy_ms = statistics.median(cpu[1::2])
    row.quiet_forks = int(statistics.median(forks[0::2]))
    row.busy_forks = int(statistics.median(forks[1::2]))
    row.cpu_per_1k_ms = row.busy_ms / row.execs * 1000
    # Enforcer CPU against host-wide new tasks over all windows: the slope is what one more
    # exec costs it, whoever made it; the intercept what a window costs with none.
    slope, intercept = statistics.linear_regression(forks, cpu)
    row.net_per_1k_ms = slope * 1000
    row.note = (
        f"{row.execs} execs in {statistics.median(bursts):.2f} s; {intercept:.1f} ms per window"
        f" at 0 execs; windows (forks: ms) "
        + ", ".join(f"{f}: {c:.1f}" for f, c in zip(forks, cpu, strict=True))
    )
    return row


# --- output -------------------------------------------------------------------------------------


def ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value == math.inf:
        return f">{CHILD_TIMEOUT_NS // 1_000_000}"
    return f"{value:.1f}"


def confine_stats(row: Row) -> dict[str, float] | None:
    """corecapd's own exec_confine_us summary (µs) for the cell, when it reported one."""
    stats = (row.figures or {}).get("exec_confine_us")
    return stats if isinstance(stats, dict) and stats.get("count") else None


def confine_us(row: Row) -> str:
    if not row.enforcer.startswith("corecapd") or row.kind.startswith("unrelated"):
        return ""
    stats = confine_stats(row)
    if stats is None:
        return "n/a"
    return f"{stats['p50'] / 1000:.2f}/{stats['p99'] / 1000:.2f}/{stats['max'] / 1000:.2f}"


def table(rows: list[Row]) -> str:
    header = (
        f"{'enforcer':<19} {'start':<6} {'load':<6} {'ld1':>4} {'n':>4} {'1st p50':>7}"
        f" {'1st p99':>7} {'first%':>6} {'p50ms':>7} {'p99ms':>7} {'maxms':>7} {'never':>5}"
        f" {'cpu ms/1k':>9} {'forks':>5} {'rss MB':>6}  event->applied ms p50/p99/max"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.kind.startswith("unrelated"):
            continue
        if row.note.startswith(("n/a", "failed")):
            lines.append(f"{row.enforcer:<19} {row.note}")
            continue
        start = (
            f"{row.enforcer:<19} {row.kind:<6} {row.load:<6} {row.load1:>4.1f} {row.children:>4}"
            f" {ms(row.first_p50_ms):>7} {ms(row.first_p99_ms):>7}"
        )
        if row.enforcer == "none":
            lines.append(f"{start}  (no enforcer)")
            continue
        lines.append(
            f"{start} {row.first_pct:>6.1f} {ms(row.p50_ms):>7} {ms(row.p99_ms):>7}"
            f" {ms(row.max_ms):>7} {row.never:>5} {row.cpu_per_1k_ms:>9.1f} {row.busy_forks:>5}"
            f" {row.rss_mb:>6.1f}"
            f"  {confine_us(row)}"
        )
    unrelated = [row for row in rows if row.kind.startswith("unrelated")]
    if unrelated:
        lines += [
            "",
            f"unrelated execs (/bin/true): enforcer CPU in {unrelated[0].seconds:g} s windows with"
            " them and without (medians of 3 each)",
            f"{'enforcer':<19} {'execs':>5} {'host forks':>13} {'cpu ms':>13} {'ms/1k':>6}"
            f" {'raw':>6} {'rss MB':>6}",
            f"{'':<19} {'':>5} {'with':>6} {'w/out':>6} {'with':>6} {'w/out':>6} {'slope':>6}",
        ]
    for row in unrelated:
        if row.note.startswith(("n/a", "failed")):
            lines.append(f"{row.enforcer:<19} {row.note}")
            continue
        lines.append(
            f"{row.enforcer:<19} {row.execs:>5} {row.busy_forks:>6} {row.quiet_forks:>6}"
            f" {row.busy_ms:>6.1f} {row.quiet_ms:>6.1f} {row.net_per_1k_ms:>6.1f}"
            f" {row.cpu_per_1k_ms:>6.1f} {row.rss_mb:>6.1f}"
        )
    # The n-th repeat of each enforcer against the n-th of cgrulesengd: the same run's.
    base = [r for r in unrelated if r.enforcer == "cgrulesengd"]
    by_enforcer: dict[str, list[float]] = {}
    seen: Counter[str] = Counter()
    for row in unrelated:
        if not row.enforcer.startswith("corecapd"):
            continue
        ratios_of = by_enforcer.setdefault(row.enforcer, [])
        seen[row.enforcer] += 1
        against = base[seen[row.enforcer] - 1] if seen[row.enforcer] <= len(base) else None
        if against is None or not against.net_per_1k_ms > 0 or math.isnan(row.net_per_1k_ms):
            continue
        ratios_of.append(row.net_per_1k_ms / against.net_per_1k_ms)
        lines.append(
            f"{row.enforcer} / cgrulesengd CPU per unrelated exec (slope):"
            f" {ratios_of[-1]:.2f} (target: <= 1)"
        )
    for enforcer, found in by_enforcer.items():
        if len(found) > 1:
            lines.append(
                f"{enforcer} / cgrulesengd, median over repeats: {_spread(found, '{:.2f}')}"
            )
    ratios = []
    for row in rows:
        stats = confine_stats(row)
        if stats is None:
            continue
        match = [
            r
            for r in rows
            if r.enforcer == "cgrulesengd" and (r.kind, r.load) == (row.kind, row.load)
        ]
        if match and match[0].p99_ms == math.inf:
            ratios.append(
                f"  {row.enforcer} {row.kind} {row.load}: cgrulesengd left"
                f" {match[0].never} children unconfined, no ratio"
            )
        elif match and match[0].p99_ms > 0:
            ratios.append(
                f"  {row.enforcer} {row.kind} {row.load}: event->applied p99"
                f" {stats['p99'] / 1000:.2f} ms / cgrulesengd spawn->confined p99"
                f" {match[0].p99_ms:.1f} ms = {stats['p99'] / 1000 / match[0].p99_ms:.3f}"
            )
    if ratios:
        lines += ["", "corecapd event->applied against cgrulesengd (same run):", *ratios]
    lines += [
        "",
        "ld1 = the host's 1-minute load average at the end of the cell (2 hogs add 2).",
        "1st p50/p99 = spawn -> the child's first statement, in ms (none: without enforcer).",
        "first% = children whose mask was already the target CPU at their first statement.",
        "p50/p99/max = spawn (parent, just before Popen) -> confined, in ms; for children",
        "  confined at their first statement it is spawn -> first statement, an upper bound;",
        f"  never = not confined within {CHILD_TIMEOUT_NS // 10**9} s (counted as infinite).",
        "slope = enforcer CPU ms per 1,000 host-wide new tasks (/proc/stat processes), a least",
        "  squares fit over all 6 windows: what an exec costs it, whoever execs (other",
        "  processes on the host count too); raw = CPU in a window with execs / our execs",
        "  (includes its periodic scans).",
        "cpu ms/1k = enforcer CPU time (all its threads, /proc/PID/task/*/schedstat) during",
        "  the cell per 1,000 execs of the cell (includes its periodic scans); forks = new",
        "  tasks on the whole host during the cell (ours: 1 per child; more = other activity);",
        "  rss = enforcer VmRSS at the end of the cell. Each cell starts the enforcer afresh.",
        "event->applied = corecapd's own exec_confine_us (kernel event timestamp -> affinity of",
        "  all threads applied, over the cell's children and its probe), from its status, in ms;",
        "  n/a when the daemon does not report it.",
    ]
    return "\n".join(line.rstrip() for line in lines)


def repeat_summary(rows: list[Row]) -> str:
    """Medians over repeated runs of each cell: this machine is shared, and a single p99
    of 200 children (the second-worst) moves with whatever else runs."""
    cells: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        if row.children and not row.kind.startswith("unrelated"):
            cells.setdefault((row.enforcer, row.kind, row.load), []).append(row)
    lines = [
        "medians over repeats (min-max): first%, spawn->confined p99 ms, enforcer CPU ms per"
        " child (target for corecapd: <= 1), event->applied p99 ms",
    ]
    for (enforcer, kind, load), repeats in cells.items():
        applied = [stats["p99"] / 1000 for r in repeats if (stats := confine_stats(r))]
        parts = [
            _spread([r.first_pct for r in repeats], "{:.1f}"),
            _spread([r.p99_ms for r in repeats], "{:.1f}"),
            _spread([r.cpu_per_1k_ms / 1000 for r in repeats], "{:.2f}"),
        ]
        if applied:
            parts.append(_spread(applied, "{:.2f}"))
        lines.append(f"  {enforcer:<19} {kind:<6} {load:<6} n={len(repeats)}: {'; '.join(parts)}")
    return "\n".join(lines)


def _spread(values: Sequence[float], form: str) -> str:
    return (
        f"{form.format(statistics.median(values))}"
        f" ({form.format(min(values))}-{form.format(max(values))})"
    )


def repo_state() -> str:
    def git(*argv: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(REPO), *argv], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    dirty = git("status", "--porcelain", "--", "corecapd").splitlines()
    events = (REPO / "corecapd" / "proc_events.py").exists()
    return (
        f"corecapd {CORECAPD_VERSION}, git {git('rev-parse', '--short', 'HEAD') or '?'}"
        + (f" + {len(dirty)} uncommitted file(s) under corecapd/" if dirty else "")
        + f"; exec-time path corecapd/proc_events.py {'present' if events else 'absent'}"
    )


# --- main -----------------------------------------------------------------------------------------


def report(fixture: CgrulesFixture) -> None:
    print(f"  cgrulesengd clean-up: cgroup {fixture.group} removed: {not fixture.group.exists()}")
    for rec in fixture.after.values():
        print(f"    after: {rec.describe()}")
    print("    " + ("; ".join(fixture.problems) or "all paths restored exactly as recorded"))


def measure_enforcer(
    name: str,
    reaper: Reaper,
    workdir: Path,
    interp: Path,
    args: argparse.Namespace,
    cpu: int,
    tag: str,
) -> list[Row]:
    rows: list[Row] = []
    exe_name = interp.name
    group = "/"
    with contextlib.ExitStack() as stack:
        enforcer: Enforcer | None = None
        if name == "none":
            pass
        elif name.startswith("corecapd"):
            enforcer = Corecapd(reaper, workdir, exe_name, cpu, name)
        elif name == "poller":
            enforcer = Poller(reaper, workdir, exe_name, cpu)
        elif name == "pyfloor":
            enforcer = PythonFloor(reaper, workdir, exe_name, cpu, tag)
            group = f"/{enforcer.group_name}"
        else:
            if shutil.which("cgrulesengd") is None:
                return [
                    Row(
                        name,
                        "-",
                        "-",
                        note="n/a: cgrulesengd not installed (apt-get install -y cgroup-tools)",
                    )
                ]
            fixture = CgrulesFixture(exe_name, tag, cpu)
            stack.callback(lambda: report(fixture))
            stack.enter_context(fixture)
            stack.callback(reaper.kill_all)  # our children are gone before the cgroup goes
            print("  cgrulesengd setup (before):")
            for rec in fixture.before.values():
                print(f"    {rec.describe()}")
            print(f"    rule: {fixture.rule.strip()!r}; cpuset {fixture.group} = CPU {cpu}")
            group = "/" + fixture.group_name
            enforcer = Cgrulesengd(reaper, workdir)

        for load in LOADS:
            with hogs(reaper, HOGS) if load != "idle" else contextlib.nullcontext():
                for kind in KINDS:
                    try:
                        if enforcer is None:
                            row = run_baseline(reaper, interp, kind, load, args, cpu)
                        else:
                            row = run_cell(enforcer, reaper, interp, kind, load, args, cpu, group)
                    except Unavailable as err:
                        note = str(err) if str(err).startswith("n/a") else f"failed: {err}"
                        print(f"  {name}: {note}")
                        return [*rows, Row(name, "-", "-", note=note)]
                    print(
                        f"  {name:<19} {kind:<6} {load:<6} load {row.load1:.2f},"
                        f" 1st statement p50 {row.first_p50_ms:.1f} p99 {row.first_p99_ms:.1f};"
                        f" confined at 1st {row.first_pct:5.1f}%"
                        f" p50 {ms(row.p50_ms)} p99 {ms(row.p99_ms)} max {ms(row.max_ms)} ms,"
                        f" {row.cpu_per_1k_ms:.1f} ms CPU/1k (stat {row.stat_cpu_per_1k_ms:.0f}),"
                        f" rss {row.rss_mb:.1f} MB, {row.in_group}/{row.children} in {group};"
                        f" {row.note}" + (f"; {json.dumps(row.figures)}" if row.figures else "")
                    )
                    rows.append(row)
        if enforcer is None:
            return rows
        row = run_unrelated(enforcer, args.unrelated, args.window)
        print(
            f"  {name:<19} unrelated: {row.busy_ms:.1f} ms CPU with, {row.quiet_ms:.1f} ms"
            f" without ({args.window:g} s windows); {row.note}"
        )
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, help="children per cell (default 200)")
    parser.add_argument("--unrelated", type=int, help="unrelated execs (default 1000)")
    parser.add_argument(
        "--window", type=float, default=2.5, help="seconds of each unrelated-exec window"
    )
    parser.add_argument(
        "--overlap-ms",
        type=float,
        default=100.0,
        help="start the next child when the last one exits, or after this many ms",
    )
    parser.add_argument("--jitter-ms", type=float, default=30.0, help="max spawn jitter")
    parser.add_argument("--quick", action="store_true", help="30 children, 300 unrelated execs")
    parser.add_argument(
        "--enforcers", default=",".join(ENFORCERS), help=f"subset of {','.join(ENFORCERS)}"
    )
    parser.add_argument(
        "--crowd", type=int, default=0, help="this many idle processes more during the run"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="measure every cell this many times (medians)"
    )
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    args = parser.parse_args()
    if args.children is None:
        args.children = 30 if args.quick else 200
    if args.unrelated is None:
        args.unrelated = 300 if args.quick else 1000
    selected = [name.strip() for name in args.enforcers.split(",") if name.strip()]
    unknown = set(selected) - set(ENFORCERS)
    if unknown:
        parser.error(f"unknown enforcers {sorted(unknown)}")
    if os.geteuid() != 0:
        parser.error("needs root (cgroups, other processes' affinity)")
    online = sorted(os.sched_getaffinity(0))
    if len(online) < 2 or online != list(range(os.cpu_count() or 0)):
        parser.error(f"needs >= 2 CPUs and an unconfined shell (this one has CPUs {online})")
    cpu = online[-1]
    tag = secrets.token_hex(4)
    exe_name = f"pybench{tag}"  # 15 characters: /proc/PID/comm holds it whole

    print("# corecap exec-time confinement benchmark (bench/exec_latency.py)")
    print("# reproduce, as root from the repository root (cgrulesengd: apt-get install -y")
    print("# cgroup-tools):")
    print(f"#   .venv/bin/python bench/exec_latency.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"# {datetime.datetime.now().isoformat(timespec='seconds')}, kernel {platform.release()},"
        f" CPUs {online[0]}-{online[-1]}, target CPU {cpu}, Python {platform.python_version()}"
    )
    print(f"# {repo_state()}")
    print(
        f"# {args.children} children per cell, each after the last exited or"
        f" {args.overlap_ms:g} ms, + jitter 0-{args.jitter_ms:g} ms,"
        f" {args.unrelated} unrelated execs; enforcers {', '.join(selected)}"
    )
    if args.crowd:
        print(f"# a crowd of {args.crowd} idle processes (sleep) runs beside them")

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _Signals.handler)
    reaper = Reaper()
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="corecap-bench-") as tmp:
        workdir = Path(tmp)
        try:
            if args.crowd:
                reaper.crowd(args.crowd)
            interp = copy_interpreter(workdir, exe_name)
            print(f"# children: {interp} (copy of {os.path.realpath(sys.executable)})")
            for repeat in range(args.repeats):
                for name in selected:
                    print(f"{name}:" + (f" (repeat {repeat + 1})" if args.repeats > 1 else ""))
                    try:
                        rows += measure_enforcer(name, reaper, workdir, interp, args, cpu, tag)
                    except FixtureError as err:
                        print(f"  {name}: failed: {err}")
                        rows.append(Row(name, "-", "-", note=f"failed: {err}"))
        finally:
            reaper.kill_all()
    print(f"\n# {time.monotonic() - started:.0f} s\n")
    print(table(rows))
    if args.repeats > 1:
        print(f"\n{repeat_summary(rows)}")
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
