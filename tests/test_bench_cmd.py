"""`corecap bench` against real short workloads, with a real daemon and without one."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, Daemon, Processes, StartDaemon, marked_rule, wait_for

from corecapd.bench import summary

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs: one is reserved")
JOB_CPU = CPUS[-1]

# Appends its label to a log (to see the order), registers like a job that uses the
# library, and prints a metric.
JOB = """
import sys, time
label, log = sys.argv[1], sys.argv[2]
import corecapd
plan = corecapd.register()
with open(log, "a") as out:
    out.write(label)
time.sleep(float(sys.argv[3]))
print(f"score {len(plan.cpus) * 1.5}")
"""


def bench(
    processes: Processes, scratch: Path, *args: str, socket: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None, float]:
    """Runs `corecap bench ARGS` (a process the test ends if it outlives it); returns it,
    its --json report (None if it wrote none) and its wall time in seconds."""
    report = scratch / f"report-{len(processes.started)}.json"
    env = dict(os.environ, CORECAP_SOCKET=str(socket or "/nonexistent.sock"))
    started = time.monotonic()
    process = processes.run(
        [PYTHON, "-m", "corecapd.launcher", "bench", "--json", str(report), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    stdout, stderr = process.communicate(timeout=120)
    done = subprocess.CompletedProcess(
        process.args, process.returncode, stdout.decode(), stderr.decode()
    )
    found = json.loads(report.read_text()) if report.exists() else None
    return done, found, time.monotonic() - started


@pytest.fixture
def daemon(start_daemon: StartDaemon, marker: str) -> Daemon:
    return start_daemon(
        daemon={"reserved_cpus": str(CPUS[0])},
        defaults={"grace": 0.0, "violation_after": 1},
        rules=marked_rule(marker, "holder", cpus=1),
    )


def job(label: str, log: Path, marker: str, seconds: float = 0.05) -> list[str]:
    return [PYTHON, "-c", JOB, label, str(log), str(seconds), marker]


def test_bench_runs_warmups_then_alternates_and_reports_every_run(
    daemon: Daemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    log = tmp_path / "order"
    done, report, seconds = bench(
        processes,
        tmp_path,
        *("--cpus", "1", "--warmup", "1", "--repeats", "3", "--metric", r"score (\S+)"),
        *("--vs", shlex.join(job("B", log, marker))),
        *("--", *job("A", log, marker)),
        socket=daemon.socket,
    )
    print(f"bench of 2 x (1 + 3) runs: {seconds:.1f} s")
    assert done.returncode == 0, done.stderr
    assert report is not None
    assert log.read_text() == "AB" + "ABABAB"  # warm-ups first, then A and B alternated
    assert report["cpus"] == [JOB_CPU] and report["daemon"] == str(daemon.socket)
    assert report["warnings"] == []
    assert report["environment"]["OMP_NUM_THREADS"] == "1"
    for command in report["commands"]:
        runs = command["runs"]
        assert len(runs) == 3 and all(run["exit_code"] == 0 for run in runs)
        walls = [run["wall_s"] for run in runs]
        assert command["median_s"] == round(summary(walls)["median"], 6)
        assert command["min_s"] == min(walls) and command["max_s"] == max(walls)
        assert command["iqr_s"] >= 0 and command["metric"]["median"] == 1.5
        for run in runs:
            assert run["cpu_s"] > 0 and run["wall_s"] >= 0.05
            manifest = run["manifest"]
            assert manifest["grant"]["cpus"] == [JOB_CPU]
            assert manifest["job"]["affinity"] == [JOB_CPU]  # the job's own, registered
            assert manifest["job"]["daemon"] == str(daemon.socket)
            assert manifest["threadpool_info"] == manifest["job"]["threadpool_info"]
            assert manifest["tensorflow"] == {"intra_op": 1, "inter_op": 1}
            assert manifest["corecap_version"] and len(manifest["load_average"]) == 3
    assert len(report["ratios"]) == 3 and report["ratio"]["min"] <= report["ratio"]["max"]
    assert "A/B: wall time ratio median" in done.stdout and "3 runs, 1 warm-up" in done.stdout


def test_bench_refuses_cores_another_job_holds_and_says_whose(
    daemon: Daemon, processes: Processes, tmp_path: Path
) -> None:
    holder = processes.python("import time; time.sleep(60)")  # the rule: the one CPU
    daemon.wait_job(holder.pid)
    done, report, _ = bench(processes, tmp_path, "--cpus", "1", "--", "true", socket=daemon.socket)
    assert done.returncode == 1 and report is None
    assert f"CPUs {JOB_CPU} are shared with PID {holder.pid} (holder)" in done.stderr
    assert "--wait SECONDS" in done.stderr


def test_bench_waits_for_the_cores_to_be_free(
    daemon: Daemon, processes: Processes, tmp_path: Path
) -> None:
    holder = processes.python("import time; time.sleep(1.5)")
    daemon.wait_job(holder.pid)
    done, report, seconds = bench(
        processes, tmp_path, "--cpus", "1", "--wait", "30", "--", "true", socket=daemon.socket
    )
    assert done.returncode == 0, done.stderr
    assert report is not None and report["warnings"] == [] and seconds >= 1.0


def test_bench_warns_when_another_job_shares_its_cores_during_a_run(
    daemon: Daemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    log = tmp_path / "order"
    process = processes.run(
        [
            *(PYTHON, "-m", "corecapd.launcher", "bench", "--cpus", "1", "--warmup", "0"),
            *("--repeats", "1", "--socket", str(daemon.socket), "--"),
            *job("A", log, marker, seconds=3.0),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: log.exists(), timeout=30, what="the run to start")
    intruder = processes.python("import time; time.sleep(60)")  # no free core: shares ours
    daemon.wait_job(intruder.pid)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert f"run 1 of {PYTHON}" in stdout.decode()
    assert f"cores shared with PID {intruder.pid} (holder) on CPUs {JOB_CPU}" in stdout.decode()


def test_bench_warns_of_a_violation_during_a_run(
    daemon: Daemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    threads = (
        "import threading, time\n"
        "for _ in range(80): threading.Thread(target=time.sleep, args=(1.5,)).start()\n"
    )
    done, report, _ = bench(
        processes,
        tmp_path,
        *("--cpus", "1", "--warmup", "0", "--repeats", "1"),
        *("--", PYTHON, "-c", threads, marker),
        socket=daemon.socket,
    )
    assert done.returncode == 0, done.stderr
    assert report is not None
    [warning] = report["warnings"]
    assert "run 1 of" in warning and "over its thread budget (" in warning


def test_bench_warns_when_repetitions_differ_in_threading(
    daemon: Daemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    counter = tmp_path / "count"
    counter.write_text("0")
    # intra_op 1, then 2: a job that sizes itself differently each run
    varying = (
        "import sys\nfrom pathlib import Path\nimport corecapd\n"
        "count = Path(sys.argv[1]); n = int(count.read_text()) + 1; count.write_text(str(n))\n"
        "corecapd.register(intra_op=n)\n"
    )
    done, report, _ = bench(
        processes,
        tmp_path,
        *("--cpus", "1", "--warmup", "0", "--repeats", "2"),
        *("--", PYTHON, "-c", varying, str(counter), marker),
        socket=daemon.socket,
    )
    assert done.returncode == 0, done.stderr
    assert report is not None
    assert any(
        "repetitions differ in threading (2 configurations)" in w for w in report["warnings"]
    )


def test_bench_without_a_daemon_runs_pinned_and_says_the_cores_are_not_reserved(
    processes: Processes, marker: str, tmp_path: Path
) -> None:
    done, report, _ = bench(
        processes,
        tmp_path,
        "--cpus",
        "1",
        "--repeats",
        "2",
        "--",
        *job("A", tmp_path / "log", marker),
    )
    assert done.returncode == 0, done.stderr
    assert report is not None and report["daemon"] is None and report["cpus"] == [CPUS[0]]
    assert len(report["commands"][0]["runs"]) == 2
    assert any("not reserved" in w for w in report["warnings"])
    assert "cannot reach corecapd" in report["warnings"][0]


def test_bench_stops_at_a_failing_run_and_shows_its_output(
    processes: Processes, tmp_path: Path
) -> None:
    failing = "import sys; print('broken here'); sys.exit(3)"
    done, report, _ = bench(processes, tmp_path, "--cpus", "1", "--", PYTHON, "-c", failing)
    assert done.returncode == 1 and report is None
    assert "exited 3" in done.stderr and "broken here" in done.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--cpus", "1"], "give the command after --"),
        (["--cpus", "0", "--", "true"], "expected at least 1"),
        (["--cpus", "1", "--metric", "(", "--", "true"], "--metric '('"),
        (["--", "true"], "the following arguments are required: --cpus"),
        (["--cpus", "1", "--vs", "", "--", "true"], "--vs: give the command to compare"),
        (["--cpus", "1", "--vs", "'a", "--", "true"], "No closing quotation"),
    ],
)
def test_bench_argument_errors(args: list[str], error: str) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "corecapd.launcher", "bench", *args], capture_output=True, text=True
    )
    assert done.returncode == 2 and error in done.stderr


def test_summary_median_iqr_and_range() -> None:
    assert summary([3.0, 1.0, 2.0, 4.0, 5.0]) == {"median": 3.0, "iqr": 2.0, "min": 1.0, "max": 5.0}
    assert summary([2.0]) == {"median": 2.0, "iqr": 0.0, "min": 2.0, "max": 2.0}


def test_in_monitor_mode_bench_pins_itself_to_the_grant(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    daemon = start_daemon(
        daemon={"mode": "monitor", "reserved_cpus": str(CPUS[0])},
        rules=marked_rule(marker, "holder", cpus=1),
    )
    affinity = tmp_path / "affinity"
    probe = f"import os; open({str(affinity)!r}, 'a').write(str(sorted(os.sched_getaffinity(0))))"
    done, report, _ = bench(
        processes,
        tmp_path,
        *("--cpus", "1", "--warmup", "0", "--repeats", "1", "--", PYTHON, "-c", probe, marker),
        socket=daemon.socket,
    )
    assert done.returncode == 0, done.stderr
    assert report is not None and report["cpus"] == [JOB_CPU]
    assert affinity.read_text() == str([JOB_CPU])  # measured on its grant, not the host
    assert any("corecap bench pinned itself" in w for w in report["warnings"]), report
