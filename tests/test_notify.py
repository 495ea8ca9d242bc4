"""sd_notify over a real datagram socket, as systemd would receive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Processes, StartDaemon, marked_rule, policy_text

import corecapd.daemon
from corecapd.daemon import build
from corecapd.policy import Policy
from corecapd.protocol import CommandFailed


def test_ready_status_watchdog_and_stopping(start_daemon: StartDaemon, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(10)
        daemon = start_daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        messages: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
            messages.append(receiver.recv(4096).decode())
        assert any("READY=1" in m for m in messages), messages
        assert any(m.startswith("STATUS=0 jobs, 0 over budget, mode enforce") for m in messages)
        assert sum("WATCHDOG=1" in m for m in messages) >= 3
        assert daemon.stop() == 0
        rest = []
        while True:
            try:
                rest.append(receiver.recv(4096).decode())
            except TimeoutError:
                break
            if "STOPPING=1" in rest[-1]:
                break
        assert "STOPPING=1" in rest[-1]


def _messages_until_ready(receiver: socket.socket, timeout: float = 15.0) -> list[str]:
    """Notify messages up to the first READY=1 (STATUS lines of scans are skipped)."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = receiver.recv(65536).decode()
        except TimeoutError:
            continue
        if message.startswith("STATUS="):
            continue
        messages.append(message)
        if "READY=1" in message:
            return messages
    raise AssertionError(f"no READY=1 within {timeout} s: {messages}")


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


# What a policy file can be at a reload; each is rejected, READY=1 follows RELOADING=1, and
# the policy in force stays. (Before: a 5,000-digit integer sent RELOADING=1 and never
# READY=1; an empty or truncated file was accepted and let go of every job.)
BAD_RELOADS: list[tuple[str, Callable[[Path], object], str]] = [
    ("empty", lambda p: p.write_text(""), ": empty policy: "),
    ("truncated", lambda p: p.write_text(p.read_text()[:40]), ""),
    ("no-rules", lambda p: p.write_text('[daemon]\nmode = "monitor"\n'), ": rules: missing: "),
    ("int-5000-digits", lambda p: p.write_text(f"[defaults]\ncpus = {'9' * 5000}\n"), ":2:8: "),
    (
        "cpulist-5000-digits",
        lambda p: p.write_text(f'rules = []\n[daemon]\nreserved_cpus = "0-{"9" * 5000}"\n'),
        ": daemon.reserved_cpus: ",
    ),
    ("not-utf8", lambda p: p.write_bytes(b"rules = []\n# caf\xe9\n"), ":2:6: not UTF-8 text"),
    ("fifo", _replace_with_fifo, ": cannot read policy: not a regular file"),
    ("directory", _replace_with_directory, ": cannot read policy: a directory"),
    ("missing", lambda p: p.unlink(), ": cannot read policy: No such file"),
    (
        "all-cpus-reserved",
        lambda p: p.write_text(
            p.read_text().replace('reserved_cpus = ""', 'reserved_cpus = "0-8191"')
        ),
        ": daemon.reserved_cpus: ",
    ),
]


def test_every_failed_reload_is_followed_by_ready_and_keeps_the_policy(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(0.5)
        daemon = start_daemon(
            rules=marked_rule(marker, "in-force", cpus=1), env={"NOTIFY_SOCKET": str(path)}
        )
        _messages_until_ready(receiver)
        job = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
        held = daemon.wait_job(job.pid)
        good = daemon.policy_path.read_text()
        for number, (name, damage, said) in enumerate(BAD_RELOADS):
            damage(daemon.policy_path)
            daemon.signal(signal.SIGHUP)
            messages = _messages_until_ready(receiver)
            assert "RELOADING=1" in messages[0] and "READY=1" in messages[-1], (name, messages)
            events = daemon.events("policy-rejected")  # the READY=1 came after the event
            assert len(events) == number + 1, (name, events)
            rejected = events[-1]["error"]
            assert rejected.startswith(str(daemon.policy_path)) and said in rejected, name
            now = daemon.job(job.pid)  # the job keeps its rule and its cores
            assert now is not None and (now["rule"], now["cpus"]) == (held["rule"], held["cpus"])
            if daemon.policy_path.is_dir():
                daemon.policy_path.rmdir()
            else:
                daemon.policy_path.unlink(missing_ok=True)
            daemon.policy_path.write_text(good)
        assert daemon.process.poll() is None and not daemon.events("policy-reloaded")
        daemon.policy_path.write_text(good.replace('"in-force"', '"after"'))
        assert daemon.call("reload") == "reloaded"
        assert daemon.job(job.pid)["rule"] == "after"  # type: ignore[index]


def test_a_flaw_while_reloading_still_sends_ready_and_keeps_the_policy(
    tmp_path: Path, marker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong inside a reload (here: made to), READY=1 follows RELOADING=1."""
    config = tmp_path / "p.toml"
    config.write_text(
        policy_text(
            marker,
            daemon={
                "socket": str(tmp_path / "s.sock"),
                "state_dir": str(tmp_path / "state"),
                "exec_events": False,
                "backend": "affinity",
            },
        )
    )
    daemon = build(config)
    notified: list[str] = []
    monkeypatch.setattr(daemon.reporter, "notify", lambda *states: notified.extend(states[:1]))
    monkeypatch.setattr(daemon.reporter, "emit", lambda event: None)
    in_force = daemon.policy

    def broken(path: Path) -> Policy:
        raise RuntimeError("a flaw")

    monkeypatch.setattr(corecapd.daemon, "load_policy", broken)
    with pytest.raises(CommandFailed, match=r": cannot be checked: RuntimeError: a flaw$"):
        daemon.reload()
    assert notified[0].startswith("RELOADING=1") and notified[-1] == "READY=1"
    assert daemon.policy is in_force

    monkeypatch.undo()
    monkeypatch.setattr(daemon.reporter, "notify", lambda *states: notified.extend(states[:1]))
    monkeypatch.setattr(daemon.reporter, "emit", lambda event: None)
    replace_policy = daemon.table.replace_policy
    calls: list[Policy] = []

    def fails_once(policy: Policy) -> None:
        calls.append(policy)
        if len(calls) == 1:
            raise RuntimeError("half-way")
        replace_policy(policy)

    monkeypatch.setattr(daemon.table, "replace_policy", fails_once)
    config.write_text(config.read_text().replace('"marked"', '"other"'))
    notified.clear()
    with pytest.raises(CommandFailed, match=r": cannot be applied: RuntimeError: half-way$"):
        daemon.reload()
    assert notified[0].startswith("RELOADING=1") and notified[-1] == "READY=1"
    assert daemon.policy is in_force and calls[-1] is in_force
