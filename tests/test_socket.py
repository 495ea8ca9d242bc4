"""The socket API against bad clients: errors come back, the daemon is unharmed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, Daemon, Processes, StartDaemon, thread_affinities, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corecapd.client import DaemonUnreachable, call
from corecapd.declaration import Pool
from corecapd.protocol import (
    COMMANDS,
    MAX_DEPTH,
    MAX_LINE,
    CommandFailed,
    EpochReport,
    ProtocolError,
    decode_request,
)
from corecapd.server import MAX_CLIENTS, REQUEST_TIMEOUT, WRITE_TIMEOUT, Peer


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
    # json.loads raises ValueError past Python's 4300-digit limit for int()
    (b'{"command": "explain", "pid": ' + b"9" * 5000 + b"}\n", "not valid JSON"),
    (b"[" * 30000 + b"]" * 30000 + b"\n", "nests deeper than"),  # RecursionError in json
    (b'{"command": "status", "x": ' + b"[" * 9 + b"]" * 9 + b"}\n", "nests deeper than"),
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
        assert "jobs: 0," in status.stdout
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


@pytest.mark.parametrize(
    "line",
    [
        b'{"command": "explain", "pid": ' + b"9" * 5000 + b"}",
        b'{"command": "register", "declaration": {"cpus": ' + b"1" * 4301 + b"}}",
        b"[" * 30000 + b"]" * 30000,
        b'{"command": "register", "pools": '
        + b"[" * (MAX_DEPTH + 1)
        + b"]" * (MAX_DEPTH + 1)
        + b"}",
        b'{"command": "explain", "pid": 1e999999}',
        b'{"command": "explain", "pid": NaN}',
        b'{"command": "explain", "pid": -Infinity}',
        b'{"command": "report", "epoch": 1' + b"0" * 4000 + b'.5, "threads": 1}',
        b'{"command": "register", "declaration": {"cpus": ' + b"9" * 4000 + b"}}",
        b'{"command": "status\xed\xa0\x80"}',  # a UTF-8-encoded surrogate: not UTF-8
        b'{"command": "\\ud800"}',  # a lone surrogate, escaped: valid JSON, unknown command
    ],
)
def test_decoder_turns_what_json_chokes_on_into_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError) as raised:
        decode_request(line + b"\n")
    assert len(str(raised.value)) < 500  # says what is wrong without echoing it all


def test_decoder_accepts_a_full_register_request() -> None:
    request = decode_request(
        b'{"command": "register", "declaration": {"cpus": 2, "intra_op": null},'
        b' "tensorflow_initialized": true, "pools": [{"layer": "openblas", "threads": 2}]}\n'
    )
    assert request.registration is not None
    assert request.registration.declaration.cpus == 2


def test_decoder_accepts_reports_of_an_epoch_of_pools_or_both() -> None:
    pools = b'"pools": [{"layer": "openblas", "threads": 1}]'
    request = decode_request(b'{"command": "report", ' + pools + b"}\n")
    assert request.pools == (Pool("openblas", 1),) and request.report is None
    request = decode_request(b'{"command": "report", "epoch": 2, "threads": 9, ' + pools + b"}")
    assert request.pools == (Pool("openblas", 1),) and request.report == EpochReport(2, 9)
    request = decode_request(b'{"command": "report", "epoch": 2, "threads": 9}')
    assert request.pools is None and request.report == EpochReport(2, 9)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"command": "report"}', 'report needs "epoch" and "threads", or "pools"'),
        (b'{"command": "report", "epoch": 1}', 'report needs "threads"'),
        (b'{"command": "report", "pools": [{"layer": "openmp"}]}', "report: pools[0]"),
        (b'{"command": "report", "pools": {"openmp": 2}}', "report: pools: expected a list"),
    ],
)
def test_decoder_refuses_a_report_of_nothing_or_of_malformed_pools(line: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(error)):
        decode_request(line)


class Huge(int):
    """An integer written with `digits` nines: past Python's int/str digit limit."""

    digits: int


def huge(digits: int) -> Huge:
    value = Huge(0)
    value.digits = digits
    return value


def to_json(value: Any) -> bytes:
    """JSON text for `value`, Huge integers included (json.dumps cannot write those)."""
    if isinstance(value, Huge):
        return b"9" * value.digits
    if isinstance(value, dict):
        items = (json.dumps(str(k)).encode() + b": " + to_json(v) for k, v in value.items())
        return b"{" + b", ".join(items) + b"}"
    if isinstance(value, list):
        return b"[" + b", ".join(to_json(v) for v in value) + b"]"
    return json.dumps(value).encode()


