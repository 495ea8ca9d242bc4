"""corecapd: wires the parts together and runs the loop. Everything is built in `main`.

One asyncio loop, in the foreground (systemd style): a scan every `scan_interval`
(read /proc → `JobTable.step` → enforce → report), the socket API, SIGHUP to reload,
SIGTERM/SIGINT to stop, and the watchdog.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corecapd import __version__
from corecapd.core import JobTable, eligible_cpus
from corecapd.cpulist import format_cpulist
from corecapd.enforcement import Backend, EnforcementError, NoBackend, choose_backend
from corecapd.events import (
    DaemonStarted,
    EnforcementFailed,
    Event,
    JobEnded,
    PolicyRejected,
    PolicyReloaded,
)
from corecapd.journal import Reporter, under_journal
from corecapd.model import ProcKey
from corecapd.policy import DEFAULT_POLICY_PATH, Policy, PolicyError, load_policy
from corecapd.procfs import ProcFS, Scanner, online_cpus
from corecapd.protocol import CommandFailed, Request
from corecapd.server import Peer, SocketServer
from corecapd.status import status_document, violations_document


class StartupError(Exception):
    pass


def check_fits_host(policy: Policy, online: frozenset[int]) -> None:
    """What only this host can tell: whether the policy leaves any CPU for jobs."""
    if not eligible_cpus(policy, online):
        reserved = format_cpulist(policy.daemon.reserved_cpus)
        raise PolicyError(
            f"{policy.source}: daemon.reserved_cpus = {reserved!r}"
            f" leaves no CPU for jobs on this host (online CPUs: {format_cpulist(online)})"
        )


class Daemon:
    def __init__(
        self,
        policy: Policy,
        policy_path: Path,
        scanner: Scanner,
        backend: Backend,
        table: JobTable,
        reporter: Reporter,
    ) -> None:
        self.policy = policy
        self.policy_path = policy_path
        self.scanner = scanner
        self.backend = backend
        self.table = table
        self.reporter = reporter
        self.server = SocketServer(Path(policy.daemon.socket), self.handle)
        self._failed: set[ProcKey] = set()  # jobs whose enforcement error was reported
        self._stop = asyncio.Event()

    @property
    def enforcing(self) -> bool:
        return self.policy.daemon.mode == "enforce"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop_signal, self._stop.set)
        await self.server.start()
        self.reporter.emit(
            DaemonStarted(
                policy=self.policy.source,
                mode=self.policy.daemon.mode,
                backend=self.backend.describe(),
                eligible_cpus=self.table.eligible_cpus,
            )
        )
        self.scan()
        self.reporter.notify("READY=1", self._status_line())
        watchdog = _watchdog_interval()
        next_scan = time.monotonic() + self.policy.daemon.scan_interval
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_scan:
                    self.scan()
                    next_scan = time.monotonic() + self.policy.daemon.scan_interval
                timeout = next_scan - time.monotonic()
                if watchdog is not None:
                    self.reporter.notify("WATCHDOG=1")
                    timeout = min(timeout, watchdog)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(timeout, 0))
        finally:
            self.reporter.notify("STOPPING=1")
            await self.server.stop()

    def scan(self) -> None:
        now = time.time()
        processes = self.scanner.scan(self.table.libraries_wanted)
        events = self.table.step(processes, now)
        if self.enforcing:
            events += self._enforce(events)
        for event in events:
            self.reporter.emit(event)
        self.reporter.notify(self._status_line())

    def _enforce(self, events: list[Event]) -> list[Event]:
        """Fence every job (new threads, drift), and let go of processes that left a job."""
        failures: list[Event] = []
        for event in events:
            if isinstance(event, JobEnded) and event.live_pids:
                self.backend.release(event.live_pids)
        self._failed &= self.table.jobs.keys()
        for job in self.table.jobs.values():
            try:
                self.backend.apply(sorted(key.pid for key in job.members), job.cpus)
            except EnforcementError as err:
                if job.id not in self._failed:
                    self._failed.add(job.id)
                    failures.append(
                        EnforcementFailed(
                            pid=job.pid,
                            user=job.user,
                            rule=job.rule.name,
                            cpus=job.cpus,
                            threads=job.threads,
                            budget=job.budget.threads,
                            error=str(err),
                        )
                    )
        return failures

    def reload(self) -> str:
        """Swap in the policy file's current content, or keep the old one and say why."""
        self.reporter.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            policy = load_policy(self.policy_path)
            check_fits_host(policy, self.table.online_cpus)
        except PolicyError as err:
            self.reporter.emit(PolicyRejected(policy=str(self.policy_path), error=str(err)))
            self.reporter.notify("READY=1", self._status_line())
            raise CommandFailed(f"reload rejected, the policy in force stays: {err}") from None
        restart_only = [
            key
            for key in ("socket", "backend")
            if getattr(policy.daemon, key) != getattr(self.policy.daemon, key)
        ]
        self.policy = policy
        self.table.enforcing = self.enforcing
        self.table.replace_policy(policy)
        self.reporter.emit(PolicyReloaded(policy=policy.source, rules=len(policy.rules)))
        self.scan()
        self.reporter.notify("READY=1", self._status_line())
        if restart_only:
            return f"reloaded; daemon.{', daemon.'.join(restart_only)} take effect at restart"
        return "reloaded"

    def _reload_on_signal(self) -> None:
        with contextlib.suppress(CommandFailed):  # reload() has reported it already
            self.reload()

    def handle(self, request: Request, peer: Peer) -> Any:
        if request.command == "ping":
            return {"version": __version__, "pid": os.getpid()}
        if request.command == "status":
            return status_document(
                self.table,
                self.policy.daemon.mode,
                self.backend.describe(),
                self.policy.source,
                time.time(),
            )
        if request.command == "violations":
            return violations_document(self.table)
        if request.command == "reload":
            return self.reload()
        raise CommandFailed(f"unhandled command {request.command!r}")

    def _status_line(self) -> str:
        jobs = self.table.jobs.values()
        over = sum(1 for job in jobs if job.violation.active)
        return f"STATUS={len(jobs)} jobs, {over} over budget, mode {self.policy.daemon.mode}"


def _watchdog_interval() -> float | None:
    """Half of WatchdogSec=, as sd_watchdog_enabled(3) advises; None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def build(config: Path) -> Daemon:
    policy = load_policy(config)
    online = online_cpus()
    check_fits_host(policy, online)
    try:
        backend_class, _why = choose_backend(policy.daemon.backend)
    except NoBackend as err:
        raise StartupError(str(err)) from None
    procfs = ProcFS()
    backend = backend_class(procfs, online)
    table = JobTable(policy, online, os.getpid(), enforcing=policy.daemon.mode == "enforce")
    return Daemon(policy, config, Scanner(procfs), backend, table, Reporter(under_journal()))


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
    except (PolicyError, StartupError, OSError) as err:
        print(f"corecapd: {err}", file=sys.stderr)
        return 1
    try:
        asyncio.run(daemon.run())
    except OSError as err:
        print(f"corecapd: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
