"""The per-layer diagnosis on real jobs: the real daemon, real TensorFlow, scikit-learn and
numpy, and a real cgroup v1 CPU quota, on marked processes only."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYTHON, Processes, StartDaemon, marked_rule, wait_for

from corecapd.ctl import format_explanation, format_violations
from corecapd.diagnosis import THREADING_VARIABLES

CPUS = sorted(os.sched_getaffinity(0))
CPU_CGROUP = Path("/sys/fs/cgroup/cpu")
# The job's environment without the threading variables of whoever runs the tests.
CLEAN = {k: v for k, v in os.environ.items() if k not in THREADING_VARIABLES}

# c13 (docs/diagnosis.md): a Keras fit on a tf.data pipeline whose private pool is 16 on
# a 1-CPU grant; intra-op and inter-op are TensorFlow's own (1 on 1 CPU).
PRIVATE_POOL_FIT = """
import os, time
deadline = time.monotonic() + 20
while len(os.sched_getaffinity(0)) != 1 and time.monotonic() < deadline:
    time.sleep(0.01)  # confined within a scan: TF must start confined
import numpy as np, tensorflow as tf
x = np.random.rand(10000, 20).astype("float32")
y = np.random.rand(10000, 1).astype("float32")
layers = [tf.keras.Input((20,)), tf.keras.layers.Dense(64), tf.keras.layers.Dense(1)]
model = tf.keras.Sequential(layers)
model.compile("adam", "mse")
ds = tf.data.Dataset.from_tensor_slices((x, y)).map(
    lambda a, b: (a * 1.0, b), num_parallel_calls=tf.data.AUTOTUNE
).batch(32).prefetch(tf.data.AUTOTUNE)
options = tf.data.Options()
options.threading.private_threadpool_size = 16
ds = ds.with_options(options)
while True:
    model.fit(ds, epochs=1, verbose=0)
