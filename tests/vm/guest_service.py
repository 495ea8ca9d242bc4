"""corecapd as a real systemd service, end to end. Guest side of the VM tier: runs inside the
tests/vm/vm.sh guest (systemd as PID 1, pure cgroup v2, root, the checkout read-only at
/mnt/src) with the guest's own python3 and pytest; tests/test_vm.py starts it.

The unit is the shipped systemd/corecapd.service with ExecStart pointed at the checkout and a
shorter WatchdogSec; every other line, all the hardening, stays. If the service then fails to
start or to confine, the test bisects the hardening lines and names the one that breaks it.
The policy's one rule matches only processes that carry this run's marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from guestkit import GUEST_ONLY, PYTHON, SRC, from_checkout, sh, wait_for

from corecapd.events import JobStarted, PolicyRejected, PolicyReloaded

T = TypeVar("T")

UNIT = "corecapd.service"
PROBE = "corecapd-probe.service"
UNIT_DIR = Path("/etc/systemd/system")
POLICY = Path("/etc/corecap.toml")
SOCKET = "/run/corecap/corecap.sock"
EXEC_START = f"ExecStart={PYTHON} -m corecapd.daemon --config {POLICY}"
WATCHDOG_SEC = 5
RULE = "vm-marked"
MARKER = f"CORECAP_VM_{uuid.uuid4().hex[:12]}"
# [Service] keys that run the daemon rather than restrict it; every other line is hardening
OPERATIONAL = ("Type", "NotifyAccess", "WatchdogSec", "Restart", "RestartSec", "Environment")

pytestmark = GUEST_ONLY


def show(prop: str, unit: str = UNIT) -> str:
    return sh("systemctl", "show", "--value", "-p", prop, unit).stdout.strip()


def journal(*matches: str) -> list[dict[str, Any]]:
    out = sh("journalctl", "--no-pager", "-o", "json", *matches).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def unit_log(unit: str = UNIT, since: float | None = None) -> str:
    """`systemctl status`, and the unit's journal since `since` (else its last 40 lines)."""
    status = sh("systemctl", "status", "--no-pager", "-l", "-n", "0", unit, check=False).stdout
    window = ["-n", "40"] if since is None else [f"--since=@{since:.3f}"]
    log = sh("journalctl", "--no-pager", "-o", "short-monotonic", *window, "-u", unit).stdout
    return f"{status}\n--- journal of {unit} ---\n{log}"


def service_lines(unit_text: str) -> list[str]:
    lines, section = [], ""
    for line in unit_text.splitlines():
        if line.startswith("["):
            section = line.strip()
        elif section == "[Service]" and "=" in line and not line.lstrip().startswith("#"):
            lines.append(line.strip())
    return lines


def hardening_lines(unit_text: str) -> list[str]:
    return [
        line
        for line in service_lines(unit_text)
        if not line.startswith("Exec") and line.partition("=")[0] not in OPERATIONAL
    ]


def derive_unit(shipped: str, drop: frozenset[str] = frozenset()) -> str:
    """The shipped unit run from the checkout, with a short watchdog; minus `drop` lines."""
    out, section = [], ""
    for line in shipped.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        if section == "[Service]" and stripped in drop:
            continue
        if section == "[Service]" and stripped.startswith("WatchdogSec="):
            line = f"WatchdogSec={WATCHDOG_SEC}s"
        out.append(line)
    return from_checkout("\n".join(out) + "\n")


def policy(broken: bool = False) -> str:
    reserved = "0" if (os.cpu_count() or 1) > 1 else ""
    text = f"""\
[daemon]
mode = "enforce"
scan_interval = 0.5
reserved_cpus = "{reserved}"
socket = "{SOCKET}"

[defaults]
grace = 0.0

[[rules]]
name = "{RULE}"
match = {{ cmdline = "{MARKER}", users = ["root"] }}
cpus = 1
"""
    return text + ("\n[daemon.oops\n" if broken else "")


def ctl_status() -> dict[str, Any]:
    out = sh(PYTHON, "-m", "corecapd.ctl", "--socket", SOCKET, "status", "--json").stdout
    document: dict[str, Any] = json.loads(out)
    return document


