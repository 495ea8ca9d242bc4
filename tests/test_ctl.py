"""corecapctl as a user runs it: exit codes, one-line errors, readable tables."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import PYTHON, Processes, StartDaemon, marked_rule

import corecapd
from corecapd.cpulist import format_cpulist

ROOT = Path(__file__).parents[1]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "corecapd.ctl", *args], capture_output=True, text=True, timeout=60
    )


def test_no_daemon_is_a_one_line_error(tmp_path: Path) -> None:
    for command in ("status", "violations", "reload"):
        result = ctl("--socket", str(tmp_path / "none.sock"), command)
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot reach corecapd" in lines[0] and "none.sock" in lines[0]


def test_version() -> None:
    assert ctl("--version").stdout == f"corecapctl {corecapd.__version__}\n"


@pytest.mark.parametrize(
    ("pid", "error"),
    [("999999999", "expected at most 4194304, got 999999999"), ("0", "expected at least 1")],
)
def test_explain_refuses_what_is_no_pid_before_asking_the_daemon(pid: str, error: str) -> None:
    result = ctl("--socket", "/nonexistent.sock", "explain", pid)
    assert result.returncode == 2 and f"argument pid: {error}" in result.stderr


def test_check_accepts_the_shipped_policy() -> None:
    result = ctl("check", str(ROOT / "etc/corecap.toml"))
    assert result.returncode == 0 and "OK" in result.stdout
    lines = result.stdout.splitlines()
    assert lines[1] == "on this host, as corecapd would start with it:"
    online = format_cpulist(os.sched_getaffinity(0))
    assert any(line.startswith(f"  CPUs online: {online}; reserved: 0; ") for line in lines)
    assert any(line.startswith("  backend: affinity") for line in lines)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[daemon\n", ":1:8: TOML syntax error"),
        ("[[rules]]\nname = 'x'\nmatch = { exe = 'python*' }\ncpus = 0\n", "rules[0].cpus"),
        ("[defaults]\ncpu = 2\n", "defaults.cpu: unknown key"),
    ],
)
def test_check_names_the_place_of_an_error(tmp_path: Path, text: str, expected: str) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text(text)
    result = ctl("check", str(policy))
    assert result.returncode == 1
    assert str(policy) in result.stderr and expected in result.stderr


def test_check_reports_every_error_each_located_then_a_count(tmp_path: Path) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text(
        '[daemon]\nmode = "sometimes"\n[defaults]\ncpus = 0\ngraze = 1\n'
        '[[rules]]\nname = "x"\nmatch = {}\nmax_threads = 0\n'
    )
    result = ctl("check", str(policy))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{policy}: daemon.mode: expected 'enforce' or 'monitor', found 'sometimes'",
        f"{policy}: defaults.cpus: expected an integer from 1 to 8192, found 0",
        f"{policy}: defaults.graze: unknown key (allowed here: cpus, grace, thread_slack,"
        " violation_after)",
        f"{policy}: rules[0].match: expected at least one of exe, cmdline, users, loads",
        f"{policy}: rules[0].max_threads: expected an integer from 1 to 1000000, found 0",
        "5 errors in this policy",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ": empty policy: a policy without [[rules]] would let go of every job"),
        ('[daemon]\nmode = "monitor"\n', ": rules: missing: "),
        (f"rules = []\n[defaults]\ncpus = {'1' * 5000}\n", ":3:8: integer of 5000 digits: too"),
        (f'rules = []\n[daemon]\nreserved_cpus = "0-{"9" * 5000}"\n', "CPU ids go up to 8191"),
        (b"rules = []\n# caf\xe9\n", ":2:6: not UTF-8 text: byte 0xe9"),
    ],
)
def test_check_refuses_with_one_located_line_and_no_traceback(
    tmp_path: Path, text: str | bytes, expected: str
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = ctl("check", str(policy))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    first, count = result.stderr.splitlines()
    assert first.startswith(f"{policy}") and expected in first, first
    assert count == "1 error in this policy"


def test_check_runs_what_corecapd_checks_of_this_host(tmp_path: Path) -> None:
    everything = format_cpulist(os.sched_getaffinity(0))
    occupied = tmp_path / "a-file"
    occupied.write_text("not a socket")
    policy = tmp_path / "p.toml"
    policy.write_text(
        f'rules = []\n[daemon]\nreserved_cpus = "{everything}"\nsocket = "{occupied}"\n'
    )
    result = ctl("check", str(policy))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{policy}: daemon.reserved_cpus: {everything!r} leaves no CPU for jobs on this host"
        f" (online CPUs: {everything})",
        f"{policy}: daemon.socket: {occupied} exists and is not a socket (corecapd replaces a"
        " stale socket, nothing else): name a free path",
        "2 errors in this policy",
    ]
    assert occupied.read_text() == "not a socket"


@pytest.mark.parametrize(
    "text",
    [
        'rules = []\n[daemon]\nreserved_cpus = "0-8191"\n',
        'rules = []\n[daemon]\nsocket = "{tmp}/a-file"\n',
        'rules = []\n[daemon]\nbackend = "systemd"\n',  # no systemd as PID 1 here
        '[daemon]\nmode = "monitor"\n',
        "",
    ],
)
def test_check_and_corecapd_refuse_the_same_policies_with_the_same_lines(
    tmp_path: Path, start_daemon: StartDaemon, text: str
) -> None:
    if "systemd" in text and Path("/proc/1/comm").read_text().strip() == "systemd":
        pytest.skip("PID 1 is systemd here")
    (tmp_path / "a-file").write_text("")
    header = f'[daemon]\nstate_dir = "{tmp_path}/state"\n'
    if "socket" not in text:  # never the default socket: a daemon may be listening there
        header += f'socket = "{tmp_path}/own.sock"\n'
    text = text.replace("{tmp}", str(tmp_path))
    text = text.replace("[daemon]\n", header) if "[daemon]" in text else text + header
    daemon = start_daemon(text, wait=False)
    assert daemon.process.wait(timeout=30) == 1
    refused = [line.removeprefix("corecapd: ") for line in daemon.log().splitlines()]
    result = ctl("check", str(daemon.policy_path))
    assert result.returncode == 1
    checked = result.stderr.splitlines()
    assert checked[-1] == "1 error in this policy" and "TOML" not in checked[0]
    assert checked[:-1] == refused, (checked, refused)


def test_check_as_another_user_counts_no_problem_that_may_be_its_own(tmp_path: Path) -> None:
    shared = Path(tempfile.mkdtemp(prefix="corecap-check-"))
    try:
        shared.chmod(0o755)
        policy = shared / "p.toml"
        policy.write_text('rules = []\n[daemon]\nbackend = "cgroup2"\nrealtime_priority = 10\n')
        policy.chmod(0o644)
        command = [PYTHON, "-m", "corecapd.ctl", "check", str(policy)]
        nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        result = subprocess.run([*nobody, *command], capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(shared)
    assert result.returncode == 0, result.stderr
    realtime = next(line for line in result.stdout.splitlines() if "realtime_priority" in line)
    assert "cannot switch to SCHED_FIFO" in realtime
    assert realtime.endswith(
        "not counted as an error: checked as uid 65534, and corecapd runs as root"
    )


def test_check_names_users_and_groups_this_host_does_not_have(tmp_path: Path) -> None:
    policy = tmp_path / "accounts.toml"
    policy.write_text(
        '[[rules]]\nname = "training"\n'
        'match = { exe = ["python*"], users = ["nosuchuser_q", "@nogroup_q", "root", "@root",'
        ' "4242", "@4242"] }\n'  # a number: an account without a name, never reported
        "cpus = 1\n[users.root]\nmax_cpus = 2\n[users.alice_nope]\nmax_cpus = 2\n"
    )
    result = ctl("check", str(policy))
    assert result.returncode == 0, result.stderr  # a finding, not an error
    found = [line.strip() for line in result.stdout.splitlines() if "on this host:" in line]
    assert found == [
        "rules[0].match.users (training): no user 'nosuchuser_q' on this host: it matches no"
        " process until there is (a typo?)",
        "rules[0].match.users (training): no group 'nogroup_q' on this host: it matches no"
        " process until there is (a typo?)",
        "users.alice_nope: no user 'alice_nope' on this host: the limit holds no one until"
        " there is (a typo?)",
    ]


def test_check_of_a_missing_file(tmp_path: Path) -> None:
    result = ctl("check", str(tmp_path / "absent.toml"))
    assert result.returncode == 1 and "cannot read policy" in result.stderr


def test_bad_arguments_are_usage_errors() -> None:
    assert ctl("frobnicate").returncode == 2
    assert ctl().returncode == 2
    assert "usage" in ctl("status", "--bogus").stderr


def test_status_and_violations_tables(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(rules=marked_rule(marker, "table-rule", cpus=1, max_threads=1))
    job = processes.python(
        "import threading, sys; threading.Thread(target=sys.stdin.read).start()",
        stdin=subprocess.PIPE,
    )
    daemon.wait_event("violation-started", pid=str(job.pid))
    status = ctl("--socket", str(daemon.socket), "status")
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert lines[0].startswith("corecapd: mode enforce, backend affinity")
    assert "jobs: 1, over budget: 1" in lines[1]
    header = next(line for line in lines if line.lstrip().startswith("PID"))
    assert header.split() == [
        "PID",
        "USER",
        "RULE",
        "CPUS",
        "THREADS/BUDGET",
        "CPU%",
        "STATE",
        "AGE",
    ]
    row = next(line for line in lines if line.split()[:1] == [str(job.pid)])
    assert row.split()[1:3] == ["root", "table-rule"] and "2/1" in row and "violation" in row

    violations = ctl("--socket", str(daemon.socket), "violations")
    assert violations.returncode == 0
    assert any(
        line.split()[:2] == [str(job.pid), "table-rule"] for line in violations.stdout.splitlines()
    )
    assert "ongoing" in violations.stdout
