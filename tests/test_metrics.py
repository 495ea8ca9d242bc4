"""The Prometheus metrics (corecapd/metrics.py): the collector on real readings and events,
its names by Prometheus' conventions, the HTTP server on a bound and on a handed-over socket,
the policy key, and the real daemon serving them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Processes, StartDaemon, marked_rule, wait_for
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from corecapd.budget import Budget
from corecapd.effects import JobView, Member, Snapshot
from corecapd.events import (
    EnforcementFailed,
    ExecEventsLost,
    FenceFailed,
    JobChanged,
    JobStarted,
    LayerOversized,
    PolicyRejected,
    PolicyReloaded,
    ViolationStarted,
)
from corecapd.metrics import Metrics, Reading
from corecapd.policy import PolicyError, parse_policy
from corecapd.procfs import ProcFS

ONLINE = frozenset(range(8))


def job_view(pid: int, cpus: set[int], threads: int = 3, violating: bool = False) -> JobView:
    return JobView(
        pid=pid,
        name=f"{pid}-1000",
        user="alice",
        rule="train",
        cpus=frozenset(cpus),
        threads=threads,
        budget=Budget(10, "max_threads"),
        cpu_percent=0.0,
        violating=violating,
        started_at=1_700_000_000.5,
        tensorflow=False,
        members=(Member(pid, "python", threads, None),),
        notes=(),
        settings=None,
        pools=(),
        epochs=(),
    )


def reading(
    *jobs: JobView, latencies: tuple[float, ...] = (), scans: tuple[float, ...] = ()
) -> Reading:
    return Reading(
        snapshot=Snapshot(
            online_cpus=ONLINE,
            reserved_cpus=frozenset({0}),
            eligible_cpus=ONLINE - {0},
            jobs=jobs,
            violations=(),
        ),
        exec_latencies_us=latencies,
        scan_seconds=scans,
        exec_events=True,
    )


class Served:
    """A Metrics serving on a free loopback port, its readings given by the test (set
    `current`) through a real asyncio loop on a thread of its own, as in the daemon."""

    def __init__(self) -> None:
        self.metrics = Metrics("127.0.0.1:1", "9.9.9", ProcFS())
        self.current = reading()
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self, inherited: tuple[int, ...] = ()) -> None:
        self.loop_thread.start()
        self.metrics.start(self.loop, lambda: self.current, inherited)

    def stop(self) -> None:
        self.metrics.stop()
        if self.loop_thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.loop_thread.join()
        self.loop.close()

    def scrape(self, port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200
            return str(answer.read().decode())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def served() -> Iterator[Callable[..., tuple[Served, int]]]:
    """served(listener=None) -> (a started Served, its port); stopped at teardown."""
    started: list[Served] = []

    def start(listener: socket.socket | None = None) -> tuple[Served, int]:
        server = Served()
        started.append(server)
        if listener is None:
            port = free_port()
            server.metrics.address = f"127.0.0.1:{port}"
            server.start()
        else:
            port = listener.getsockname()[1]
            server.metrics.address = f"127.0.0.1:{port}"
            server.start((os.dup(listener.fileno()),))  # the daemon's own, as from systemd
        return server, port

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def samples(text: str) -> dict[str, list[Sample]]:
    """Exposition text -> family name -> its samples."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_names_and_labels_follow_prometheus_conventions(
    served: Callable[..., tuple[Served, int]],
) -> None:
    server, port = served()
    server.current = reading(job_view(41, {1, 2}), latencies=(800.0,), scans=(0.003,))
    server.metrics.emit(ViolationStarted(41, "alice", "train", frozenset({1}), 12, 10))
    families = list(text_string_to_metric_families(server.scrape(port)))
    types = {family.name: family.type for family in families}
    # (prometheus_client adds a `_created` gauge beside each counter and histogram)
    ours = {
        name: kind
        for name, kind in types.items()
        if name.startswith("corecap_") and not name.endswith("_created")
    }
    assert ours == {
        "corecap_build_info": "gauge",  # an info metric is a gauge in the text format
        "corecap_job_threads": "gauge",
        "corecap_job_thread_budget": "gauge",
        "corecap_job_cpus": "gauge",
        "corecap_job_violating": "gauge",
        "corecap_job_start_time_seconds": "gauge",
        "corecap_job_cpu_seconds": "counter",
        "corecap_cpus": "gauge",
        "corecap_exec_events_subscribed": "gauge",
        "corecap_violations_started": "counter",
        "corecap_layer_violations_started": "counter",
        "corecap_jobs_started": "counter",
        "corecap_exec_events_lost": "counter",
        "corecap_enforcement_errors": "counter",
        "corecap_policy_reloads": "counter",
        "corecap_policy_last_reload_successful": "gauge",
        "corecap_exec_confine_seconds": "histogram",
        "corecap_scan_duration_seconds": "histogram",
    }
    assert "process_cpu_seconds" in types and "process_resident_memory_bytes" in types
    for family in families:
        if family.name.endswith("_created"):
            continue
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name == f"{family.name}_total", sample
            # Base units: seconds, never ms or us; Prometheus' own target labels stay free.
            assert not any(unit in sample.name for unit in ("_ms", "_us", "millis", "micro"))
            assert not {"job", "instance"} & sample.labels.keys(), sample
        if "time" in family.name or "duration" in family.name or "confine" in family.name:
            assert family.name.endswith("_seconds"), family.name


