"""Prometheus metrics: a sink for the daemon's events and an exporter of its state at
`daemon.metrics` ("HOST:PORT", off when ""), served at /metrics.

The names follow Prometheus' conventions (base units, `_total` for counters, `_seconds`,
`_info`); the list, with what each means, is in the README's "Fleet" section. Per-job series
carry the labels `corecap_job` (the job's name, "<pid>-<start ticks>": Prometheus keeps `job`
for the scrape job), `rule` and `user`, and vanish with their job: at any moment there are as
many as there are live jobs.

Threads: the daemon's loop thread feeds the counters (`emit`, as every sink) and owns the
job table; the HTTP server runs on a thread of its own. A scrape never reads the table from
its thread: it asks the loop thread for a `Reading` (`call_soon_threadsafe`) and waits for it,
so every series of a scrape comes from one moment between two inputs of the core, no lock is
taken on the exec path, and nothing is copied when nobody scrapes. The histograms are fed
from the daemon's own windows of samples at scrape time (the loop thread takes out the new
ones), so the exec path does not change at all; an exec event that arrives while the loop
takes a reading (a snapshot of the table: O(jobs)) waits for it. bench/exec_latency.py
measures it, docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import platform
import socket
import socketserver
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

from corecapd.effects import JobView, Snapshot
from corecapd.events import (
    EnforcementFailed,
    Event,
    ExecEventsLost,
    FenceFailed,
    JobStarted,
    LayerOversized,
    PolicyRejected,
    PolicyReloaded,
    ViolationStarted,
)
from corecapd.model import ProcKey
from corecapd.policy import split_address
from corecapd.procfs import ProcessGone, ProcFS

# A scrape waits this long for the loop thread; a loop that does not answer in time is
# stuck, and the failed scrape (HTTP 503, `up == 0`) says so.
READING_TIMEOUT = 5.0  # seconds
# A client that sends no complete request in this time is dropped: the server handles one
# connection at a time (Prometheus scrapes a target one request at a time).
REQUEST_TIMEOUT = 10.0  # seconds
# Exec event -> every thread confined: p50 ~0.5-1 ms, p99 1-10 ms (docs/benchmarks.md).
EXEC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# One scan: 2-4 ms on a quiet host, tens of ms with thousands of processes (docs/benchmarks.md).
SCAN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
JOB_LABELS = ("corecap_job", "rule", "user")
T = TypeVar("T")


@dataclass(frozen=True)
class Reading:
    """The daemon as one scrape shows it, made and used on the loop's thread only.

    `exec_latencies_us`: the daemon's own window of recent exec event -> confined samples
    (microseconds, oldest first; not copied: only the new ones are taken out, there);
    `scan_seconds`: its window of recent scan durations (seconds, oldest first);
    `exec_events`: whether the kernel's exec events are subscribed.
    """

    snapshot: Snapshot
    exec_latencies_us: Sequence[float]
    scan_seconds: Sequence[float]
    exec_events: bool


@dataclass(frozen=True)
class _Fresh:
    """What the loop's thread hands a scrape: the snapshot, and the samples taken since the
    previous scrape (oldest first)."""

    snapshot: Snapshot
    exec_latencies_us: list[float]
    scan_seconds: list[float]
    exec_events: bool


class Metrics:
    """The metrics sink (`emit`, on the loop's thread) and the /metrics server.

    `address`: daemon.metrics ("HOST:PORT"); `version`: corecapd's, for corecap_build_info;
    `procfs`: where the jobs' CPU seconds are read at scrape time (stateless reads, so the
    daemon's own reader serves). `start` serves from a thread of its own; `stop` ends it.
    """

    def __init__(self, address: str, version: str, procfs: ProcFS) -> None:
        self.address = address
        self.registry = CollectorRegistry()
        self.violations = Counter(
            "corecap_violations_started",
            "Violations that began (a job over its thread budget), by rule and user.",
            ("rule", "user"),
            registry=None,
        )
        self.layers_oversized = Counter(
            "corecap_layer_violations_started",
            "Times one threaded layer of a job (tf.data, OpenMP, ...) grew wider than its"
            " grant allows, by rule, user and layer (corecapd.attribution's names).",
            ("rule", "user", "layer"),
            registry=None,
        )
        self.jobs_started = Counter(
            "corecap_jobs_started", "Jobs that began, by rule.", ("rule",), registry=None
        )
        self.events_lost = Counter(
            "corecap_exec_events_lost",
            "Times the kernel dropped exec events (socket overrun); a full scan followed.",
            registry=None,
        )
        self.enforcement_errors = Counter(
            "corecap_enforcement_errors",
            'Failures to confine a job: kind "affinity" (its threads\' CPU masks) or "fence"'
            " (its cgroup or scope).",
            ("kind",),
            registry=None,
        )
        self.reloads = Counter(
            "corecap_policy_reloads",
            'Policy reloads, by outcome: "applied", or "rejected" (the policy in force stays).',
            ("outcome",),
            registry=None,
        )
        self.reload_ok = Gauge(
            "corecap_policy_last_reload_successful",
            "1 unless the last reload was rejected: then the file on disk is not in force.",
            registry=None,
        )
        self.exec_latency = Histogram(
            "corecap_exec_confine_seconds",
            "Exec event (the kernel's timestamp) -> every thread of the process confined.",
            buckets=EXEC_BUCKETS,
            registry=None,
        )
        self.scan_duration = Histogram(
            "corecap_scan_duration_seconds",
            "Wall time of one reconciling scan of /proc.",
            buckets=SCAN_BUCKETS,
            registry=None,
        )
        for kind in ("affinity", "fence"):
            self.enforcement_errors.labels(kind)
        for outcome in ("applied", "rejected"):
            self.reloads.labels(outcome)
        self.reload_ok.set(1)
        self._live = _Live(self, version, procfs)
        self.registry.register(self._live)
        ProcessCollector(namespace="", registry=self.registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def emit(self, event: Event) -> None:
        """Count `event` (the loop's thread, in order; a few us, never blocks)."""
        match event:
            case ViolationStarted(rule=rule, user=user):
                self.violations.labels(rule, user).inc()
            case LayerOversized(rule=rule, user=user, layer=layer):
                self.layers_oversized.labels(rule, user, layer).inc()
            case JobStarted(rule=rule) if event.kind == JobStarted.kind:  # not JobChanged
                self.jobs_started.labels(rule).inc()
            case ExecEventsLost():
                self.events_lost.inc()
            case EnforcementFailed():
                self.enforcement_errors.labels("affinity").inc()
            case FenceFailed():
                self.enforcement_errors.labels("fence").inc()
            case PolicyReloaded():
                self.reloads.labels("applied").inc()
                self.reload_ok.set(1)
            case PolicyRejected():
                self.reloads.labels("rejected").inc()
                self.reload_ok.set(0)

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        read: Callable[[], Reading],
        inherited: Sequence[int] = (),
    ) -> None:
        """Serve /metrics; scrapes get their `Reading` from `read`, called on `loop`'s
        thread. `inherited`: listening sockets handed over by systemd (socket activation,
        `systemd/corecapd-metrics.socket`); the one bound to `address` is used, else the
        address is bound here.

        Raises:
            OSError: the address cannot be bound (in use, not this host's, or Internet
                sockets forbidden, as the shipped unit does: use the socket unit), or an
                inherited socket listens elsewhere.
        """
        live = self._live
        live.reader = on_loop_thread(loop, lambda: live.fresh(read()))
        listener = _listener(self.address, inherited)
        server = _Server(listener, _answering(make_wsgi_app(self.registry)))
        thread = threading.Thread(target=server.serve_forever, name="corecapd-metrics", daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()
        self._server = self._thread = None


class LoopUnavailable(Exception):
    """The loop thread gave no reading: stuck past READING_TIMEOUT, or stopped."""


def on_loop_thread(loop: asyncio.AbstractEventLoop, read: Callable[[], T]) -> Callable[[], T]:
    """`read`, run on `loop`'s thread, for a caller on another thread.

    Raises (from the returned function):
        LoopUnavailable: the loop did not run it within READING_TIMEOUT, or is closed.
    """

    def on_loop() -> T:
        done: futures.Future[T] = futures.Future()

        def fill() -> None:
            try:
                done.set_result(read())
            except Exception as err:  # handed to the scrape, which fails with it
                done.set_exception(err)

        try:
            loop.call_soon_threadsafe(fill)
            return done.result(timeout=READING_TIMEOUT)
        except futures.TimeoutError:  # not the built-in one before Python 3.11
            raise LoopUnavailable(f"no reading within {READING_TIMEOUT:g} s") from None
        except RuntimeError as err:  # the loop is closed
            raise LoopUnavailable(str(err)) from None

    return on_loop


def _answering(app: Callable[..., Any]) -> Callable[..., Any]:
    """`app`, answering 503 (and no traceback on stderr) when the loop gives no reading:
    the scrape fails, so `up` is 0 for it."""

    def answer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            return app(environ, start_response)  # it renders all before start_response
        except LoopUnavailable as err:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"corecapd did not answer: {err}\n".encode()]

    return answer


class _Live:
    """The collector that reads the daemon at scrape time (on the server's thread)."""

    def __init__(self, metrics: Metrics, version: str, procfs: ProcFS) -> None:
        self.metrics = metrics
        self.version = version
        self.procfs = procfs
        self.reader: Callable[[], _Fresh] | None = None
        self._cpu = _JobCpu()
        self._last_latency: float | None = None  # loop thread only
        self._last_scan: float | None = None  # loop thread only

    def fresh(self, reading: Reading) -> _Fresh:
        """On the loop's thread: the samples since the last scrape, O(new ones)."""
        latencies, self._last_latency = _since(reading.exec_latencies_us, self._last_latency)
        scans, self._last_scan = _since(reading.scan_seconds, self._last_scan)
        return _Fresh(reading.snapshot, latencies, scans, reading.exec_events)

    def collect(self) -> Iterator[Metric]:
        build = InfoMetricFamily("corecap_build", "The corecapd that serves these metrics.")
        build.add_metric([], {"version": self.version, "python": platform.python_version()})
        yield build
        if self.reader is None:
            return
        reading = self.reader()
        # One scrape at a time (the server has one thread): no lock around `_cpu`.
        cpu_seconds = self._cpu.update(reading.snapshot.jobs, self.procfs)
        for latency_us in reading.exec_latencies_us:
            self.metrics.exec_latency.observe(latency_us / 1e6)
        for seconds in reading.scan_seconds:
            self.metrics.scan_duration.observe(seconds)
        yield from _job_families(reading.snapshot.jobs, cpu_seconds)
        yield _cpu_states(reading.snapshot)
        subscribed = GaugeMetricFamily(
            "corecap_exec_events_subscribed",
            "1 when jobs are found at exec (the kernel's process events), 0 when by scans only.",
            value=1 if reading.exec_events else 0,
        )
        yield subscribed
        for metric in (
            self.metrics.violations,
            self.metrics.layers_oversized,
            self.metrics.jobs_started,
            self.metrics.events_lost,
            self.metrics.enforcement_errors,
            self.metrics.reloads,
            self.metrics.reload_ok,
            self.metrics.exec_latency,
            self.metrics.scan_duration,
        ):
            yield from metric.collect()


def _since(samples: Sequence[float], last: float | None) -> tuple[list[float], float | None]:
    """The samples taken after `last` (the newest one the previous scrape saw), and the
    newest now. By identity: every sample is a float object of its own, and holding `last`
    keeps its identity from being reused, so no counter is added on the exec path. If
    `last` has left the bounded window meanwhile, the whole window is new (older ones were
    never seen: a histogram undercounts then, never double counts)."""
    fresh: list[float] = []
    for sample in reversed(samples):
        if sample is last:
            break
        fresh.append(sample)
    fresh.reverse()
    return fresh, (samples[-1] if samples else last)


class _JobCpu:
    """Each live job's CPU seconds as a counter: what its processes used, those that
    exited included (their last reading stays counted). Read from /proc/PID/stat at scrape
    time, on the server's thread (utime + stime, clock ticks)."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[float, dict[ProcKey, float]]] = {}

    def update(self, jobs: Iterable[JobView], procfs: ProcFS) -> dict[str, float]:
        """Job name -> CPU seconds so far; forgets the jobs that ended."""
        totals: dict[str, tuple[float, dict[ProcKey, float]]] = {}
        for job in jobs:
            total, last = self._jobs.get(job.name, (0.0, {}))
            now: dict[ProcKey, float] = {}
            for pid in job.pids:
                with contextlib.suppress(ProcessGone, PermissionError):
                    sample = procfs.sample(pid)
                    now[sample.key] = sample.cpu_seconds
                    total += max(0.0, sample.cpu_seconds - last.get(sample.key, 0.0))
            totals[job.name] = (total, now)
        self._jobs = totals
        return {name: total for name, (total, _) in totals.items()}


def _job_families(jobs: Sequence[JobView], cpu_seconds: dict[str, float]) -> Iterator[Metric]:
    families: list[tuple[GaugeMetricFamily | CounterMetricFamily, Callable[[JobView], float]]] = [
        (
            GaugeMetricFamily(
                "corecap_job_threads", "Threads of the job at the last scan.", labels=JOB_LABELS
            ),
            lambda job: job.threads,
        ),
        (
            GaugeMetricFamily(
                "corecap_job_thread_budget",
                "Threads the job may run (its budget) before they count as a violation.",
                labels=JOB_LABELS,
            ),
            lambda job: job.budget.threads,
        ),
        (
            GaugeMetricFamily(
                "corecap_job_cpus", "CPUs granted to the job (its cores).", labels=JOB_LABELS
            ),
            lambda job: len(job.cpus),
        ),
        (
            GaugeMetricFamily(
                "corecap_job_violating",
                "1 while the job is in a violation (over budget), else 0.",
                labels=JOB_LABELS,
            ),
            lambda job: 1 if job.violating else 0,
        ),
        (
            GaugeMetricFamily(
                "corecap_job_start_time_seconds",
                "When the job's first process started, seconds since the epoch.",
                labels=JOB_LABELS,
            ),
            lambda job: job.started_at,
        ),
        (
            CounterMetricFamily(
                "corecap_job_cpu_seconds",
                "CPU time (user + system) used by the job's processes, exited ones included.",
                labels=JOB_LABELS,
            ),
            lambda job: cpu_seconds.get(job.name, 0.0),
        ),
    ]
    for family, value in families:
        for job in jobs:
            family.add_metric([job.name, job.rule, job.user], value(job))
        yield family


def _cpu_states(snapshot: Snapshot) -> GaugeMetricFamily:
    """Online CPUs by state: held by one job, shared by several, free for jobs, reserved."""
    holders = Tally(cpu for job in snapshot.jobs for cpu in job.cpus)
    cpus = GaugeMetricFamily(
        "corecap_cpus",
        'Online CPUs by state: "held" (one job), "shared" (several jobs), "free" (for'
        ' jobs, held by none), "reserved" (daemon.reserved_cpus: never for jobs).',
        labels=("state",),
    )
    cpus.add_metric(["held"], sum(1 for count in holders.values() if count == 1))
    cpus.add_metric(["shared"], sum(1 for count in holders.values() if count > 1))
    cpus.add_metric(["free"], len(snapshot.eligible_cpus - holders.keys()))
    cpus.add_metric(["reserved"], len(snapshot.reserved_cpus))
    return cpus


# -- the server ---------------------------------------------------------------------------


def _listener(address: str, inherited: Sequence[int]) -> socket.socket:
    """The listening socket for `address`: an inherited one bound there, else a new one.

    Raises:
        OSError: see `Metrics.start`.
    """
    host, port = split_address(address)
    wanted = (ipaddress.ip_address(host), port)
    elsewhere = []
    for fd in inherited:
        sock = socket.socket(fileno=fd)
        inet = sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
        bound = sock.getsockname()  # (host, port, ...) for an Internet socket, else a path
        if inet and (ipaddress.ip_address(bound[0]), bound[1]) == wanted:
            return sock
        elsewhere.append(str(bound))
        sock.detach()  # not ours to close: systemd keeps it
    if elsewhere:
        raise OSError(
            f"systemd handed over sockets on {', '.join(elsewhere)}, none on {address}:"
            " make the socket unit's ListenStream= and daemon.metrics the same"
        )
    family = socket.AF_INET6 if wanted[0].version == 6 else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=16)


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: the journal is for events."""


class _Server(WSGIServer):
    """wsgiref's server on a socket that is already listening: one connection at a time
    (no thread per connection for a client to multiply). Made without a socket() call of
    its own, so it also runs where Internet sockets may not be created (the unit's
    RestrictAddressFamilies=) with one handed over by systemd."""

    def __init__(self, listener: socket.socket, app: Callable[..., Any]) -> None:
        socketserver.BaseServer.__init__(self, listener.getsockname()[:2], _QuietHandler)
        self.socket = listener
        self.server_name, self.server_port = listener.getsockname()[:2]
        self.setup_environ()
        self.set_app(app)
