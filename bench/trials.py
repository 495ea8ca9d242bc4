"""Per-epoch time of 2 concurrent trials, with and without corecap (issue 15, item 3).

Two trials of the seed Keras model (Dense(64) on random (10000, 20), batch 32) run at the
same time, as a hyperparameter search runs them, each timing its own epochs:

- without corecap: `python trial.py` twice, TensorFlow's defaults: each sizes its pools to
  the 2 CPUs it sees, both on the same 2 CPUs;
- with corecap: `corecap run --cpus 1 -- python trial.py` twice, against a corecapd this
  script starts (its own socket, `backend = "affinity"`, registrations only: `rules = []`):
  each gets a core of its own and pools of 1.

Per repeat, each trial's median epoch time (its first epoch, which builds the graph, left
out) and the ratio of the slower trial's to the faster's (1.0 = a fair comparison); over
repeats the median and min-max of both, and every epoch's time within a trial as its
spread (max/min). Needs root (it starts corecapd).

    .venv/bin/python bench/trials.py [--repeats 5] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TRIAL = """
import json, os, sys, time
barrier, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
if os.environ.get("CORECAP_CPUS"):
    import corecapd
    corecapd.register()  # the grant `corecap run` left in CORECAP_*
import numpy as np, tensorflow as tf
model = tf.keras.Sequential([
    tf.keras.Input((20,)), tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(1),
])
model.compile(optimizer="adam", loss="mse")
x, y = np.random.rand(10000, 20), np.random.rand(10000, 1)
times = []
class Clock(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.began = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        times.append(time.perf_counter() - self.began)
open(f"{barrier}/{os.getpid()}", "w").close()  # both trials train at the same time
while len(os.listdir(barrier)) < 2:
    time.sleep(0.01)
model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[Clock()])
json.dump({"epochs": times, "intra": tf.config.threading.get_intra_op_parallelism_threads(),
           "affinity": sorted(os.sched_getaffinity(0))}, open(out, "w"))
"""


def pair(scratch: Path, epochs: int, corecap: Path | None) -> list[dict[str, Any]]:
    """Runs 2 trials at once; returns each one's epoch times, TF intra setting and mask."""
    barrier = Path(tempfile.mkdtemp(dir=scratch))
    trial = scratch / "trial.py"
    trial.write_text(TRIAL)
    outputs = [barrier.with_name(f"{barrier.name}-{i}.json") for i in range(2)]
    children = []
    for out in outputs:
        argv = [sys.executable, str(trial), str(barrier), str(out), str(epochs)]
        if corecap is not None:
            argv = [sys.executable, "-m", "corecapd.launcher", "run", "--cpus", "1",
                    "--socket", str(corecap), "--", *argv]  # fmt: skip
        children.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
    for child in children:
        if child.wait(timeout=600) != 0:
            raise RuntimeError(f"a trial failed: exit {child.returncode}")
    return [json.loads(out.read_text()) for out in outputs]


def start_daemon(scratch: Path) -> tuple[subprocess.Popen[bytes], Path]:
    socket = scratch / "corecap.sock"
    policy = scratch / "policy.toml"
    policy.write_text(
        "rules = []\n[daemon]\n"
        f'mode = "enforce"\nbackend = "affinity"\nreserved_cpus = ""\nsocket = "{socket}"\n'
        f'state_dir = "{scratch / "state"}"\nscan_interval = 0.5\n'
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "corecapd.daemon", "--config", str(policy)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not socket.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("corecapd did not start")
        time.sleep(0.05)
    return daemon, socket


def main() -> None:
    parser = argparse.ArgumentParser(description="Per-epoch time of 2 concurrent trials")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corecap-trials-") as name:
        scratch = Path(name)
        daemon, socket = start_daemon(scratch)
        try:
            results: dict[str, list[list[dict[str, Any]]]] = {"without": [], "with": []}
            for _ in range(args.repeats):  # alternated: a drift in the host weighs on both
                results["without"].append(pair(scratch, args.epochs, None))
                results["with"].append(pair(scratch, args.epochs, socket))
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    print(
        f"2 concurrent trials, {args.epochs} epochs each (first left out), {args.repeats} repeats"
    )
    print(f"{'corecap':8} {'epoch s, median (min-max)':28} {'slower/faster':22} "
          f"{'within-trial max/min':22} {'intra':6} masks")  # fmt: skip
    for condition, repeats in results.items():
        medians, ratios, within = [], [], []
        for trials in repeats:
            per_trial = [statistics.median(t["epochs"][1:]) for t in trials]
            medians += per_trial
            ratios.append(max(per_trial) / min(per_trial))
            within += [max(t["epochs"][1:]) / min(t["epochs"][1:]) for t in trials]
        last = repeats[-1]
        print(
            f"{condition:8} {_spread(medians):28} {_spread(ratios):22} {_spread(within):22}"
            f" {','.join(str(t['intra']) for t in last):6}"
            f" {' '.join(str(t['affinity']) for t in last)}"
        )


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    main()
