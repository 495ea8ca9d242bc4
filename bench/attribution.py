"""Accuracy and cost of corecapd/attribution.py on real workloads, against a native unwinder.

Each workload runs as its own process (a Keras fit as is; intra/inter 16; a tf.data private
pool of 16; an AUTOTUNE map; scikit-learn KMeans with OMP_NUM_THREADS=16; numpy's OpenBLAS
matmul; TensorFlow and scikit-learn in one process; the job's own threading.Threads and a
ThreadPoolExecutor). Once it runs steadily:

1. cost: `StackAttributor.attribute(pid)` with an empty symbol cache (cold), then warm, in
   this process: CPU ms (process time) and wall ms, median of the warm runs;
2. pause: a 1 ms sleeper thread in the job records every gap over 3 ms in its own loop; the
   longest gap that overlaps an attribution is the job's longest pause (beside the longest
   gap in the baseline second before, when nothing reads it);
3. truth: gdb attaches (stopping the job), this process attributes the held job, and gdb
   prints every thread's backtrace (`thread apply all bt`, its full native unwind). A
   thread's true layer is its start routine, the frame gdb shows right above
   `start_thread`; for TensorFlow's threads (start routine tsl's `PThread::ThreadFn`) the
   pool is the name TF gave the thread at creation, recorded by an LD_PRELOAD wrapper of
   `pthread_setname_np` (gdb gives the pthread_t it was called with; comm cannot: TF's long
   names are refused by the kernel), since an idle worker's frames are the same in every
   Eigen pool. The attribution taken live just before gdb attached is scored too, on the
   threads that were still there.

Prints, per workload, threads, right, cost and pause; then per-layer precision and recall
over all threads, held and live. Needs root, gdb and gcc (scripts/bootstrap.sh test).

    .venv/bin/python bench/attribution.py [--repeats 1] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from corecapd.attribution import Layer, ProcessEvidence, StackAttributor, SymbolTables
from corecapd.diagnosis import Evidence, JobFacts, ThreadLayer, diagnose

# Records each name TF (or anyone) gives a thread, with the pthread_t it names.
SETNAME_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int pthread_setname_np(pthread_t thread, const char *name) {
    static int (*real)(pthread_t, const char *);
    if (!real) real = (int (*)(pthread_t, const char *))dlsym(RTLD_NEXT, "pthread_setname_np");
    const char *log = getenv("BENCH_THREAD_NAMES");
    if (log) {
        char line[320];
        int n = snprintf(line, sizeof line, "%#lx %s\n", (unsigned long)thread, name);
        int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (fd >= 0) { if (write(fd, line, n) < 0) {} close(fd); }
    }
    return real(thread, name);
}
"""

# Every workload: a 1 ms sleeper that records its gaps; on SIGTERM they go to argv[1].
PRELUDE = """
import json, os, signal, sys, threading, time
_gaps = []
def _sleeper():
    last = time.monotonic()
    while True:
        time.sleep(0.001)
        now = time.monotonic()
        if now - last > 0.003:
            _gaps.append((last, now))
        last = now
threading.Thread(target=_sleeper, daemon=True).start()
def _stop(*_):
    with open(sys.argv[1], "w") as out:
        json.dump(_gaps, out)
    os._exit(0)
signal.signal(signal.SIGTERM, _stop)
"""
KERAS_MODEL = """
import numpy as np, tensorflow as tf
x = np.random.rand(10000, 20).astype("float32")
y = np.random.rand(10000, 1).astype("float32")
model = tf.keras.Sequential([
    tf.keras.Input((20,)), tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(1),
])
model.compile(optimizer="adam", loss="mse")
"""
FIT_FOREVER = """
print("ready", flush=True)
while True:
    model.fit(DATA, epochs=1, steps_per_epoch=STEPS, verbose=0, **FIT)
"""
TF_DATA = """
ds = tf.data.Dataset.from_tensor_slices((x, y)).map(
    lambda a, b: (a * 2.0, b), num_parallel_calls=tf.data.AUTOTUNE
).batch(32).prefetch(tf.data.AUTOTUNE).repeat()
"""
PRIVATE_POOL = """
options = tf.data.Options()
options.threading.private_threadpool_size = 16
ds = ds.with_options(options)
"""
KMEANS = """
import numpy as np
from sklearn.cluster import KMeans
points = np.random.rand(20000, 20)
"""
NUMPY = """
import numpy as np
a = np.random.rand(1000, 1000)
print("ready", flush=True)
while True:
    a.dot(a)
"""
PYTHON_THREADS = """
import concurrent.futures, numpy
stop = threading.Event()
def busy():
    while not stop.is_set():
        sum(range(1000))
waiting = [threading.Thread(target=stop.wait, daemon=True) for _ in range(3)]
for thread in waiting + [threading.Thread(target=busy, daemon=True)]:
    thread.start()
executor = concurrent.futures.ThreadPoolExecutor(4)
print("ready", flush=True)
while True:
    list(executor.map(lambda n: sum(range(n)), [20000] * 8))
    time.sleep(0.01)
"""

