"""Jobs are process trees (issue 11): the real daemon against real process trees.

A job is its matched process and every descendant, however many unmatched processes
(shells, env, timeout, nohup) lie between: a descendant that runs Python is a member of the
enclosing job from its first statement, never a job of its own under another rule, and never
on CPUs outside the job's grant. A violation that ends with its job says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, Processes, StartDaemon, marked_rule, thread_affinities, wait_for

from corecapd.ctl import format_explanation

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
# Scans every 30 s: what happens before then is the exec path's doing.
SLOW_SCANS = {"scan_interval": 30.0, "reserved_cpus": "", "realtime_priority": 10}

# A descendant's first statement: its mask before any code of ours ran; then it waits.
REPORT = (
    "import json, os, sys; print(json.dumps([os.getpid(), sorted(os.sched_getaffinity(0))]),"
    " flush=True); sys.stdin.readline()"
)


def two_rules(marker: str) -> str:
    """ "parent": 1 CPU; "child": every CPU, for Python whose command line says child."""
    return marked_rule(marker, "parent", cpus=1) + marked_rule(
        f"{marker}-child", "child", cpus=len(CPUS)
    )


def launch(processes: Processes, argv: list[str]) -> subprocess.Popen[bytes]:
    """A matched parent that runs `argv` (stdin and stdout inherited) and waits for it."""
    return processes.python(
        "import json, subprocess, sys; subprocess.run(json.loads(sys.argv[2]))",
        json.dumps(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def first_line(process: subprocess.Popen[bytes]) -> Any:
    assert process.stdout is not None
    return json.loads(process.stdout.readline())


def finish(process: subprocess.Popen[bytes]) -> None:
    assert process.stdin is not None
    process.stdin.write(b"\n")
    process.stdin.close()
    process.wait(timeout=30)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda code, mark: ["sh", "-c", f'{PYTHON} -c "{code}" {mark}; true'],  # os.system
        lambda code, mark: ["bash", "{script}"],
        lambda code, mark: ["timeout", "60", PYTHON, "-c", code, mark],
        lambda code, mark: ["nohup", PYTHON, "-c", code, mark],
        lambda code, mark: ["env", "X=1", "sh", "-c", f'{PYTHON} -c "{code}" {mark}; true'],
    ],
    ids=["sh -c", "bash run.sh", "timeout 60", "nohup", "env + sh -c"],
)
def test_python_below_wrappers_is_in_the_parents_job_from_its_first_statement(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path, wrap: Any
) -> None:
    daemon = start_daemon(daemon=SLOW_SCANS, rules=two_rules(marker))
    child_mark = f"{marker}-child"  # would match rule "child" on its own
    argv = wrap(REPORT.replace('"', "'"), child_mark)
    if argv[1] == "{script}":
        script = tmp_path / "run.sh"
        script.write_text(f'#!/bin/bash\n{PYTHON} -c "{REPORT}" {child_mark}\necho done >&2\n')
        argv[1] = str(script)
    parent = launch(processes, argv)
    child, mask = first_line(parent)
    job = daemon.wait_job(parent.pid)
    assert len(job["cpus"]) == 1 and mask == job["cpus"]  # the parent's CPU, not the child's
    assert child in job["pids"] and len(job["pids"]) >= 2
    assert [j["pid"] for j in daemon.status()["jobs"]] == [parent.pid]  # no job of its own
    assert daemon.events("job-started", rule="child") == []
    assert all(m == set(job["cpus"]) for m in thread_affinities(child).values())
    finish(parent)


def test_an_os_system_trial_counts_in_the_parents_job_found_by_scans(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    """Without exec events the scans find the trial below its shell all the same."""
    daemon = start_daemon(
        daemon={"scan_interval": 0.1, "exec_events": False}, rules=two_rules(marker)
    )
    parent = launch(processes, ["sh", "-c", f'{PYTHON} -c "{REPORT}"; true'])
    child, _ = first_line(parent)
    job = wait_for(lambda: (j := daemon.job(parent.pid)) and child in j["pids"] and j)
    assert len(job["pids"]) == 3  # the parent, sh and the trial
    members = {m["pid"]: m["kind"] for m in job["members"]}
    assert members[parent.pid] == "python" and members[child] == "python"
    assert sorted(members.values()) == ["other", "python", "python"]
    assert all(m["budget"] == (1 if m["kind"] == "other" else 6) for m in job["members"])
    assert job["budget"] == 6 + 6 + 1 + 8  # the members' budgets on 1 CPU, + slack
    assert wait_for(lambda: os.sched_getaffinity(child) == set(job["cpus"]))
    explained = daemon.call("explain", pid=child)
    assert explained["job"] == parent.pid and explained["members"] == job["members"]
    text = format_explanation(explained)
    assert f"members (3 processes, threads/budget):\n  {parent.pid} python 1/6\n" in text
    finish(parent)


WORKERS = """
import json, multiprocessing as mp, os, sys
def work(_):
    return os.getpid(), sorted(os.sched_getaffinity(0))
