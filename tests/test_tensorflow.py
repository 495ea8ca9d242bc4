"""Real TensorFlow: a default Keras fit, confined by a rule, stays within the derived budget."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import Processes, StartDaemon, marked_rule

from corecapd.diagnosis import THREADING_VARIABLES

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tensorflow

LAST_CPU = max(os.sched_getaffinity(0))

# The seed example: Dense(64) on random (10000, 20), default threading settings.
SEED_FIT = """
import json, os, sys, time
deadline = time.monotonic() + 20
while len(os.sched_getaffinity(0)) != 1 and time.monotonic() < deadline:
    time.sleep(0.01)  # corecapd confines us within a scan; TF must start confined
import numpy as np, tensorflow as tf
model = tf.keras.Sequential([
    tf.keras.Input((20,)), tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(1),
])
model.compile(optimizer="adam", loss="mse")
model.fit(np.random.rand(10000, 20), np.random.rand(10000, 1), epochs=3, verbose=0)
tasks = os.listdir("/proc/self/task")
print(json.dumps({
    "threads": len(tasks),
    "masks": sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in tasks}),
}), flush=True)
"""


def test_default_keras_fit_confined_to_one_cpu_is_within_budget(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(
        daemon={"reserved_cpus": str(min(os.sched_getaffinity(0)))},
        defaults={"grace": 1.0, "violation_after": 1, "thread_slack": 8},
        rules=marked_rule(marker, "keras", cpus=1),
    )
    job = processes.python(SEED_FIT, stdout=subprocess.PIPE)
    out, _ = job.communicate(timeout=240)
    assert job.returncode == 0
    result = json.loads(out)
    assert result["masks"] == [[LAST_CPU]]  # every TF thread on the granted core
    started = daemon.events("job-started", pid=str(job.pid))
    assert started and started[0]["cpus"] == str(LAST_CPU)
    ended = daemon.wait_event("job-ended", pid=str(job.pid))
    # TensorFlow was seen in maps: the budget is the TF formula for 1 CPU, 6 + 7 + 8 slack.
    assert ended["budget"] == "21"
    assert daemon.events("violation-started", pid=str(job.pid)) == []


REGISTERED_FIT = """
import json, os, sys
import corecapd
plan = corecapd.register(cpus=1)            # before `import tensorflow`
import numpy as np, tensorflow as tf
model = tf.keras.Sequential([
    tf.keras.Input((20,)), tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(1),
])
model.compile(optimizer="adam", loss="mse")
data = tf.data.Dataset.from_tensor_slices((np.random.rand(10000, 20), np.random.rand(10000, 1)))
data = data.batch(32).with_options(plan.data_options())
model.fit(data, epochs=3, verbose=0, callbacks=[plan.keras_callback()])
tasks = os.listdir("/proc/self/task")
print(json.dumps({
    "intra": tf.config.threading.get_intra_op_parallelism_threads(),
    "inter": tf.config.threading.get_inter_op_parallelism_threads(),
    "masks": sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in tasks}),
    "manifest": plan.manifest(),
}), flush=True)
sys.stdin.read()
"""


def test_registered_seed_example_on_one_cpu(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(
        daemon={"reserved_cpus": str(min(os.sched_getaffinity(0)))},
        defaults={"grace": 1.0, "violation_after": 1},
        rules=marked_rule(marker, "keras", cpus=2),
    )
    job = processes.python(
        REGISTERED_FIT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, CORECAP_SOCKET=str(daemon.socket)),
    )
    assert job.stdout is not None
    result = json.loads(job.stdout.readline())
    assert (result["intra"], result["inter"]) == (1, 1)
    assert result["masks"] == [[LAST_CPU]]
    manifest = result["manifest"]
    assert len(manifest["epoch_threads"]) == 3
    assert manifest["settings"] == {"intra_op": 1, "inter_op": 1, "data_workers": 1, "blas": 1}
    explained = daemon.call("explain", pid=job.pid)
    assert [e["epoch"] for e in explained["epochs"]] == [0, 1, 2]
    assert explained["declared"]["intra_op"] == 1
    assert daemon.events("violation-started", pid=str(job.pid)) == []


OVERSIZED_TF = """
import json, os, sys, time
deadline = time.monotonic() + 20
while len(os.sched_getaffinity(0)) != 1 and time.monotonic() < deadline:
    time.sleep(0.01)
import numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(16)
tf.config.threading.set_inter_op_parallelism_threads(16)
model = tf.keras.Sequential([tf.keras.Input((20,)), tf.keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
model.fit(np.random.rand(10000, 20), np.random.rand(10000, 1), epochs=1000, verbose=0)
"""


def test_tensorflow_pools_of_16_on_one_core_are_diagnosed(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(
        daemon={"reserved_cpus": str(min(os.sched_getaffinity(0)))},
        defaults={"grace": 1.0, "violation_after": 2},
        rules=marked_rule(marker, "keras", cpus=1),
    )
    job = processes.python(OVERSIZED_TF)
    onset = daemon.wait_event("violation-started", timeout=120, pid=str(job.pid))
    assert int(onset["threads"]) > int(onset["budget"]) == 21
    assert "TensorFlow intra-op pool" in onset["diagnosis"]
    assert "set_intra_op_parallelism_threads(1)" in onset["diagnosis"]
    explained = daemon.call("explain", pid=job.pid)
    assert any("inter-op pool" in hint for hint in explained["hints"])
    job.kill()


LATE_REGISTRATION = """
import json, os, sys, time, warnings
cpus = int(sys.argv[2])
deadline = time.monotonic() + 20
while len(os.sched_getaffinity(0)) != cpus and time.monotonic() < deadline:
    time.sleep(0.01)  # corecapd confines us within a scan; TF must start confined
import tensorflow as tf
tf.constant(1.0) + 1.0                       # the runtime and its pools exist now
import corecapd
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    plan = corecapd.register(cpus=1, intra_op=1, inter_op=1)
print(json.dumps({
    "warnings": [str(w.message) for w in caught],
    "manifest": plan.manifest(),
    "tensorflow_threads": plan.tensorflow_threads,
}), flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("cpus", [1, 2])
def test_registering_after_tensorflow_started_records_the_pools_it_runs(
    start_daemon: StartDaemon, processes: Processes, marker: str, cpus: int
) -> None:
    if len(os.sched_getaffinity(0)) < cpus:
        pytest.skip(f"needs {cpus} CPUs")
    daemon = start_daemon(rules=marked_rule(marker, "late", cpus=cpus))
    environment = {k: v for k, v in os.environ.items() if k not in THREADING_VARIABLES}
    job = processes.python(
        LATE_REGISTRATION,
        str(cpus),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=environment | {"CORECAP_SOCKET": str(daemon.socket)},
    )
    assert job.stdout is not None
    result = json.loads(job.stdout.readline())
    # Unset, TensorFlow's pools run one thread per CPU it saw at the first op (measured:
    # docs/budgets.md), whatever register() asks for afterwards.
    running = {"intra_op": cpus, "inter_op": cpus}
    [warning] = [w for w in result["warnings"] if "after TensorFlow initialised" in w]
    assert f"they run intra_op={cpus}, inter_op={cpus} threads" in warning
    assert ("not the intra_op=1, inter_op=1 asked for" in warning) == (cpus != 1)
    assert result["tensorflow_threads"] == running
    manifest = result["manifest"]
    assert manifest["tensorflow_initialized_before_register"] is True
    tensorflow = manifest["tensorflow"]
    assert tensorflow["initialized"] is True
    assert {k: tensorflow[k] for k in running} == running
    assert tensorflow["configured"] == {"intra_op": 0, "inter_op": 0}  # TF's "unset"
    assert {k: manifest["settings"][k] for k in running} == running
    # What the daemon got: TF's pools as they run, BLAS as register() left it (1 CPU).
    explained = daemon.call("explain", pid=job.pid)
    layers = {pool["layer"]: pool["threads"] for pool in explained["pools"]}
    assert layers["tensorflow-intra-op"] == cpus and layers["tensorflow-inter-op"] == cpus
    assert layers["openblas"] == 1
    assert {k: explained["declared"][k] for k in running} == running
    status = daemon.wait_job(job.pid)
    assert status["budget_basis"].startswith(f"declared: intra {cpus} + inter {cpus}")