# name: (code, extra environment, loads TensorFlow)
WORKLOADS: dict[str, tuple[str, dict[str, str], bool]] = {
    "keras fit (default)": (
        KERAS_MODEL + "DATA, STEPS, FIT = x, None, dict(y=y, batch_size=32)\n" + FIT_FOREVER,
        {},
        True,
    ),
    "keras fit, intra/inter 16": (
        "import tensorflow as tf\n"
        "tf.config.threading.set_intra_op_parallelism_threads(16)\n"
        "tf.config.threading.set_inter_op_parallelism_threads(16)\n"
        + KERAS_MODEL
        + "DATA, STEPS, FIT = x, None, dict(y=y, batch_size=32)\n"
        + FIT_FOREVER,
        {},
        True,
    ),
    "tf.data private pool 16": (
        KERAS_MODEL + TF_DATA + PRIVATE_POOL + "DATA, STEPS, FIT = ds, 10**6, {}\n" + FIT_FOREVER,
        {},
        True,
    ),
    "tf.data AUTOTUNE map": (
        KERAS_MODEL + TF_DATA + "DATA, STEPS, FIT = ds, 10**6, {}\n" + FIT_FOREVER,
        {},
        True,
    ),
    "sklearn KMeans, OMP 16": (
        KMEANS
        + 'print("ready", flush=True)\n'
        + "while True:\n    KMeans(8, n_init=1, max_iter=30).fit(points)\n",
        {"OMP_NUM_THREADS": "16"},
        False,
    ),
    "numpy matmul (OpenBLAS)": (NUMPY, {}, False),
    "TF + sklearn, OMP 16": (
        KERAS_MODEL
        + KMEANS
        + 'print("ready", flush=True)\n'
        + "while True:\n"
        + "    model.fit(x, y, batch_size=32, epochs=1, steps_per_epoch=50, verbose=0)\n"
        + "    KMeans(8, n_init=1, max_iter=10).fit(points)\n",
        {"OMP_NUM_THREADS": "16"},
        True,
    ),
    "threading.Thread + executor": (PYTHON_THREADS, {}, False),
}

Popen = subprocess.Popen[bytes]
TF_INTRA_OP = re.compile(r"^tf_(numa_-?\d+_)?Eigen$")  # tsl ThreadPool "tf_" + LocalDevice's


@dataclass
class Thread:
    """One thread in gdb's snapshot."""

    lwp: int
    pthread: int
    frames: list[str] = field(default_factory=list)


def parse_backtraces(text: str) -> dict[int, Thread]:
    """gdb's `thread apply all bt`: {lwp: thread with its frames, innermost first}."""
    threads: dict[int, Thread] = {}
    current: Thread | None = None
    header = re.compile(r"^Thread \d+ \(Thread (0x[0-9a-f]+) \(LWP (\d+)\)")
    for line in text.splitlines():
        match = header.match(line)
        if match:
            current = Thread(int(match.group(2)), int(match.group(1), 16))
            threads[current.lwp] = current
        elif current is not None and line.startswith("#"):
            current.frames.append(line)
    return threads


