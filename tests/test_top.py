"""corecapctl top: the pure renderer on crafted replies (80x24, order, highlighting, escaping),
then the command for real: the status table without a terminal, one frame in a pseudo-terminal
with --once, and the live screen in tmux (capture-pane to read it, send-keys to drive it)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shlex
import shutil
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, Processes, StartDaemon, marked_rule, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.style import Style
from rich.text import Text
from test_ctl_output import HOSTILE, assert_safe

from corecapd.client import DaemonUnreachable
from corecapd.protocol import RemoteError
from corecapd.top import Session, View, keys, layer_counts, move, render, rows

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = Console(width=80, color_system="truecolor", force_terminal=True)


def job(
    pid: int,
    threads: int,
    budget: int,
    cpus: list[int],
    state: str = "ok",
    **fields: Any,
) -> dict[str, Any]:
    return {
        "pid": pid,
        "user": "alice",
        "rule": "python",
        "cpus": cpus,
        "threads": threads,
        "budget": budget,
        "budget_basis": "python member 4 + 2 x 1 cpus, + slack 8",
        "cpu_percent": 3.0,
        "state": state,
        "age": 61.0,
        "pids": [pid],
        "members": [{"pid": pid, "kind": "python", "threads": threads, "budget": budget - 8}],
        "notes": [],
    } | fields


def status(jobs: list[dict[str, Any]], cpus: int = 4, reserved: tuple[int, ...] = ()) -> Any:
    online = list(range(cpus))
    return {
        "host": {
            "mode": "enforce",
            "backend": "affinity",
            "policy": "/etc/corecap.toml",
            "online_cpus": online,
            "reserved_cpus": list(reserved),
            "eligible_cpus": [cpu for cpu in online if cpu not in reserved],
            "jobs": len(jobs),
            "violations": sum(1 for j in jobs if j["state"] == "violation"),
        },
        "jobs": jobs,
    }


CALM = job(100, 3, 14, [1])
VIOLATING = job(200, 43, 21, [2], "violation", user="bob", rule="tensorflow")
OVER = job(300, 16, 14, [3])  # over budget, not (yet) a violation
STATUS = status([CALM, VIOLATING, OVER], reserved=(0,))


def lines(text: Text) -> list[Text]:
    return list(text.split("\n", allow_blank=True))


def line_of(text: Text, needle: str) -> Text:
    return next(line for line in lines(text) if needle in line.plain)


def style_at(line: Text, needle: str) -> Style:
    return line.get_style_at_offset(CONSOLE, line.plain.index(needle))


def red(style: Style) -> bool:
    return any(c is not None and c.name == "red" for c in (style.color, style.bgcolor))


# The renderer


@pytest.mark.parametrize("cpus", [2, 64, 1024])
@pytest.mark.parametrize("count", [0, 3, 200])
def test_a_frame_fits_80x24_title_first_keys_last(cpus: int, count: int) -> None:
    jobs = [
        job(1000 + i, 5 + i % 30, 14, [i % cpus], "violation" if i % 7 == 0 else "ok")
        for i in range(count)
    ]
    frame = render(View(status(jobs, cpus), clock="12:00:00"), 80, 24)
    shown = lines(frame)
    assert len(shown) == 24 and all(line.cell_len <= 80 for line in shown)
    assert shown[0].plain.startswith(" corecap top") and "12:00:00" in shown[0].plain
    assert "q: quit" in shown[-1].plain
    assert any(re.match(r"^( CPUs| +0 )", line.plain) for line in shown)  # the map
    if count:
        assert any(line.plain.startswith(">") for line in shown)  # the selection is on screen


@settings(max_examples=150, deadline=None)
@given(
    jobs=st.lists(
        st.tuples(
            st.integers(1, 4_194_304),
            st.integers(0, 10_000),
            st.integers(0, 10_000),
            st.sets(st.integers(0, 300), max_size=20),
            st.sampled_from(["ok", "violation"]),
            st.text(max_size=40),
            st.one_of(st.none(), st.integers(1, 4_194_304), st.text(max_size=12)),
        ),
        max_size=30,
        unique_by=lambda t: t[0],
    ),
    width=st.integers(1, 220),
    height=st.integers(1, 70),
    live=st.booleans(),
    layers=st.one_of(st.none(), st.dictionaries(st.text(max_size=20), st.integers(0, 99))),
)
def test_any_reply_fits_any_screen_and_stays_printable(
    jobs: list[tuple[int, int, int, set[int], str, str, Any]],
    width: int,
    height: int,
    live: bool,
    layers: dict[str, int] | None,
) -> None:
    document = status(
        [
            job(pid, threads, budget, sorted(cpus), state, user=name, rule=name, parent=parent)
            for pid, threads, budget, cpus, state, name, parent in jobs
        ],
        cpus=8,
        reserved=(0,),
    )
    first = jobs[0][0] if jobs else None
    detail = {"job": first, "layers": layers, "hints": ["x" * 300]}
    frame = render(View(document, first, detail, live=live), width, height)
    shown = lines(frame)
    assert len(shown) <= height and all(line.cell_len <= width for line in shown)
    assert len(shown) == height or not live
    assert_safe(frame.plain)
    assert sorted(row.pid for row in rows(document["jobs"])) == sorted(j[0] for j in jobs)


def test_jobs_are_sorted_by_threads_over_budget_sub_jobs_under_their_parent() -> None:
    parent = job(400, 10, 30, [0, 1])
    child = job(410, 40, 20, [1], "violation", parent=400)  # the most over budget of all
    grandchild = job(420, 1, 14, [1], parent=410)
    orphan = job(500, 2, 14, [3], parent=999)  # a parent that is no job: top level
    document = status([CALM, VIOLATING, OVER, parent, child, grandchild, orphan])
    order = [(row.pid, row.depth) for row in rows(document["jobs"])]
    # 200 is +22; then the family of 400 by its worst, 410 at +20; 300 +2; 100 -11; 500 -12
    assert order == [(200, 0), (400, 0), (410, 1), (420, 2), (300, 0), (100, 0), (500, 0)]
    frame = render(View(document), 80, 24)
    plain = [line.plain for line in lines(frame)]
    pids = [int(p.split()[1]) for p in plain if re.match(r"^[ >][A-Za-z0-9+] +\d+ ", p)]
    assert pids == [200, 400, 410, 420, 300, 100, 500]
    assert " \\_ python " in next(p for p in plain if " 410 " in p)
    assert "   \\_ python " in next(p for p in plain if " 420 " in p)


def test_equal_excess_puts_the_violation_first_then_the_lower_pid() -> None:
    document = status(
        [job(30, 20, 10, [1]), job(20, 20, 10, [1]), job(40, 20, 10, [1], "violation")]
    )
    assert [row.pid for row in rows(document["jobs"])] == [40, 20, 30]


def test_parents_in_a_loop_or_named_are_tolerated() -> None:
    document = status(
        [
            job(1, 2, 14, [1], parent=2),
            job(2, 3, 14, [1], parent=1),
            job(3, 2, 14, [2], parent="1-77"),
        ]
    )
    order = [(row.pid, row.depth) for row in rows(document["jobs"])]
    assert sorted(pid for pid, _ in order) == [1, 2, 3]
    assert (3, 1) in order or (3, 2) in order  # under 1, by its name "<pid>-<start ticks>"


def test_a_violation_is_red_over_budget_yellow_within_budget_neither() -> None:
    frame = render(View(STATUS), 80, 24)
    violating = line_of(frame, " 200 ")
    assert "VIOLATION" in violating.plain
    assert red(style_at(violating, "200")) and style_at(violating, "200").bold
    state = style_at(violating, "VIOLATION")
    assert state.bgcolor is not None and state.bgcolor.name == "red"
    over = line_of(frame, " 300 ")
    assert over.plain.rstrip().endswith("over") and style_at(over, "300").color.name == "yellow"  # type: ignore[union-attr]
    calm = line_of(frame, " 100 ")
    assert calm.plain.rstrip().endswith("ok") and not red(style_at(calm, "100"))
    assert "1 in violation" in lines(frame)[1].plain
    assert red(style_at(lines(frame)[1], "1 in violation"))


def test_the_cpu_map_shows_each_cpus_holder_shared_free_and_reserved() -> None:
    sharing = job(600, 1, 14, [2])  # on the violating job's CPU 2
    document = status([CALM, VIOLATING, sharing], cpus=5, reserved=(0,))
    frame = render(View(document), 80, 24)
    # glyphs by ascending PID: 100 A, 200 B, 600 C
    cpus = line_of(frame, " CPUs ")
    assert cpus.plain.split() == ["CPUs", "0", "r", "1", "A", "2", "=", "3", ".", "4", "."]
    assert red(style_at(cpus, "="))  # shared with a job in violation
    legend = lines(frame)[lines(frame).index(cpus) + 1].plain
    assert legend == " A-C: held 1  = shared 1  . free 2  r reserved 1"


def test_a_sub_jobs_cpu_shows_the_sub_job_not_shared() -> None:
    document = status([job(1, 2, 14, [1, 2]), job(2, 2, 14, [2], parent=1)], cpus=3)
    cpus = line_of(render(View(document), 80, 24), " CPUs ").plain.split()
    assert cpus == ["CPUs", "0", ".", "1", "A", "2", "B"]


def test_many_cpus_are_one_glyph_each_in_groups_of_eight() -> None:
    document = status([job(1, 2, 14, list(range(8, 16)))], cpus=128)
    frame = [line.plain for line in lines(render(View(document), 80, 24))]
    assert frame[2] == "   0 ........ AAAAAAAA " + " ".join(["........"] * 6)
    assert frame[3].startswith("  64 ........")


def test_the_selected_job_is_marked_and_detailed_with_layers_when_explain_gives_them() -> None:
    detail = {
        "job": 300,
        "hints": ["OpenMP pool of up to 16 threads on 1 CPUs: set OMP_NUM_THREADS=1"],
        "layers": [  # as explain gives them
            {
                "name": "openmp",
                "threads": 16,
                "expected": 1,
                "processes": 1,
                "oversized": True,
                "evidence": "start routine gomp_thread_start in libgomp.so.1",
                "fix": "set OMP_NUM_THREADS=1",
            },
            {"name": "python-threading", "threads": 2, "expected": None, "oversized": False},
        ],
    }
    frame = render(View(STATUS, 300, detail), 80, 24)
    row = line_of(frame, " 300 ")
    assert row.plain.startswith(">") and style_at(row, "300").reverse
    assert not line_of(frame, " 200 ").plain.startswith(">")
    plain = frame.plain
    assert " PID 300, alice, rule python: 16/14 threads on CPUs 3, over" in plain
    assert "   layers: openmp 16/1, python-threading 2" in plain
    assert red(style_at(line_of(frame, "layers:"), "openmp"))
    assert "   diagnosis: OpenMP pool of up to 16" in plain
    assert "   members: 300 python 16/6" in plain


def test_without_layers_the_detail_shows_members_only() -> None:
    members = [
        {"pid": 200 + i, "kind": "tensorflow", "threads": 13, "budget": 13} for i in range(12)
    ]
    document = status([job(200, 156, 100, [1], members=members)])
    for detail in (None, {"job": 200, "hints": []}, {"job": 999, "layers": {"openmp": 3}}):
        frame = render(View(document, 200, detail), 80, 24)
        assert "layers:" not in frame.plain and "diagnosis:" not in frame.plain
        packed = [line.plain for line in lines(frame) if "tensorflow 13/13" in line.plain]
        assert packed[0].startswith("   members: 200 tensorflow 13/13, 201 tensorflow")
        assert len(packed) >= 2 and packed[1].startswith("            ")  # wrapped, aligned
        assert sum(p.count("tensorflow") for p in packed) == 12


def test_layer_counts_take_a_list_or_a_mapping_and_nothing_else() -> None:
    assert layer_counts(None) == []
    assert layer_counts({"layers": None}) == []
    assert layer_counts({"layers": {"openmp": 4}}) == [("openmp", 4, None, False)]
    assert layer_counts(
        {"layers": [{"name": "tf-data", "threads": 16, "expected": 1}, {"name": "x"}, 3]}
    ) == [("tf-data", 16, 1, True)]
    assert layer_counts({"layers": [{"name": "main", "threads": 1, "oversized": True}]}) == [
        ("main", 1, None, True)
    ]


def test_the_selection_scrolls_into_view_among_many_jobs() -> None:
    jobs = [job(1000 + i, 10, 14, [1]) for i in range(60)]
    frame = render(View(status(jobs), selected=1050), 80, 24)
    assert line_of(frame, " 1050 ").plain.startswith(">")
    # 13 rows of 60 (24 lines: 4 above, the detail's 4 and the keys' 1 below), the 51st
    # in the middle
    assert line_of(frame, " of 60").plain == " jobs 45-57 of 60"
    assert len(lines(frame)) == 24


def test_what_jobs_chose_is_escaped() -> None:
    jobs = [
        job(10 + i, 20, 14, [1], "violation", user=hostile, rule=hostile, notes=[hostile])
        for i, hostile in enumerate(HOSTILE)
    ]
    detail = {"job": 10, "layers": {HOSTILE[0]: 3}, "hints": [HOSTILE[1]]}
    document = status(jobs)
    document["host"]["policy"] = HOSTILE[2]
    for width in (80, 200):
        frame = render(View(document, 10, detail), width, 60)
        assert_safe(frame.plain)
        assert "\\x1b]0;owned" in frame.plain


def test_an_unreachable_daemon_is_said_on_the_screen() -> None:
    frame = render(View(None, error="cannot reach corecapd at /x.sock; trying again"), 80, 24)
    shown = [line.plain for line in lines(frame)]
    assert len(shown) == 24 and "cannot reach corecapd at /x.sock" in shown[1]


def test_once_has_no_key_help_and_no_padding() -> None:
    frame = render(View(STATUS, live=False), 80, 23)
    shown = [line.plain for line in lines(frame)]
    assert "quit" not in frame.plain and shown[-1].strip() and len(shown) < 23


def test_keys_from_terminal_bytes() -> None:
    assert keys(b"\x1b[A\x1bOBjkqQ") == ["up", "down", "down", "up", "quit", "quit"]
    assert keys(b"\x1b[5~\x1b[6~\x1b[H\x1b[F\x1b[1~\x1b[4~gG") == [
        "page-up",
        "page-down",
        "home",
        "end",
        "home",
        "end",
        "home",
        "end",
    ]
    assert keys(b"x\x1b[1;5Cz\x1b\x1b[B") == ["down"]  # Ctrl-Right, a lone ESC: skipped
    assert keys(b"\x1b[") == []


def test_move_stays_within_the_jobs() -> None:
    order = [5, 6, 7]
    assert move(order, None, "down") == 6
    assert move(order, 7, "down") == 7 and move(order, 5, "up") == 5
    assert move(order, 5, "page-down", page=10) == 7 and move(order, 7, "home") == 5
    assert move(order, 42, "end") == 7 and move([], None, "down") is None


def test_the_session_keeps_the_selected_pid_and_survives_a_silent_daemon() -> None:
    replies: list[Any] = [
        STATUS,
        status([CALM, job(200, 1, 21, [2]), OVER]),  # 200 back within budget: now last
        DaemonUnreachable("cannot reach corecapd at /x.sock"),
        status([CALM, OVER]),  # 200 ended
    ]
    explained: list[int] = []

    def ask() -> Any:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def explain(pid: int) -> Any:
        explained.append(pid)
        if pid == 300:
            raise RemoteError("PID 300 is in no job")
        return {"job": pid, "layers": {"main": 1}}

    session = Session(ask, explain, 2.0, live=True)
    session.refresh()
    assert session.view.selected == 200 and session.order == [200, 300, 100]
    assert session.view.detail == {"job": 200, "layers": {"main": 1}}
    session.press("down", page=10)
    assert session.view.selected == 300 and session.view.detail is None  # explain refused
    session.press("up", page=10)
    session.refresh()
    assert session.view.selected == 200 and session.order == [300, 100, 200]
    try:
        session.refresh()
    except DaemonUnreachable as err:
        session.failed(f"{err}; trying again")
    assert session.view.status is None and session.view.selected == 200
    assert "cannot reach corecapd" in render(session.view, 80, 24).plain
    session.refresh()  # 200 ended: the job that took its place, the last
    assert session.view.selected == 100 and session.view.error is None
    assert explained == [200, 300, 200, 200, 100]


# The command


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "corecapd.ctl", *args], capture_output=True, text=True, timeout=60
    )


def terminal_env() -> dict[str, str]:
    """This environment for a program on a terminal: its size from the terminal, not from
    COLUMNS / LINES (rich prefers those)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    return env | {"TERM": "xterm-256color"}


