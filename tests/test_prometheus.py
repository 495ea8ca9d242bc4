"""The shipped Prometheus rules under promtool, and a real Prometheus server (Debian's
package) scraping a real corecapd that runs a marked job, asked through its HTTP query API.

Both need the `prometheus` package (scripts/bootstrap.sh test installs it); without it they
skip, saying so.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Processes, StartDaemon, marked_rule, wait_for

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "etc/prometheus/corecap-rules.yml"
RULE_TESTS = sorted((ROOT / "etc/prometheus/tests").glob("*.yml"))
SCRAPE_INTERVAL = "500ms"  # the test waits a few of them, not 15 s each

needs_promtool = pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool not installed (scripts/bootstrap.sh test)"
)
needs_prometheus = pytest.mark.skipif(
    not shutil.which("prometheus"), reason="prometheus not installed (scripts/bootstrap.sh test)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 11 rules found" in checked.stdout


@needs_promtool
def test_rules_pass_their_promtool_unit_tests() -> None:
    assert RULE_TESTS, "no promtool tests in etc/prometheus/tests"
    tested = promtool("test", "rules", *map(str, RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_every_alert_has_a_promtool_case() -> None:
    alerts = {
        line.split(":", 1)[1].strip()
        for line in RULES.read_text().splitlines()
        if line.strip().startswith("- alert:")
    }
    tested = "\n".join(path.read_text() for path in RULE_TESTS)
    assert {alert for alert in alerts if f"alertname: {alert}" not in tested} == set()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Prometheus:
    """A Prometheus server on loopback with its own config and data directory."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            textwrap.dedent(
                f"""\
                global:
                  scrape_interval: {SCRAPE_INTERVAL}
                  evaluation_interval: {SCRAPE_INTERVAL}
                rule_files:
                  - {RULES}
                scrape_configs:
                  - job_name: corecap
                    static_configs:
                      - targets: ["{target}"]
                """
            )
        )
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.loads(answer.read())

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        with contextlib.suppress(OSError):
            url = f"http://127.0.0.1:{self.port}/-/ready"
            with urllib.request.urlopen(url, timeout=5) as answer:
                return bool(answer.status == 200)
        return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The one sample `promql` gives now, or None when it gives none."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def prometheus_for() -> Iterator[Any]:
    """prometheus_for(target) -> a ready Prometheus scraping `target`; stopped by PID and its
    directory removed at teardown, also on failure."""
    workdir = Path(tempfile.mkdtemp(prefix="corecap-prometheus-"))
    servers: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        server = Prometheus(workdir, target)
        servers.append(server)
        wait_for(server.ready, timeout=60, what="Prometheus to be ready")
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir)


# A job that runs `sys.argv[2]` threads once it reads a line, and ends at the end of input.
GROWS = """
import sys, threading
sys.stdin.readline()
stop = threading.Event()
for _ in range(int(sys.argv[2])):
    threading.Thread(target=stop.wait).start()
sys.stdin.read()
stop.set()
"""


@needs_prometheus
def test_prometheus_scrapes_a_job_and_counts_its_violation(
    start_daemon: StartDaemon, processes: Processes, marker: str, prometheus_for: Any
) -> None:
    port = free_port()
    daemon = start_daemon(
        daemon={"metrics": f"127.0.0.1:{port}"},
        rules=marked_rule(marker, "scraped", cpus=1, max_threads=4),
    )
    server = prometheus_for(f"127.0.0.1:{port}")
    job = processes.python(GROWS, "8", stdin=subprocess.PIPE)
    assert job.stdin is not None
    daemon.wait_job(job.pid)
    mine = f'rule="scraped", corecap_job=~"{job.pid}-.*"'

    wait_for(lambda: server.value(f"corecap_job_threads{{{mine}}}") == 1, 30, "the job's threads")
    assert server.value(f"corecap_job_thread_budget{{{mine}}}") == 4
    assert server.value(f"corecap_job_cpus{{{mine}}}") == 1
    assert server.value('up{job="corecap"}') == 1
    counted = 'corecap_violations_started_total{rule="scraped", user="root"}'
    assert server.value(counted) in (None, 0.0)  # the series begins at its first violation

    job.stdin.write(b"go\n")  # 8 threads more: over its budget of 4
    job.stdin.flush()
    daemon.wait_event("violation-started", pid=str(job.pid))
    wait_for(lambda: server.value(counted) == 1, 30, "the violation counted")
    assert server.value(f"corecap_job_violating{{{mine}}}") == 1
    assert server.value(f"corecap_job_threads{{{mine}}}") == 9
    recorded = f"corecap:job_threads_per_budget:ratio{{{mine}}}"  # the shipped rules run
    wait_for(lambda: server.value(recorded) == 9 / 4, 30, "the recording rule")

    job.stdin.close()
    daemon.wait_event("job-ended", pid=str(job.pid))
    wait_for(lambda: server.value(f"corecap_job_threads{{{mine}}}") is None, 30, "its series gone")
    assert server.value(counted) == 1  # counters outlive the job