def test_a_jobs_series_follow_it_and_vanish_when_it_ends(
    served: Callable[..., tuple[Served, int]],
) -> None:
    server, port = served()
    server.current = reading(job_view(41, {1, 2}, threads=12, violating=True), job_view(42, {2}))
    text = server.scrape(port)
    job = {"corecap_job": "41-1000", "rule": "train", "user": "alice"}
    assert value(text, "corecap_job_threads", **job) == 12
    assert value(text, "corecap_job_thread_budget", **job) == 10
    assert value(text, "corecap_job_cpus", **job) == 2
    assert value(text, "corecap_job_violating", **job) == 1
    assert value(text, "corecap_job_violating", corecap_job="42-1000") == 0
    assert value(text, "corecap_job_start_time_seconds", **job) == 1_700_000_000.5
    # CPU 2 is held by both, CPU 1 by one; 3-7 are free; CPU 0 is reserved
    assert value(text, "corecap_cpus", state="shared") == 1
    assert value(text, "corecap_cpus", state="held") == 1
    assert value(text, "corecap_cpus", state="free") == 5
    assert value(text, "corecap_cpus", state="reserved") == 1

    server.current = reading(job_view(42, {2}))
    text = server.scrape(port)
    assert value(text, "corecap_job_threads", corecap_job="41-1000") is None
    assert value(text, "corecap_job_threads", corecap_job="42-1000") == 3
    assert value(text, "corecap_cpus", state="shared") == 0


def test_events_feed_the_counters(served: Callable[..., tuple[Served, int]]) -> None:
    server, port = served()
    common = (41, "alice", "train", frozenset({1}), 3, 10)
    events = [
        JobStarted(*common, budget_basis="max_threads", notes=(), enforced=True),
        JobChanged(*common, budget_basis="max_threads", notes=(), enforced=True),  # no start
        ViolationStarted(*common),
        ViolationStarted(*common),
        LayerOversized(
            *common,
            layer="tf-data",
            name="tf.data private pool",
            layer_threads=8,
            processes=1,
            expected=1,
            fix="options.threading.private_threadpool_size = 1",
            evidence="start routine in libtensorflow_framework.so.2",
        ),
        ExecEventsLost(reason="ENOBUFS", total=1),
        EnforcementFailed(*common, error="EPERM"),
        FenceFailed(job="41-1000", error="EBUSY"),
        FenceFailed(job="41-1000", error="EBUSY again"),
        PolicyReloaded(policy="/etc/corecap.toml", rules=2),
        PolicyRejected(policy="/etc/corecap.toml", error="bad"),
    ]
    text = server.scrape(port)
    assert (
        value(text, "corecap_enforcement_errors_total", kind="fence") == 0
    )  # there from the start
    assert value(text, "corecap_policy_reloads_total", outcome="rejected") == 0
    assert value(text, "corecap_policy_last_reload_successful") == 1
    for event in events:
        server.metrics.emit(event)
    text = server.scrape(port)
    assert value(text, "corecap_jobs_started_total", rule="train") == 1
    assert value(text, "corecap_violations_started_total", rule="train", user="alice") == 2
    layer = {"rule": "train", "user": "alice", "layer": "tf-data"}
    assert value(text, "corecap_layer_violations_started_total", **layer) == 1
    assert value(text, "corecap_exec_events_lost_total") == 1
    assert value(text, "corecap_enforcement_errors_total", kind="affinity") == 1
    assert value(text, "corecap_enforcement_errors_total", kind="fence") == 2
    assert value(text, "corecap_policy_reloads_total", outcome="applied") == 1
    assert value(text, "corecap_policy_reloads_total", outcome="rejected") == 1
    assert value(text, "corecap_policy_last_reload_successful") == 0
    server.metrics.emit(PolicyReloaded(policy="/etc/corecap.toml", rules=2))
    assert value(server.scrape(port), "corecap_policy_last_reload_successful") == 1