KEYS = sorted({key for keys in COMMANDS.values() for key in keys})
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-1, 5000)
    | st.integers(4000, 6000).map(huge)
    | st.floats()
    | st.text(max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
DECLARATIONS = st.dictionaries(
    st.sampled_from(["cpus", "intra_op", "inter_op", "data_workers", "blas", "gpus"]),
    st.none() | st.integers(-2, 5000) | VALUES,
)
POOLS = st.lists(
    st.fixed_dictionaries({"layer": st.text(max_size=70), "threads": st.integers(-1, 5000)})
    | VALUES,
    max_size=3,
)
REQUESTS = st.builds(
    lambda command, fields: {"command": command, **fields},
    st.sampled_from([*COMMANDS, "", "Status"]) | VALUES,
    st.dictionaries(
        st.sampled_from([*KEYS, "cmd", "x"]),
        VALUES | DECLARATIONS | POOLS | st.integers(0, 1 << 23),
        max_size=4,
    ),
)
NESTED = st.integers(1, 30000).map(lambda depth: b"[" * depth + b"]" * depth)


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """One connection's bytes: a few lines of requests, garbage, deep nesting, broken
    UTF-8; a last line with or without its newline."""
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        line = draw(REQUESTS.map(to_json) | NESTED | st.binary(max_size=200))
        if draw(st.booleans()) and line:  # bytes that are not UTF-8, somewhere
            at = draw(st.integers(0, len(line)))
            line = (
                line[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + line[at:]
            )
        lines.append(line)
    return b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))


# Sends each framed payload (4-byte length, bytes) on a connection of its own, closes its
# writing side, and frames back everything the daemon answered. A process of the test's
# own (it carries the marker): a register request registers it, and no other.
RELAY = """
import socket, struct, sys
read, write = sys.stdin.buffer.read, sys.stdout.buffer.write
while header := read(4):
    payload = read(struct.unpack(">I", header)[0])
    answer = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(sys.argv[2])
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # after an error reply the daemon closes and reads no further
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    write(struct.pack(">I", len(answer)) + answer)
    sys.stdout.buffer.flush()
"""


def test_the_daemon_answers_or_closes_whatever_arrives_and_confines_the_next_job(
    daemon: Daemon, processes: Processes
) -> None:
    relay = processes.python(
        RELAY, str(daemon.socket), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert relay.stdin is not None and relay.stdout is not None
    sent, answered = relay.stdin, relay.stdout

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payloads())
    def exchange_through_relay(payload: bytes) -> None:
        sent.write(struct.pack(">I", len(payload)) + payload)
        sent.flush()
        header = answered.read(4)
        assert len(header) == 4, f"the relay died: {daemon.log()[-2000:]}"
        answer = answered.read(struct.unpack(">I", header)[0])
        assert answer == b"" or answer.endswith(b"\n"), answer[-200:]
        replies = [json.loads(line) for line in answer.splitlines()]
        assert all(isinstance(reply["ok"], bool) for reply in replies), replies
        assert len(replies) <= payload.count(b"\n") + 1
        assert daemon.process.poll() is None, daemon.log()

    exchange_through_relay()
    assert "Traceback" not in daemon.log()
    job = processes.python("import time; time.sleep(60)")
    cpus = wait_for(lambda: (daemon.job(job.pid) or {}).get("cpus"), what="the next job")
    assert len(cpus) == 1
    wait_for(
        lambda: all(mask == set(cpus) for mask in thread_affinities(job.pid).values()),
        what="the next job confined",
    )


def test_a_client_that_does_not_read_or_trickles_its_request_is_dropped(daemon: Daemon) -> None:
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as trickling,
    ):
        silent.settimeout(10)
        silent.connect(str(daemon.socket))
        silent.sendall(b'{"command": "status"}\n' * 3000)  # ~1 MB of replies, never read
        trickling.connect(str(daemon.socket))
        started = time.monotonic()
        request = b'{"command": "ping",                                        "x": 1}\n'
        closed_after = None
        for byte in request:  # one byte every 0.25 s: ~17 s for the line
            if select.select([trickling], [], [], 0.25)[0]:
                assert trickling.recv(65536) == b""  # closed, without a reply
                closed_after = time.monotonic() - started
                break
            trickling.send(bytes([byte]))
        assert closed_after is not None, "a trickled request kept its connection"
        assert REQUEST_TIMEOUT - 0.5 < closed_after < REQUEST_TIMEOUT + 3

        # Long past WRITE_TIMEOUT: the silent client lost its connection, and most replies.
        replies, data = 0, b""
        silent.settimeout(3)
        with contextlib.suppress(ConnectionResetError):
            while chunk := silent.recv(1 << 16):
                data += chunk
        replies = data.count(b"\n")
        assert 0 < replies < 3000
    assert WRITE_TIMEOUT < REQUEST_TIMEOUT  # the order the test relies on
    assert daemon.call("ping")["pid"] == daemon.process.pid