def in_terminal(argv: list[str], columns: int = 80, rows: int = 24) -> tuple[int, str]:
    """Run `argv` on a new pseudo-terminal of `columns` x `rows`; its exit code and what it
    wrote there, escape sequences removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=terminal_env(), start_new_session=True
    )
    os.close(slave)
    written = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer to the terminal is gone
                break
            if not chunk:
                break
            written += chunk
        code = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    text = re.sub(
        r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r", "", written.decode()
    )
    return code, text


def test_top_takes_seconds_from_a_tenth_to_an_hour() -> None:
    for bad in ("0", "0.01", "nan", "7200", "soon"):
        result = ctl("top", "--interval", bad)
        assert result.returncode == 2 and "expected seconds from 0.1 to 3600" in result.stderr


def test_top_without_a_daemon_is_a_one_line_error_on_a_terminal_too(tmp_path: Path) -> None:
    socket = str(tmp_path / "none.sock")
    piped = ctl("--socket", socket, "top")
    assert piped.returncode == 1 and piped.stdout == ""
    assert "cannot reach corecapd" in piped.stderr and len(piped.stderr.splitlines()) == 1
    code, shown = in_terminal([PYTHON, "-m", "corecapd.ctl", "--socket", socket, "top", "--once"])
    assert code == 1 and shown.strip().startswith("corecapctl: cannot reach corecapd"), shown


def two_jobs(processes: Processes) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """A job over its budget of 1 thread (a second thread) and one within it."""
    busy = processes.python(
        "import threading, sys; threading.Thread(target=sys.stdin.read).start()",
        stdin=subprocess.PIPE,
    )
    calm = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    return busy, calm


def test_top_without_a_terminal_prints_the_status_table_and_once_one_frame(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(rules=marked_rule(marker, "top-rule", cpus=1, max_threads=1))
    busy, calm = two_jobs(processes)
    daemon.wait_event("violation-started", pid=str(busy.pid))
    daemon.wait_job(calm.pid)

    for args in (["top"], ["top", "--once"]):
        piped = ctl("--socket", str(daemon.socket), *args)
        assert piped.returncode == 0, piped.stderr
        table = piped.stdout.splitlines()
        assert table[0].startswith("corecapd: mode enforce, backend affinity")
        assert "jobs: 2, over budget: 1" in table[1]
        header = "PID USER RULE CPUS THREADS/BUDGET CPU% STATE AGE"
        assert table[3].split() == header.split()
        assert {line.split()[0] for line in table[4:]} == {str(busy.pid), str(calm.pid)}

    argv = [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), "top", "--once"]
    code, shown = in_terminal(argv)
    assert code == 0, shown
    frame = shown.rstrip("\n").split("\n")
    assert len(frame) <= 23 and all(len(line) <= 80 for line in frame), shown
    assert frame[0].startswith(" corecap top") and "quit" not in shown
    row = next(line for line in frame if f" {busy.pid} " in line)
    assert row.startswith(">") and "VIOLATION" in row and "top-rule" in row
    assert any(f" {calm.pid} " in line and line.rstrip().endswith("ok") for line in frame)
    assert f"PID {busy.pid}, root, rule top-rule: 2/1 threads" in shown


def test_top_live_in_tmux_shows_the_cpus_and_jobs_selects_with_keys_and_quits(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed (scripts/bootstrap.sh test installs it)")
    daemon = start_daemon(rules=marked_rule(marker, "top-rule", cpus=1, max_threads=1))
    busy, calm = two_jobs(processes)
    daemon.wait_event("violation-started", pid=str(busy.pid))
    daemon.wait_job(calm.pid)

    server = str(tmp_path / "tmux.sock")  # a tmux server of this test's own, killed at the end
    config = tmp_path / "tmux.conf"
    config.write_text("set -g status off\nset -g default-size 80x24\n")
    exit_status, errors = tmp_path / "exit-status", tmp_path / "stderr"
    top = [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), "top", "--interval", "0.5"]
    command = f"{shlex.join(top)} 2>{errors}; echo $? >{exit_status}"  # tmp_path: no spaces

    def tmux(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", server, "-f", str(config), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=terminal_env(),
            cwd=ROOT,
        )

    def screen() -> list[str]:
        return tmux("capture-pane", "-p", "-t", "top").stdout.split("\n")[:24]

    def selected(pid: int) -> list[str] | None:
        shown = screen()
        row = next((line for line in shown if f" {pid} " in line and "top-rule" in line), "")
        return shown if row.startswith(">") and f" PID {pid}, root" in "\n".join(shown) else None

    try:
        started = tmux("new-session", "-d", "-s", "top", "-x", "80", "-y", "24", command)
        assert started.returncode == 0, started.stderr
        size = tmux("display-message", "-p", "-t", "top", "#{pane_width}x#{pane_height}")
        assert size.stdout.strip() == "80x24", size.stdout + size.stderr
        shown = wait_for(lambda: selected(busy.pid), 30, "top's first frame")
        assert shown[0].startswith(" corecap top") and "q: quit" in shown[23], shown

        # The map: each job's glyph (by ascending PID) on the CPU the daemon gave it.
        glyphs = dict(zip(sorted([busy.pid, calm.pid]), "AB", strict=True))
        cpus = next(line for line in shown if line.startswith(" CPUs")).split()[1:]
        cells = dict(zip(cpus[::2], cpus[1::2], strict=True))
        for pid in (busy.pid, calm.pid):
            for cpu in daemon.job(pid)["cpus"]:  # type: ignore[index]
                assert cells[str(cpu)] in (glyphs[pid], "="), (cells, shown)
        row = next(line for line in shown if f" {busy.pid} " in line)
        assert "2/1" in row and "VIOLATION" in row, shown
        assert any(f" {calm.pid} " in line and "1/1" in line for line in shown), shown

        tmux("send-keys", "-t", "top", "Down")
        wait_for(lambda: selected(calm.pid), 10, "the second job selected (Down)")
        tmux("send-keys", "-t", "top", "k")
        wait_for(lambda: selected(busy.pid), 10, "the first job selected again (k)")
        tmux("send-keys", "-t", "top", "q")
        wait_for(exit_status.exists, 10, "top to quit on q")
        assert exit_status.read_text().strip() == "0", errors.read_text()
        assert "Traceback" not in errors.read_text()
    finally:
        subprocess.run(["tmux", "-S", server, "kill-server"], capture_output=True, timeout=30)