def true_layer(thread: Thread, pid: int, names: dict[int, str]) -> tuple[Layer, str]:
    """The layer a full unwind shows (see the module's docstring), and its runtime."""
    if thread.lwp == pid:
        return Layer.MAIN, ""
    starts = [i for i, frame in enumerate(thread.frames) if " start_thread " in frame]
    if not starts or starts[0] == 0:
        return Layer.UNKNOWN, ""
    routine = thread.frames[starts[0] - 1]
    library = re.search(r" from \S*/([^/\s]+)$", routine)
    where = library.group(1) if library else ""
    if "gomp_thread_start" in routine or where.startswith("libgomp"):
        return Layer.OPENMP, "libgomp"
    if "__kmp_launch" in routine:
        return Layer.OPENMP, "Intel libiomp5" if "iomp5" in where else "LLVM libomp"
    if "blas_thread_server" in routine:
        return Layer.OPENBLAS, ""
    if "pythread_wrapper" in routine or "thread_run" in routine:
        return Layer.PYTHON_THREADING, ""
    if "PThread::ThreadFn" in routine:
        name = names.get(thread.pthread, "")
        if TF_INTRA_OP.match(name):
            return Layer.TF_INTRA_OP, ""
        if name == "tf_Compute":
            return Layer.TF_INTER_OP, ""
        if name == "tf_data_private_threadpool":
            return Layer.TF_DATA, "private pool"
        if name.startswith("tf_data") or name == "dataset-memory-logging-thread":
            return Layer.TF_DATA, ""
        return (Layer.OTHER_NATIVE, "TensorFlow") if name else (Layer.UNKNOWN, "")
    return Layer.OTHER_NATIVE, ""


def thread_names(path: Path) -> dict[int, str]:
    """pthread_t -> the last name given to it (a pthread_t is reused after a thread ends)."""
    names = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            handle, _, name = line.partition(" ")
            names[int(handle, 16)] = name
    return names


@dataclass
class Run:
    name: str
    truth: dict[int, tuple[Layer, str]]
    held: ProcessEvidence
    live: ProcessEvidence
    cold_cpu_ms: float
    warm_cpu_ms: float
    warm_wall_ms: float
    attribution_pause_ms: float
    baseline_pause_ms: float
    gdb_pause_s: float
    running: int  # threads that read "running" in /proc/PID/task/TID/syscall, live
    environment: dict[str, str]  # the workload's extra variables (OMP_NUM_THREADS=16)