def pidfds_of(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
    return count


def test_each_connection_holds_a_pidfd_of_its_caller_and_closes_it(daemon: Daemon) -> None:
    if tuple(map(int, os.uname().release.split(".")[:2])) < (6, 5):
        pytest.skip("SO_PEERPIDFD needs Linux 6.5")
    pid = daemon.process.pid
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    assert pidfds_of(pid) == 0
    connections = [
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CLIENTS + 8)
    ]
    try:
        replies = []
        for connection in connections:
            connection.settimeout(10)
            connection.connect(str(daemon.socket))
            connection.sendall(b'{"command": "ping"}\n')
            replies.append(json.loads(connection.recv(65536)))
        # root gets every slot, and then is told the daemon is busy
        assert [r["ok"] for r in replies] == [True] * MAX_CLIENTS + [False] * 8
        assert "corecapd is busy" in replies[-1]["error"]
        assert pidfds_of(pid) == MAX_CLIENTS
    finally:
        for connection in connections:
            connection.close()
    wait_for(lambda: pidfds_of(pid) == 0, what="every pidfd closed")
    # at most as many as before: a scan may have held a /proc file open when they were counted
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= fds_before, what="no fd left over")


@pytest.mark.parametrize("kind", ["file", "symlink", "directory", "dangling symlink"])
def test_a_socket_path_taken_by_something_else_is_left_alone(
    start_daemon: StartDaemon, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "taken"
    precious = tmp_path / "precious.txt"
    precious.write_text("precious")
    if kind == "file":
        path.write_text("precious")
    elif kind == "symlink":
        path.symlink_to(precious)
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "nothing")
    else:
        path.mkdir()
    daemon = start_daemon(daemon={"socket": str(path)}, wait=False)
    assert daemon.process.wait(timeout=30) == 1
    [error] = daemon.log().splitlines()
    assert str(path) in error and "not a socket" in error, error
    assert precious.read_text() == "precious"
    assert os.path.lexists(path) and not path.is_socket()
    if kind == "file":
        assert path.read_text() == "precious"


def test_a_stale_socket_is_replaced(start_daemon: StartDaemon, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_over:
        left_over.bind(str(path))  # bound, never listening: what a killed daemon leaves
    daemon = start_daemon(daemon={"socket": str(path)})
    assert daemon.call("ping")["pid"] == daemon.process.pid


def start_ticks(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


def test_a_peer_is_confirmed_by_its_pidfd_and_refused_once_that_process_is_gone() -> None:
    child = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(child.pid)
    try:
        peer = Peer(child.pid, os.getuid(), os.getgid(), pidfd)
        peer.confirm(start_ticks(child.pid), os.getuid(), "registered")
        with pytest.raises(CommandFailed, match="runs as uid 65534, the connection is uid 0"):
            peer.confirm(start_ticks(child.pid), 65534, "registered")
        child.kill()
        child.wait()  # reaped: its PID is free for the next process
        with pytest.raises(CommandFailed, match=f"the process that connected .PID {child.pid}"):
            peer.confirm(0, os.getuid(), "registered")
    finally:
        os.close(pidfd)
        if child.poll() is None:
            child.kill()
            child.wait()


def test_without_a_pidfd_a_process_younger_than_the_connection_is_not_the_caller() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        started = start_ticks(child.pid)
        Peer(child.pid, 0, 0, None, connected_ticks=started).confirm(started, 0, "registered")
        younger = Peer(child.pid, 0, 0, None, connected_ticks=started - 1)
        with pytest.raises(CommandFailed, match="has exited"):
            younger.confirm(started, 0, "registered")
        with pytest.raises(CommandFailed, match="has exited"):  # gone before it was accepted
            Peer(child.pid, 0, 0, None, None).confirm(started, 0, "registered")
    finally:
        child.kill()
        child.wait()


def test_a_reply_that_trickles_in_times_out_as_a_whole(tmp_path: Path) -> None:
    """A byte a second, never a newline: the client's timeout bounds the whole reply."""
    path = tmp_path / "trickle.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = listener.accept()
        with connection:
            while not stop.wait(0.2):
                connection.sendall(b" ")

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    started = time.monotonic()
    try:
        with pytest.raises(DaemonUnreachable, match="did not answer: timed out"):
            call(path, "status", timeout=1.0)
        assert time.monotonic() - started < 3
    finally:
        stop.set()
        server.join(timeout=5)
        listener.close()


def test_an_empty_socket_path_is_a_one_line_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "corecapd.ctl", "--socket", "", "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("corecapctl: cannot reach corecapd at .:"), result.stderr
    assert result.stderr.count("\n") == 1
