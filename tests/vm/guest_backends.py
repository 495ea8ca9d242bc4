"""The systemd and cgroup2 fences against a real systemd and a real cgroup v2 kernel. Guest side
of the VM tier (tests/vm/vm.sh: systemd 257 as PID 1, pure cgroup v2, root, the checkout
read-only at /mnt/src); tests/test_vm.py runs it with the guest's python3 and pytest.

- systemd: a marked job confined by a transient scope, `AllowedCPUs` read back from systemd
  (`systemctl show`, and D-Bus Get through `adopt()`) and from the kernel (/proc/PID/cgroup,
  cpuset.cpus.effective, the job's mask); new CPUs; a new member; release; adopt.
- cgroup2: the same on a subtree of a unit started with Delegate=yes. The backend must run in
  that unit's subgroup, so a small driver (this file, run as `... guest_backends.py serve`) is
  a transient service with `Delegate=yes` and `DelegateSubgroup=supervisor` (`systemd-run
  --pipe`) and takes JSON commands on stdin; in the root of a delegated cgroup (a scope) the
  backend refuses, and says why.
- end to end: corecapd as the shipped (hardened) service with `backend = "auto"` chooses
  systemd and fences marked jobs in their scopes; and with `backend = "cgroup2"`, the unit
  plus the shipped drop-in systemd/cgroup2.conf, in its delegated subtree. Either way a fenced
  job outlives `systemctl restart` and a kill -9 of corecapd, and the new daemon takes it
  over. The time from exec to the fence is printed (past pytest's capture).

Every unit, cgroup and process a test makes carries this run's prefix or marker and is removed
by name or PID, also on failure. Timings print with `-s` (test_vm.py shows the guest output).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from guestkit import GUEST_ONLY, PYTHON, SRC, from_checkout, sh, wait_for

T = TypeVar("T")

CGROUP = Path("/sys/fs/cgroup")
RUN = uuid.uuid4().hex[:10]
PREFIX = f"cctest_{RUN}"  # daemon.cgroup of the backend tests: "<PREFIX>.slice", ...
MARKER = f"CORECAP_VM_BACKENDS_{RUN}"
ONLINE = frozenset(os.sched_getaffinity(0))
TWO_CPUS = len(ONLINE) >= 2

pytestmark = GUEST_ONLY


def show(unit: str, prop: str) -> str:
    return sh("systemctl", "show", "--value", "-p", prop, unit).stdout.strip()


def cgroup_of(pid: int) -> str:
    text = Path(f"/proc/{pid}/cgroup").read_text()
    return next(line[3:] for line in text.splitlines() if line.startswith("0::"))


def effective(cgroup: str) -> str:
    return (CGROUP / cgroup.lstrip("/") / "cpuset.cpus.effective").read_text().strip()


def job_name(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return f"{pid}-{stat[stat.rindex(')') + 2 :].split()[19]}"


def cpulist(cpus: frozenset[int] | set[int]) -> str:
    from corecapd.cpulist import format_cpulist

    return format_cpulist(cpus)


@dataclass
class Made:
    """What a test made, ended and removed by PID and name at teardown, also on failure."""

    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)  # removed once empty, after the files

    def job(self, *prefix: str) -> subprocess.Popen[Any]:
        """A marked job process: `python3 -c` sleeping, the marker in its command line."""
        argv = [*prefix, PYTHON, "-c", "import time; time.sleep(600)", MARKER]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def end(self, process: subprocess.Popen[Any]) -> None:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)

    def clean(self) -> None:
        for process in self.processes:
            self.end(process)
        for unit in self.units:
            sh("systemctl", "stop", unit, check=False)
            sh("systemctl", "reset-failed", unit, check=False)
        for path in self.files:
            path.unlink(missing_ok=True)
        for path in self.dirs:
            if path.is_dir():
                path.rmdir()


@pytest.fixture
def made() -> Iterator[Made]:
    things = Made()
    try:
        yield things
    finally:
        things.clean()
        leftovers = ours_in_the_cgroup_tree()
        for unit in leftovers:  # a unit of ours that outlived its processes
            sh("systemctl", "stop", unit, check=False)
        assert not ours_in_the_cgroup_tree(), f"left behind, now stopped: {leftovers}"


def ours_in_the_cgroup_tree() -> list[str]:
    """This run's units in the cgroup tree ("<PREFIX>.slice", "system.slice/<PREFIX>-x.scope")."""
    found = [*CGROUP.glob(f"*{RUN}*"), *CGROUP.glob(f"*/*{RUN}*")]
    return [path.name for path in found if path.is_dir()]


