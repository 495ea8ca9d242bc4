"""corecapd: wires the parts together and runs the loop. Everything is built in `main`.

One asyncio loop, in the foreground (systemd style): a scan every `scan_interval`, exec
and exit events between scans, the socket API, SIGHUP to reload, SIGTERM/SIGINT to stop,
and the watchdog. Each of them becomes one input of the core (`JobTable.handle`); the
daemon carries out the effects it returns and hands the events to the reporter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import math
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from corecapd import __version__
from corecapd.attribution import Attributor, StackAttributor
from corecapd.core import JobTable, Refused
from corecapd.declaration import Registration
from corecapd.diagnosis import THREADING_VARIABLES, Diagnosis, Evidence, ThreadLayer, diagnose
from corecapd.effects import (
    Adopt,
    Confine,
    ConfineFailed,
    Effect,
    Escapes,
    EvidenceRead,
    Exec,
    ExecStat,
    Exit,
    GatherEvidence,
    Input,
    JobView,
    NextScan,
    Pin,
    Prepare,
    Register,
    Release,
    ReplacePolicy,
    Report,
    Restore,
    SaveState,
    Scan,
)
from corecapd.enforcement import AffinityBackend, Backend, EnforcementError
from corecapd.events import (
    DaemonStarted,
    DaemonStopped,
    Event,
    ExecEventsLost,
    ExecEventsUnavailable,
    FenceFailed,
    MetricsUnavailable,
    PolicyRejected,
    PolicyReloaded,
    StateProblem,
)
from corecapd.journal import Reporter, Sink, under_journal
from corecapd.model import KeptRegistration, Observed, ProcKey, Sample
from corecapd.policy import DEFAULT_POLICY_PATH, Policy, PolicyError, load_policy
from corecapd.preflight import check_host, check_policy_file
from corecapd.printable import visible, visible_lines
from corecapd.proc_events import EXEC, FORK, EventsLost, ProcEvent, ProcEventSocket
from corecapd.procfs import ProcessGone, Scanner
from corecapd.protocol import CommandFailed, Request
from corecapd.quota import cpu_quota
from corecapd.server import Peer, SocketServer
from corecapd.state import STATE_FILE, StateError, load_state, save_state
from corecapd.status import (
    grant_document,
    latency_summary,
    members_document,
    status_document,
    violations_document,
)

if TYPE_CHECKING:
    from corecapd.metrics import Metrics, Reading

# Policy keys that only a restart applies: the socket, the backend and the event source.
RESTART_ONLY = (
    "socket",
    "backend",
    "exec_events",
    "realtime_priority",
    "cgroup",
    "state_dir",
    "metrics",
)
LATENCY_SAMPLES = 10_000
GIL_SWITCH_INTERVAL = 0.0001  # seconds; Python's default of 5 ms would dwarf the exec path
EVENT_DATAGRAMS_PER_WAKE = 4096
# Exits closer together than EVENT_STORM_GAP (s) wait up to EVENT_DEFER (s) for a wake-up
# (an exec takes them at once): at most 20 wake-ups a second for them in a storm.
EVENT_STORM_GAP = 0.005
EVENT_DEFER = 0.05
# Ancestors the exec path reads at most to find a Python process's job: shells, env,
# timeout, nohup and wrappers between a job and its Python are a handful, not dozens.
MAX_ANCESTRY = 32
# Reads of a job's fork: one that exec'd meanwhile is read again (its exec event may pass it
# by: an exe no rule names is not looked at, and scans read only what they watch).
FORK_READS = 3
FENCE_TIDY_AFTER = 1.0  # seconds without fence work before the backend tidies up
RELOAD_FENCE_WAIT = 2.0  # seconds a reload's reply waits for the fences it changed


class StartupError(Exception):
    pass


FenceWork = tuple[Callable[[], object], str]  # an operation, and its job's name ("": none)


class Pinned(NamedTuple):
    pid: int
    cpus: frozenset[int]


class FenceWorker:
    """The fence backend's work, in order, on one thread of its own: a cgroup move takes
    6-12 ms here while the kernel waits out an RCU grace period (its CPU: ~0.15 ms), and
    exec events must never wait behind it (the write releases the GIL). Errors come back to
    the loop's thread.

    The thread is woken once the loop's callback that made work has returned (`call_soon`),
    and does all of it: it runs while the loop waits for events, not beside it. Two threads
    that both want the GIL hand it back and forth (with the 0.1 ms switch interval: 5.5
    context switches of this thread per short job, against 2.4 woken after the callback).

    A job's end wakes no one: its release waits in line for the next wake-up (most often
    the next job's confine: one wake-up for both) or the idle moment before tidying (at
    most FENCE_TIDY_AFTER); meanwhile its cpuset only holds what it held.

    A plain thread and queue, not an executor: a future per operation woke the loop for
    its result, two wake-ups per short-lived job (about 20 us each: bench/wake_cost.py)
    for what only an error needs."""

    def __init__(self, backend: Backend, on_error: Callable[[str, str], None]) -> None:
        self.backend = backend
        self._on_error = on_error
        # All work, in the order it was made; the thread takes from the left. A deque: an
        # append and a popleft are each one step under the GIL, so nothing is lost between.
        self._work_to_do: deque[FenceWork] = deque()
        self._wakes: queue.SimpleQueue[bool] = queue.SimpleQueue()  # False: stop
        self._waking = False  # a wake-up is due when the current callback returns
        self._parked = False  # the thread waits with nothing to tidy: no timeout wakes it
        self._thread = threading.Thread(target=self._work, name="corecapd-fence", daemon=True)
        self._loop: asyncio.AbstractEventLoop  # the daemon's, from `start`: errors go there

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the thread; errors are reported on `loop`'s thread."""
        self._loop = loop
        self._thread.start()

    def confine(self, job: str, pids: Sequence[int], cpus: frozenset[int]) -> None:
        self._add((partial(self.backend.confine, job, tuple(pids), cpus), job), wake=True)

    def release(self, job: str, pids: Sequence[int]) -> None:
        self._add((partial(self.backend.release, job, tuple(pids)), job), wake=False)

    def close(self) -> str | None:
        """Finish the work handed over, then tidy up; the error, if tidying failed."""
        self._wakes.put(False)
        self._thread.join()
        return _attempt(self.backend.tidy)

    def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until the work handed over so far is done."""
        done = threading.Event()
        self._work_to_do.append((done.set, ""))
        self._wakes.put(True)
        done.wait(timeout)

    def _add(self, work: FenceWork, wake: bool) -> None:
        self._work_to_do.append(work)
        if wake and not self._waking:
            self._waking = True
            self._loop.call_soon(self._wake)
        elif self._parked:  # read after the append: see `_next`
            self._wakes.put(True)

    def _wake(self) -> None:
        self._waking = False
        self._wakes.put(True)

    def _work(self) -> None:
        # Tidy once idle that long after work, and after start (what a crash left).
        idle: float | None = FENCE_TIDY_AFTER
        while True:
            woken = self._next(idle)
            did = False
            while self._work_to_do:
                operation, job = self._work_to_do.popleft()
                self._report(job, _attempt(operation))
                did = True
            if woken is False:
                return
            if woken is None:  # idle that long (releases waited for this): tidy now
                self._report("", _attempt(self.backend.tidy))
                idle = None
            elif did:
                idle = FENCE_TIDY_AFTER

    def _next(self, idle: float | None) -> bool | None:
        """The next wake-up (False: stop), or None after `idle` s; at once when work waits
        and nothing else would wake the thread."""
        if idle is not None:
            try:
                return self._wakes.get(timeout=idle)
            except queue.Empty:
                return None
        # Flag, then look: work added before the look is seen here, work added after it
        # sees the flag and wakes the thread (each statement is atomic under the GIL).
        self._parked = True
        try:
            return True if self._work_to_do else self._wakes.get()
        finally:
            self._parked = False

    def _report(self, job: str, error: str | None) -> None:
        if error is not None:
            self._loop.call_soon_threadsafe(self._on_error, job, error)


def _attempt(operation: Callable[[], object]) -> str | None:
    try:
        operation()
    except EnforcementError as err:
        return str(err)
    return None


class Daemon:
    def __init__(
        self,
        policy: Policy,
        policy_path: Path,
        scanner: Scanner,
        affinity: AffinityBackend,
        fence: Backend | None,
        backend_reason: str,
        table: JobTable,
        reporter: Reporter,
        exec_events: ProcEventSocket | str,
        attributor: Attributor,
    ) -> None:
        self.policy = policy
        self.policy_path = policy_path
        self.scanner = scanner
        # Affinity first (the fast path: pools size themselves from the mask), then a fence.
        self.affinity = affinity
        self.backend_reason = backend_reason  # why this fence: configured, or auto's reasons
        self.fences = FenceWorker(fence, self._fence_failed) if fence is not None else None
        self._fence_errors: set[tuple[str, str]] = set()
        self.state_problem: str | None = None  # why a previous daemon's state was not used
        self.table = table
        self.reporter = reporter  # sd_notify, and the first of the sinks
        self.sinks: list[Sink] = [reporter]
        self.exec_events = exec_events  # the subscription, or why there is none
        # Each thread's layer, for a diagnosis: one for the daemon's life (its symbol cache)
        self.attributor = attributor
        self.server = SocketServer(Path(policy.daemon.socket), self.handle)
        self.exec_latency_us: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.scan_seconds: deque[float] = deque(maxlen=LATENCY_SAMPLES)  # wall time per scan
        self.metrics: Metrics | None = None  # daemon.metrics: also one of the sinks
        self.events_lost = 0
        self.execs_during_scans = 0
        self._changed_meanwhile: set[int] | None = None  # while a scan runs: PIDs events changed
        # What the next scan reads, as the core asked; the first is complete
        self._plan = NextScan(frozenset(), complete=True)
        self._reconciled_at = -math.inf  # time.monotonic() of the last complete scan
        self.complete_scans = 0
        self.partial_scans = 0
        self._stop = asyncio.Event()
        self._stop_reason = "an error in the main loop"  # until stop() says otherwise
        self._wake = asyncio.Event()
        self._next_scan = 0.0
        self._deferred: asyncio.TimerHandle | None = None  # the exits' turn
        self._lost_in_scan = False  # events lost while a scan read: the next one is complete
        self._exes_read: dict[int, str] = {}  # PID -> exe, of the execs read and wanted
        self._last_deferred = -math.inf  # time.monotonic() of their last wake-up

    @property
    def enforcing(self) -> bool:
        return self.policy.daemon.mode == "enforce"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop_signal, self.stop, stop_signal.name)
        await self.server.start()
        if self.fences is not None:
            self.fences.start(loop)
        if self.metrics is not None:
            self._serve_metrics(loop)
        self._emit(
            DaemonStarted(
                policy=self.policy.source,
                mode=self.policy.daemon.mode,
                backend=self._backend_description(),
                backend_reason=self.backend_reason,
                eligible_cpus=self.table.snapshot().eligible_cpus,
            )
        )
        if self.state_problem is not None:
            self._emit(StateProblem(error=self.state_problem))
        if isinstance(self.exec_events, ProcEventSocket):
            loop.add_reader(self.exec_events.fileno(), self._on_execs)
            loop.add_reader(self.exec_events.deferred_fileno(), self._defer_events)
        else:
            self._emit(ExecEventsUnavailable(reason=self.exec_events))
        self._adopt()
        self.scan()
        # Everything built so far lives as long as the daemon: keep it out of the garbage
        # collector's full passes, which otherwise land on the exec path as p99 pauses.
        gc.freeze()
        # The fence worker thread must hand the GIL back quickly when an exec event arrives.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.reporter.notify("READY=1", self._status_line())
        watchdog = _watchdog_interval()
        try:
            while not self._stop.is_set():
                if time.monotonic() >= self._next_scan:
                    self.scan()
                timeout = self._next_scan - time.monotonic()
                if watchdog is not None:
                    self.reporter.notify("WATCHDOG=1")
                    timeout = min(timeout, watchdog)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(timeout, 0))
        finally:
            self.reporter.notify("STOPPING=1")
            if isinstance(self.exec_events, ProcEventSocket):
                if self._deferred is not None:
                    self._deferred.cancel()
                loop.remove_reader(self.exec_events.fileno())
                loop.remove_reader(self.exec_events.deferred_fileno())
                self.exec_events.close()
            await self.server.stop()  # before the fences close: a request may still confine
            if self.fences is not None and (error := self.fences.close()) is not None:
                self._fence_failed("", error)
            jobs, _ = self.table.counts()
            self._emit(DaemonStopped(reason=self._stop_reason, jobs=jobs))
            if self.metrics is not None:  # off the loop: a scrape may wait for a reading
                await asyncio.to_thread(self.metrics.stop)

    def stop(self, reason: str = "asked to stop") -> None:
        self._stop_reason = reason
        self._stop.set()
        self._wake.set()

    def scan(self) -> None:
        """Sample the jobs' processes (threads, CPU time, masks), and with exec, fork and
        exit events on, only them and the processes waiting on their libraries: the
        events say what else is new or gone. All of /proc is read (new and gone
        processes, drift) without events, at the reconcile interval, after lost events,
        and when the core asks (`NextScan.complete`)."""
        started = time.monotonic()
        daemon = self.policy.daemon
        self._next_scan = started + daemon.scan_interval
        now = time.time()
        # Exec events that come in while a scan reads /proc (tens of ms with thousands of
        # processes) are handled at once, as between scans; `_folded_in` reconciles.
        events_on = isinstance(self.exec_events, ProcEventSocket)
        self._changed_meanwhile = set()
        try:
            # The forks waiting join their jobs, to be sampled too. Inside the scan: events
            # lost now ask for a complete one (`_rescan`), this one, not one within it.
            self._take_events()
            complete = (
                not events_on
                or self._plan.complete
                or started - self._reconciled_at >= daemon.reconcile_interval
            )
            self._lost_in_scan = False  # from here on, a loss asks for the next scan
            watched = None if complete else self.table.watched()
            scanning = self.scanner.scanning(self._plan.libraries, watched)
            while True:
                try:
                    next(scanning)
                except StopIteration as done:
                    processes: dict[ProcKey, Observed] = done.value
                    break
                if events_on:
                    self._on_events()
        finally:
            changed, self._changed_meanwhile = self._changed_meanwhile, None
        if complete:
            self._reconciled_at = started
            self.complete_scans += 1
        else:
            self.partial_scans += 1
        self._apply(Scan(self._folded_in(processes, changed), complete), now)
        if self._lost_in_scan:  # the core's NextScan just replaced the plan `_rescan` set
            self._plan = dataclasses.replace(self._plan, complete=True)
        self._apply(Escapes(self.affinity.take_escapes()), now)
        self.scan_seconds.append(time.monotonic() - started)
        self.reporter.notify(self._status_line())
        self._apply(Prepare(), now)

    def _apply(self, given: Input, now: float) -> JobView | None:
        """Hand `given` to the core, carry out the effects it returns, in order, and
        report its events (after the effects: a failure to carry one out comes back as
        an input of its own). Returns the job a registration or report concerned.

        Raises:
            Refused: the core would not carry out a `Register` or `Report`.
        """
        outcome = self.table.handle(given, now)
        self._carry_out(outcome.effects, now)
        for event in outcome.events:
            self._emit(event)
        return outcome.job

    def _carry_out(
        self, effects: Iterable[Effect], now: float, alone: Pinned | None = None
    ) -> int | None:
        """Returns when the last `Confine`'s masks were set (time.monotonic_ns(); before
        its fence is handed to the worker), or None when there was none. `alone`: a
        process the exec path pinned, with no other thread since (nothing to list)."""
        confined_ns = None
        for effect in effects:
            match effect:
                case Confine(job, pids, cpus):
                    try:
                        if alone is not None and (pids, cpus) == ((alone.pid,), alone.cpus):
                            self.affinity.confined_alone(job, alone.pid, cpus)
                        else:
                            self.affinity.confine(job, pids, cpus)
                    except EnforcementError as err:
                        self._apply(ConfineFailed(job, str(err)), now)
                    confined_ns = time.monotonic_ns()
                    if self.fences is not None:
                        self.fences.confine(job, pids, cpus)
                case Release(job, pids):
                    self.affinity.release(job, pids)
                    if self.fences is not None:
                        self.fences.release(job, pids)
                case NextScan():
                    self._plan = effect
                case GatherEvidence(job, pids):
                    self._apply(EvidenceRead(job, self._evidence(pids)), now)
                case SaveState(registrations):
                    self._save_state(registrations)
        return confined_ns

    def _folded_in(
        self, processes: dict[ProcKey, Observed], changed: set[int]
    ) -> dict[ProcKey, Observed]:
        """The scan's view with what exec and exit events changed meanwhile, as it is now:
        the scan may have read those processes before their exec or exit, or not at all,
        and the core must not end a job just placed or place one that has ended."""
        if not changed:
            return processes
        folded = {key: seen for key, seen in processes.items() if key.pid not in changed}
        for pid in changed:  # read again: a partial scan sees nothing it does not watch
            with contextlib.suppress(ProcessGone, PermissionError):
                if (seen := self.scanner.observe(pid)) is not None:
                    folded[seen.key] = seen
        return folded

    def _take_events(self) -> None:
        """Take what waits unseen: forks wake no one (ProcEventSocket), and the exits of a
        run wait for EVENT_DEFER."""
        if isinstance(self.exec_events, ProcEventSocket):
            self._on_events()

    def _defer_events(self) -> None:
        """An exit waits. One that comes alone is taken at once (a job's end frees its
        cores before the next exec needs them), with the forks before it; in a run of
        them, less than EVENT_STORM_GAP apart (a shell loop, a build), they wait up to
        EVENT_DEFER, or for the next exec, which takes them first: their wake-ups cost
        more than their handling (bench/wake_cost.py)."""
        assert isinstance(self.exec_events, ProcEventSocket)
        now = time.monotonic()
        alone = now - self._last_deferred >= EVENT_STORM_GAP
        self._last_deferred = now
        if alone:
            self._on_events()
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.exec_events.deferred_fileno())
        self._deferred = loop.call_later(EVENT_DEFER, self._deferred_due)

    def _deferred_due(self) -> None:
        assert isinstance(self.exec_events, ProcEventSocket)
        self._deferred = None
        self._on_events()
        self._last_deferred = time.monotonic()  # a storm that goes on stays deferred
        loop = asyncio.get_running_loop()
        loop.add_reader(self.exec_events.deferred_fileno(), self._defer_events)

    def _on_execs(self) -> None:
        """The exec socket's reader: the forks and exits are read only before an exec that
        may be a job's (`_wanted`); the rest wait for their own reader, or the next read."""
        self._on_events(others=False)

    def _wanted(self, pid: int) -> bool:
        """Whether an exec may be a job's, by its program's name (an exec with no rule that
        names it is left to scans: a job's children inherit its mask). The exe read is kept
        for `_admit`."""
        try:
            exe = self.scanner.procfs.exe(pid)
        except (ProcessGone, PermissionError):
            return False
        if not self.table.may_match_exe(os.path.basename(exe)):
            return False
        self._exes_read[pid] = exe
        return True

    def _on_events(self, others: bool = True) -> None:
        """One exec datagram at a time, with the forks and exits before it: the first exec
        is confined before the rest are read (a bound keeps a storm from starving the
        loop; the reader fires again). `others`: see ProcEventSocket.read."""
        assert isinstance(self.exec_events, ProcEventSocket)
        changed = False  # whether the core was told anything
        for _ in range(EVENT_DATAGRAMS_PER_WAKE):
            try:
                events = self.exec_events.read(self._wanted, others)
            except EventsLost as err:
                self.events_lost += 1
                self._emit(ExecEventsLost(reason=str(err), total=self.events_lost))
                self._rescan()  # the lost execs are found, and confined, by a full scan
                return
            if events is None:
                break
            for event in events:
                if event.kind is EXEC:
                    if changed:  # forks and exits came first: foresee its grant anew
                        self._apply(Prepare(), time.time())
                    changed = self._admit(event)
                    continue
                if event.kind is FORK:
                    if self.table.is_member(event.parent):  # else: it matters once it execs
                        self._forked(event.pid)
                        changed = True
                    continue
                if self.table.is_member(event.pid) and self.scanner.procfs.lives_on(event.pid):
                    continue  # only its leader thread exited; scans see the process's end
                if self._changed_meanwhile is not None:
                    self._changed_meanwhile.add(event.pid)
                if self.table.knows(event.pid):  # most exits on a host are of nobody it knows
                    self._apply(Exit(event.pid), time.time())
                    changed = True
        if changed:  # the next exec's grant, worked out while nothing waits
            self._apply(Prepare(), time.time())

    def _forked(self, pid: int) -> None:
        """A job's process started another without an exec (a multiprocessing or
        DataLoader worker): it joins the job now, so partial scans sample it. It runs
        confined already: the mask and the fence are inherited at fork."""
        if self._changed_meanwhile is not None:
            self._changed_meanwhile.add(pid)
        for _ in range(FORK_READS):  # None: it exec'd while read (`subprocess`: at once)
            try:
                process = self.scanner.observe(pid)
            except (ProcessGone, PermissionError):
                return
            if process is not None:
                self._apply(ExecStat(process, ()), time.time())
                return

    def _rescan(self) -> None:
        self._plan = dataclasses.replace(self._plan, complete=True)
        if self._changed_meanwhile is None:
            self.scan()
        else:  # the running scan may have listed /proc before the lost execs: one more
            self._lost_in_scan = True
            self._next_scan = time.monotonic()
            self._wake.set()

    def _admit(self, event: ProcEvent) -> bool:
        """The exec fast path: cheap reads, and the core pins the process ahead when who it
        is tells its CPUs (`Exec`), before the stat file is read (most of the path's work);
        then the core places it (`ExecStat`) and the masks are confirmed or corrected.
        Returns whether the core was told of it."""
        pid = event.pid
        exe = self._exes_read.pop(pid, None)  # `_wanted` read it
        if exe is None:  # its second exec in one batch (after lost events): one is enough
            return False
        gc.disable()  # a collection now would land on the exec path; it runs right after
        try:
            identity, ppid = self.scanner.procfs.identity_and_parent(pid, exe)
            lineage, ancestor = self._lineage(ppid)
            ahead = self.table.handle(Exec(pid, ancestor, identity), time.time()).effects
            pinned = {
                effect.cpus
                for effect in ahead
                if isinstance(effect, Pin)  # all Exec gives, and only it
                and all([self.affinity.pin(one, effect.cpus) for one in effect.pids])
            }
            confined_ns = time.monotonic_ns()
            process = self.scanner.observe(pid, identity=identity)  # the stat file only now
        except (ProcessGone, PermissionError):
            return True  # pinned ahead, maybe: the exit event follows
        finally:
            gc.enable()
        if process is None:
            return True
        if self._changed_meanwhile is not None:
            self._changed_meanwhile.add(pid)
            self._changed_meanwhile.update(sample.key.pid for sample in lineage)
            self.execs_during_scans += 1
        now = time.time()
        outcome = self.table.handle(ExecStat(process, tuple(lineage)), now)
        # Read after the pin, one thread: any other was made since, with the mask set.
        alone = Pinned(pid, *pinned) if len(pinned) == 1 and process.sample.threads == 1 else None
        masks_set_ns = self._carry_out(outcome.effects, now, alone)
        for effect in outcome.effects:
            if isinstance(effect, Confine) and pid in effect.pids:
                if effect.cpus not in pinned and masks_set_ns is not None:
                    confined_ns = masks_set_ns  # not pinned ahead, or to other CPUs
                self.exec_latency_us.append((confined_ns - event.timestamp_ns) / 1000)
        for reported in outcome.events:
            self._emit(reported)
        return True

    def _lineage(self, ppid: int) -> tuple[list[Sample], int]:
        """The exec path's ancestry walk: the ancestors the table does not know yet
        (forked since the last scan, like the /bin/sh of `os.system` or the bash of
        `bash run.sh`), nearest first, and the PID of the first it knows (a job's
        process, or one in no job). One stat read each (~20 us), usually none or one:
        the last scan saw every older process."""
        lineage: list[Sample] = []
        pid = ppid
        while not self.table.ancestry_known(pid) and len(lineage) < MAX_ANCESTRY:
            try:
                sample = self.scanner.procfs.sample(pid)
            except (ProcessGone, PermissionError):
                break  # the chain is cut: what is left is placed as a process of no job
            lineage.append(sample)
            pid = sample.ppid
        return lineage, pid

    def _emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def _serve_metrics(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the metrics server, on the socket systemd handed over if there is one; a
        failure is reported and the daemon goes on confining without metrics."""
        assert self.metrics is not None
        try:
            self.metrics.start(loop, self._metrics_reading, self.reporter.inherited_sockets())
        except OSError as err:
            self._emit(MetricsUnavailable(address=self.metrics.address, reason=str(err)))
            self.sinks.remove(self.metrics)
            self.metrics = None

    def _metrics_reading(self) -> Reading:
        """What a scrape shows; on the loop's thread (metrics.py says why)."""
        from corecapd.metrics import Reading

        self._take_events()  # a job's forks that no wake-up took count in its CPU time
        return Reading(
            snapshot=self.table.snapshot(),
            exec_latencies_us=self.exec_latency_us,
            scan_seconds=self.scan_seconds,
            exec_events=isinstance(self.exec_events, ProcEventSocket),
        )

    def _fence_failed(self, job: str, error: str) -> None:
        if (job, error) not in self._fence_errors:
            self._fence_errors.add((job, error))
            self._emit(FenceFailed(job=job, error=error))

    def _adopt(self) -> None:
        """Before the first scan: what jobs held when a previous daemon stopped (the fences
        it left, and processes' masks), for the core to keep where the policy still allows;
        the fences whose job is gone it releases after the first scan."""
        if not self.enforcing:
            return
        left: dict[str, frozenset[int]] = {}
        if self.fences is not None:
            try:
                left = self.fences.backend.adopt()
            except EnforcementError as err:  # e.g. the system bus did not answer
                self._emit(FenceFailed(job="(adopting fences)", error=str(err)))
        self._apply(Adopt(left, self.affinity.adopt()), time.time())

    def _backend_description(self) -> str:
        if self.fences is None:
            return self.affinity.describe()
        return f"{self.affinity.describe()} + {self.fences.backend.describe()}"

    def reload(self) -> str:
        """Swap in the policy file's current content, or keep the old one and say why.
        READY=1 follows RELOADING=1 whatever happens in between (systemd waits for it).

        Raises:
            CommandFailed: the policy was rejected (every reason, one per line); the policy
                in force stays.
        """
        self.reporter.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return self._reload()
        finally:
            self.reporter.notify("READY=1", self._status_line())

    def _reload(self) -> str:
        try:
            policy = load_policy(self.policy_path)
            checked = check_host(policy, self.affinity.host, in_force=self.policy.daemon)
            if checked.problems:
                raise PolicyError(*(f"{policy.source}: {problem}" for problem in checked.problems))
        except PolicyError as err:
            self._reject(err.errors)
        except Exception as err:  # a flaw in the checks: the policy in force stays
            self._reject([f"{self.policy_path}: cannot be checked: {type(err).__name__}: {err}"])
        restart_only = [
            key
            for key in RESTART_ONLY
            if getattr(policy.daemon, key) != getattr(self.policy.daemon, key)
        ]
        in_force = self.policy
        try:
            self._apply_policy(policy)
        except Exception as err:  # a flaw in applying it: back to the policy in force
            self._apply_policy(in_force)
            self._reject([f"{self.policy_path}: cannot be applied: {type(err).__name__}: {err}"])
        self._emit(
            PolicyReloaded(
                policy=policy.source,
                rules=len(policy.rules),
                restart_needed=tuple(f"daemon.{key}" for key in restart_only),
            )
        )
        self.scan()
        if self.fences is not None:
            # "reloaded" once the new grants are in force: a grant that grew is narrowed
            # by its old fence until the fence worker widens it (a few ms)
            self.fences.drain(RELOAD_FENCE_WAIT)
        if restart_only:
            return f"reloaded; daemon.{', daemon.'.join(restart_only)} take effect at restart"
        return "reloaded"

    def _apply_policy(self, policy: Policy) -> None:
        self.policy = policy
        self._apply(ReplacePolicy(policy), time.time())

    def _reject(self, errors: Sequence[str]) -> NoReturn:
        """Report a rejected reload: every error in one event (one line: "; " between
        them, as the stderr log has a line per event), and to the caller one per line."""
        joined = "; ".join(errors)
        self._emit(PolicyRejected(policy=str(self.policy_path), error=joined))
        said = joined if len(errors) == 1 else f"{len(errors)} errors\n" + "\n".join(errors)
        raise CommandFailed(f"reload rejected, the policy in force stays: {said}")

    def _reload_on_signal(self) -> None:
        with contextlib.suppress(CommandFailed):  # reload() has reported it already
            self.reload()

    def handle(self, request: Request, peer: Peer) -> Any:
        if request.command == "ping":
            return {"version": __version__, "pid": os.getpid()}
        self._take_events()  # the forks no wake-up took: a job's worker may be the caller
        if request.command == "status":
            return status_document(
                self.table.snapshot(),
                self.policy.daemon.mode,
                self._backend_description(),
                self.policy.source,
                time.time(),
                self._exec_events_state(),
            )
        if request.command == "violations":
            return violations_document(self.table.snapshot())
        if request.command == "reload":
            return self.reload()
        if request.command == "register" and request.registration is not None:
            grant = self._register(request.registration, peer)
            if request.pid not in (None, peer.pid):
                grant["notes"].append(
                    f"registered PID {peer.pid}, the caller; a process can only register"
                    f" itself, not PID {request.pid}"
                )
            return grant
        if request.command == "report":
            process = self._caller(peer, "reported")
            job = self._requested(Report(process, request.pools, request.report))
            return {"job": job.pid}
        if request.command == "explain" and request.pid is not None:
            return self._explain(request.pid)
        raise CommandFailed(f"unhandled command {request.command!r}")

    def _requested(self, given: Register | Report) -> JobView:
        """A request's input for the core; CommandFailed when the core refuses it."""
        try:
            job = self._apply(given, time.time())
        except Refused as err:
            raise CommandFailed(str(err)) from None
        assert job is not None  # a registration or report always concerns a job
        return job

    def _caller(self, peer: Peer, doing: str) -> Observed:
        """The process that made the connection, read now; CommandFailed when it is gone
        (its PID may be another process's by now) or runs as another user."""
        try:
            process = self.scanner.observe(peer.pid)
            uid = self.scanner.procfs.identity(peer.pid).uid  # now: observe() may cache it
        except (ProcessGone, PermissionError):
            process = None
        if process is None:
            raise CommandFailed(f"PID {peer.pid} cannot be read in /proc: nothing {doing}")
        peer.confirm(process.key.start_ticks, uid, doing)  # after the reads: they were its
        return process

    def _register(self, registration: Registration, peer: Peer) -> dict[str, Any]:
        """The caller (by SO_PEERCRED and its pidfd, never by what it says) declares
        itself a job."""
        process = self._caller(peer, "registered")
        job = self._requested(Register(process, registration))
        return grant_document(job, self.enforcing)

    def _save_state(self, registrations: Sequence[tuple[str, KeptRegistration]]) -> None:
        """Keep what registered jobs declared for a restarted daemon (state.py)."""
        try:
            left_out = save_state(Path(self.policy.daemon.state_dir), list(registrations))
        except OSError as err:
            self._emit(StateProblem(error=f"{self.policy.daemon.state_dir}: {err}"))
        else:
            if left_out:
                self._emit(
                    StateProblem(
                        error=f"{left_out} of {len(registrations)} registrations left out of"
                        f" {self.policy.daemon.state_dir}/{STATE_FILE}: beyond its limits"
                    )
                )

    def _explain(self, pid: int) -> dict[str, Any]:
        job = self.table.view_of(pid)
        if job is None:
            raise CommandFailed(f"PID {pid} is in no job (corecapctl status lists the jobs)")
        diagnosis = self._diagnose(job)
        return {
            "pid": pid,
            "job": job.pid,
            "rule": job.rule,
            "state": "violation" if job.violating else "ok",
            "budget_basis": job.budget.basis,
            "epochs": [{"epoch": e.epoch, "threads": e.threads} for e in job.epochs],
            **diagnosis.as_dict(),
            "members": members_document(job),
        }

    def _diagnose(self, job: JobView) -> Diagnosis:
        return diagnose(job.diagnosis_facts(), self._evidence(job.pids))

    def _evidence(self, pids: Sequence[int]) -> Evidence:
        """What a job's processes (`pids`, root first) show now: every thread attributed to
        its layer, the threading variables (the root's win), and the root's CPU mask and
        CPU quota. For `explain`, a violation's onset and a layer check only: a TF process
        costs 7-11 ms of CPU, 13-35 ms the first time (docs/diagnosis.md)."""
        procfs = self.scanner.procfs
        environment: dict[str, str] = {}
        threads: list[ThreadLayer] = []
        for pid in pids:
            with contextlib.suppress(ProcessGone, PermissionError):
                found = self.attributor.attribute(pid)
                threads += [
                    ThreadLayer(pid, t.tid, t.comm, t.layer.value, t.runtime, t.library, t.evidence)
                    for t in found.threads
                ]
            with contextlib.suppress(ProcessGone, PermissionError):
                environment = procfs.environment(pid, THREADING_VARIABLES) | environment
        mask, quota = 0, None
        if pids:
            with contextlib.suppress(OSError):  # ProcessLookupError: the root exited
                mask = len(os.sched_getaffinity(pids[0]))
            with contextlib.suppress(ProcessGone, PermissionError):
                quota = cpu_quota(pids[0], procfs.root, procfs.cgroup_root)
        return Evidence(environment, tuple(threads), mask, quota)

    def _exec_events_state(self) -> dict[str, Any]:
        if not isinstance(self.exec_events, ProcEventSocket):
            source = f"none, scanning only: {self.exec_events}"
        else:
            source = "netlink: exec, and fork and exit of processes"
        return {
            "backend_reason": self.backend_reason,
            "exec_events": source,
            "exec_events_lost": self.events_lost,
            "exec_events_during_scans": self.execs_during_scans,
            # all of /proc read, and only what the core watches (events told the rest)
            "scans": {"complete": self.complete_scans, "partial": self.partial_scans},
            # exec event (kernel timestamp) -> all the process's threads confined
            "exec_confine_us": latency_summary(self.exec_latency_us),
        }

    def _status_line(self) -> str:
        jobs, over = self.table.counts()
        return f"STATUS={jobs} jobs, {over} over budget, mode {self.policy.daemon.mode}"


def _watchdog_interval() -> float | None:
    """Half of WatchdogSec=, as sd_watchdog_enabled(3) advises; None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def build(config: Path) -> Daemon:
    """The daemon for the policy at `config`, checked as `corecapctl check` checks it.

    Raises:
        PolicyError: every problem of the policy, or of the policy on this host.
        StartupError: SCHED_FIFO refused after all.
    """
    checked = check_policy_file(config)
    policy, topology, host = checked.policy, checked.topology, checked.host
    online, procfs = host.online_cpus, host.procfs
    if topology is None:
        print(f"corecapd: {checked.host_check.findings[0]}", file=sys.stderr)
    chosen, why = checked.host_check.backend, checked.host_check.backend_reason
    if chosen is None:  # cannot be: a policy whose backend cannot work is refused above
        raise StartupError(f"daemon.backend = {policy.daemon.backend!r}: not checked")
    if policy.daemon.realtime_priority:
        _run_realtime(policy.daemon.realtime_priority)
    table = JobTable(
        policy, online, os.getpid(), enforcing=policy.daemon.mode == "enforce", topology=topology
    )
    daemon = Daemon(
        policy,
        config,
        Scanner(procfs),
        AffinityBackend(host),
        None if isinstance(chosen, AffinityBackend) else chosen,
        why,
        table,
        Reporter(under_journal()),
        _subscribe(policy),
        StackAttributor(procfs.root),
    )
    if policy.daemon.metrics:
        # Here, not with the daemon: prometheus_client adds 12 MB to its RSS (of 36).
        from corecapd.metrics import Metrics

        daemon.metrics = Metrics(policy.daemon.metrics, __version__, procfs)
        daemon.sinks.append(daemon.metrics)
    try:
        table.handle(Restore(load_state(Path(policy.daemon.state_dir))), time.time())
    except StateError as err:
        daemon.state_problem = str(err)
    return daemon


def _run_realtime(priority: int) -> None:
    """SCHED_FIFO for the exec fast path: measured, p99 event->confined drops from
    5-12 ms to ~0.3 ms on a loaded host (docs/benchmarks.md)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as err:
        raise StartupError(
            f"daemon.realtime_priority = {priority}: cannot switch to SCHED_FIFO: {err.strerror}"
            " (under systemd, use the unit's CPUSchedulingPolicy= instead)"
        ) from None


def _subscribe(policy: Policy) -> ProcEventSocket | str:
    if not policy.daemon.exec_events:
        return "daemon.exec_events = false"
    try:
        return ProcEventSocket()
    except OSError as err:  # no connector in this kernel or container, or no CAP_NET_ADMIN
        return f"netlink process connector: {err.strerror or err}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="corecapd", description="Keep Python / TensorFlow jobs inside their CPU core budget."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_POLICY_PATH,
        help=f"policy file (default {DEFAULT_POLICY_PATH})",
    )
    parser.add_argument("--version", action="version", version=f"corecapd {__version__}")
    args = parser.parse_args(argv)
    try:
        daemon = build(args.config)
    except PolicyError as err:
        for line in err.errors:  # every problem, one per line, then how many
            print(f"corecapd: {visible(line)}", file=sys.stderr)
        if len(err.errors) > 1:
            print(f"corecapd: {len(err.errors)} errors in {args.config}", file=sys.stderr)
        return 1
    except (StartupError, OSError) as err:
        print(f"corecapd: {visible_lines(str(err))}", file=sys.stderr)
        return 1
    try:
        asyncio.run(daemon.run())
    except OSError as err:
        print(f"corecapd: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
