"""Harness for tests that run the real daemon against real processes.

Every daemon under test gets a policy whose rules match only processes that carry this
test's unique marker in their command line, so it can never act on anything else on the
machine. Every process a test starts is ended by PID at teardown, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from corecapd.client import call

PYTHON = sys.executable

# Properties here are about results, not speed: on a busy 2-CPU machine (the VM tier beside
# the suite) one example of a pure function took longer than hypothesis's 200 ms deadline.
settings.register_profile("corecap", deadline=None)
settings.load_profile("corecap")


def sitecustomize_env(tmp_path: Path, source: str) -> dict[str, str]:
    """The environment for a daemon that runs `source` as its sitecustomize (a fault
    injected into the real daemon): PYTHONPATH with it first."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(source)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def thread_affinities(pid: int) -> dict[int, set[int]]:
    masks = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            masks[int(name)] = os.sched_getaffinity(int(name))
        except ProcessLookupError:
            continue
    return masks


@dataclass
class Processes:
    """Starts marked processes and ends every one of them, by PID, at teardown."""

    marker: str
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def python(self, code: str, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
        """A Python process running `code`, with the marker in its command line."""
        return self.run([PYTHON, "-c", textwrap.dedent(code), self.marker, *args], **popen)

    def run(self, argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, **popen)
        self.started.append(process)
        return process

    def end_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


@dataclass
class Daemon:
    """A corecapd subprocess with a temporary policy and socket."""

    process: subprocess.Popen[bytes]
    socket: Path
    policy_path: Path
    log_path: Path

    def call(self, command: str, **arguments: Any) -> Any:
        return call(self.socket, command, **arguments)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    def job(self, pid: int) -> dict[str, Any] | None:
        return next((j for j in self.status()["jobs"] if j["pid"] == pid), None)

    def wait_job(self, pid: int, timeout: float = 10.0) -> dict[str, Any]:
        job: dict[str, Any] = wait_for(lambda: self.job(pid), timeout, f"job {pid}")
        return job

    def log(self) -> str:
        return self.log_path.read_text()

    def events(self, kind: str, **fields: str) -> list[dict[str, str]]:
        """Events of `kind` from the stderr log, as their key=value fields."""
        found = []
        for line in self.log().splitlines():
            head, sep, details = line.partition(" | ")
            if not sep or f": {kind}: " not in head:
                continue
            values = parse_fields(details)
            if all(values.get(k) == v for k, v in fields.items()):
                found.append(values)
        return found

    def wait_event(self, kind: str, timeout: float = 10.0, **fields: str) -> dict[str, str]:
        events = wait_for(lambda: self.events(kind, **fields), timeout, f"{kind} {fields}")
        return events[0]  # type: ignore[no-any-return]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def parse_fields(details: str) -> dict[str, str]:
    """Parse `key=value key="quoted value"` as the daemon's stderr lines print them."""
    values: dict[str, str] = {}
    decoder = json.JSONDecoder()
    rest = details.strip()
    while rest:
        key, _, rest = rest.partition("=")
        if rest.startswith('"'):
            value, end = decoder.raw_decode(rest)
            rest = rest[end:].lstrip()
        else:
            value, _, rest = rest.partition(" ")
        values[key] = value
    return values


def marked_rule(marker: str, name: str = "marked", **settings: object) -> str:
    """A rule matching only root's processes that carry `marker` in their command line."""
    lines = [
        "[[rules]]",
        f"name = {json.dumps(name)}",
        f'match = {{ cmdline = "{marker}", users = ["root"] }}',
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def policy_text(marker: str, rules: str = "", **sections: dict[str, Any]) -> str:
    """A policy whose sections are given as dicts; `rules` is raw TOML for [[rules]]."""
    daemon = {
        "mode": "enforce",
        "scan_interval": 0.1,
        "reserved_cpus": "",
        "cgroup": f"corecap-test-{marker}",  # ours alone, removed at teardown
    } | sections.pop("daemon", {})
    defaults = {"grace": 0.0, "violation_after": 2} | sections.pop("defaults", {})
    out = []
    for name, table in (("daemon", daemon), ("defaults", defaults), *sections.items()):
        out.append(f"[{name}]")
        out += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    if not rules:
        rules = marked_rule(marker, cpus=1)
    return "\n".join(out) + "\n" + textwrap.dedent(rules)


@pytest.fixture
def marker() -> str:
    return f"CORECAP_TEST_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def processes(marker: str) -> Iterator[Processes]:
    started = Processes(marker)
    try:
        yield started
    finally:
        started.end_all()


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start_daemon(tmp_path: Path, marker: str) -> Iterator[StartDaemon]:
    """start_daemon(policy_text=None, **policy_sections) -> a running Daemon."""
    daemons: list[Daemon] = []

    def start(text: str | None = None, wait: bool = True, **sections: Any) -> Daemon:
        index = len(daemons)
        extra_env = sections.pop("env", {})
        prefix = sections.pop("prefix", [])  # e.g. setpriv, to start it with fewer privileges
        default_socket = str(tmp_path / f"corecap-{index}.sock")
        sections["daemon"] = {
            "socket": default_socket,
            "state_dir": str(tmp_path / "state"),
        } | sections.get("daemon", {})
        socket_path = Path(sections["daemon"]["socket"])
        policy_path = tmp_path / f"policy-{index}.toml"
        policy_path.write_text(text if text is not None else policy_text(marker, **sections))
        log_path = tmp_path / f"corecapd-{index}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*prefix, PYTHON, "-m", "corecapd.daemon", "--config", str(policy_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env | extra_env,
            )
        daemon = Daemon(process, socket_path, policy_path, log_path)
        daemons.append(daemon)
        if wait:
            wait_for(
                lambda: process.poll() is not None or daemon.events("daemon-started"),
                timeout=30,  # a loaded machine (CI runs beside other work) starts slowly
                what="corecapd to start",
            )
            assert process.poll() is None, f"corecapd exited: {daemon.log()}"
        return daemon

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.stop()
        remove_cgroup(CPUSET / f"corecap-test-{marker}")
        for daemon in daemons:
            assert "Traceback" not in daemon.log(), daemon.log()


CPUSET = Path("/sys/fs/cgroup/cpuset")


def remove_cgroup(path: Path) -> None:
    """Remove a cpuset tree a test's daemon made, after moving any process in it (only the
    test's own can be there) back to the root cpuset."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            remove_cgroup(child)
    for pid in (path / "cgroup.procs").read_text().split():
        with contextlib.suppress(ProcessLookupError):
            (CPUSET / "cgroup.procs").write_text(pid)
    path.rmdir()
