"""corecapctl as a user runs it: exit codes, one-line errors, readable tables."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, Processes, StartDaemon, marked_rule

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


def test_check_accepts_the_shipped_policy() -> None:
    result = ctl("check", str(ROOT / "etc/corecap.toml"))
    assert result.returncode == 0 and "OK" in result.stdout


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
    assert "1 jobs, 1 over budget" in lines[1]
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
