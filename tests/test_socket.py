"""The socket API against bad clients: errors come back, the daemon is unharmed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import PYTHON, Daemon, StartDaemon
from hypothesis import given, settings
from hypothesis import strategies as st

from corecapd.protocol import MAX_LINE, ProtocolError, decode_request


def exchange(path: Path, payload: bytes, shutdown: bool = False) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(str(path))
        sock.sendall(payload)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def daemon(start_daemon: StartDaemon) -> Daemon:
    return start_daemon()


BAD_REQUESTS = [
    (b"not json\n", "not valid JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'{"cmd": "status"}\n', '"command"'),
    (b'{"command": 7}\n', '"command"'),
    (b'{"command": "format-disk"}\n', "unknown command"),
    (b'{"command": "status", "pid": 1}\n', "unknown key 'pid'"),
    (b"\xff\xfe\n", "not valid JSON"),
    (b'{"command": "status"}', "must end with a newline"),
]


@pytest.mark.parametrize(("payload", "error"), BAD_REQUESTS)
def test_malformed_requests_get_an_error_reply(daemon: Daemon, payload: bytes, error: str) -> None:
    [reply] = exchange(daemon.socket, payload, shutdown=True)
    assert reply["ok"] is False and error in str(reply["error"])
    assert daemon.call("ping")["pid"] == daemon.process.pid


def test_oversized_request_is_refused_and_connection_closed(daemon: Daemon) -> None:
    replies = exchange(daemon.socket, b'{"command": "' + b"x" * (MAX_LINE + 10) + b'"}\n')
    assert replies[0]["ok"] is False and "longer than" in str(replies[0]["error"])
    assert daemon.status()["host"]["mode"] == "enforce"


def test_several_requests_on_one_connection(daemon: Daemon) -> None:
    replies = exchange(
        daemon.socket,
        b'{"command": "ping"}\n{"command": "status"}\n{"command": "violations"}\n',
        shutdown=True,
    )
    assert [r["ok"] for r in replies] == [True, True, True]


def test_silent_and_vanishing_clients_do_not_block_others(daemon: Daemon) -> None:
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(10)]
    try:
        for sock in idle:
            sock.connect(str(daemon.socket))
        idle[0].sendall(b'{"command": "sta')  # half a request, then silence
        started = time.monotonic()
        assert daemon.call("ping")["pid"] == daemon.process.pid
        assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()
    assert daemon.call("status")["jobs"] == []


def test_socket_is_readable_by_any_user_but_reload_needs_root(start_daemon: StartDaemon) -> None:
    with tempfile.TemporaryDirectory(prefix="corecap-test-") as public:
        os.chmod(public, 0o755)  # pytest's tmp_path is private to root
        daemon = start_daemon(daemon={"socket": f"{public}/api.sock"})
        assert os.stat(daemon.socket).st_mode & 0o777 == 0o666
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        ctl = [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket)]
        env = {"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": os.environ["PATH"]}
        status = subprocess.run(
            [*as_nobody, *ctl, "status"], capture_output=True, text=True, env=env
        )
        assert status.returncode == 0, status.stderr
        assert "0 jobs" in status.stdout
        reload = subprocess.run(
            [*as_nobody, *ctl, "reload"], capture_output=True, text=True, env=env
        )
        assert reload.returncode != 0
        assert "reload needs root (you are uid 65534)" in reload.stderr
        assert daemon.events("policy-reloaded") == []
        daemon.stop()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_turns_any_bytes_into_a_request_or_a_protocol_error(raw: bytes) -> None:
    try:
        request = decode_request(raw)
    except ProtocolError as err:
        assert str(err)
    else:
        assert request.command in ("ping", "status", "violations", "reload")


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["command", "cmd", "pid", "args", ""]),
        st.one_of(st.none(), st.integers(), st.text(max_size=20), st.sampled_from(["status"])),
        max_size=4,
    )
)
def test_decoder_on_json_objects(message: dict[str, object]) -> None:
    line = json.dumps(message).encode() + b"\n"
    try:
        request = decode_request(line)
    except ProtocolError:
        assert set(message) != {"command"} or message["command"] not in ("status",)
    else:
        assert message == {"command": request.command}