Say = Callable[[str], None]


@pytest.fixture
def say(capsys: pytest.CaptureFixture[str]) -> Say:
    """Print past pytest's capture: test_vm.py runs the guest's pytest without -s."""

    def print_now(text: str) -> None:
        with capsys.disabled():
            print(f"\n  timing (TCG guest): {text}")

    return print_now


def outer_scope(made: Made, cpus: str) -> subprocess.Popen[Any]:
    """A marked process in someone else's cpuset: a scope of ours with AllowedCPUs=`cpus`."""
    unit = f"{PREFIX}-outer.scope"
    made.units.append(unit)
    process = made.job(
        "systemd-run", "--quiet", "--scope", f"--unit={unit}", "-p", f"AllowedCPUs={cpus}"
    )
    wait_for(lambda: cgroup_of(process.pid).endswith(unit), f"PID {process.pid} in {unit}")
    wait_for(lambda: effective(cgroup_of(process.pid)) == cpus, f"{unit} with CPUs {cpus}")
    return process


# --- systemd ---------------------------------------------------------------------------------


@pytest.mark.skipif(not TWO_CPUS, reason="needs 2 CPUs")
def test_systemd_scope_confines_updates_and_goes_with_the_job(made: Made, say: Say) -> None:
    from corecapd.enforcement import Host, SystemdBackend
    from corecapd.procfs import ProcFS, online_cpus

    backend = SystemdBackend(Host(ProcFS(), online_cpus(), cgroup=PREFIX))
    assert backend.problem() is None
    made.units.append(f"{PREFIX}.slice")  # slices stay when empty
    job = made.job()
    name = job_name(job.pid)
    unit, scope = f"{PREFIX}-{name}.scope", f"/{PREFIX}.slice/{PREFIX}-{name}.scope"
    made.units.append(unit)

    began = time.monotonic()
    assert backend.confine(name, [job.pid], frozenset({1})) == 1
    fenced_ms = (time.monotonic() - began) * 1000
    assert cgroup_of(job.pid) == scope  # in the scope when confine returns (the job is done)
    assert show(unit, "AllowedCPUs") == "1"
    assert show(unit, "ActiveState") == "active" and show(unit, "Slice") == f"{PREFIX}.slice"
    assert effective(scope) == "1"
    assert os.sched_getaffinity(job.pid) == {1}
    os.sched_setaffinity(job.pid, ONLINE)  # a widened mask is cut back to the fence
    assert os.sched_getaffinity(job.pid) == {1}
    assert backend.adopt() == {name: frozenset({1})}  # AllowedCPUs by D-Bus Get

    began = time.monotonic()
    assert backend.confine(name, [job.pid], frozenset({1})) == 0  # no change: no D-Bus
    unchanged_ms = (time.monotonic() - began) * 1000
    began = time.monotonic()
    backend.confine(name, [job.pid], frozenset({0}))
    update_ms = (time.monotonic() - began) * 1000
    wait_for(lambda: effective(scope) == "0", "the new CPUs applied")
    assert show(unit, "AllowedCPUs") == "0"
    assert os.sched_getaffinity(job.pid) == {0}

    member = made.job()
    began = time.monotonic()
    assert backend.confine(name, [job.pid, member.pid], frozenset({0})) == 1
    attach_ms = (time.monotonic() - began) * 1000
    assert cgroup_of(member.pid) == scope
    assert os.sched_getaffinity(member.pid) == {0}

    backend.release(name, [job.pid, member.pid])  # processes left: they go free, still alive
    wait_for(lambda: effective(scope) == cpulist(ONLINE), "the scope widened")
    assert job.poll() is None and member.poll() is None
    made.end(job)
    made.end(member)
    wait_for(lambda: show(unit, "LoadState") == "not-found", f"{unit} gone with its last process")
    assert not (CGROUP / scope.lstrip("/")).exists()
    assert backend.adopt() == {}
    backend.release(name, [])  # gone already: nothing to do, no error
    say(
        f"systemd backend: new scope (StartTransientUnit + job) {fenced_ms:.1f} ms,"
        f" no change {unchanged_ms:.2f} ms, new CPUs {update_ms:.1f} ms,"
        f" new member (AttachProcessesToUnit) {attach_ms:.1f} ms"
    )