@contextmanager
def workload(code: str, env: dict[str, str], shim: Path, folder: Path) -> Iterator[Popen]:
    """The workload running, with its threads' names recorded; stopped by PID at the end."""
    names, gaps = folder / "names.txt", folder / "gaps.json"
    for stale in (names, gaps):
        stale.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PRELUDE + code), str(gaps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=os.environ
        | env
        | {"LD_PRELOAD": str(shim), "BENCH_THREAD_NAMES": str(names), "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline() != b"ready\n":
            raise SystemExit(f"the workload did not start: exit code {process.wait()}")
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def longest_gap(gaps: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    """The longest gap (seconds) that overlaps one of `windows`."""
    return max(
        (end - start for start, end in gaps for low, high in windows if start < high and end > low),
        default=0.0,
    )


def running_threads(pid: int) -> int:
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as syscall:
                count += syscall.read().startswith("running")
        except OSError:
            continue
    return count


def measure(name: str, shim: Path, folder: Path, settle: float, warm: int) -> Run:
    code, env, _ = WORKLOADS[name]
    with workload(code, env, shim, folder) as process:
        pid = process.pid
        time.sleep(settle)
        baseline = (time.monotonic() - 1.0, time.monotonic())
        windows = []
        cpu = time.process_time()
        start = time.monotonic()
        StackAttributor(symbols=SymbolTables()).attribute(pid)
        windows.append((start, time.monotonic()))
        cold_cpu = time.process_time() - cpu
        attributor = StackAttributor(symbols=SymbolTables())
        attributor.attribute(pid)
        cpu_times, wall_times = [], []
        for _ in range(warm):
            cpu, start = time.process_time(), time.monotonic()
            live = attributor.attribute(pid)
            wall_times.append(time.monotonic() - start)
            cpu_times.append(time.process_time() - cpu)
            windows.append((start, time.monotonic()))
            time.sleep(0.05)
        running = running_threads(pid)
        held, gdb_pause, text = snapshot(pid, attributor, folder)
        names = thread_names(folder / "names.txt")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    gaps = [
        (float(low), float(high)) for low, high in json.loads((folder / "gaps.json").read_text())
    ]
    threads = parse_backtraces(text)
    truth = {lwp: true_layer(thread, pid, names) for lwp, thread in threads.items()}
    return Run(
        name=name,
        truth=truth,
        held=held,
        live=live,
        cold_cpu_ms=cold_cpu * 1e3,
        warm_cpu_ms=statistics.median(cpu_times) * 1e3,
        warm_wall_ms=statistics.median(wall_times) * 1e3,
        attribution_pause_ms=longest_gap(gaps, windows) * 1e3,
        baseline_pause_ms=longest_gap(gaps, [baseline]) * 1e3,
        gdb_pause_s=gdb_pause,
        running=running,
        environment=env,
    )


def snapshot(
    pid: int, attributor: StackAttributor, folder: Path
) -> tuple[ProcessEvidence, float, str]:
    """gdb stops the job; it is attributed while held; gdb unwinds every thread and
    detaches. Returns the held attribution, how long the job was stopped (s), gdb's output."""
    held, release = folder / "held", folder / "release"
    for stale in (held, release):
        stale.unlink(missing_ok=True)
    started = time.monotonic()
    gdb = subprocess.Popen(
        [
            "gdb", "-p", str(pid), "-batch", "-nx",
            "-ex", "set pagination off", "-ex", "set width 0",
            "-ex", f"shell touch {held}",
            "-ex", f"shell while [ ! -e {release} ]; do sleep 0.01; done",
            "-ex", "thread apply all bt",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        while not held.exists():
            if gdb.poll() is not None:
                raise SystemExit(f"gdb could not attach to {pid}")
            time.sleep(0.01)
        evidence = attributor.attribute(pid)
        release.touch()
        text, _ = gdb.communicate(timeout=600)
    finally:
        if gdb.poll() is None:
            gdb.kill()
            gdb.wait()
    return evidence, time.monotonic() - started, text


def score(
    truth: dict[int, tuple[Layer, str]], evidence: ProcessEvidence
) -> list[tuple[Layer, Layer, bool]]:
    """(true layer, attributed layer, runtime agrees) for the threads both saw."""
    found = {thread.tid: thread for thread in evidence.threads}
    return [
        (layer, found[tid].layer, runtime == found[tid].runtime or layer != Layer.OPENMP)
        for tid, (layer, runtime) in truth.items()
        if tid in found
    ]


def fixes(run: Run, cpus: int) -> tuple[list[str], list[str]]:
    """(layers the diagnosis of the held attribution names a fix for, layers oversized by
    the same rule applied to gdb's true layers), for a job granted `cpus`: each thread's
    library comes from the attribution in both (only the layer is being scored)."""
    held = {thread.tid: thread for thread in run.held.threads}
    pid = run.held.key.pid

    def diagnosed(layers: dict[int, tuple[Layer, str]]) -> list[str]:
        threads = tuple(
            ThreadLayer(pid, tid, "", layer.value, runtime, held[tid].library, "")
            for tid, (layer, runtime) in layers.items()
            if tid in held
        )
        facts = JobFacts(cpus, len(threads), 0, False, None, ())
        found = diagnose(facts, Evidence(run.environment, threads, cpus))
        return [finding.name for finding in found.oversized]

    said = {thread.tid: (thread.layer, thread.runtime) for thread in run.held.threads}
    return diagnosed(said), diagnosed(run.truth)


def print_table(title: str, pairs: list[tuple[Layer, Layer, bool]]) -> None:
    right = sum(true == got and runtime for true, got, runtime in pairs)
    print(
        f"\n{title}: {right}/{len(pairs)} threads right ({100 * right / max(len(pairs), 1):.1f}%)"
    )
    print(f"{'layer':18} {'true':>5} {'said':>5} {'precision':>10} {'recall':>7}")
    for layer in Layer:
        true = sum(t == layer for t, _, _ in pairs)
        said = sum(g == layer for _, g, _ in pairs)
        hits = sum(t == g == layer and ok for t, g, ok in pairs)
        if true or said:
            precision = f"{hits / said:.3f}" if said else "-"
            recall = f"{hits / true:.3f}" if true else "-"
            print(f"{layer.value:18} {true:5} {said:5} {precision:>10} {recall:>7}")
    wrong = Counter((t.value, g.value) for t, g, ok in pairs if t != g or not ok)
    if wrong:
        print("wrong (true -> said):", dict(wrong))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", help="run only the workloads whose name contains this")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds after ready")
    parser.add_argument("--warm", type=int, default=5, help="warm attributions per run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: gdb attaches and /proc/PID/mem is read")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        shim = folder / "setname.so"
        (folder / "setname.c").write_text(SETNAME_SHIM)
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(folder / "setname.c"), "-ldl"],
            check=True,
        )
        print(
            f"{'workload':30} {'threads':>7} {'live':>7} {'held':>4}"
            f" {'cold ms':>8} {'warm ms':>8} {'wall ms':>8} {'running':>7}"
            f" {'pause ms':>8} {'base ms':>7} {'gdb s':>6}"
        )
        for name in WORKLOADS:
            if args.only and args.only not in name:
                continue
            for _ in range(args.repeats):
                run = measure(name, shim, folder, args.settle, args.warm)
                runs.append(run)
                held = score(run.truth, run.held)
                live = score(run.truth, run.live)
                live_right = sum(t == g and ok for t, g, ok in live)
                print(
                    f"{name:30} {len(run.truth):7} {f'{live_right}/{len(live)}':>7}"
                    f" {sum(t == g and ok for t, g, ok in held):4}"
                    f" {run.cold_cpu_ms:8.1f} {run.warm_cpu_ms:8.2f} {run.warm_wall_ms:8.2f}"
                    f" {run.running:7} {run.attribution_pause_ms:8.1f}"
                    f" {run.baseline_pause_ms:7.1f} {run.gdb_pause_s:6.1f}",
                    flush=True,
                )
    print(
        "\nthreads: in gdb's snapshot; live: right / seen both by gdb and by the attribution"
        " taken just before gdb attached (threads come and go in between); held: right, of"
        " the job attributed while gdb held it.\n"
        "cold/warm ms: CPU per attribution of the job (cold: empty symbol cache; warm:"
        " median); wall ms: warm, wall clock; running: threads whose syscall file read"
        " 'running' (no saved stack pointer).\npause ms: the job's longest 1 ms-sleeper gap"
        " overlapping an attribution (base: in the second before); gdb s: how long gdb"
        " stopped the job."
    )
    print_table("live", [pair for run in runs for pair in score(run.truth, run.live)])
    print_table("held by gdb", [pair for run in runs for pair in score(run.truth, run.held)])
    cpus = len(os.sched_getaffinity(0))  # the workloads ran on these: their pools' size
    print(f"\nfixes named, for a job granted the {cpus} CPUs the workloads ran on:")
    print(f"{'workload':30} {'oversized (gdb)':32} {'fix named for':32} {'wrong':>5}")
    wrong_total = 0
    for run in runs:
        named, oversized = fixes(run, cpus)
        wrong = len(set(named) ^ set(oversized))
        wrong_total += wrong
        print(
            f"{run.name:30} {', '.join(oversized) or '-':32} {', '.join(named) or '-':32} {wrong:5}"
        )
    print(f"fixes named for a layer that is not oversized, or missed: {wrong_total}")
    for run in runs:  # what was said, per workload and layer, for the record
        said = Counter(
            (thread.layer.value, thread.runtime, thread.evidence) for thread in run.held.threads
        )
        print(f"\n{run.name}:")
        for (layer, runtime, evidence), count in sorted(said.items()):
            print(f"  {count:3} {layer:17} {runtime:14} {evidence}")


if __name__ == "__main__":
    main()
