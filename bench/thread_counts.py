"""Peak thread counts of real workloads per CPU count, against corecap's derived budget.

The measurements behind corecapd/budget.py: each workload runs under a CPU mask of 1..N
CPUs, its thread count (/proc/PID/task) is sampled every 5 ms, and the peak is printed next
to the budget corecapd would derive (without slack, and with the default slack of 8).

    .venv/bin/python bench/thread_counts.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from corecapd.budget import declared_budget, thread_budget
from corecapd.declaration import Declaration, resolve

SEED_FIT = """
import numpy as np, tensorflow as tf
model = tf.keras.Sequential([
    tf.keras.Input((20,)), tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(1),
])
model.compile(optimizer="adam", loss="mse")
model.fit(np.random.rand(10000, 20), np.random.rand(10000, 1), epochs=3, verbose=0)
"""
TF_DATA_FIT = SEED_FIT.replace(
    "model.fit(np.random.rand(10000, 20), np.random.rand(10000, 1), epochs=3, verbose=0)",
    "ds = tf.data.Dataset.from_tensor_slices((np.random.rand(10000, 20), np.random.rand(10000, 1)))"
    ".map(lambda a, b: (a * 2, b), num_parallel_calls=tf.data.AUTOTUNE)"
    ".batch(32).prefetch(tf.data.AUTOTUNE)\nmodel.fit(ds, epochs=3, verbose=0)",
)
# The same, with `corecapd.register` first (standalone: no daemon, so the grant is the mask
# it runs in, or its first CPU with cpus=1).
REGISTERED_FIT = (
    "import os, warnings\nwarnings.simplefilter('ignore')\nimport corecapd\n"
    "corecapd.register(socket='/nonexistent.sock')\n" + SEED_FIT
)
REGISTERED_ONE_CPU_FIT = REGISTERED_FIT.replace("register(", "register(cpus=1, ")
NUMPY_DOT = "import numpy\na = numpy.random.rand(2000, 2000)\nfor _ in range(5): a.dot(a)"

# name: (code, loads TensorFlow, registers)
WORKLOADS = {
    "keras fit (seed example)": (SEED_FIT, True, False),
    "keras fit, registered": (REGISTERED_FIT, True, True),
    "keras fit, registered cpus=1": (REGISTERED_ONE_CPU_FIT, True, True),
    "keras fit on tf.data": (TF_DATA_FIT, True, False),
    "numpy dot (OpenBLAS)": (NUMPY_DOT, False, False),
}


def peak_threads(code: str, cpus: set[int]) -> int:
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, len(os.listdir(f"/proc/{child.pid}/task")))
        except FileNotFoundError:
            break
        time.sleep(0.005)
    if child.wait() != 0:
        raise RuntimeError(f"workload failed with exit code {child.returncode}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    print(f"peak threads, median of {args.repeats} runs, sampled every 5 ms")
    print(f"{'workload':28} {'cpus':>4} {'peak':>5} {'budget':>8} {'+slack 8':>9}")
    for name, (code, tensorflow, registers) in WORKLOADS.items():
        for count in range(1, len(cpus) + 1):
            peaks = [peak_threads(code, set(cpus[:count])) for _ in range(args.repeats)]
            if registers:  # what it declares: every layer sized to the grant
                granted = 1 if "cpus=1" in name else count
                derived = declared_budget(resolve(Declaration(), granted), 0).threads
            else:
                derived = thread_budget(count, tensorflow, None, 0).threads
            print(
                f"{name:28} {count:4d} {statistics.median(peaks):5.0f} {derived:8d}"
                f" {derived + 8:9d}"
            )


if __name__ == "__main__":
    main()