@pytest.mark.skipif(not TWO_CPUS, reason="needs 2 CPUs")
def test_systemd_leaves_a_process_in_a_narrower_cpuset(made: Made) -> None:
    from corecapd.enforcement import Host, SystemdBackend
    from corecapd.procfs import ProcFS, online_cpus

    boxed = outer_scope(made, "0")
    before = cgroup_of(boxed.pid)
    backend = SystemdBackend(Host(ProcFS(), online_cpus(), cgroup=PREFIX))
    assert backend.confine(job_name(boxed.pid), [boxed.pid], frozenset({0})) == 0
    assert cgroup_of(boxed.pid) == before
    assert backend.adopt() == {}


# --- cgroup2 in a delegated unit ---------------------------------------------------------------


@dataclass
class Driver:
    """The cgroup2 backend in a unit of its own (`serve` below), driven over a pipe."""

    process: subprocess.Popen[str]  # systemd-run: the unit's process has its stdin and stdout
    unit: str
    last_ms: float = 0.0  # how long the backend took for the last command, in the driver

    def __call__(self, op: str, *args: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the cgroup2 driver ended (exit {self.process.wait(timeout=30)})"
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"cgroup2 {op}{args}: {answer['error']}")
        self.last_ms = answer["ms"]
        return answer["result"]

    def close(self) -> None:
        """End of input: the driver returns, its unit ends, then systemd-run."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


# corecapd's way (systemd/cgroup2.conf): the main process in <unit cgroup>/supervisor. A
# transient service does not inherit the environment; --pipe hands it our stdin and stdout.
DELEGATED_SERVICE = (
    *("systemd-run", "--quiet", "--pipe", "--wait", "--service-type=exec"),
    *("-p", "Delegate=yes", "-p", "DelegateSubgroup=supervisor"),
    *(f"--setenv=PYTHONPATH={SRC}", "--setenv=PYTHONDONTWRITEBYTECODE=1"),
)
# the process in the root of its delegated cgroup (a service without DelegateSubgroup= alike)
DELEGATED_SCOPE = ("systemd-run", "--quiet", "--scope", "-p", "Delegate=yes")


def start_driver(made: Made, unit: str, runner: tuple[str, ...]) -> Driver:
    made.units.append(unit)
    process = subprocess.Popen(
        [*runner, f"--unit={unit}", PYTHON, __file__, "serve", PREFIX],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    made.processes.append(process)
    return Driver(process, unit)


@pytest.fixture
def driver(made: Made) -> Iterator[Driver]:
    started = start_driver(made, f"{PREFIX}-driver.service", DELEGATED_SERVICE)
    yield started
    started.close()


def test_cgroup2_refuses_the_root_of_a_delegated_cgroup(made: Made) -> None:
    """There, systemd could not start corecapd again once jobs are fenced below it."""
    root = start_driver(made, f"{PREFIX}-root.scope", DELEGATED_SCOPE)
    try:
        problem = root("problem")
        assert cgroup_of(root.process.pid) == f"/system.slice/{root.unit}"
    finally:
        root.close()
    assert problem.startswith(
        f"corecapd runs in the root of its delegated cgroup /system.slice/{root.unit}: once jobs"
        " are fenced below it, systemd could not start corecapd there again"
    ), problem
    assert "jobs would be stopped with the service" in problem
    for fix in ("DelegateSubgroup=supervisor", "KillMode=process", "systemd/cgroup2.conf"):
        assert fix in problem, problem


@pytest.mark.skipif(not TWO_CPUS, reason="needs 2 CPUs")
def test_cgroup2_fences_in_its_delegated_subtree(made: Made, driver: Driver, say: Say) -> None:
    assert driver("problem") is None
    owned = f"/system.slice/{driver.unit}"
    assert show(driver.unit, "Delegate") == "yes" and show(driver.unit, "ControlGroup") == owned
    assert cgroup_of(int(show(driver.unit, "MainPID"))) == f"{owned}/supervisor"
    assert driver("describe") == f"cgroup2 ({CGROUP}{owned}/{PREFIX})"
    job = made.job()
    name = job_name(job.pid)
    fence = f"{owned}/{PREFIX}/job-{name}"

    assert driver("confine", name, [job.pid], [1]) == 1
    fenced_ms = driver.last_ms
    assert cgroup_of(job.pid) == fence
    assert effective(fence) == "1"
    assert os.sched_getaffinity(job.pid) == {1}
    assert (CGROUP / owned.lstrip("/") / "cgroup.subtree_control").read_text().split() == ["cpuset"]
    assert "cpuset" in (CGROUP / fence.lstrip("/") / ".." / "cgroup.subtree_control").read_text()
    os.sched_setaffinity(job.pid, ONLINE)
    assert os.sched_getaffinity(job.pid) == {1}

    assert driver("confine", name, [job.pid], [0]) == 0
    update_ms = driver.last_ms
    assert effective(fence) == "0" and os.sched_getaffinity(job.pid) == {0}
    assert driver("adopt") == {name: [0]}

    boxed = outer_scope(made, "0")  # someone else's narrower cpuset: left there
    assert driver("confine", name, [boxed.pid], [0]) == 0
    assert cgroup_of(boxed.pid).endswith(f"{PREFIX}-outer.scope")

    driver("release", name, [job.pid])  # a process left: widened, removed when it is gone
    assert effective(fence) == cpulist(ONLINE) and job.poll() is None
    made.end(job)
    wait_for(
        lambda: driver("release", name, []) is None and not (CGROUP / fence.lstrip("/")).exists(),
        "the job cgroup removed",
    )
    assert not (CGROUP / owned.lstrip("/") / PREFIX).exists()  # the last job took the subtree
    assert driver("adopt") == {}
    say(f"cgroup2 backend: new job cgroup + move {fenced_ms:.1f} ms, new CPUs {update_ms:.1f} ms")


def serve(prefix: str) -> None:
    """The cgroup2 driver: runs inside the delegated unit, one JSON command per line."""
    from corecapd.enforcement import Cgroup2Backend, EnforcementError, Host
    from corecapd.procfs import ProcFS, online_cpus

    backend = Cgroup2Backend(Host(ProcFS(), online_cpus(), cgroup=prefix))
    for line in sys.stdin:
        request = json.loads(line)
        op, args = request["op"], request["args"]
        if op == "confine":
            args = [args[0], args[1], frozenset(args[2])]
        began = time.monotonic()
        try:
            result = getattr(backend, op)(*args)
        except EnforcementError as err:
            print(json.dumps({"error": str(err)}), flush=True)
            continue
        if isinstance(result, dict):
            result = {job: sorted(cpus) for job, cpus in result.items()}
        ms = (time.monotonic() - began) * 1000
        print(json.dumps({"result": result, "ms": ms}), flush=True)


# --- corecapd as a service ------------------------------------------------------------------


SERVICE = f"{PREFIX}-corecapd.service"
UNIT_DIR = Path("/etc/systemd/system")
POLICY = Path(f"/etc/{PREFIX}.toml")
SOCKET = Path(f"/run/corecap/{PREFIX}.sock")


@dataclass(frozen=True)
class Service:
    """One way to run corecapd: the policy's backend, the unit's drop-in, what to expect."""

    backend: str
    drop_in: str | None  # systemd/<this>, installed as <unit>.d/<this>
    describe: str  # the fence backend's describe(), as status shows it after "affinity + "
    fence: str  # the cgroup a job lands in, "{job}" for its name

    def unit(self) -> str:
        """The shipped unit, all its hardening kept, run from the checkout with our policy."""
        text = (SRC / "systemd" / "corecapd.service").read_text()
        return from_checkout(text.replace("/etc/corecap.toml", str(POLICY)))

    def install(self, made: Made) -> None:
        """The unit, and the shipped drop-in as it is, as an administrator would install them."""
        unit_file = UNIT_DIR / SERVICE
        made.files.append(unit_file)
        unit_file.write_text(self.unit())
        if self.drop_in is not None:
            directory = UNIT_DIR / f"{SERVICE}.d"
            made.dirs.append(directory)
            made.files.append(directory / self.drop_in)
            directory.mkdir(exist_ok=True)
            shutil.copyfile(SRC / "systemd" / self.drop_in, directory / self.drop_in)

    def policy(self) -> str:
        return f"""\
