"""Real Ray (Tune): each trial and task gets the cores Ray assigned it, through corecapd.ray.

One Ray instance for the module (`ray.init(num_cpus=2)` in this process); each scenario is
a driver of its own (a subprocess that connects to it), with or without the integration,
so the workers of one scenario never carry over into the next (Ray's workers belong to
their driver's job). Every Ray process is ended at teardown, by PID, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, Daemon, StartDaemon, marked_rule

from corecapd.budget import declared_budget
from corecapd.declaration import Declaration, declaration_from, resolve
from corecapd.ray import cores

ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune")
pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tensorflow

CPUS = sorted(os.sched_getaffinity(0))

# A driver: argv = address, "corecap" | "plain", a directory for the trials' barrier and
# Tune's files, what to run ("tune" | "tasks"). Prints one JSON line of results.
DRIVER = """
import json, os, sys, time
import ray
from ray import tune

address, mode, scratch, scenario = sys.argv[1:5]
runtime_env = {"env_vars": {"CORECAP_SOCKET": os.environ["CORECAP_SOCKET"]}}
if mode == "corecap":
    runtime_env["worker_process_setup_hook"] = "corecapd.ray.setup"
ray.init(address=address, _node_ip_address="127.0.0.1", runtime_env=runtime_env)


def facts():
    import tensorflow as tf
    import corecapd.ray
    from corecapd.declaration import tensorflow_pools
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    tasks = os.listdir("/proc/self/task")
    plan = corecapd.ray.plan()
    return {
        "pid": os.getpid(),
        "start": open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19],
        "configured": [intra, inter],  # as TensorFlow reports them; 0 = "decide"
        "pools": tensorflow_pools(intra, inter, os.environ, len(os.sched_getaffinity(0))),
        "masks": sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in tasks}),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "manifest": None if plan is None else plan.manifest(),
    }


def trial(config):
    # Both trials wait for each other: they run at the same time, or the test fails.
    mine = os.path.join(scratch, f"trial-{config['trial']}")
    open(mine, "w").close()
    deadline = time.monotonic() + 60
    while len([n for n in os.listdir(scratch) if n.startswith("trial-")]) < 2:
        assert time.monotonic() < deadline, "the other trial never started"
        time.sleep(0.05)
    import numpy as np, tensorflow as tf
    model = tf.keras.Sequential([  # the seed example
        tf.keras.Input((20,)), tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.random.rand(10000, 20), np.random.rand(10000, 1), epochs=2, verbose=0)
    tune.report({"facts": json.dumps(facts())})


@ray.remote
def task():
    import tensorflow as tf  # imported, never started: its pools can still be sized
    return facts()


if scenario == "tune":
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 1}),
        param_space={"trial": tune.grid_search([0, 1])},
        run_config=tune.RunConfig(storage_path=scratch, verbose=0),
    )
    results = [json.loads(r.metrics["facts"]) for r in tuner.fit()]
else:
    # One worker at a time, so Ray reuses it: 1 CPU, then 2, then 1 again.
    results = [ray.get(task.options(num_cpus=n).remote()) for n in (1, 2, 1)]