if __name__ == "__main__":
    with mp.get_context(sys.argv[2]).Pool(2) as pool:
        print(json.dumps(pool.map(work, range(8))), flush=True)
        sys.stdin.readline()
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_workers_are_members(
    start_daemon: StartDaemon, processes: Processes, method: str, tmp_path: Path
) -> None:
    daemon = start_daemon(daemon={"scan_interval": 0.1, "reserved_cpus": ""})
    script = tmp_path / "workers.py"  # spawn imports the main module again: a file
    script.write_text(WORKERS)
    parent = processes.run(
        [PYTHON, str(script), processes.marker, method],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    results = first_line(parent)
    job = daemon.wait_job(parent.pid)
    workers = {pid for pid, _ in results}
    assert all(mask == job["cpus"] for _, mask in results)
    wait_for(lambda: (j := daemon.job(parent.pid)) and workers <= set(j["pids"]))
    assert [j["pid"] for j in daemon.status()["jobs"]] == [parent.pid]
    finish(parent)


@pytest.mark.parametrize("linger", ["sleep 0.5", ":"], ids=["known first", "gone first"])
def test_a_child_whose_parent_exits_stays_in_its_job(
    start_daemon: StartDaemon, processes: Processes, marker: str, linger: str
) -> None:
    """Known first: the exec path reads the shell, then it exits. Gone first: the shell
    exits before the child's exec is read (its parent is init by then), and the cgroup
    fence it inherited at fork names its job (the cgroup1 backend here). The fence lands
    on the fence worker 6-12 ms after the exec (more on a loaded machine), so the parent
    forks only once it is in it: a fork before then leaves no trace (README)."""
    daemon = start_daemon(daemon={"scan_interval": 0.1, "reserved_cpus": ""})
    orphan_code = (
        "import json, os, time; print(json.dumps([os.getpid(), os.getppid(),"
        " sorted(os.sched_getaffinity(0))]), flush=True); time.sleep(60)"
    )
    # sh starts the Python in the background and exits: it is reparented (to init here).
    parent = processes.python(
        "import subprocess, sys, time\n"
        "while '/job-' not in open('/proc/self/cpuset').read(): time.sleep(0.005)\n"
        "subprocess.run(sys.argv[2:]); sys.stdin.readline()",
        "sh",
        "-c",
        f'{PYTHON} -c "{orphan_code}" & {linger}',
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    orphan, shell, mask = first_line(parent)
    assert mask == daemon.wait_job(parent.pid)["cpus"]

    def ppid() -> int:
        return int(Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[1])

    wait_for(lambda: ppid() != shell or shell == 1, what="the shell to exit")
    time.sleep(0.5)  # several scans since
    before = daemon.job(parent.pid)
    assert before is not None and orphan in before["pids"] and shell not in before["pids"]
    finish(parent)  # the job's root exits: the job goes on with the orphan
    time.sleep(0.5)
    job = daemon.job(parent.pid)
    assert job is not None and job["pids"] == [orphan]
    assert os.sched_getaffinity(orphan) == set(job["cpus"]) and daemon.job(orphan) is None
    os.kill(orphan, 9)
    daemon.wait_event("job-ended", pid=str(parent.pid))


def test_a_job_that_exits_while_over_budget_says_so(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    """C16: not "back within budget" with a count still over it."""
    daemon = start_daemon(
        daemon={"scan_interval": 0.1},
        rules=marked_rule(marker, "capped", cpus=1, max_threads=3),
    )
    job = processes.python(
        """
        import os, sys, threading
        for _ in range(8):
            threading.Thread(target=threading.Event().wait, daemon=True).start()
        sys.stdin.readline()
        os._exit(0)  # with every thread still there
        """,
        stdin=subprocess.PIPE,
    )
    daemon.wait_event("violation-started", pid=str(job.pid))
    finish(job)
    closed = daemon.wait_event("violation-ended-with-job", pid=str(job.pid))
    assert closed["reason"] == "exited" and int(closed["threads"]) > int(closed["budget"]) == 3
    assert int(closed["peak_threads"]) >= 9
    daemon.wait_event("job-ended", pid=str(job.pid))
    assert daemon.events("violation-ended", pid=str(job.pid)) == []
    [record] = [v for v in daemon.call("violations") if v["pid"] == job.pid]
    assert record["ended_by"] == "exited" and record["ended"] is not None


# -- TensorFlow in descendants: few and short ----------------------------------------------

TF_TRIAL = """
import sys, time
import tensorflow as tf
intra = int(sys.argv[1])
if intra:
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(intra)
tf.reduce_sum(tf.constant([1.0, 2.0])).numpy()  # the pools start here
if len(sys.argv) > 2:
    import numpy as np
    model = tf.keras.Sequential([
        tf.keras.Input((20,)), tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(1),
    ])
    model.compile("adam", "mse")
    model.fit(np.random.rand(10000, 20), np.random.rand(10000, 1), epochs=2, verbose=0)
time.sleep(3)
"""


@pytest.mark.tensorflow
def test_an_oversized_trial_through_os_system_is_a_violation_of_the_parent_job(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    """C07d: intra = inter = 16 inside a 1-CPU job, started with os.system."""
    pytest.importorskip("tensorflow")
    trial = tmp_path / "trial.py"
    trial.write_text(TF_TRIAL)
    daemon = start_daemon(
        daemon={"scan_interval": 0.2},
        defaults={"grace": 1.0, "violation_after": 2},
        rules=marked_rule(marker, "parent", cpus=1),
    )
    parent = processes.python(
        f"import os, sys; sys.exit(os.system('{sys.executable} {trial} 16; true'))",
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    onset = daemon.wait_event("violation-started", timeout=60, pid=str(parent.pid))
    assert int(onset["threads"]) > 30 and onset["rule"] == "parent"
    assert parent.wait(timeout=60) == 0
    assert len(daemon.status()["jobs"]) <= 1


@pytest.mark.tensorflow
def test_a_launcher_with_a_tensorflow_child_is_budgeted_for_it(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    """C05: a default Keras fit in the child of a launcher is no violation."""
    pytest.importorskip("tensorflow")
    trial = tmp_path / "trial.py"
    trial.write_text(TF_TRIAL)
    daemon = start_daemon(
        daemon={"scan_interval": 0.2, "reserved_cpus": ""},
        defaults={"grace": 1.0, "violation_after": 2},
        rules=marked_rule(marker, "launcher", cpus=len(CPUS)),
    )
    parent = processes.python(
        f"import subprocess; subprocess.run(['{sys.executable}', '{trial}', '0', 'fit'])",
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    seen: list[dict[str, Any]] = []
    while parent.poll() is None:
        job = daemon.job(parent.pid)
        if job is not None:
            seen.append(job)
        time.sleep(0.2)
    assert parent.returncode == 0
    assert any(job["tensorflow"] for job in seen), "TensorFlow in the child not seen"
    peak = max(job["threads"] for job in seen)
    budget = (4 + 2 * len(CPUS)) + (6 + 7 * len(CPUS)) + 8  # launcher + TF child + slack
    assert any(job["budget"] == budget for job in seen), [j["budget"] for j in seen]
    assert peak >= 10  # the fit ran (its pools): ~20 threads with the launcher on 2 CPUs
    assert daemon.events("violation-started") == []


# -- sub-jobs: trials of a search, each on cores of its own within the search's grant -----


def search_rules(marker: str, sub_job: bool = True) -> str:
    """ "trial": 1 CPU, a sub-job below another job; "search": every CPU."""
    trial = {"sub_job": True} if sub_job else {}
    return marked_rule(f"{marker}-trial", "trial", cpus=1, **trial) + marked_rule(
        marker, "search", cpus=len(CPUS)
    )


# A trial in the background: its stdin is /dev/null (sh), so it sleeps until it is killed.
# One write(2) per line: the trials share the pipe, and unbuffered print writes twice.
TRIAL = (
    "import json, os, time; os.write(1, (json.dumps([os.getpid(),"
    " sorted(os.sched_getaffinity(0))]) + chr(10)).encode()); time.sleep(120)"
)


def on_cpus(pid: int, cpus: set[int]) -> bool:
    return all(mask == cpus for mask in thread_affinities(pid).values())


def start_trials(processes: Processes, marker: str, count: int) -> tuple[Any, list[Any]]:
    """A search that starts `count` trials through `sh -c "... &"` (as os.system does) and
    waits; each trial prints its PID and mask at its first statement. The trials' marker
    comes from the environment, so the search's own command line does not carry it."""
    trial = f'{PYTHON} -c "{TRIAL}" "$TRIAL" & '
    search = processes.python(
        "import subprocess, sys; subprocess.run(sys.argv[2:])",
        "sh",
        "-c",
        trial * count + "wait",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "TRIAL": f"{marker}-trial"},
    )
    trials = [first_line(search) for _ in range(count)]
    return search, trials


def end_trials(search: subprocess.Popen[bytes], trials: list[Any]) -> None:
    """The trials (not started by the fixture) end by PID, also when the test failed."""
    for pid, _ in trials:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    finish(search)


def test_two_trials_are_sub_jobs_on_disjoint_cores_within_the_search_grant(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(daemon=SLOW_SCANS, rules=search_rules(marker))
    search, trials = start_trials(processes, marker, 2)
    try:
        parent = daemon.wait_job(search.pid)
        assert parent["parent"] is None and parent["rule"] == "search"
        for _, mask in trials:  # at its first statement: within the search's grant
            assert set(mask) <= set(parent["cpus"])
        jobs = [daemon.wait_job(pid) for pid, _ in trials]
        assert [(job["rule"], job["parent"]) for job in jobs] == [("trial", search.pid)] * 2
        first, second = (set(job["cpus"]) for job in jobs)
        assert len(first) == len(second) == 1 and not first & second  # apart...
        assert first | second <= set(parent["cpus"])  # ...and carved out of the search's
        for (pid, _), job in zip(trials, jobs, strict=True):
            wait_for(functools.partial(on_cpus, pid, set(job["cpus"])))
            assert pid not in daemon.job(search.pid)["pids"]  # type: ignore[index]
        shown = subprocess.run(
            [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), "status"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert shown.count(" \\_ trial") == 2
    finally:
        end_trials(search, trials)
    daemon.wait_event("job-ended", pid=str(search.pid))  # after its trials


def test_a_trial_outside_every_job_is_a_top_level_job(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(daemon=SLOW_SCANS, rules=search_rules(marker))
    alone = processes.run([PYTHON, "-c", REPORT, f"{marker}-trial"], stdin=subprocess.PIPE)
    job = daemon.wait_job(alone.pid)
    assert job["rule"] == "trial" and job["parent"] is None and len(job["cpus"]) == 1
    finish(alone)


def test_a_reload_that_changes_the_sub_job_rule(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(daemon={"scan_interval": 0.1}, rules=search_rules(marker))
    search, trials = start_trials(processes, marker, 2)
    pids = [pid for pid, _ in trials]
    try:
        for pid in pids:
            assert daemon.wait_job(pid)["parent"] == search.pid
        policy = daemon.policy_path.read_text()
        daemon.policy_path.write_text(policy.replace("sub_job = true\n", ""))
        assert daemon.call("reload") == "reloaded"
        for pid in pids:  # members of the search again, on its CPUs
            event = daemon.wait_event("job-ended", pid=str(pid))
            assert (
                event["reason"] == f"no rule makes it a sub-job any more: joined job {search.pid}"
            )
        parent = wait_for(
            lambda: (j := daemon.job(search.pid)) and set(pids) <= set(j["pids"]) and j
        )
        for pid in pids:
            wait_for(functools.partial(on_cpus, pid, set(parent["cpus"])))
        daemon.policy_path.write_text(policy)
        assert daemon.call("reload") == "reloaded"
        jobs = [daemon.wait_job(pid) for pid in pids]  # sub-jobs again
        assert all(job["parent"] == search.pid for job in jobs)
        assert not set(jobs[0]["cpus"]) & set(jobs[1]["cpus"])
    finally:
        end_trials(search, trials)
