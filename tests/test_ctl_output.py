"""corecapctl prints what jobs chose (thread names, environment) without letting it reach
the terminal as control sequences."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, Processes, StartDaemon
from hypothesis import given
from hypothesis import strategies as st

from corecapd.ctl import format_explanation, format_status, format_violations
from corecapd.events import FenceFailed
from corecapd.journal import Reporter
from corecapd.printable import visible

HOSTILE = [
    "\x1b]0;owned\x07",  # sets the terminal's title
    "\x1b[2J\x1b[H",  # clears the screen
    "ok\r\n  4242  root  forged  0  1/14  0.0  ok  1s",  # a forged line of the table
    "\x9b31m",  # C1 CSI: an escape sequence without ESC
    "\u202eevil",  # right-to-left override
    "a\u2028b",  # line separator
    "\ud800",  # a lone surrogate (valid JSON: "\\ud800"); no encoder can print it
    "\x00\x7f\t",
]

STATUS: dict[str, Any] = {
    "host": {
        "mode": "enforce",
        "backend": "affinity",
        "policy": "/etc/corecap.toml",
        "eligible_cpus": [0, 1],
        "reserved_cpus": [],
        "jobs": 1,
        "violations": 0,
    },
    "jobs": [
        {
            "pid": 4242,
            "user": "alice",
            "rule": "python",
            "cpus": [1],
            "threads": 3,
            "budget": 14,
            "cpu_percent": 0.0,
            "state": "ok",
            "age": 5.0,
        }
    ],
}
EXPLANATION: dict[str, Any] = {
    "pid": 4242,
    "job": 4242,
    "rule": "python",
    "state": "ok",
    "threads": 3,
    "budget": 14,
    "cpus": 1,
    "budget_basis": "Python default",
    "declared": {"cpus": 1},
    "pools": [{"layer": "openblas", "threads": 1}],
    "thread_names": {"python": 2, "worker": 1},
    "environment": {"OMP_NUM_THREADS": "1"},
    "epochs": [{"epoch": 0, "threads": 3}],
    "hints": ["OMP_NUM_THREADS=1 in the job's environment"],
    # Evidence holds what a job controls: the names TF gave its threads, library file names.
    "layers": [
        {
            "layer": "openmp",
            "name": "OpenMP pool (libgomp)",
            "threads": 4,
            "processes": 1,
            "expected": 1,
            "oversized": True,
            "fix": "set OMP_NUM_THREADS=1",
            "evidence": "start routine gomp_thread_start in libgomp.so.1",
        }
    ],
    "mask_cpus": 2,
    "quota": {"cpus": 0.5, "source": "cpu.max=50000 100000 in /sys/fs/cgroup/job"},
}
VIOLATIONS: list[dict[str, Any]] = [
    {"pid": 4242, "rule": "python", "threads": 30, "budget": 14, "started": 0.0, "ended": None}
]


FREE_FORM = ("thread_names", "environment")  # maps whose keys the job chose


def poisoned(document: Any, text: str, keys: bool = False) -> Any:
    """`document` with `text` added to every string value in it, and to the keys of the
    maps a job fills."""
    if isinstance(document, str):
        return document + text
    if isinstance(document, dict):
        return {
            (k + text if keys else k): poisoned(v, text, k in FREE_FORM)
            for k, v in document.items()
        }
    if isinstance(document, list):
        return [poisoned(item, text) for item in document]
    return copy.copy(document)


def assert_safe(output: str) -> None:
    """Nothing a terminal acts on, and nothing an encoder chokes on, but line ends."""
    for char in output:
        assert char == "\n" or unicodedata.category(char) not in (
            "Cc",
            "Cf",
            "Cs",
            "Zl",
            "Zp",
        ), f"{char!r} in {output!r}"
    output.encode("utf-8")


FORMATTERS = [
    (format_status, STATUS),
    (format_explanation, EXPLANATION),
    (format_violations, VIOLATIONS),
]


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize(("formatter", "document"), FORMATTERS)
def test_what_jobs_chose_is_printed_escaped(formatter: Any, document: Any, text: str) -> None:
    output = formatter(poisoned(document, text))
    assert_safe(output)
    assert output.count("\n") == formatter(document).count("\n")  # no forged lines


@given(st.text())
def test_visible_escapes_every_control_character_and_only_those(text: str) -> None:
    shown = visible(text)
    assert_safe(shown)
    assert visible(shown) == shown
    if text.isprintable():
        assert shown == text


@pytest.mark.parametrize("text", HOSTILE)
def test_json_output_escapes_them_already(text: str) -> None:
    # corecapctl --json prints json.dumps(document, indent=2): ensure_ascii escapes it all
    printed = json.dumps(poisoned(EXPLANATION, text), indent=2)
    assert printed.isascii()
    assert_safe(printed)
    assert json.loads(printed) == poisoned(EXPLANATION, text)


# Names its threads with escape sequences, a forged line and bytes that are not UTF-8.
NAMES_ITS_THREADS = """
import os, sys, threading, time
def name(tid, raw):
    fd = os.open(f"/proc/self/task/{tid}/comm", os.O_WRONLY)
    os.write(fd, raw)
    os.close(fd)