def thread_masks(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


@dataclass
class Guest:
    shipped: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    child: subprocess.Popen[bytes] | None = None
    granted: frozenset[int] = frozenset()

    def marked_child(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)", MARKER])
        self.children.append(child)
        return child

    def end_children(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=30)
        self.children.clear()


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    state = Guest(shipped=(SRC / "systemd" / UNIT).read_text())
    POLICY.write_text(policy())
    (UNIT_DIR / UNIT).write_text(derive_unit(state.shipped))
    sh("systemctl", "daemon-reload")
    try:
        yield state
    finally:
        sh("systemctl", "stop", UNIT, PROBE, check=False)
        state.end_children()
        for name in (UNIT, PROBE):
            (UNIT_DIR / name).unlink(missing_ok=True)
        POLICY.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload")


def confines(state: Guest, unit: str) -> str | None:
    """Start `unit`, confine a marked child with it; None if all went well, else what failed."""
    since = time.time()
    if sh("systemctl", "start", unit, check=False, timeout=150).returncode != 0:
        return f"systemctl start {unit} failed\n{unit_log(unit, since)}"
    child = state.marked_child()
    try:
        job = wait_for(
            lambda: next((j for j in ctl_status()["jobs"] if j["pid"] == child.pid), None),
            f"the marked child {child.pid} in corecapctl status",
        )
        state.granted = frozenset(job["cpus"])
        wait_for(lambda: thread_masks(child.pid) == {state.granted}, "its affinity")
    except AssertionError as err:
        return f"{err}\n{unit_log(unit, since)}"
    return None


def diagnose(state: Guest, failure: str) -> str:
    """Bisect the hardening lines (a probe unit with the first k of them) for the first line
    that turns a working service into a failing one. Adding lines only restricts more."""
    sh("systemctl", "stop", UNIT, check=False)
    lines = hardening_lines(state.shipped)

    def broken_with(k: int) -> str | None:
        (UNIT_DIR / PROBE).write_text(derive_unit(state.shipped, frozenset(lines[k:])))
        sh("systemctl", "daemon-reload")
        try:
            return confines(state, PROBE)
        finally:
            sh("systemctl", "stop", PROBE, check=False)
            sh("systemctl", "reset-failed", PROBE, check=False)
            state.end_children()

    report = f"corecapd as the shipped service fails in the guest:\n{failure}\n"
    if broken_with(0) is not None:
        return report + "It fails without any hardening line as well: not a hardening problem."
    good, bad = 0, len(lines)  # the first `good` lines work, the first `bad` fail
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (good, mid) if broken_with(mid) is not None else (mid, bad)
    why = broken_with(bad) or "(passed on retry: flaky?)"
    return report + (
        f"\nHARDENING LINE THAT BREAKS IT: `{lines[bad - 1]}` (the lines before it work;"
        f" with it:)\n{why}"
    )


def require_active() -> None:
    if show("ActiveState") != "active":
        pytest.fail(f"corecapd is not active (see test_start_reaches_ready)\n{unit_log()}")


def test_unit_keeps_every_hardening_line(guest: Guest) -> None:
    unit = (UNIT_DIR / UNIT).read_text()
    installed = service_lines(unit)
    assert EXEC_START in installed
    assert f"Environment=PYTHONPATH={SRC} PYTHONDONTWRITEBYTECODE=1" in installed
    hardening = hardening_lines(guest.shipped)
    assert hardening, "no hardening lines found in the shipped unit"
    assert [line for line in hardening if line not in installed] == []
    assert not [line for line in installed if "/usr/local/bin" in line], unit


def test_start_reaches_ready(guest: Guest) -> None:
    failure = confines(guest, UNIT)  # Type=notify: start returns once READY=1 arrived
    if failure is not None:
        pytest.fail(diagnose(guest, failure))
    assert show("ActiveState") == "active"
    assert show("SubState") == "running"
    guest.child = guest.children[-1]


def test_status_text_is_the_daemons(guest: Guest) -> None:
    require_active()
    text = show("StatusText")
    assert "jobs" in text and "enforce" in text, text


def test_marked_child_is_confined(guest: Guest) -> None:
    require_active()
    assert guest.child is not None and guest.child.poll() is None
    online = frozenset(os.sched_getaffinity(0))
    assert len(guest.granted) == 1 and guest.granted <= online
    if len(online) > 1:
        assert guest.granted != online and 0 not in guest.granted  # reserved_cpus = "0"
    assert thread_masks(guest.child.pid) == {guest.granted}
    job = next(j for j in ctl_status()["jobs"] if j["pid"] == guest.child.pid)
    assert job["rule"] == RULE and job["user"] == "root", job


def test_journal_has_structured_job_started(guest: Guest) -> None:
    require_active()
    assert guest.child is not None
    pid = str(guest.child.pid)
    entries = wait_for(
        lambda: journal(f"MESSAGE_ID={JobStarted.message_id}", f"CORECAP_PID={pid}"),
        "the job-started entry",
    )
    entry = entries[0]
    assert entry["_SYSTEMD_UNIT"] == UNIT
    assert entry["CORECAP_EVENT"] == "job-started"
    assert entry["CORECAP_RULE"] == RULE
    assert entry["CORECAP_CPUS"] == ",".join(str(cpu) for cpu in sorted(guest.granted))
    assert pid in entry["MESSAGE"]


def test_explain_attributes_a_jobs_threads_inside_the_service(guest: Guest) -> None:
    """`explain` attributes every thread of a job inside the daemon, under the unit's
    seccomp filter (pyelftools reading the interpreter's ELF headers, /proc/PID/mem): the
    main thread and a threading.Thread of a marked job, and the daemon still the same."""
    require_active()
    main_pid = show("MainPID")
    code = (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([PYTHON, "-c", code, MARKER])
    guest.children.append(child)
    tasks = Path(f"/proc/{child.pid}/task")
    wait_for(lambda: len(os.listdir(tasks)) == 2, f"the thread of PID {child.pid}")
    wait_for(
        lambda: any(j["pid"] == child.pid for j in ctl_status()["jobs"]),
        f"the threaded child {child.pid} in corecapctl status",
    )
    ctl = [PYTHON, "-m", "corecapd.ctl", "--socket", SOCKET, "explain", str(child.pid), "--json"]
    explained = sh(*ctl, check=False)
    assert explained.returncode == 0, f"{explained.stdout}{explained.stderr}\n{unit_log()}"
    layers = {t["tid"]: t for t in json.loads(explained.stdout)["thread_layers"]}
    thread = next(tid for tid in map(int, os.listdir(tasks)) if tid != child.pid)
    assert layers[child.pid]["layer"] == "main", layers
    assert layers[thread]["layer"] == "python-threading", layers
    assert layers[thread]["library"].startswith("python3"), layers
    assert show("ActiveState") == "active" and show("MainPID") == main_pid, unit_log()
    child.kill()
    child.wait(timeout=30)


def test_reload_rejects_a_broken_policy_and_stays_active(guest: Guest) -> None:
    require_active()
    main_pid = show("MainPID")
    rejected = [f"MESSAGE_ID={PolicyRejected.message_id}", f"_PID={main_pid}"]
    reloaded = [f"MESSAGE_ID={PolicyReloaded.message_id}", f"_PID={main_pid}"]
    before = len(journal(*rejected))
    try:
        POLICY.write_text(policy(broken=True))
        sh("systemctl", "reload", UNIT)
        entry = wait_for(lambda: journal(*rejected)[before:], "policy-rejected")[0]
    finally:
        POLICY.write_text(policy())
    assert entry["CORECAP_EVENT"] == "policy-rejected"
    assert str(POLICY) in entry["CORECAP_ERROR"], entry
    time.sleep(2)
    assert show("ActiveState") == "active" and show("MainPID") == main_pid
    assert guest.child is not None
    assert thread_masks(guest.child.pid) == {guest.granted}  # the policy in force stays
    before = len(journal(*reloaded))
    sh("systemctl", "reload", UNIT)
    wait_for(lambda: journal(*reloaded)[before:], "policy-reloaded after the fix")
    assert show("ActiveState") == "active"


def test_watchdog_does_not_kill_it(guest: Guest) -> None:
    require_active()
    assert show("WatchdogUSec") == f"{WATCHDOG_SEC}s"
    main_pid, restarts = show("MainPID"), show("NRestarts")
    pinged = int(show("WatchdogTimestampMonotonic"))
    time.sleep(2.5 * WATCHDOG_SEC)
    assert show("ActiveState") == "active"
    assert (show("MainPID"), show("NRestarts")) == (main_pid, restarts)
    assert int(show("WatchdogTimestampMonotonic")) > pinged, "no WATCHDOG=1 pings"
    log = sh("journalctl", "--no-pager", "-u", UNIT).stdout
    assert "atchdog timeout" not in log, log


def test_stop_ends_it_cleanly(guest: Guest) -> None:
    require_active()
    sh("systemctl", "stop", UNIT, timeout=150)
    assert show("ActiveState") == "inactive"
    assert show("Result") == "success", unit_log()
    assert show("ExecMainStatus") == "0", unit_log()
    assert guest.child is not None and guest.child.poll() is None  # jobs are left running