print(json.dumps(results), flush=True)
"""


@dataclass
class Cluster:
    address: str
    workers: list[tuple[int, str]] = field(default_factory=list)  # (PID, start ticks)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One Ray instance of 2 CPUs for the module; its processes, and the workers the
    scenarios saw, ended by PID at teardown (the same start time: never a reused PID)."""
    started = time.monotonic()
    ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.1",  # Ray's servers on the loopback only
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        configure_logging=False,
    )
    node = ray._private.worker._global_node
    children = [info.process for infos in node.all_processes.values() for info in infos]
    found = Cluster(str(ray.get_runtime_context().gcs_address))
    try:
        yield found
    finally:
        print(f"ray instance up {time.monotonic() - started:.1f} s")
        ray.shutdown()
        for child in children:  # Popen objects: poll() knows a reaped child, unlike a PID
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
        deadline = time.monotonic() + 10  # the raylet's children: they go with it
        while any(_alive(*worker) for worker in found.workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid, start in found.workers:
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int, start: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[19] == start


def drive(
    cluster: Cluster, mode: str, scenario: str, tmp_path: Path, socket: Path
) -> tuple[list[dict[str, Any]], str]:
    """Runs DRIVER; returns its results and its stderr (the workers' output, forwarded)."""
    scratch = tmp_path / f"{mode}-{scenario}"
    scratch.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    started = time.monotonic()
    done = subprocess.run(
        [PYTHON, str(driver), cluster.address, mode, str(scratch), scenario],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, CORECAP_SOCKET=str(socket)),
    )
    print(f"{mode} {scenario}: {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stderr[-4000:]
    results: list[dict[str, Any]] = json.loads(done.stdout.splitlines()[-1])
    cluster.workers += [(result["pid"], result["start"]) for result in results]
    return results, done.stderr


@pytest.fixture
def daemon(start_daemon: StartDaemon, marker: str) -> Daemon:
    # No rule matches a Ray process: only the workers that register become jobs.
    return start_daemon(daemon={"reserved_cpus": ""}, rules=marked_rule(marker, cpus=1))


@pytest.mark.skipif(len(CPUS) != 2, reason="Ray is told num_cpus=2: needs exactly 2 CPUs")
def test_ray_tune_trials_get_disjoint_cores_and_pools_of_one(
    cluster: Cluster, daemon: Daemon, tmp_path: Path
) -> None:
    trials, _ = drive(cluster, "corecap", "tune", tmp_path, daemon.socket)
    assert len(trials) == 2
    masks = [trial["masks"] for trial in trials]
    assert sorted(masks) == [[[CPUS[0]]], [[CPUS[1]]]]  # every thread on its own core
    for trial in trials:
        assert trial["configured"] == [1, 1], trial  # TensorFlow says intra = inter = 1
        assert trial["omp"] == "1"
        manifest = trial["manifest"]
        assert manifest["daemon"] == str(daemon.socket)
        assert [manifest["cpus"]] == trial["masks"]
        ended = daemon.wait_event("job-ended", pid=str(trial["pid"]), timeout=30)
        assert ended["rule"] == "registered"
        assert daemon.events("violation-started", pid=str(trial["pid"])) == []


@pytest.mark.skipif(len(CPUS) != 2, reason="Ray is told num_cpus=2: needs exactly 2 CPUs")
def test_ray_tune_trials_without_the_integration_share_both_cpus(
    cluster: Cluster, tmp_path: Path
) -> None:
    trials, _ = drive(cluster, "plain", "tune", tmp_path, tmp_path / "none.sock")
    for trial in trials:
        assert trial["masks"] == [CPUS] and trial["configured"] == [0, 0]
        assert trial["pools"] == {"intra_op": 2, "inter_op": 2}  # each sized to both CPUs
        assert trial["manifest"] is None


def test_ray_reused_worker_registers_again_for_other_resources(
    cluster: Cluster, daemon: Daemon, tmp_path: Path
) -> None:
    tasks, _ = drive(cluster, "corecap", "tasks", tmp_path, daemon.socket)
    # 1 CPU, then 2, then 1: each task's grant, mask and pools follow its resources
    assert [len(task["manifest"]["cpus"]) for task in tasks] == [1, 2, 1]
    assert [len(task["masks"][0]) for task in tasks] == [1, 2, 1]
    assert [task["configured"] for task in tasks] == [[1, 1], [2, 2], [1, 1]]
    assert all(task["manifest"]["daemon"] == str(daemon.socket) for task in tasks)
    counts: dict[int, set[int]] = {}
    for task, cpus in zip(tasks, (1, 2, 1), strict=True):
        counts.setdefault(task["pid"], set()).add(cpus)
    reused = [pid for pid, seen in counts.items() if len(seen) > 1]
    assert reused, f"Ray reused no worker for another CPU count ({counts})"
    for pid in reused:
        changed = daemon.events("job-changed", pid=str(pid))
        assert changed, f"worker {pid} ran tasks of 1 and 2 CPUs and never registered again"


def test_ray_without_a_daemon_sizes_pools_to_the_assigned_cpus_and_warns_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    tasks, stderr = drive(cluster, "corecap", "tasks", tmp_path, tmp_path / "none.sock")
    for task, cpus in zip(tasks, (1, 2, 1), strict=True):
        assert task["masks"] == [CPUS]  # the mask left as it is
        assert task["manifest"]["settings"]["intra_op"] == cpus
        assert task["omp"] == str(cpus) and task["configured"] == [cpus, min(cpus, 2)]
    workers = {task["pid"] for task in tasks}
    assert stderr.count("cannot reach corecapd") == len(workers), stderr


@pytest.mark.parametrize(
    ("assigned", "expected"),
    [
        ({"CPU": 1.0}, 1),
        ({"CPU": 2.0, "memory": 1e9}, 2),
        ({"CPU": 1.5}, 1),
        ({"CPU": 0.5}, 1),
        ({}, 1),
    ],
)
def test_ray_cores_are_the_whole_cpus_assigned_at_least_one(
    assigned: dict[str, float], expected: int
) -> None:
    assert cores(assigned) == expected


def test_ray_host_threads_are_declared_into_the_budget() -> None:
    settings = resolve(declaration_from({"cpus": 1, "host_threads": 19}), 1)
    budget = declared_budget(settings, slack=8)
    assert budget.threads == 24 + 19 and "+ 19 host +" in budget.basis
    assert declared_budget(resolve(Declaration(cpus=1), 1), 8).threads == 24