[daemon]
mode = "enforce"
backend = "{self.backend}"
scan_interval = 0.5
reserved_cpus = "{"0" if TWO_CPUS else ""}"
socket = "{SOCKET}"

[defaults]
grace = 0.0

[[rules]]
name = "vm-backends"
match = {{ cmdline = "{MARKER}", users = ["root"] }}
cpus = 1
"""


SERVICES = [
    pytest.param(
        Service("auto", None, "systemd (corecap.slice)", "/corecap.slice/corecap-{job}.scope"),
        id="auto-chooses-systemd",
    ),
    pytest.param(  # its own cgroup delegated and writable, itself in the subgroup supervisor
        Service(
            "cgroup2",
            "cgroup2.conf",
            f"cgroup2 ({CGROUP}/system.slice/{SERVICE}/corecap)",
            f"/system.slice/{SERVICE}/corecap/job-{{job}}",
        ),
        id="cgroup2-delegated",
    ),
]


def service_log(since: float) -> str:
    status = sh("systemctl", "status", "--no-pager", "-l", "-n", "0", SERVICE, check=False).stdout
    log = sh("journalctl", "--no-pager", f"--since=@{since:.3f}", "-u", SERVICE, check=False).stdout
    return f"{status}\n--- journal of {SERVICE} ---\n{log}"


@pytest.mark.parametrize("service", SERVICES)
def test_corecapd_service_fences_a_marked_job(made: Made, say: Say, service: Service) -> None:
    from corecapd.client import call

    made.files.append(POLICY)
    made.units.append(SERVICE)
    made.units.append("corecap.slice")  # auto's scopes' slice: systemd keeps it once empty
    POLICY.write_text(service.policy())
    service.install(made)
    since = time.time()
    sh("systemctl", "daemon-reload")
    try:
        started = sh("systemctl", "start", SERVICE, check=False, timeout=150)
        assert started.returncode == 0, "systemctl start failed"
        host = call(SOCKET, "status")["host"]
        assert host["backend"] == f"affinity + {service.describe}", host
        log = sh("journalctl", "--no-pager", f"--since=@{since:.3f}", "-u", SERVICE).stdout
        why = "auto: systemd works here" if service.backend == "auto" else "configured"
        assert f"backend affinity + {service.describe} ({why})" in log  # daemon-started
        assert host["backend_reason"] == why

        timings = [fence_one_job(made, service) for _ in range(3)]
        assert show(SERVICE, "ActiveState") == "active"
        in_its_subgroup(service)
        sh("systemctl", "reload", SERVICE)  # ExecReload= runs beside it (systemd: .control)
        shown = ", ".join(f"{ms:.0f}" for ms in timings)
        say(f"corecapd, {service.describe}: exec -> in its cgroup {shown} ms (3 jobs)")
        survives_a_restart(made, say, service)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{service_log(since)}") from None
    finally:
        sh("systemctl", "stop", SERVICE, check=False)
        made.clean()
        sh("systemctl", "daemon-reload")


def in_its_subgroup(service: Service) -> None:
    """cgroup2: corecapd in <service cgroup>/supervisor (DelegateSubgroup=), none in the
    service cgroup itself, which hands the cpuset controller to the job cgroups."""
    if service.backend == "cgroup2":
        assert cgroup_of(int(show(SERVICE, "MainPID"))) == f"/system.slice/{SERVICE}/supervisor"
        assert (CGROUP / "system.slice" / SERVICE / "cgroup.procs").read_text() == ""


def enrolled(pid: int) -> list[int] | None:
    """The job's CPUs in corecapd's status; None while it is not there (or no daemon is)."""
    from corecapd.client import DaemonUnreachable, call

    try:
        jobs = call(SOCKET, "status")["jobs"]
    except DaemonUnreachable:
        return None
    return next((job["cpus"] for job in jobs if job["pid"] == pid), None)


def survives_a_restart(made: Made, say: Say, service: Service) -> None:
    """A fenced job outlives `systemctl restart` and a kill -9 of corecapd (then restarted by
    systemd: Restart=on-failure); the new daemon takes it over: in status again, its fence the
    same cgroup with the same CPUs, and no second one made for it. A scope is not the service's;
    a cgroup2 fence is, and systemd/cgroup2.conf keeps it there: KillMode=process ends only
    corecapd, and DelegateSubgroup= has systemd start the next one in the subgroup, not in the
    service cgroup, which now hands the cpuset controller to children (that restart failed
    with 219/CGROUP on systemd 252, without the subgroup)."""
    job = made.job()
    fence = fenced(job.pid, service.fence.partition("{job}")[0], timeout=30)
    where = CGROUP / fence.lstrip("/")
    identity = where.stat().st_ino  # the cgroup's id: the same cgroup, not one made anew
    granted = wait_for(lambda: enrolled(job.pid), "the job in status")
    unit = f"corecap-{job_name(job.pid)}.scope"

    def taken_over(how: str, began: float) -> float:
        """Checks once the new daemon has the job; ms from `began` to it in status."""
        wait_for(lambda: enrolled(job.pid), f"the job re-enrolled after {how}", timeout=60)
        took_ms = (time.monotonic() - began) * 1000
        assert job.poll() is None, f"the job ended with corecapd ({how})"
        assert cgroup_of(job.pid) == fence and where.stat().st_ino == identity, how
        assert enrolled(job.pid) == granted, how
        assert effective(fence) == cpulist(set(granted)), how
        assert os.sched_getaffinity(job.pid) == set(granted), how
        fences = [path.name for path in where.parent.iterdir() if path.is_dir()]
        assert fences == [where.name], f"after {how}: {fences}"  # the one job running now
        if service.backend == "auto":
            assert show(unit, "AllowedCPUs") == cpulist(set(granted)), how
        in_its_subgroup(service)
        return took_ms

    main = int(show(SERVICE, "MainPID"))
    began = time.monotonic()
    sh("systemctl", "restart", SERVICE, timeout=150)
    assert int(show(SERVICE, "MainPID")) not in (0, main)
    restart_ms = taken_over("systemctl restart", began)

    main, restarts = int(show(SERVICE, "MainPID")), int(show(SERVICE, "NRestarts"))
    began = time.monotonic()
    os.kill(main, signal.SIGKILL)
    wait_for(
        lambda: (
            int(show(SERVICE, "MainPID")) not in (0, main)
            and show(SERVICE, "ActiveState") == "active"
        ),
        "systemd to start corecapd again after kill -9",
        timeout=90,
    )
    assert int(show(SERVICE, "NRestarts")) == restarts + 1
    killed_ms = taken_over("kill -9", began)

    made.end(job)
    wait_for(lambda: not where.exists(), f"{fence} gone with the job")
    if service.backend == "auto":
        assert show(unit, "LoadState") == "not-found"
    say(
        f"corecapd, {service.describe}: the fenced job back in status {restart_ms:.0f} ms"
        f" after systemctl restart began, {killed_ms:.0f} ms after kill -9 (RestartSec=2s)"
    )


def fence_one_job(made: Made, service: Service) -> float:
    """Start a marked job; check its fence; end it, see the fence go. Exec -> fence in ms."""
    from corecapd.client import call

    began = time.monotonic()
    job = made.job()
    fence = fenced(job.pid, service.fence.partition("{job}")[0], timeout=30)
    exec_to_fence_ms = (time.monotonic() - began) * 1000
    assert fence == service.fence.format(job=job_name(job.pid))
    granted = next(j["cpus"] for j in call(SOCKET, "status")["jobs"] if j["pid"] == job.pid)
    wanted = cpulist(set(granted))
    if service.backend == "auto":
        assert show(f"corecap-{job_name(job.pid)}.scope", "AllowedCPUs") == wanted
    assert effective(fence) == wanted
    assert os.sched_getaffinity(job.pid) == set(granted)
    if TWO_CPUS:
        assert granted == [1]  # reserved_cpus = "0"
    made.end(job)
    where = CGROUP / fence.lstrip("/")
    try:
        wait_for(lambda: not where.exists(), f"{fence} gone with the job")
    except AssertionError as err:
        state = {
            n: (where / n).read_text() for n in ("cgroup.procs", "cgroup.events", "cpuset.cpus")
        }
        raise AssertionError(f"{err}: {state}") from None
    return exec_to_fence_ms


def fenced(pid: int, under: str, timeout: float) -> str:
    """The process's cgroup once it is under `under`: polled every millisecond, for timing."""
    deadline = time.monotonic() + timeout
    while not (where := cgroup_of(pid)).startswith(under):
        if time.monotonic() > deadline:
            raise AssertionError(f"PID {pid} not under {under} after {timeout} s: in {where}")
        time.sleep(0.001)
    return where


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(sys.argv[2])
