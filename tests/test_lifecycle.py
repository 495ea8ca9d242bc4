"""A process's life as the kernel has it, not as it looks: a process ends with its last
thread, not with its main thread; and a daemon that is stopped says so.

Real daemon, real processes: a small C program whose main thread calls pthread_exit while a
worker thread runs on (legal with pthreads: the leader is a zombie in /proc/PID/stat while
the process runs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from conftest import CPUSET, Daemon, Processes, StartDaemon, thread_affinities, wait_for

LEADER_EXITS = textwrap.dedent(
    r"""
    /* argv: SECONDS [widen]. The worker runs SECONDS; main exits after 0.5 s. With "widen",
       the worker sets its own mask to every online CPU 1 s after main exited, once. */
    #define _GNU_SOURCE
    #include <pthread.h>
    #include <sched.h>
    #include <stdlib.h>
    #include <string.h>
    #include <time.h>
    #include <unistd.h>
    static double seconds; static int widen;
    static double now(void) {
        struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9;
    }
    static void *worker(void *arg) {
        double start = now();
        while (now() - start < seconds) {
            if (widen && now() - start > 1.5) {
                cpu_set_t all; CPU_ZERO(&all);
                for (int c = 0; c < sysconf(_SC_NPROCESSORS_ONLN); c++) CPU_SET(c, &all);
                sched_setaffinity(0, sizeof all, &all); widen = 0;
            }
            usleep(20000);
        }
        return NULL;
    }
    int main(int argc, char **argv) {
        seconds = atof(argv[1]); widen = argc > 2 && strcmp(argv[2], "widen") == 0;
        pthread_t t; pthread_create(&t, NULL, worker, NULL);
        usleep(500000);
        pthread_exit(NULL);
    }
    """
)


@pytest.fixture(scope="module")
def leader_exits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The program, named python3 so that the default `exe` criterion matches it."""
    where = tmp_path_factory.mktemp("leader-exits")
    (where / "leader_exits.c").write_text(LEADER_EXITS)
    binary = where / "python3"
    subprocess.run(
        ["gcc", "-O2", "-pthread", "-o", str(binary), str(where / "leader_exits.c")], check=True
    )
    return binary


def leader_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def cpuset_of_threads(pid: int) -> set[str]:
    paths = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        if leader_state(pid) != "Z" or int(tid) != pid:
            paths.add(Path(f"/proc/{pid}/task/{tid}/cpuset").read_text().strip())
    return paths


def run_without_leader(
    processes: Processes, binary: Path, daemon: Daemon, *args: str
) -> subprocess.Popen[bytes]:
    job = processes.run([str(binary), "6", *args, processes.marker])
    daemon.wait_job(job.pid)
    wait_for(lambda: leader_state(job.pid) == "Z", 5, "the main thread to exit")
    return job


@pytest.mark.parametrize("backend", ["cgroup1", "affinity"])
def test_a_job_whose_main_thread_exits_stays_confined_until_its_last_thread_ends(
    start_daemon: StartDaemon, processes: Processes, leader_exits: Path, backend: str
) -> None:
    daemon = start_daemon(daemon={"backend": backend})
    job = run_without_leader(processes, leader_exits, daemon)
    grant = set(daemon.wait_job(job.pid)["cpus"])
    assert len(grant) == 1
    for _ in range(10):  # a second of scans (0.1 s) with the leader a zombie
        listed = daemon.job(job.pid)
        assert listed is not None and set(listed["cpus"]) == grant, daemon.log()
        live = {t: m for t, m in thread_affinities(job.pid).items() if t != job.pid}
        assert live and all(mask == grant for mask in live.values()), live
        if backend == "cgroup1":
            fence = f"/corecap-test-{processes.marker}/job-"
            assert all(path.startswith(fence) for path in cpuset_of_threads(job.pid))
        time.sleep(0.1)
    assert not daemon.events("job-ended"), daemon.log()

    job.wait(timeout=15)  # the worker ends: now the process ends
    ended = daemon.wait_event("job-ended", pid=str(job.pid))
    assert ended["reason"] == "exited"
    assert not daemon.events("job-ended", pid=str(job.pid))[1:]
    if backend == "cgroup1":
        ours = CPUSET / f"corecap-test-{processes.marker}"
        wait_for(lambda: not list(ours.glob("job-*")), 5, "the fence to be removed")


def test_a_thread_that_widens_its_mask_after_its_leader_exited_is_set_back(
    start_daemon: StartDaemon, processes: Processes, leader_exits: Path
) -> None:
    daemon = start_daemon(daemon={"backend": "affinity"})
    job = run_without_leader(processes, leader_exits, daemon, "widen")
    grant = set(daemon.wait_job(job.pid)["cpus"])
    escape = daemon.wait_event("escape", pid=str(job.pid), timeout=10)
    assert escape["escaped_threads"] == "1"
    live = {t: m for t, m in thread_affinities(job.pid).items() if t != job.pid}
    assert live and all(mask == grant for mask in live.values())


def test_a_multithreaded_job_that_exits_ends_at_its_exit_event(
    start_daemon: StartDaemon, processes: Processes
) -> None:
    # exit() from main with threads running: the leader's exit event comes while the
    # others are being killed; the job must end from the event, not wait for a scan.
    daemon = start_daemon(daemon={"scan_interval": 30.0})
    job = processes.python(
        """
        import sys, threading, time
        for _ in range(4):
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        sys.stdin.readline()
        """,
        stdin=subprocess.PIPE,
    )
    daemon.wait_job(job.pid)
    assert job.stdin is not None
    job.stdin.close()
    job.wait(timeout=10)
    daemon.wait_event("job-ended", pid=str(job.pid), timeout=5)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_by_signal_is_reported_with_the_jobs_left_fenced(
    start_daemon: StartDaemon, processes: Processes, stop_signal: signal.Signals
) -> None:
    daemon = start_daemon()
    job = processes.python("import time; time.sleep(60)")
    grant = set(daemon.wait_job(job.pid)["cpus"])
    daemon.signal(stop_signal)
    assert daemon.process.wait(timeout=10) == 0
    stopped = daemon.events("daemon-stopped")
    assert len(stopped) == 1, daemon.log()
    assert stopped[0]["reason"] == stop_signal.name and stopped[0]["jobs"] == "1"
    assert all(mask == grant for mask in thread_affinities(job.pid).values())