def test_histograms_count_each_sample_once_across_scrapes(
    served: Callable[..., tuple[Served, int]],
) -> None:
    server, port = served()
    # The daemon's windows: each scrape sees the last samples, new and already seen ones
    first = (300.0, 700.0, 2_000.0)
    server.current = reading(latencies=first, scans=(0.002,))
    server.scrape(port)
    later = (*first[1:], 150.0, 40_000.0)  # the window moved: 300 left it, two are new
    server.current = reading(latencies=later, scans=(0.002, 0.02))
    text = server.scrape(port)
    assert value(text, "corecap_exec_confine_seconds_count") == 5
    assert value(text, "corecap_exec_confine_seconds_sum") == pytest.approx(0.04315)
    assert value(text, "corecap_exec_confine_seconds_bucket", le="0.00025") == 1
    assert value(text, "corecap_exec_confine_seconds_bucket", le="0.001") == 3
    assert value(text, "corecap_scan_duration_seconds_count") == 2
    assert value(server.scrape(port), "corecap_exec_confine_seconds_count") == 5  # nothing new


def test_job_cpu_seconds_count_exited_processes_and_never_go_back(
    served: Callable[..., tuple[Served, int]], processes: Processes
) -> None:
    """Real processes: a job of two, one of which burns CPU and exits."""
    burner = processes.python("import time\nend = time.time() + 0.5\nwhile time.time() < end: pass")
    idle = processes.python("import time; time.sleep(60)")
    job = job_view(idle.pid, {1})
    job = dataclasses.replace(job, members=(*job.members, Member(burner.pid, "python", 1, None)))
    server, port = served()
    server.current = reading(job)
    time.sleep(0.3)
    during = value(server.scrape(port), "corecap_job_cpu_seconds_total", corecap_job=job.name)
    assert during is not None and during > 0
    burner.wait(timeout=30)
    after = value(server.scrape(port), "corecap_job_cpu_seconds_total", corecap_job=job.name)
    assert after is not None and after >= during  # the exited member's time stays counted