"""


@pytest.mark.tensorflow
def test_a_tf_data_private_pool_of_16_on_one_cpu_is_diagnosed_as_that_pool(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    pytest.importorskip("tensorflow")
    daemon = start_daemon(
        daemon={"reserved_cpus": str(CPUS[0])},
        defaults={"grace": 1.0, "violation_after": 2},
        rules=marked_rule(marker, "keras", cpus=1),
    )
    job = processes.python(PRIVATE_POOL_FIT, env=CLEAN | {"TF_CPP_MIN_LOG_LEVEL": "2"})
    onset = daemon.wait_event("violation-started", timeout=180, pid=str(job.pid))
    diagnosis = onset["diagnosis"]
    assert diagnosis.startswith("tf.data private pool of 16 threads on 1 CPUs"), diagnosis
    assert "options.threading.private_threadpool_size = 1" in diagnosis
    assert "intra_op" not in diagnosis and "inter_op" not in diagnosis  # not oversized
    layer = daemon.wait_event("layer-oversized", pid=str(job.pid), layer="tf-data")
    assert (layer["layer_threads"], layer["expected"]) == ("16", "1")
    assert "tf_data_private_threadpool" in layer["evidence"]
    assert not daemon.events("layer-oversized", layer="tf-intra-op")

    records = [r for r in daemon.call("violations") if r["pid"] == job.pid]
    [total] = [r for r in records if r["kind"] == "threads"]
    assert [found["name"] for found in total["layers"]] == ["tf.data private pool"]
    [pool] = [r for r in records if r["kind"] == "layer"]
    assert (pool["layer"], pool["threads"], pool["budget"]) == ("tf-data", 16, 1)
    assert "tf-data" in format_violations(records)

    explained = daemon.call("explain", pid=job.pid)
    rows = {row["name"]: row for row in explained["layers"]}
    assert (
        rows["tf.data private pool"]["oversized"] and rows["tf.data private pool"]["threads"] == 16
    )
    assert rows["TensorFlow intra-op pool"] == rows["TensorFlow intra-op pool"] | {
        "threads": 1,
        "expected": 1,
        "oversized": False,
        "fix": "",
    }
    tids = {row["tid"] for row in explained["thread_layers"]}
    assert tids == {int(tid) for tid in os.listdir(f"/proc/{job.pid}/task")} & tids
    assert {row["layer"] for row in explained["thread_layers"]} >= {
        "main",
        "tf-data",
        "tf-intra-op",
    }
    text = format_explanation(explained)
    assert "  tf.data private pool: 16 of 1 for the grant: OVERSIZED" in text
    assert "evidence: 'tf_data_private_threadpool', start routine" in text
    assert "fix: set options.threading.private_threadpool_size = 1" in text
    job.kill()


THREADS_20 = """
import sys, threading
done = threading.Event()
for _ in range(20):
    threading.Thread(target=done.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_job_over_budget_on_threads_no_setting_sizes_is_told_its_widest_layer(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(
        daemon={"reserved_cpus": str(CPUS[0])}, rules=marked_rule(marker, "threads", cpus=1)
    )
    job = processes.python(THREADS_20, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=CLEAN)
    assert job.stdout is not None and job.stdout.readline() == b"ready\n"
    onset = daemon.wait_event("violation-started", timeout=60, pid=str(job.pid))
    assert int(onset["threads"]) == 21 and int(onset["budget"]) < 21
    assert onset["diagnosis"].startswith(
        "the widest layer: python-threading, 20 of the job's 21 threads ("
    ), onset["diagnosis"]
    assert "no setting sizes this layer to the CPUs" in onset["diagnosis"]
    explained = daemon.call("explain", pid=job.pid)
    assert explained["hints"][0] == onset["diagnosis"]
    job.kill()


KMEANS = """
import os, time
deadline = time.monotonic() + 20
while len(os.sched_getaffinity(0)) != 1 and time.monotonic() < deadline:
    time.sleep(0.01)
import numpy as np
from sklearn.cluster import KMeans
points = np.random.rand(50000, 10)
while True:
    KMeans(n_clusters=8, n_init=1, max_iter=30).fit(points)
"""


def test_an_openmp_pool_wider_than_the_cores_is_reported_within_budget(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    pytest.importorskip("sklearn")
    daemon = start_daemon(
        daemon={"reserved_cpus": str(CPUS[0])},
        defaults={"grace": 0.5, "violation_after": 2},
        rules=marked_rule(marker, "sklearn", cpus=1),
    )
    job = processes.python(KMEANS, env=CLEAN | {"OMP_NUM_THREADS": "4"})
    layer = daemon.wait_event("layer-oversized", timeout=60, pid=str(job.pid))
    assert int(layer["threads"]) <= int(layer["budget"])  # the job's total: within budget
    assert (layer["layer"], layer["layer_threads"], layer["expected"]) == ("openmp", "4", "1")
    assert layer["fix"].startswith(
        "OMP_NUM_THREADS=4 in the job's environment; set OMP_NUM_THREADS=1"
    )
    assert "libgomp" in layer["evidence"]
    [record] = [r for r in daemon.call("violations") if r["pid"] == job.pid]
    assert (record["kind"], record["layer"], record["ended"]) == ("layer", "openmp", None)
    assert daemon.events("violation-started", pid=str(job.pid)) == []
    job.kill()
    wait_for(
        lambda: [r for r in daemon.call("violations") if r["ended_by"] == "exited"],
        what="the layer's record to end with its job",
    )


@pytest.fixture
def quota_cgroup(marker: str) -> Iterator[Path]:
    """A cgroup v1 cpu cgroup of this test's own, with a quota of half a CPU; removed by
    its name at teardown, also on failure."""
    if not (CPU_CGROUP / "cpu.cfs_quota_us").is_file():
        pytest.skip(f"no cgroup v1 cpu controller at {CPU_CGROUP}")
    path = CPU_CGROUP / f"corecap-test-{marker}"
    path.mkdir()
    try:
        (path / "cpu.cfs_period_us").write_text("100000")
        (path / "cpu.cfs_quota_us").write_text("50000")
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                (CPU_CGROUP / "cgroup.procs").write_text(pid)
        path.rmdir()


NUMPY = """
import numpy as np, sys
a = np.random.rand(300, 300)
a.dot(a)  # OpenBLAS's pool, sized from the mask when the library loaded
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_quota_below_the_mask_is_said_to_be_no_thread_control(
    start_daemon: StartDaemon, processes: Processes, marker: str, quota_cgroup: Path
) -> None:
    if len(CPUS) < 2:
        pytest.skip("needs 2 CPUs: a mask wider than the quota")
    daemon = start_daemon(rules=marked_rule(marker, "numpy", cpus=len(CPUS)))
    procs = quota_cgroup / "cgroup.procs"

    def into_quota() -> None:  # in the child, before exec: its every thread is under it
        procs.write_text(str(os.getpid()))

    job = processes.python(
        NUMPY,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=CLEAN,
        preexec_fn=into_quota,
    )
    assert job.stdout is not None and job.stdout.readline() == b"ready\n"
    daemon.wait_job(job.pid)
    explained = daemon.call("explain", pid=job.pid)
    assert explained["quota"]["cpus"] == 0.5 and explained["mask_cpus"] == len(CPUS)
    assert str(quota_cgroup) in explained["quota"]["source"]
    [said] = [hint for hint in explained["hints"] if "quota" in hint]
    assert (
        f"the pools were sized from the CPU mask ({len(CPUS)} CPUs), not from the quota"
        " (0.5 CPUs)" in said
    )
    assert "OPENBLAS_NUM_THREADS=1" in said
    [blas] = [row for row in explained["layers"] if row["layer"] == "openblas"]
    assert blas["oversized"] and blas["expected"] == 1
    printed = subprocess.run(
        [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), "explain", str(job.pid)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "CPU quota: 0.5 CPUs (cpu.cfs_quota_us=50000, cpu.cfs_period_us=100000" in printed.stdout