worker = threading.Thread(target=time.sleep, args=(120,), daemon=True)
worker.start()
name(threading.get_native_id(), b"\\x1b]0;owned\\x07")
name(worker.native_id, b"x\\n[forged]\\xff\\x9b2J")
print("named", flush=True)
time.sleep(120)
"""


def test_corecapctl_shows_a_hostile_job_escaped(
    start_daemon: StartDaemon, processes: Processes
) -> None:
    daemon = start_daemon()
    job = processes.python(
        NAMES_ITS_THREADS,
        stdout=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="2\x1b[2J\r\nforged: ok"),
    )
    assert job.stdout is not None and job.stdout.readline() == b"named\n"
    daemon.wait_job(job.pid)

    def ctl(*args: str) -> str:
        result = subprocess.run(
            [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), *args],
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0 and result.stderr == b"", result.stderr
        text = result.stdout.decode()
        assert_safe(text)
        return text

    explained = ctl("explain", str(job.pid))
    assert "\\x1b]0;owned\\x07" in explained
    assert "x\\x0a[forged]\ufffd\ufffd2J" in explained
    assert "OMP_NUM_THREADS=2\\x1b[2J\\x0d\\x0aforged: ok" in explained
    assert not any(line.startswith(("[forged]", "forged")) for line in explained.splitlines())
    ctl("status")
    ctl("violations")
    for command in ("status", "violations", "explain"):
        printed = ctl(command, *([str(job.pid)] if command == "explain" else []), "--json")
        assert printed.isascii()
    report = json.loads(ctl("explain", str(job.pid), "--json"))
    assert report["thread_names"]["\x1b]0;owned\x07"] == 1
    assert report["environment"]["OMP_NUM_THREADS"] == "2\x1b[2J\r\nforged: ok"


@given(st.text(), st.text())
def test_the_daemons_log_keeps_one_line_per_event_whatever_jobs_chose(error: str, job: str) -> None:
    # FenceFailed carries a job name and an error text in its message and fields alike.
    stream = io.StringIO()
    Reporter(to_journal=False, stream=stream).emit(FenceFailed(job=job, error=error))
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert visible(line[:-1]) == line[:-1], repr(line)  # nothing left to escape
    for hostile in HOSTILE:
        stream = io.StringIO()
        Reporter(to_journal=False, stream=stream).emit(FenceFailed(job=hostile, error=hostile))
        assert stream.getvalue().count("\n") == 1 and "\x1b" not in stream.getvalue()


@given(st.text())
def test_a_logged_value_is_quoted_when_it_holds_a_space_a_separator_or_an_unprintable(
    value: str,
) -> None:
    """`_quote` as it was written character by character (the definition), now one regex."""
    from corecapd.journal import _quote

    bare = value and value.isprintable() and not any(c.isspace() or c in '"|=' for c in value)
    assert _quote(value) == (value if bare else json.dumps(value))


@pytest.mark.parametrize(
    "policy",
    [
        'rules = []\n[daemon]\n"\\u001b]0;PWNED\\u0007\\u001b[2J" = 1\n',  # an unknown key
        'rules = []\n[users."q\\u001b]0;T\\u0007"]\nmax_cpus = 0\n',  # a user's table
        '[[rules]]\nname = "x"\nmatch = { cmdline = "(?<\\u001b]0;PWN\\u0007>a)" }\n',  # a regex
    ],
)
def test_policy_errors_quote_what_the_file_holds_escaped(tmp_path: Path, policy: str) -> None:
    quoted = "cmdline" not in policy  # the regex library names a position, not the text
    path = tmp_path / "policy.toml"
    path.write_text(policy)
    for argv in (
        ["-m", "corecapd.ctl", "check", str(path)],
        ["-m", "corecapd.daemon", "--config", str(path)],
    ):
        result = subprocess.run([PYTHON, *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert "\x1b" not in result.stderr and "\x07" not in result.stderr
        assert not quoted or "\\x1b" in result.stderr, result.stderr


def test_status_shows_sub_jobs_under_their_job() -> None:
    def job(pid: int, parent: int | None) -> dict[str, Any]:
        return {**STATUS["jobs"][0], "pid": pid, "parent": parent}

    jobs = [job(10, None), job(20, None), job(11, 10), job(21, 20), job(12, 10), job(13, 11)]
    lines = format_status({**STATUS, "jobs": jobs}).splitlines()[3:]
    start = lines[0].index("RULE")
    width = lines[0].index("CPUS") - start
    shown = [(line.split()[0], line[start : start + width].rstrip()) for line in lines[1:]]
    rule = STATUS["jobs"][0]["rule"]
    assert shown == [
        ("10", rule),
        ("11", f" \\_ {rule}"),
        ("13", f"     \\_ {rule}"),
        ("12", f" \\_ {rule}"),
        ("20", rule),
        ("21", f" \\_ {rule}"),
    ]
    looped = [job(1, 2), job(2, 1), job(3, 99)]  # never sent; still each shown once
    table = format_status({**STATUS, "jobs": looped}).splitlines()[4:]
    assert sorted(line.split()[0] for line in table) == ["1", "2", "3"]