def test_serves_on_a_socket_handed_over_and_refuses_one_elsewhere(
    served: Callable[..., tuple[Served, int]],
) -> None:
    """systemd's socket activation, as corecapd-metrics.socket does it: a listening socket
    the daemon did not create (the unit forbids it to create Internet sockets)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server, port = served(listener)
        assert "corecap_build_info" in server.scrape(port)
    with socket.create_server(("127.0.0.1", 0)) as elsewhere:
        other = Served()
        other.metrics.address = f"127.0.0.1:{free_port()}"
        handed = os.dup(elsewhere.fileno())
        try:
            with pytest.raises(OSError, match=r"none on 127\.0\.0\.1:"):
                other.start((handed,))
            os.fstat(handed)  # left open: not the daemon's to close
        finally:
            os.close(handed)
            other.stop()


def test_a_scrape_fails_while_the_loop_does_not_answer(
    served: Callable[..., tuple[Served, int]],
) -> None:
    server, port = served()
    stalled = threading.Event()
    server.loop.call_soon_threadsafe(stalled.wait, 30)  # the loop thread is busy
    try:
        with pytest.raises(urllib.error.HTTPError, match="503") as failed:
            server.scrape(port)
        assert b"corecapd did not answer: no reading within 5 s" in failed.value.read()
    finally:
        stalled.set()
    assert "corecap_build_info" in server.scrape(port)


@pytest.mark.parametrize("address", ["127.0.0.1:9787", "[::1]:9787", "0.0.0.0:9787", "[::]:1", ""])
def test_policy_takes_an_ip_address_and_port(address: str) -> None:
    policy = parse_policy(f'rules = []\n[daemon]\nmetrics = "{address}"\n')
    assert policy.daemon.metrics == address


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("localhost:9787", "'localhost' is not an IP address"),
        ("::1:9787", "an IPv6 address, and only one, goes in brackets"),
        ("[127.0.0.1]:9787", "an IPv6 address, and only one, goes in brackets"),
        ("127.0.0.1", "expected a port from 1 to 65535"),
        ("127.0.0.1:0", "expected a port from 1 to 65535"),
        ("127.0.0.1:65536", "expected a port from 1 to 65535"),
    ],
)
def test_policy_refuses_other_addresses(address: str, why: str) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy(f'rules = []\n[daemon]\nmetrics = "{address}"\n', source="p.toml")
    [error] = raised.value.errors
    assert error.startswith('p.toml: daemon.metrics: expected "" or "HOST:PORT"'), error
    assert why in error, error


# -- the real daemon -------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def test_daemon_serves_its_jobs_and_counts_a_violation(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    port = free_port()
    daemon = start_daemon(
        daemon={"metrics": f"127.0.0.1:{port}"},
        rules=marked_rule(marker, "capped", cpus=1, max_threads=4),
    )
    job = processes.python(
        "import sys, threading; ts = [threading.Thread(target=sys.stdin.read) for _ in range(8)]\n"
        "[t.start() for t in ts]; sys.stdin.read()",
        stdin=subprocess.PIPE,
    )
    daemon.wait_event("violation-started", pid=str(job.pid))
    text = scrape(port)
    name = next(
        s.labels["corecap_job"]
        for s in samples(text)["corecap_job_threads"]
        if s.labels["corecap_job"].startswith(f"{job.pid}-")
    )
    assert value(text, "corecap_job_threads", corecap_job=name, rule="capped", user="root") == 9
    assert value(text, "corecap_job_thread_budget", corecap_job=name) == 4
    assert value(text, "corecap_job_violating", corecap_job=name) == 1
    assert value(text, "corecap_violations_started_total", rule="capped", user="root") == 1
    assert value(text, "corecap_jobs_started_total", rule="capped") == 1
    assert (value(text, "corecap_scan_duration_seconds_count") or 0) > 0
    if value(text, "corecap_exec_events_subscribed") == 1:  # confined at its exec: timed
        assert (value(text, "corecap_exec_confine_seconds_count") or 0) >= 1
    assert value(text, "process_open_fds") is not None

    assert job.stdin is not None
    job.stdin.close()
    daemon.wait_event("job-ended", pid=str(job.pid))
    wait_for(lambda: value(scrape(port), "corecap_job_threads", corecap_job=name) is None)


def test_a_changed_address_waits_for_a_restart_and_a_taken_one_leaves_the_daemon_running(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        daemon = start_daemon(daemon={"metrics": f"127.0.0.1:{port}"})
        unavailable = daemon.wait_event("metrics-unavailable")
        assert unavailable["address"] == f"127.0.0.1:{port}"
        assert "Address already in use" in unavailable["reason"]
        job = processes.python("import time; time.sleep(60)")
        daemon.wait_job(job.pid)  # it confines all the same

    text = daemon.policy_path.read_text()
    daemon.policy_path.write_text(text.replace(f"127.0.0.1:{port}", "127.0.0.1:1"))
    assert daemon.call("reload").endswith("daemon.metrics take effect at restart")
    reloaded = daemon.wait_event("policy-reloaded")  # in the journal too (also on SIGHUP)
    assert reloaded["restart_needed"] == "daemon.metrics"
    assert daemon.process.poll() is None


def test_no_metrics_without_the_key(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    listening = Path("/proc/net/tcp").read_text() + Path("/proc/net/tcp6").read_text()
    inodes = {line.split()[9] for line in listening.splitlines()[1:] if line.split()[3] == "0A"}
    fds = Path(f"/proc/{daemon.process.pid}/fd")
    sockets = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            sockets.add(os.readlink(fd))
    assert not {f"socket:[{inode}]" for inode in inodes} & sockets
