"""The real daemon against real processes: confinement, monitor mode, budgets, lifecycle."""

from __future__ import annotations

import os
import signal
import subprocess
from functools import partial
from pathlib import Path

import pytest
from conftest import PYTHON, Processes, StartDaemon, marked_rule, thread_affinities, wait_for

ALL_CPUS = os.sched_getaffinity(0)
LAST_CPU = max(ALL_CPUS)
pytestmark = pytest.mark.skipif(len(ALL_CPUS) < 2, reason="needs 2 CPUs: one is reserved")

# A process that starts N threads (sleeping until stdin closes) and reports their count.
THREADS = """
import sys, threading
n = int(sys.argv[2])
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(n)]
for t in threads: t.start()
print(len(threads), flush=True)
sys.stdin.read()
stop.set()
"""


def confined(pid: int, cpus: set[int]) -> dict[int, set[int]]:
    """The thread masks of `pid` once every one is `cpus`, else an empty dict."""
    masks = thread_affinities(pid)
    return masks if masks and all(mask == cpus for mask in masks.values()) else {}


def test_every_thread_confined_including_threads_started_before_and_after(
    start_daemon: StartDaemon, processes: Processes
) -> None:
    before = processes.python(THREADS, "12", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert before.stdout is not None
    before.stdout.readline()  # 12 threads exist before the daemon starts
    daemon = start_daemon(daemon={"reserved_cpus": str(min(ALL_CPUS))})
    job = daemon.wait_job(before.pid)
    assert job["cpus"] == [LAST_CPU]
    masks = wait_for(lambda: confined(before.pid, {LAST_CPU}), what="all threads confined")
    assert len(masks) == 13

    after = processes.python(
        "import time, threading, sys; time.sleep(0.6)\n" + THREADS,
        "6",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert after.stdout is not None
    daemon.wait_job(after.pid)
    after.stdout.readline()
    masks = thread_affinities(after.pid)
    assert len(masks) == 7 and all(v == {LAST_CPU} for v in masks.values()), masks


def test_monitor_mode_reports_but_changes_nothing(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(
        daemon={"mode": "monitor", "reserved_cpus": str(min(ALL_CPUS))},
        rules=marked_rule(marker, "small", cpus=1, max_threads=3),
    )
    busy = processes.python(THREADS, "8", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    job = daemon.wait_job(busy.pid)
    assert job["cpus"] == [LAST_CPU]
    started = daemon.wait_event("job-started", pid=str(busy.pid))
    assert started["enforced"] == "0"
    daemon.wait_event("violation-started", pid=str(busy.pid))  # reported as in enforce
    masks = thread_affinities(busy.pid)
    assert all(mask == ALL_CPUS for mask in masks.values()), masks
    assert daemon.status()["host"]["mode"] == "monitor"


def test_violation_onset_and_resolution_logged_once_each(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(
        defaults={"violation_after": 3},
        rules=marked_rule(marker, "capped", cpus=1, max_threads=5),
    )
    # Its threads end at the first line of input; the process at the end of input.
    job = processes.python(
        THREADS.replace("sys.stdin.read()\nstop.set()", "sys.stdin.readline()\nstop.set()")
        + "sys.stdin.read()\n",
        "10",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert job.stdout is not None and job.stdin is not None
    job.stdout.readline()
    onset = daemon.wait_event("violation-started", pid=str(job.pid))
    assert onset["threads"] == "11" and onset["budget"] == "5" and onset["rule"] == "capped"
    assert daemon.job(job.pid)["state"] == "violation"  # type: ignore[index]
    ongoing = [v for v in daemon.call("violations") if v["pid"] == job.pid]
    assert len(ongoing) == 1 and ongoing[0]["ended"] is None

    job.stdin.write(b"\n")  # its threads end; the process stays until its stdin closes
    job.stdin.flush()
    ended = daemon.wait_event("violation-ended", pid=str(job.pid))
    assert ended["peak_threads"] == "11" and ended["threads"] == "1"
    job.stdin.close()
    daemon.wait_event("job-ended", pid=str(job.pid))
    assert len(daemon.events("violation-started", pid=str(job.pid))) == 1
    assert len(daemon.events("violation-ended", pid=str(job.pid))) == 1
    [record] = [v for v in daemon.call("violations") if v["pid"] == job.pid]
    assert record["ended"] is not None and record["ended"] >= record["started"]
    assert record == record | {"rule": "capped", "threads": 11, "budget": 5}
    assert record["ended_by"] == "resolved"


def test_short_spikes_below_violation_after_are_not_violations(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(
        daemon={"scan_interval": 0.2},
        defaults={"violation_after": 5},
        rules=marked_rule(marker, "capped", max_threads=4),
    )
    # 10 threads for ~0.3 s, three times: never 5 consecutive samples over budget.
    spiky = processes.python(
        """
        import threading, time
        for _ in range(3):
            ts = [threading.Thread(target=time.sleep, args=(0.3,)) for _ in range(10)]
            [t.start() for t in ts]; [t.join() for t in ts]
            time.sleep(0.6)
        """
    )
    daemon.wait_job(spiky.pid)
    spiky.wait(timeout=20)
    daemon.wait_event("job-ended", pid=str(spiky.pid))
    assert daemon.events("violation-started") == []


def test_reserved_cpus_never_used(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    reserved = min(ALL_CPUS)
    daemon = start_daemon(
        daemon={"reserved_cpus": str(reserved)},
        rules=marked_rule(marker, "wide", cpus=64),
    )
    jobs = [processes.python(THREADS, "2", stdin=subprocess.PIPE) for _ in range(3)]
    for job in jobs:
        granted = daemon.wait_job(job.pid)["cpus"]
        assert reserved not in granted and granted == sorted(ALL_CPUS - {reserved})
    for job in jobs:
        masks = wait_for(partial(confined, job.pid, ALL_CPUS - {reserved}))
        assert all(reserved not in mask for mask in masks.values())
    started = daemon.events("job-started")
    assert any("only" in e["notes"] and "eligible" in e["notes"] for e in started)


def test_user_cap_limits_distinct_cpus_across_a_users_jobs(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(
        rules=marked_rule(marker, "two", cpus=2) + "[users.root]\nmax_cpus = 1\n",
    )
    first = processes.python(THREADS, "1", stdin=subprocess.PIPE)
    second = processes.python(THREADS, "1", stdin=subprocess.PIPE)
    one = daemon.wait_job(first.pid)
    two = daemon.wait_job(second.pid)
    assert len(one["cpus"]) == 1 and one["cpus"] == two["cpus"]
    assert "capped at 1" in " ".join(one["notes"])


def test_children_stay_in_their_job(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(daemon={"reserved_cpus": str(min(ALL_CPUS))})
    parent = processes.python(
        """
        import subprocess, sys
        child = subprocess.Popen(["sleep", "30"])
        print(child.pid, flush=True)
        sys.stdin.read()
        child.kill()
        """,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    job = wait_for(lambda: (j := daemon.job(parent.pid)) and child_pid in j["pids"] and j)
    assert job["pids"] == sorted([parent.pid, child_pid])
    assert wait_for(lambda: os.sched_getaffinity(child_pid) == {LAST_CPU})
    assert daemon.job(child_pid) is None  # not a job of its own
    assert len(daemon.status()["jobs"]) == 1


def test_shebang_script_and_python_m_module_are_classified_by_exe(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    daemon = start_daemon(rules=marked_rule(marker, "python-only", cpus=1))
    script = tmp_path / f"train-{marker}"
    script.write_text(f"#!{PYTHON}\nimport sys\nsys.stdin.read()\n")
    script.chmod(0o755)
    shebang = processes.run([str(script)], stdin=subprocess.PIPE)
    (tmp_path / "jobmodule.py").write_text("import sys\nsys.stdin.read()\n")
    module = processes.run([PYTHON, "-m", "jobmodule", marker], stdin=subprocess.PIPE, cwd=tmp_path)
    # A non-Python process with the marker is not a job: exe, not the cmdline, says Python.
    shell = processes.run(["sh", "-c", f"read line # {marker}"], stdin=subprocess.PIPE)

    wait_for(lambda: Path(f"/proc/{shebang.pid}/comm").read_text().strip() == script.name[:15])
    for pid in (shebang.pid, module.pid):
        assert daemon.wait_job(pid)["rule"] == "python-only"
    assert daemon.job(shell.pid) is None


def test_processes_exiting_mid_scan_are_routine(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(daemon={"scan_interval": 0.05})
    # 60 marked processes that live 0-60 ms: many vanish between listing and reading.
    launcher = processes.python(
        """
        import subprocess, sys, random
        procs = [subprocess.Popen([sys.executable, "-c",
                 f"import time; time.sleep({random.random() * 0.06})", sys.argv[1]])
                 for _ in range(60)]
        for p in procs: p.wait()
        """
    )
    assert launcher.wait(timeout=60) == 0
    assert daemon.call("ping")["pid"] == daemon.process.pid
    wait_for(lambda: daemon.status()["jobs"] == [], what="every job released")
    assert daemon.process.poll() is None


def test_system_user_processes_only_matched_when_the_user_is_named(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    unnamed = f"""
        [[rules]]
        name = "root-named"
        match = {{ cmdline = "{marker}", users = ["root"] }}

        [[rules]]
        name = "group-or-anyone"
        match = {{ cmdline = "{marker}", users = ["@daemon"] }}

        [[rules]]
        name = "anyone"
        match = {{ cmdline = "{marker}" }}
    """
    daemon = start_daemon(rules=unnamed)
    system = processes.run(
        [
            "setpriv",
            "--reuid=daemon",
            "--regid=daemon",
            "--clear-groups",
            PYTHON,
            "-c",
            "import sys; sys.stdin.read()",
            marker,
        ],
        stdin=subprocess.PIPE,
    )
    wait_for(lambda: Path(f"/proc/{system.pid}/exe").resolve().name.startswith("python"))
    root = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    assert daemon.wait_job(root.pid)["rule"] == "root-named"
    daemon.wait_event("job-started", pid=str(root.pid))
    assert daemon.job(system.pid) is None  # uid 1, in group daemon, but never named

    text = daemon.policy_path.read_text()
    daemon.policy_path.write_text(text.replace('users = ["@daemon"]', 'users = ["daemon"]'))
    assert daemon.call("reload") == "reloaded"
    assert daemon.wait_job(system.pid)["rule"] == "group-or-anyone"


def test_refuses_to_start_on_a_bad_policy(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("[daemon]\nmode = 'sometimes'\n", wait=False)
    assert daemon.process.wait(timeout=20) != 0
    lines = daemon.log().splitlines()  # every error, one per line, then how many
    assert lines[0] == (
        f"corecapd: {daemon.policy_path}: daemon.mode: expected 'enforce' or 'monitor',"
        " found 'sometimes'"
    )
    assert lines[1].startswith(f"corecapd: {daemon.policy_path}: rules: missing: ")
    assert lines[2:] == [f"corecapd: 2 errors in {daemon.policy_path}"]


def test_refuses_a_policy_that_reserves_every_cpu(start_daemon: StartDaemon) -> None:
    everything = f"0-{max(ALL_CPUS)}"
    daemon = start_daemon(f'rules = []\n[daemon]\nreserved_cpus = "{everything}"\n', wait=False)
    assert daemon.process.wait(timeout=20) != 0
    assert daemon.log() == (
        f"corecapd: {daemon.policy_path}: daemon.reserved_cpus: {everything!r} leaves no CPU"
        f" for jobs on this host (online CPUs: {everything})\n"
    )


def test_reload_rejects_bad_policy_keeps_old_then_applies_good_one(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(rules=marked_rule(marker, "before", max_threads=50))
    job = processes.python(THREADS, "1", stdin=subprocess.PIPE)
    assert daemon.wait_job(job.pid)["rule"] == "before"
    good = daemon.policy_path.read_text()

    daemon.policy_path.write_text(good.replace("max_threads = 50", "max_threads = 'many'"))
    daemon.signal(signal.SIGHUP)
    rejected = daemon.wait_event("policy-rejected")
    assert "rules[0].max_threads" in rejected["error"]
    ctl = subprocess.run(
        [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), "reload"],
        capture_output=True,
        text=True,
    )
    assert ctl.returncode != 0 and "rules[0].max_threads" in ctl.stderr
    assert daemon.job(job.pid)["rule"] == "before"  # type: ignore[index]
    assert daemon.process.poll() is None

    # (only that key: the random marker, cgroup and paths may hold a "50" too)
    daemon.policy_path.write_text(
        good.replace('"before"', '"after"').replace("max_threads = 50", "max_threads = 2")
    )
    assert daemon.call("reload") == "reloaded"
    job_after = daemon.job(job.pid)
    assert job_after is not None and job_after["rule"] == "after" and job_after["budget"] == 2


def test_reload_of_an_empty_or_truncated_policy_keeps_every_job_confined(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    """A half-written policy file (an editor's save, `>` redirection) at a reload: before,
    it was taken for a policy without rules and every job was let go."""
    daemon = start_daemon(daemon={"reserved_cpus": str(min(ALL_CPUS))})
    job = processes.python(THREADS, "3", stdin=subprocess.PIPE)
    daemon.wait_job(job.pid)
    wait_for(lambda: confined(job.pid, {LAST_CPU}))
    good = daemon.policy_path.read_text()
    for count, text in enumerate(["", good[: good.index("[[rules]]")]], start=1):
        daemon.policy_path.write_text(text)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda n=count: len(daemon.events("policy-rejected")) == n)  # type: ignore[misc]
        daemon.call("status")  # answered after a scan under the policy in force
        daemon.call("status")
        assert daemon.job(job.pid) is not None and confined(job.pid, {LAST_CPU})
    errors = [event["error"] for event in daemon.events("policy-rejected")]
    assert ": empty policy: " in errors[0] and ": rules: missing: " in errors[1]
    assert not daemon.events("job-ended") and not daemon.events("policy-reloaded")
    # several errors: all of them, to the caller one per line, in the journal in one event
    daemon.policy_path.write_text(
        good.replace('mode = "enforce"', 'mode = "x"').replace("cpus = 1", "cpus = 0")
    )
    rejected = subprocess.run(
        [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), "reload"],
        capture_output=True,
        text=True,
    )
    assert rejected.returncode == 1
    assert rejected.stderr.splitlines() == [
        "corecapctl: reload rejected, the policy in force stays: 2 errors",
        f"{daemon.policy_path}: daemon.mode: expected 'enforce' or 'monitor', found 'x'",
        f"{daemon.policy_path}: rules[0].cpus: expected an integer from 1 to 8192, found 0",
    ]
    event = daemon.events("policy-rejected")[-1]["error"]
    assert event == "; ".join(rejected.stderr.splitlines()[1:])
    assert daemon.job(job.pid) is not None and confined(job.pid, {LAST_CPU})


def test_reload_that_drops_the_rule_releases_the_job(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(daemon={"reserved_cpus": str(min(ALL_CPUS))})
    job = processes.python(THREADS, "3", stdin=subprocess.PIPE)
    daemon.wait_job(job.pid)
    wait_for(lambda: confined(job.pid, {LAST_CPU}))
    daemon.policy_path.write_text(
        daemon.policy_path.read_text().replace(marker, "NOTHING_CARRIES_THIS")
    )
    daemon.call("reload")
    daemon.wait_event("job-ended", pid=str(job.pid), reason="no rule matches any more")
    # The fence is let go on its own thread: until then the kernel narrows masks to it.
    wait_for(lambda: all(m == ALL_CPUS for m in thread_affinities(job.pid).values()))


def test_status_and_violations_json_shapes(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(rules=marked_rule(marker, "shape", cpus=1, max_threads=2))
    job = processes.python(THREADS, "4", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    daemon.wait_event("violation-started", pid=str(job.pid))
    out = subprocess.run(
        [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), "status", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    status = json.loads(out.stdout)
    [entry] = [j for j in status["jobs"] if j["pid"] == job.pid]
    assert entry["user"] == "root" and entry["rule"] == "shape"
    assert isinstance(entry["cpus"], list) and all(isinstance(c, int) for c in entry["cpus"])
    assert entry["threads"] == 5 and entry["budget"] == 2 and entry["state"] == "violation"
    out = subprocess.run(
        [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), "violations", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    [record] = [v for v in json.loads(out.stdout) if v["pid"] == job.pid]
    assert set(record) >= {"pid", "rule", "threads", "budget", "started", "ended"}
    assert record["ended"] is None and record["budget"] == 2


def test_second_daemon_on_the_same_socket_refuses_and_the_first_keeps_serving(
    start_daemon: StartDaemon,
) -> None:
    first = start_daemon()
    second = start_daemon(daemon={"socket": str(first.socket)}, wait=False)
    assert second.process.wait(timeout=20) != 0
    assert "another corecapd is already listening" in second.log()
    assert first.call("ping")["pid"] == first.process.pid


def test_a_job_that_widens_its_own_mask_is_set_back_and_logged(
    start_daemon: StartDaemon, processes: Processes
) -> None:
    daemon = start_daemon(
        daemon={"reserved_cpus": str(min(ALL_CPUS)), "backend": "affinity", "scan_interval": 0.1}
    )
    job = processes.python(
        f"""
        import os, sys, threading
        done = threading.Event()
        threading.Thread(target=done.wait).start()
        sys.stdin.readline()  # confined by now; then it undoes it for itself
        os.sched_setaffinity(0, {set(ALL_CPUS)!r})
        sys.stdin.readline()
        done.set()
        """,
        stdin=subprocess.PIPE,
    )
    assert job.stdin is not None
    wait_for(lambda: confined(job.pid, {LAST_CPU}), what="confined")
    job.stdin.write(b"widen\n")
    job.stdin.flush()
    escape = daemon.wait_event("escape", pid=str(job.pid))
    assert escape["escaped_threads"] == "1" and escape["cpus"] == str(LAST_CPU)
    assert wait_for(lambda: confined(job.pid, {LAST_CPU}), what="set back")
    assert len(daemon.events("escape", pid=str(job.pid))) == 1


def test_a_reload_that_widens_a_grant_answers_once_it_is_in_force(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    """The old fence narrows the wider mask until the fence worker widens the fence: the
    reply waits for it (the reliability campaign saw the old mask right after the reply)."""
    daemon = start_daemon(daemon={"reserved_cpus": ""}, rules=marked_rule(marker, cpus=1))
    job = processes.python(THREADS, "3", stdin=subprocess.PIPE)
    narrow = set(daemon.wait_job(job.pid)["cpus"])
    wait_for(lambda: confined(job.pid, narrow))
    text = daemon.policy_path.read_text()
    for cpus in (2, 1, 2, 1, 2):
        daemon.policy_path.write_text(text.replace("cpus = 1", f"cpus = {cpus}"))
        assert daemon.call("reload") == "reloaded"
        masks = thread_affinities(job.pid)  # at once: before another request
        granted = set((daemon.job(job.pid) or {})["cpus"])
        assert len(granted) == cpus
        assert all(mask == granted for mask in masks.values()), (masks, granted)
