"""Real TensorFlow: a default Keras fit, confined by a rule, stays within the derived budget."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import Processes, StartDaemon, marked_rule

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
