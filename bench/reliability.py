"""A reliability campaign against the real daemon: a hostile local user, a careless admin,
crashes and odd processes, each class tried with several instances. Prints one row per
instance (what was expected, what was seen) and the figures: RSS under abuse, CPU during an
exec storm, events lost, recovery time after kill -9.

    .venv/bin/python bench/reliability.py [--only CLASS ...] [--storm-rate 2000]

As root (cgroups, a second user, kill -9). Everything it starts carries a marker of its own
and is ended by PID; its cgroups (`corecap-rel-*`) and its user (`cctest-rel-*`) are removed
at the end, also on failure. Results: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent
SYSTEM_PYTHON = (
    "/usr/bin/python3"  # the second user cannot enter root's home, where the venv's lies
)
CPUSET = Path("/sys/fs/cgroup/cpuset")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    group: str
    instance: str
    expected: str
    observed: str
    ok: bool


def wait_for(predicate: Callable[[], Any], timeout: float, poll: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll)


def start_ticks(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


def masks(pid: int) -> dict[int, set[int]]:
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found[int(tid)] = os.sched_getaffinity(int(tid))
    return found


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    socket: Path
    policy: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        from corecapd.client import call

        return call(self.socket, command, timeout=timeout, **arguments)

    def job(self, pid: int) -> dict[str, Any] | None:
        with contextlib.suppress(Exception):
            return next((j for j in self.call("status")["jobs"] if j["pid"] == pid), None)
        return None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self, kind: str) -> list[str]:
        return [line for line in self.text().splitlines() if f": {kind}: " in line]

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        raw = Path(f"/proc/{self.pid}/stat").read_bytes()
        fields = raw[raw.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Campaign:
    """One marker, one temporary folder, one cgroup name and one second user for every
    experiment; `close` ends and removes everything it made, by id."""

    marker: str = field(default_factory=lambda: f"CORECAP_REL_{uuid.uuid4().hex[:10]}")
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="corecap-rel-")))
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    user: str | None = None
    uid: int = -1

    def __post_init__(self) -> None:
        self.dir.chmod(0o755)  # the second user reaches the sockets in it

    def add_user(self) -> str:
        if self.user is None:
            name = f"cctest-rel-{uuid.uuid4().hex[:6]}"
            subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
            self.user = name
            self.uid = int(subprocess.check_output(["id", "-u", name]))
        return self.user

    def as_user(self, argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        user = self.add_user()
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"]
        return self.spawn([*prefix, *argv], **popen)

    def spawn(self, argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, **popen)
        self.started.append(process)
        return process

    def marked(self, code: str = "import time; time.sleep(300)", **popen: Any) -> Any:
        return self.spawn([PYTHON, "-c", code, self.marker], **popen)

    def policy(self, cgroup: str, *, rules: str | None = None, **daemon: Any) -> str:
        settings = {
            "mode": "enforce",
            "scan_interval": 0.2,
            "reserved_cpus": "",
            "socket": str(self.dir / f"{cgroup}.sock"),
            "state_dir": str(self.dir / f"{cgroup}-state"),
            "cgroup": cgroup,
        } | daemon
        if rules is None:
            rules = self.rule()
        lines = ["[daemon]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
        lines += ["[defaults]", "grace = 0.0", "violation_after = 2"]
        return "\n".join(lines) + "\n" + rules

    def rule(self, cpus: int = 1, users: tuple[str, ...] = ("root",)) -> str:
        return textwrap.dedent(
            f"""
            [[rules]]
            name = "marked"
            match = {{ cmdline = "{self.marker}", users = {json.dumps(list(users))} }}
            cpus = {cpus}
            """
        )

    def cgroup(self) -> str:
        name = f"corecap-rel-{uuid.uuid4().hex[:8]}"
        self.cgroups.append(name)
        return name

    def start(
        self, text: str | None = None, cgroup: str | None = None, wait: bool = True, **daemon: Any
    ) -> Daemon:
        cgroup = cgroup or self.cgroup()
        policy = self.dir / f"{cgroup}-{len(self.daemons)}.toml"
        policy.write_text(text if text is not None else self.policy(cgroup, **daemon))
        log = self.dir / f"{cgroup}-{len(self.daemons)}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [PYTHON, "-m", "corecapd.daemon", "--config", str(policy)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        sock = Path(daemon.get("socket", self.dir / f"{cgroup}.sock"))
        found = Daemon(process, sock, policy, log)
        self.daemons.append(found)
        if wait:
            wait_for(lambda: not found.alive() or found.events("daemon-started"), 30)
        return found

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for daemon in self.daemons:
            daemon.stop()
        for name in self.cgroups:
            remove_cgroup(CPUSET / name)
        if self.user is not None:
            subprocess.run(["pkill", "-KILL", "-u", self.user], check=False)
            subprocess.run(["userdel", self.user], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            remove_cgroup(child)
    for pid in (path / "cgroup.procs").read_text().split():
        with contextlib.suppress(ProcessLookupError):
            (CPUSET / "cgroup.procs").write_text(pid)
    with contextlib.suppress(OSError):
        path.rmdir()


def in_cgroup(pid: int, prefix: str) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cpuset").read_text().startswith(prefix)
    return False


def ended_job(daemon: Daemon, pid: int) -> bool:
    return _pings(daemon) and daemon.job(pid) is None


def all_confined(daemon: Daemon, jobs: list[subprocess.Popen[bytes]]) -> bool:
    for job in jobs:
        listed = daemon.job(job.pid)
        if not listed or not confined_to(job.pid, set(listed["cpus"])):
            return False
    return True


def confined_to(pid: int, cpus: set[int]) -> bool:
    found = masks(pid)
    return bool(found) and all(mask == cpus for mask in found.values())


# -- a hostile local user: the socket ---------------------------------------------------

HOLD = textwrap.dedent(
    """
    # argv: SOCKET N SECONDS MODE. idle: connect, say nothing; partial: half a request, no
    # newline; trickle: a byte every second; noread: pipelined requests, never read; churn:
    # connect and close as fast as it can. Reconnects whatever the daemon closes.
    import select, socket, sys, time
    path, n, seconds, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    def opened():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.setblocking(False)
        if mode == "partial":
            s.send(b'{"command": "ping"')
        elif mode == "noread":
            try:
                s.send(b'{"command":"status"}\\n' * 3000)
            except BlockingIOError:
                pass
        return s
    deadline = time.monotonic() + seconds
    if mode == "churn":
        count = 0
        while time.monotonic() < deadline:
            try:
                opened().close()
                count += 1
            except OSError:
                pass
        print("churned", count)
        sys.exit()
    conns = []
    for _ in range(n):
        try:
            conns.append(opened())
        except OSError:
            break
    while time.monotonic() < deadline:
        if mode == "trickle":
            for s in list(conns):
                try:
                    s.send(b" ")
                except OSError:
                    conns.remove(s)
        readable = select.select(conns, [], [], 1.0)[0] if conns else []
        for s in readable:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data and s in conns:
                conns.remove(s)
                s.close()
                try:
                    conns.append(opened())
                except OSError:
                    pass
    """
)


# A marked job's first statement prints how many CPUs it may run on (1: confined by then).
FIRST_STATEMENT = "import os; print(len(os.sched_getaffinity(0)), flush=True)"


def socket_abuse(run: Campaign) -> list[Row]:
    """The second user holds hundreds of connections every way it can, for 20 s; root, a
    `corecap run` and a new job must all be served meanwhile."""
    daemon = run.start()
    job = run.marked()
    wait_for(lambda: daemon.job(job.pid), 10)
    rss_before = daemon.rss_mib()
    script = run.dir / "hold.py"
    script.write_text(HOLD)
    script.chmod(0o644)
    abuse = 20.0

    def attack() -> list[subprocess.Popen[bytes]]:
        modes = (("idle", 100), ("partial", 100), ("trickle", 50), ("noread", 50), ("churn", 0))
        return [
            run.as_user(
                [SYSTEM_PYTHON, str(script), str(daemon.socket), str(n), str(abuse), mode],
                stdout=subprocess.DEVNULL,
            )
            for mode, n in modes
        ]

    attackers = attack()
    time.sleep(12)  # past the daemon's idle timeout: whatever it would drop, it has
    latencies, refused, rss = [], [], [daemon.rss_mib()]
    for _ in range(20):
        start = time.monotonic()
        try:
            daemon.call("status", timeout=5)
            latencies.append(time.monotonic() - start)
        except Exception as err:
            refused.append(type(err).__name__)
        rss.append(daemon.rss_mib())
        time.sleep(0.1)
    launched = subprocess.run(
        [str(BIN / "corecap"), "run", "--socket", str(daemon.socket), "--", "/bin/echo", "ran"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    fresh = [run.marked(FIRST_STATEMENT, stdout=subprocess.PIPE) for _ in range(10)]
    at_first = sum(1 for child in fresh if child.communicate(timeout=30)[0].strip() == b"1")
    wait_for(lambda: all(p.poll() is not None for p in attackers), abuse + 10)
    rss_after = daemon.rss_mib()
    for attacker in attack():  # a second round: what the first left must not grow
        attacker.wait(timeout=abuse + 10)
    rss_again = daemon.rss_mib()
    median = statistics.median(latencies) * 1000 if latencies else float("nan")
    worst = max(latencies) * 1000 if latencies else float("nan")
    return [
        Row(
            "unprivileged DoS",
            "300 held + churn: root's status",
            "20/20 answered",
            f"{len(latencies)}/20 answered (median {median:.1f} ms, max {worst:.1f} ms)"
            + (f", refused: {refused[:3]}" if refused else ""),
            len(latencies) == 20,
        ),
        Row(
            "unprivileged DoS",
            "300 held + churn: corecap run",
            "the job runs (exit 0)",
            f"exit {launched.returncode}: {(launched.stdout + launched.stderr).strip()[-120:]}",
            launched.returncode == 0 and "ran" in launched.stdout,
        ),
        Row(
            "unprivileged DoS",
            "300 held + churn: 10 new jobs",
            "confined at their first statement",
            f"{at_first}/10",
            at_first == 10,
        ),
        Row(
            "unprivileged DoS",
            "RSS under abuse",
            "bounded",
            f"{rss_before:.1f} MiB before, peak {max(rss):.1f} MiB, {rss_after:.1f} MiB after,"
            f" {rss_again:.1f} MiB after a second round",
            max(rss) < rss_before + 64 and rss_again < rss_after + 8,
        ),
    ]


FUZZ = textwrap.dedent(
    """
    # argv: SOCKET COUNT SEED. Random requests, one connection each; prints a JSON summary of
    # the outcomes: a reply (a JSON line with "ok"), a clean close, or a hang (no answer in 15 s).
    import json, random, socket, sys
    path, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    sys.set_int_max_str_digits(0)  # this side writes 5,000-digit numbers; the daemon reads them
    COMMANDS = ["ping", "status", "violations", "reload", "explain", "register", "report"]
    def value(depth=0):
        kind = rng.randrange(9 if depth < 3 else 6)
        if kind == 0: return rng.randrange(-2**70, 2**70)
        if kind == 1: return int("9" * rng.choice([19, 400, 4301, 5000]))
        if kind == 2: return rng.random() * 10.0 ** rng.randrange(-320, 308)
        if kind == 3: return "".join(chr(rng.randrange(0x2FFF)) for _ in range(rng.randrange(40)))
        if kind == 4: return rng.choice([None, True, False, [], {}])
        if kind == 5: return rng.randrange(0, 5000)
        if kind == 6: return [value(depth + 1) for _ in range(rng.randrange(4))]
        keys = ["cpus", "intra_op", "pid", "x", "declaration", "pools"]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randrange(4))}
    def request():
        kind = rng.randrange(6)
        if kind == 0:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\\n"
        if kind == 1:
            return b"[" * rng.choice([10, 1000, 100000]) + b"\\n"
        if kind == 2:
            return b'{"command": "ping", "x": "\\xff\\xfe"}\\n'
        body = {"command": rng.choice(COMMANDS)}
        body.update({rng.choice(["pid", "declaration", "epoch", "threads", "pools", "z"]): value()
                     for _ in range(rng.randrange(3))})
        if kind == 3 and body["command"] == "register":
            body["declaration"] = {k: value() for k in ("cpus", "intra_op", "inter_op", "blas")}
        line = json.dumps(body).encode()
        return line if kind == 4 else line + b"\\n"  # kind 4: no newline, then EOF
    outcomes = {"reply": 0, "close": 0, "hang": 0, "refused": 0}
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        try:
            s.connect(path)
            s.sendall(request())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while not data.endswith(b"\\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
            if data:
                assert "ok" in json.loads(data.splitlines()[0])
                outcomes["reply"] += 1
            else:
                outcomes["close"] += 1
        except socket.timeout:
            outcomes["hang"] += 1
        except (ConnectionRefusedError, FileNotFoundError):
            outcomes["refused"] += 1
        except OSError:
            outcomes["close"] += 1
        finally:
            s.close()
    print(json.dumps(outcomes))
    """
)


def protocol_fuzz(run: Campaign, count: int = 600) -> list[Row]:
    """Random bytes and JSON into the socket, as root and as the second user."""
    daemon = run.start()
    script = run.dir / "fuzz.py"
    script.write_text(FUZZ)
    script.chmod(0o644)
    rows = []
    for who, seed in (("root", 1), ("second user", 2)):
        argv = [SYSTEM_PYTHON, str(script), str(daemon.socket), str(count), str(seed)]
        fuzzer = run.as_user(argv, stdout=subprocess.PIPE) if who != "root" else None
        fuzzer = fuzzer or run.spawn(argv, stdout=subprocess.PIPE)
        out, _ = fuzzer.communicate(timeout=600)
        outcomes = json.loads(out or b"{}")
        answered = outcomes.get("reply", 0) + outcomes.get("close", 0)
        rows.append(
            Row(
                "bad input",
                f"{count} random requests as {who}",
                "a reply or a clean close each",
                ", ".join(f"{k} {v}" for k, v in outcomes.items()),
                answered == count,
            )
        )
    job = run.marked()
    placed = wait_for(lambda: daemon.job(job.pid), 10)
    tracebacks = daemon.text().count("Traceback")
    confined = bool(placed) and confined_to(job.pid, set(placed["cpus"]))
    rows.append(
        Row(
            "bad input",
            "after the fuzzing",
            "no traceback; alive; the next job confined",
            f"tracebacks {tracebacks}, alive {daemon.alive()}, next job"
            f" {'confined' if confined else 'not confined'}",
            tracebacks == 0 and daemon.alive() and confined,
        )
    )
    return rows


# -- a careless admin: half-written policies and state ------------------------------------


def policy_instances(text: str, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    data = text.encode()
    yield "empty file", b""
    yield "only comments", b"# being edited\n"
    lines = data.splitlines(keepends=True)
    for cut in range(1, len(lines)):
        yield f"cut after line {cut}", b"".join(lines[:cut])
    for offset in sorted(rng.sample(range(1, len(data)), 20)):
        yield f"cut at byte {offset}", data[:offset]
    for offset in sorted(rng.sample(range(len(data)), 5)):
        yield f"byte 0xff at {offset}", data[:offset] + b"\xff" + data[offset:]
    yield "NUL byte", data.replace(b"\n", b"\n\x00", 1)
    for key in (b"scan_interval = 0.2", b"violation_after = 2", b"cpus = 1"):
        name = key.split(b" ")[0]
        yield f"{name.decode()} of 5,000 digits", data.replace(key, name + b" = " + b"9" * 5000)


def careless_policies(run: Campaign) -> list[Row]:
    """Every truncation of a working policy, bytes that are not UTF-8, huge numbers: each
    reloaded while a job runs. A reload either takes a policy that still names the job or
    refuses with a located error; the job is never released."""
    cgroup = run.cgroup()
    text = run.policy(cgroup)
    daemon = run.start(text, cgroup=cgroup)
    job = run.marked()
    wait_for(lambda: daemon.job(job.pid), 10)
    accepted, refused, unlocated, released = 0, 0, [], []
    instances = list(policy_instances(text, random.Random(3)))
    for name, content in instances:
        daemon.policy.write_bytes(content)
        try:
            daemon.call("reload")
            accepted += 1
        except Exception as err:
            refused += 1
            if str(daemon.policy) not in str(err):
                unlocated.append(name)
        listed = daemon.job(job.pid)
        if not listed or not confined_to(job.pid, set(listed["cpus"])):
            released.append(name)
        daemon.policy.write_text(text)  # the good policy back before the next instance
        with contextlib.suppress(Exception):
            daemon.call("reload")
    return [
        Row(
            "careless admin",
            f"{len(instances)} broken policies reloaded under a running job",
            "the job never released; every refusal names the file",
            f"{accepted} accepted, {refused} refused, released in {len(released)}"
            f" {released[:3]}, unlocated refusals {len(unlocated)} {unlocated[:3]},"
            f" alive {daemon.alive()}",
            not released and not unlocated and daemon.alive(),
        )
    ]


def careless_state(run: Campaign) -> list[Row]:
    """state.json as a crash, a full disk or a hand edit leaves it."""
    rows = []
    root_sleeper = run.spawn(["sleep", "300"])  # root's, named by no rule
    forged_name = f"{root_sleeper.pid}-{start_ticks(root_sleeper.pid)}"
    forged = {
        "version": 2,
        "registrations": {forged_name: {"declaration": {"cpus": 1}, "uid": 0}},
    }

    def world_writable(path: Path) -> None:
        path.write_text(json.dumps(forged))
        path.chmod(0o666)

    cases: list[tuple[str, Callable[[Path], object], str]] = [
        ("300 MB file", lambda p: _sparse_json(p, 300 << 20), "refused by size, fast start"),
        ("truncated JSON", lambda p: p.write_text('{"version": 2, "regis'), "refused"),
        ("forged entry for root's sleep", lambda p: p.write_text(json.dumps(forged)), "no job"),
        ("world-writable", world_writable, "refused"),
        ("a directory", lambda p: p.mkdir(), "refused"),
    ]
    for name, make, expected in cases:
        cgroup = run.cgroup()
        state = run.dir / f"{cgroup}-state"
        state.mkdir(mode=0o755)
        make(state / "state.json")
        start = time.monotonic()
        daemon = run.start(cgroup=cgroup)
        pong = wait_for(partial(_pings, daemon), 30)
        took = time.monotonic() - start
        problems = daemon.events("state-problem")
        enrolled = daemon.job(root_sleeper.pid) is not None
        rss = daemon.rss_mib() if daemon.alive() else 0.0
        rows.append(
            Row(
                "careless admin",
                f"state.json: {name}",
                expected,
                f"up in {took:.2f} s, RSS {rss:.0f} MiB, state-problem {len(problems)},"
                f" root's sleep enrolled {enrolled}",
                bool(pong) and not enrolled and (name.startswith("forged") or bool(problems)),
            )
        )
        daemon.stop()
    return rows


def _sparse_json(path: Path, size: int) -> None:
    with open(path, "wb") as file:
        file.write(b'{"version": 2, "registrations": {}}')
        file.truncate(size)  # the rest: NUL bytes, as a crash on some file systems leaves


def _pings(daemon: Daemon) -> bool:
    with contextlib.suppress(Exception):
        daemon.call("ping", timeout=2)
        return True
    return False


# -- crashes: kill -9 at chosen moments, half-made fences -------------------------------


def kill9(run: Campaign) -> list[Row]:
    """8 jobs on shared cores; corecapd killed -9 at a chosen moment; while it is down 2 jobs
    end and 2 start; then it starts again. Survivors must keep their cores and fences."""
    rows = []
    recoveries = []
    for backend, moment in (
        ("cgroup1", "idle"),
        ("affinity", "idle"),
        ("cgroup1", "right after an exec"),
        ("cgroup1", "during a reload"),
    ):
        cgroup = run.cgroup()
        daemon = run.start(cgroup=cgroup, backend=backend)
        jobs = [run.marked() for _ in range(8)]
        wait_for(partial(all_confined, daemon, jobs), 20)
        time.sleep(0.5)
        before = {j.pid: set(daemon.job(j.pid)["cpus"]) for j in jobs}  # type: ignore[index]
        if moment == "right after an exec":
            jobs.append(run.marked())
            time.sleep(0.002)
        elif moment == "during a reload":
            daemon.process.send_signal(signal.SIGHUP)
            time.sleep(0.002)
        daemon.process.kill()
        daemon.process.wait()
        for ended in jobs[:2]:
            ended.kill()
            ended.wait()
        survivors = jobs[2:8]
        fresh = [run.marked() for _ in range(2)]
        start = time.monotonic()
        again = run.start(daemon.policy.read_text(), cgroup=cgroup)

        done = wait_for(partial(all_confined, again, [*jobs[2:], *fresh]), 30, 0.01)
        took = time.monotonic() - start
        recoveries.append(took)
        moved = [
            j.pid
            for j in survivors
            if set((again.job(j.pid) or {}).get("cpus", [])) != before[j.pid]
        ]
        rows.append(
            Row(
                "crash",
                f"kill -9 ({backend}, {moment}); 2 end, 2 start while down",
                "survivors keep their cores; all confined",
                f"survivors moved {len(moved)}/6, all confined {bool(done)},"
                f" recovered {took:.2f} s after the restart began",
                not moved and bool(done),
            )
        )
        again.stop()
        for job in jobs + fresh:
            job.kill()
    rows.append(
        Row(
            "crash",
            "recovery time after kill -9",
            "figure",
            f"median {statistics.median(recoveries):.2f} s, max {max(recoveries):.2f} s"
            " (restart to every job listed and confined)",
            True,
        )
    )
    return rows


def half_made_fences(run: Campaign) -> list[Row]:
    """Cgroups as a crash leaves them: made, never written."""
    rows = []
    for name in ("subtree without CPUs", "subtree without memory nodes", "job fence unwritten"):
        cgroup = run.cgroup()
        subtree = CPUSET / cgroup
        subtree.mkdir()
        effective = (CPUSET / "cpuset.effective_cpus").read_text().strip()
        mems = (CPUSET / "cpuset.effective_mems").read_text().strip()
        if name != "subtree without CPUs":
            (subtree / "cpuset.cpus").write_text(effective)
        if name != "subtree without memory nodes":
            (subtree / "cpuset.mems").write_text(mems)
        job = run.marked()
        if name == "job fence unwritten":
            wait_for(partial(start_ticks, job.pid), 5)
            (subtree / f"job-{job.pid}-{start_ticks(job.pid)}").mkdir()
        daemon = run.start(cgroup=cgroup)
        listed = wait_for(partial(daemon.job, job.pid), 10)
        fence = f"/{cgroup}/job-"
        fenced = wait_for(partial(in_cgroup, job.pid, fence), 5)
        failed = daemon.events("fence-failed")
        rows.append(
            Row(
                "crash",
                f"half-made cgroup: {name}",
                "repaired: the job fenced, no fence-failed",
                f"fenced {bool(fenced)}, confined"
                f" {bool(listed) and confined_to(job.pid, set(listed['cpus']))},"
                f" fence-failed {len(failed)}",
                bool(fenced) and not failed,
            )
        )
        daemon.stop()
        job.kill()
        job.wait()
    return rows


LEADER_EXITS = textwrap.dedent(
    r"""
    #define _GNU_SOURCE
    #include <pthread.h>
    #include <sched.h>
    #include <stdlib.h>
    #include <string.h>
    #include <unistd.h>
    /* argv: WORKERS SECONDS [widen]: main exits after 0.5 s, the workers run on */
    static int seconds, widen;
    static void *worker(void *arg) {
        for (int i = 0; i < seconds * 50; i++) {
            if (widen && i == 75) {
                cpu_set_t all; CPU_ZERO(&all);
                for (int c = 0; c < sysconf(_SC_NPROCESSORS_ONLN); c++) CPU_SET(c, &all);
                sched_setaffinity(0, sizeof all, &all);
            }
            usleep(20000);
        }
        return NULL;
    }
    int main(int argc, char **argv) {
        int workers = atoi(argv[1]); seconds = atoi(argv[2]);
        widen = argc > 3 && strcmp(argv[3], "widen") == 0;
        for (int i = 0; i < workers; i++) { pthread_t t; pthread_create(&t, NULL, worker, NULL); }
        usleep(500000);
        pthread_exit(NULL);
    }
    """
)


def leader_exits(run: Campaign) -> list[Row]:
    """Main threads that exit while their workers run on (pthread_exit)."""
    source = run.dir / "leader_exits.c"
    source.write_text(LEADER_EXITS)
    binary = run.dir / "python3"  # the default exe criterion matches Python interpreters
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(source)], check=True)
    rows = []
    for backend, workers, widen in (
        ("cgroup1", 1, False),
        ("cgroup1", 8, False),
        ("affinity", 1, False),
        ("affinity", 3, True),
    ):
        daemon = run.start(backend=backend)
        job = run.spawn([str(binary), str(workers), "5", *(["widen"] if widen else []), run.marker])
        listed = wait_for(partial(daemon.job, job.pid), 10)
        grant = set(listed["cpus"]) if listed else set()
        time.sleep(3.0)  # the leader exited at 0.5 s; a worker widened at 1.5 s
        still = daemon.job(job.pid)
        live = {t: m for t, m in masks(job.pid).items() if t != job.pid}
        kept = bool(still) and bool(live) and all(m == grant for m in live.values())
        job.wait(timeout=20)
        ended = wait_for(partial(ended_job, daemon, job.pid), 5)
        escapes = len(daemon.events("escape"))
        rows.append(
            Row(
                "odd processes",
                f"main thread exits, {workers} workers run on ({backend}"
                + (", a worker widens its mask)" if widen else ")"),
                "job kept and confined until its last thread; then ended"
                + ("; escape logged" if widen else ""),
                f"kept {kept}, ended after {bool(ended)}, job-ended events"
                f" {len(daemon.events('job-ended'))}, escapes {escapes}",
                kept and bool(ended) and (escapes > 0 if widen else True),
            )
        )
        daemon.stop()
    return rows


# -- load: an exec storm ------------------------------------------------------------------


def exec_storm(run: Campaign, rate: int = 2000, seconds: float = 10.0) -> list[Row]:
    """A build host's worth of unrelated execs, with marked jobs started among them: the
    daemon's CPU (against the same daemon idle, same run), events lost, jobs confined at
    their first statement."""
    binary = run.dir / "exec_storm"
    source = ROOT / "tests" / "exec_storm.c"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    daemon = run.start(scan_interval=1.0)
    wait_for(lambda: _pings(daemon), 10)
    idle_cpu = daemon.cpu_seconds()
    time.sleep(seconds)
    idle = (daemon.cpu_seconds() - idle_cpu) / seconds
    storm = run.spawn([str(binary), str(rate), str(seconds)], stdout=subprocess.PIPE)
    cpu_start, wall_start = daemon.cpu_seconds(), time.monotonic()
    children = []
    while storm.poll() is None:
        children.append(run.marked(FIRST_STATEMENT, stdout=subprocess.PIPE))
        time.sleep(0.1)
    used = (daemon.cpu_seconds() - cpu_start) / (time.monotonic() - wall_start)
    execs = int((storm.communicate()[0] or b"0").split()[-1])
    confined = sum(1 for child in children if child.communicate(timeout=30)[0].strip() == b"1")
    host = daemon.call("status")["host"]
    lost = host.get("exec_events_lost", "?")
    return [
        Row(
            "load",
            f"exec storm: {execs} execs in {seconds:.0f} s, {len(children)} marked jobs among them",
            "no events lost; every job confined at its first statement",
            f"daemon CPU {used * 100:.1f}% of a core (idle, same run: {idle * 100:.1f}%),"
            f" events lost {lost}, confined at first statement {confined}/{len(children)}",
            lost == 0 and confined == len(children),
        )
    ]


CLASSES: dict[str, Callable[[Campaign], list[Row]]] = {
    "socket": socket_abuse,
    "fuzz": protocol_fuzz,
    "policy": careless_policies,
    "state": careless_state,
    "kill9": kill9,
    "fences": half_made_fences,
    "leader": leader_exits,
    "storm": exec_storm,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=CLASSES, help="these classes only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: cgroups, a second user, kill -9")
    rows: list[Row] = []
    for name in args.only or CLASSES:
        run = Campaign()
        started = time.monotonic()
        try:
            found = CLASSES[name](run)
        except Exception as err:
            found = [
                Row(name, "the experiment itself", "runs", f"{type(err).__name__}: {err}", False)
            ]
        finally:
            run.close()
        rows += found
        print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    print("| class | instance | expected | observed | ok |")
    print("|---|---|---|---|---|")
    for row in rows:
        observed = row.observed.replace("|", "/")
        ok = "yes" if row.ok else "NO"
        print(f"| {row.group} | {row.instance} | {row.expected} | {observed} | {ok} |")
    failed = sum(1 for row in rows if not row.ok)
    print(f"\n{len(rows) - failed} as expected, {failed} not")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
