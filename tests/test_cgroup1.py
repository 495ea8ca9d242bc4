"""The cgroup v1 cpuset fence, against this machine's real cpuset hierarchy."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import CPUSET, Processes, StartDaemon, remove_cgroup, sitecustomize_env, wait_for

from corecapd.daemon import FENCE_TIDY_AFTER, FenceWorker
from corecapd.enforcement import (
    AffinityBackend,
    Cgroup1Backend,
    Host,
    NoBackend,
    cgroupfs,
    choose_backend,
)
from corecapd.procfs import ProcFS, online_cpus

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = [
    pytest.mark.skipif(not (CPUSET / "cpuset.cpus").is_file(), reason="no cgroup v1 cpuset"),
    pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs"),
]
JOB_CPU = CPUS[-1]


@pytest.fixture
def host(marker: str) -> Iterator[Host]:
    name = f"corecap-test-{marker}"
    yield Host(ProcFS(), online_cpus(), cgroup=name)
    remove_cgroup(CPUSET / name)


def cpuset_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cpuset").read_text().strip()


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def make_cpuset(path: Path) -> Path:
    """A cpuset at `path` holding the last CPU and every memory node (as a previous daemon,
    Slurm or a container would have made it)."""
    path.mkdir()
    (path / "cpuset.cpus").write_text(str(JOB_CPU))
    (path / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
    return path


def test_confine_moves_the_whole_process_and_release_removes_everything(
    host: Host, processes: Processes
) -> None:
    backend = Cgroup1Backend(host)
    assert backend.problem() is None
    job = processes.python(
        "import threading, sys; [threading.Thread(target=sys.stdin.read, daemon=True).start()"
        " for _ in range(4)]; sys.stdin.read()",
        stdin=subprocess.PIPE,
    )
    wait_for(lambda: len(os.listdir(f"/proc/{job.pid}/task")) == 5)
    assert backend.confine("1-2", [job.pid], frozenset({JOB_CPU})) == 1
    fence = CPUSET / host.cgroup / "job-1-2"
    assert cpuset_of(job.pid) == f"/{host.cgroup}/job-1-2"
    assert (fence / "cpuset.cpus").read_text().strip() == str(JOB_CPU)
    tasks = (fence / "tasks").read_text().split()
    assert len(tasks) == 5  # one write to cgroup.procs moved every thread
    assert all(os.sched_getaffinity(int(t)) == {JOB_CPU} for t in tasks)
    assert backend.confine("1-2", [job.pid], frozenset({JOB_CPU})) == 0  # idempotent
    assert backend.adopt() == {"1-2": frozenset({JOB_CPU})}

    backend.release("1-2", [job.pid])
    assert cpuset_of(job.pid) == "/"
    assert not fence.exists()
    assert (CPUSET / host.cgroup).exists()  # kept for the next job: a run of short jobs
    backend.tidy()  # ... until the fence work is idle
    assert not (CPUSET / host.cgroup).exists()


def test_a_fence_removed_behind_our_back_is_set_up_again(host: Host, processes: Processes) -> None:
    """Later confines of a job read nothing of its fence (every scan confines every job);
    a move that finds the fence gone makes it again, subtree and all."""
    backend = Cgroup1Backend(host)
    first = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    assert backend.confine("1-2", [first.pid], frozenset({JOB_CPU})) == 1
    (CPUSET / "cgroup.procs").write_text(str(first.pid))  # an admin's clean-up, by hand
    (CPUSET / host.cgroup / "job-1-2").rmdir()
    (CPUSET / host.cgroup).rmdir()
    second = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    assert backend.confine("1-2", [first.pid, second.pid], frozenset({JOB_CPU})) == 2
    assert cpuset_of(second.pid) == f"/{host.cgroup}/job-1-2"
    assert (CPUSET / host.cgroup / "job-1-2" / "cpuset.cpus").read_text().strip() == str(JOB_CPU)
    backend.release("1-2", [first.pid, second.pid])
    backend.tidy()
    assert not (CPUSET / host.cgroup).exists()


@pytest.mark.parametrize("half_made", ["subtree", "fence", "both", "narrow subtree"])
def test_confine_completes_what_a_crash_left_half_made(
    host: Host, processes: Processes, half_made: str
) -> None:
    """A kill -9 between mkdir and the writes of cpuset.cpus / cpuset.mems leaves them
    empty (the kernel then refuses the job's CPUs: EACCES, or the process: ENOSPC); the
    subtree may also hold fewer CPUs than a job needs now. Setting up repairs all of it."""
    subtree = CPUSET / host.cgroup
    subtree.mkdir()
    if half_made in ("fence", "narrow subtree"):
        cpus = str(CPUS[0]) if half_made == "narrow subtree" else ",".join(map(str, CPUS))
        (subtree / "cpuset.cpus").write_text(cpus)
        (subtree / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
    if half_made in ("fence", "both"):
        (subtree / "job-1-2").mkdir()
    job = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    backend = Cgroup1Backend(host)
    if half_made != "narrow subtree":
        assert backend.adopt() == ({"1-2": frozenset()} if half_made != "subtree" else {})
    assert backend.confine("1-2", [job.pid], frozenset({JOB_CPU})) == 1
    assert cpuset_of(job.pid) == f"/{host.cgroup}/job-1-2"
    assert (subtree / "job-1-2" / "cpuset.cpus").read_text().strip() == str(JOB_CPU)
    assert (subtree / "job-1-2" / "cpuset.mems").read_text().strip()
    assert os.sched_getaffinity(job.pid) == {JOB_CPU}
    assert backend.adopt() == {"1-2": frozenset({JOB_CPU})}
    backend.release("1-2", [job.pid])
    backend.tidy()
    assert not subtree.exists()


def test_a_run_of_short_jobs_reuses_emptied_cpusets(host: Host, processes: Processes) -> None:
    """An ended job's cpuset is renamed to a spare and renamed again for the next job (a
    rename for a mkdir and two writes): the next job's fence is the same directory, with
    its own CPUs written when they differ, and no spare ever holds a process."""
    subtree = CPUSET / host.cgroup
    backend = Cgroup1Backend(host)
    first = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    assert backend.confine("1-2", [first.pid], frozenset({JOB_CPU})) == 1
    made = (subtree / "job-1-2").stat().st_ino
    backend.release("1-2", [])  # its process lives on: it must leave the cpuset first
    assert cpuset_of(first.pid) == "/"
    spares = [path for path in subtree.iterdir() if path.name.startswith("spare-")]
    assert len(spares) == 1 and not (spares[0] / "cgroup.procs").read_text().split()

    second = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    assert backend.confine("3-4", [second.pid], frozenset({JOB_CPU})) == 1
    assert (subtree / "job-3-4").stat().st_ino == made  # renamed, not made again
    assert not any(path.name.startswith("spare-") for path in subtree.iterdir())
    assert cpuset_of(second.pid) == f"/{host.cgroup}/job-3-4"
    assert backend.adopt() == {"3-4": frozenset({JOB_CPU})}

    backend.release("3-4", [second.pid])
    other = frozenset({CPUS[0]})
    assert backend.confine("5-6", [first.pid], other) == 1  # a spare of other CPUs
    assert (subtree / "job-5-6" / "cpuset.cpus").read_text().strip() == str(CPUS[0])
    assert os.sched_getaffinity(first.pid) == other
    backend.release("5-6", [first.pid])
    backend.tidy()
    assert not subtree.exists()


def test_tidy_removes_the_spares_a_previous_daemon_left(host: Host) -> None:
    subtree = make_cpuset(CPUSET / host.cgroup)
    (subtree / "spare-7").mkdir()
    (subtree / "job-3-4").mkdir()  # a job's: adopted, or not yet, it stays
    backend = Cgroup1Backend(host)
    backend.tidy()
    assert not (subtree / "spare-7").exists()
    assert (subtree / "job-3-4").is_dir()


def test_adopt_lists_only_job_cpusets(host: Host) -> None:
    subtree = make_cpuset(CPUSET / host.cgroup)
    (subtree / "not-a-job").mkdir()
    (subtree / "job-3-4").mkdir()
    (subtree / "job-3-4" / "cpuset.cpus").write_text(str(JOB_CPU))
    assert Cgroup1Backend(host).adopt() == {"3-4": frozenset({JOB_CPU})}


def test_the_job_cannot_widen_its_own_mask(host: Host, processes: Processes) -> None:
    backend = Cgroup1Backend(host)
    job = processes.python(
        "import os, sys; sys.stdin.readline();"
        f" os.sched_setaffinity(0, {set(CPUS)!r}); print(sorted(os.sched_getaffinity(0)))",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    backend.confine("3-4", [job.pid], frozenset({JOB_CPU}))
    out, _ = job.communicate(b"go\n", timeout=30)
    assert json.loads(out) == [JOB_CPU]  # the kernel narrows any mask to the cpuset


def test_a_process_in_another_cpuset_is_left_in_it(
    host: Host, processes: Processes, marker: str
) -> None:
    outer = CPUSET / f"corecap-test-outer-{marker}"
    outer.mkdir()
    try:
        (outer / "cpuset.cpus").write_text(",".join(map(str, CPUS)))
        (outer / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
        job = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
        (outer / "cgroup.procs").write_text(str(job.pid))
        assert Cgroup1Backend(host).confine("5-6", [job.pid], frozenset({JOB_CPU})) == 0
        assert cpuset_of(job.pid) == f"/corecap-test-outer-{marker}"
    finally:
        processes.end_all()
        remove_cgroup(outer)


def test_choice_of_backend(host: Host, tmp_path: Path) -> None:
    chosen, why = choose_backend("auto", host)
    assert isinstance(chosen, Cgroup1Backend) and why.startswith("auto")
    assert isinstance(choose_backend("affinity", host)[0], AffinityBackend)
    nowhere = Host(host.procfs, host.online_cpus, cgroup_root=tmp_path)
    assert isinstance(choose_backend("auto", nowhere)[0], AffinityBackend)
    assert "not cgroup1: no cgroup v1 cpuset hierarchy" in choose_backend("auto", nowhere)[1]
    with pytest.raises(NoBackend, match=r"daemon\.backend = 'cgroup1' cannot work here"):
        choose_backend("cgroup1", nowhere)


def test_daemon_fences_jobs_and_cleans_up_after_them(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(daemon={"reserved_cpus": str(CPUS[0]), "backend": "cgroup1"})
    host = daemon.status()["host"]
    assert (
        host["backend"].startswith("affinity + cgroup1") and host["backend_reason"] == "configured"
    )
    job = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    daemon.wait_job(job.pid)
    subtree = f"corecap-test-{marker}"
    wait_for(lambda: cpuset_of(job.pid).startswith(f"/{subtree}/job-{job.pid}-"))
    assert job.stdin is not None
    job.stdin.close()
    job.wait(timeout=10)
    daemon.wait_event("job-ended", pid=str(job.pid))
    wait_for(lambda: not (CPUSET / subtree).exists(), what="the fence removed")


def test_a_restarted_daemon_removes_fences_whose_job_is_gone(
    start_daemon: StartDaemon, marker: str
) -> None:
    subtree = make_cpuset(CPUSET / f"corecap-test-{marker}")
    stale = make_cpuset(subtree / "job-4194000-1")  # no such process
    start_daemon(daemon={"backend": "cgroup1"})
    wait_for(lambda: not stale.exists(), what="the stale fence removed")


@pytest.fixture
def outer_cpuset(marker: str) -> Iterator[Path]:
    """A cpuset standing for Slurm's or a container's, holding only the last CPU."""
    outer = make_cpuset(CPUSET / f"corecap-test-outer-{marker}")
    yield outer
    remove_cgroup(outer)


def enter(cpuset: Path) -> Callable[[], None]:
    """For preexec_fn: the child is born inside `cpuset`, before any scan can see it."""

    def join() -> None:
        (cpuset / "cgroup.procs").write_text(str(os.getpid()))

    return join


def test_grants_stay_inside_a_cpuset_someone_else_set(
    start_daemon: StartDaemon, processes: Processes, outer_cpuset: Path
) -> None:
    daemon = start_daemon(daemon={"backend": "cgroup1", "exec_events": False})
    job = processes.python(
        "import sys; sys.stdin.read()", stdin=subprocess.PIPE, preexec_fn=enter(outer_cpuset)
    )
    granted = daemon.wait_job(job.pid)
    # Free-first by id would pick CPU 0; its cpuset allows only the last CPU.
    assert granted["cpus"] == [JOB_CPU]
    assert cpuset_of(job.pid) == f"/{outer_cpuset.name}"  # never moved out of it
    processes.end_all()


# sitecustomize for the daemon under test: the first `cmdline` search over the job's command
# line is cut off by its timeout, as `regex` cuts one whose thread's CPU time jumped (a VM's
# steal time; QEMU's TCG, which runs one vCPU at a time); every other search is left alone.
CUT_OFF_ONCE = """
import regex

_compile = regex.compile


class CutOffOnce:
    def __init__(self, pattern):
        self._pattern = pattern
        self._cut = False

    def search(self, string, *args, **kwargs):
        if not self._cut and MARKER in string and "timeout" in kwargs:
            self._cut = True
            raise TimeoutError("regex timed out")
        return self._pattern.search(string, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pattern, name)


def compile(pattern, *args, **kwargs):
    compiled = _compile(pattern, *args, **kwargs)
    return CutOffOnce(compiled) if pattern == MARKER else compiled


regex.compile = compile
"""


def test_a_job_whose_cmdline_search_was_cut_off_by_chance_is_still_placed(
    start_daemon: StartDaemon,
    processes: Processes,
    outer_cpuset: Path,
    marker: str,
    tmp_path: Path,
) -> None:
    """A `cmdline` search cut off by `matching.CMDLINE_TIMEOUT` by chance is tried again:
    the VM tier's corecapd missed short jobs so (2 in ~200 there), each exec read, no rule
    matched, the process left alone for good. Born in a cpuset someone else set (as a job
    in the VM's cgroup v2, where the cpuset controller is on for system.slice), the job is
    matched once on the exec path, by `admit`, not ahead of it."""
    hook = sitecustomize_env(tmp_path, f"MARKER = {marker!r}\n{CUT_OFF_ONCE}")
    daemon = start_daemon(env=hook, daemon={"backend": "cgroup1"})
    job = processes.python(
        "import sys; sys.stdin.read()", stdin=subprocess.PIPE, preexec_fn=enter(outer_cpuset)
    )
    assert daemon.wait_job(job.pid)["cpus"] == [JOB_CPU]
    assert cpuset_of(job.pid) == f"/{outer_cpuset.name}"
    processes.end_all()


def test_a_cpuset_of_reserved_cpus_only_keeps_the_job_in_it(
    start_daemon: StartDaemon, processes: Processes, outer_cpuset: Path
) -> None:
    daemon = start_daemon(
        daemon={"backend": "cgroup1", "exec_events": False, "reserved_cpus": str(JOB_CPU)}
    )
    job = processes.python(
        "import sys; sys.stdin.read()", stdin=subprocess.PIPE, preexec_fn=enter(outer_cpuset)
    )
    granted = daemon.wait_job(job.pid)
    assert granted["cpus"] == [JOB_CPU]
    assert any("left in its own cpuset" in note for note in granted["notes"])
    processes.end_all()


def run_fence_worker(host: Host, scenario: Callable[[FenceWorker], Awaitable[None]]) -> list[str]:
    """Run `scenario` with a started FenceWorker over the real backend on a real event
    loop; close the worker (its tidy) after it, also on failure. The errors it reported."""
    errors: list[str] = []

    async def main() -> None:
        worker = FenceWorker(Cgroup1Backend(host), lambda job, error: errors.append(error))
        worker.start(asyncio.get_running_loop())
        try:
            await scenario(worker)
        finally:
            await asyncio.to_thread(worker.close)

    asyncio.run(main())
    return errors


def test_fence_work_is_handed_over_once_the_callback_returns(
    host: Host, processes: Processes
) -> None:
    """The thread gets a callback's fence work as one batch after the callback: it runs
    while the loop waits for events, not beside the callback (both want the GIL)."""
    job = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)

    async def scenario(worker: FenceWorker) -> None:
        worker.confine("1-2", [job.pid], frozenset({JOB_CPU}))
        time.sleep(0.3)  # this callback goes on: the thread has nothing yet
        assert cpuset_of(job.pid) == "/"
        await asyncio.sleep(0)  # the callback returned: the batch is handed over
        await asyncio.to_thread(worker.drain, 10)
        assert cpuset_of(job.pid) == f"/{host.cgroup}/job-1-2"
        worker.release("1-2", [])  # the daemon stops at once: the release is not lost

    assert run_fence_worker(host, scenario) == []
    assert cpuset_of(job.pid) == "/"
    assert not (CPUSET / host.cgroup).exists()  # released at close, then tidied


def test_a_release_is_done_with_the_next_job_or_when_the_work_is_idle(
    host: Host, processes: Processes
) -> None:
    """A job's end wakes no thread: its release is done before the next batch (the next
    job reuses its cpuset), or once the work has been idle FENCE_TIDY_AFTER, with the tidy
    (so a job's fence is gone within that of its end), also when the thread had tidied up
    and waits for nothing."""
    subtree = CPUSET / host.cgroup
    first = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    second = processes.python("import sys; sys.stdin.read()", stdin=subprocess.PIPE)

    async def done(worker: FenceWorker) -> None:
        await asyncio.sleep(0)
        await asyncio.to_thread(worker.drain, 10)

    async def scenario(worker: FenceWorker) -> None:
        worker.confine("7-8", [first.pid], frozenset({JOB_CPU}))
        worker.release("7-8", [])  # a job that ended in the callback that placed it
        await done(worker)
        assert cpuset_of(first.pid) == "/"  # in order: in, then out
        assert not (subtree / "job-7-8").exists()

        worker.confine("1-2", [first.pid], frozenset({JOB_CPU}))
        await done(worker)
        made = (subtree / "job-1-2").stat().st_ino
        worker.release("1-2", [])
        worker.confine("3-4", [second.pid], frozenset({JOB_CPU}))
        await done(worker)
        assert cpuset_of(first.pid) == "/"  # the release came first: out, then reused
        assert (subtree / "job-3-4").stat().st_ino == made
        assert not (subtree / "job-1-2").exists()

        worker.release("3-4", [])  # the last job: gone, subtree and all, once idle
        await asyncio.sleep(0)
        bound = FENCE_TIDY_AFTER + 0.5
        await asyncio.to_thread(wait_for, lambda: not subtree.exists(), bound, "tidied")
        assert cpuset_of(second.pid) == "/"

        worker.confine("5-6", [first.pid], frozenset({JOB_CPU}))  # made afresh
        await done(worker)
        await asyncio.sleep(FENCE_TIDY_AFTER * 2)  # idle, tidied: the thread waits
        worker.release("5-6", [])
        await asyncio.to_thread(wait_for, lambda: not subtree.exists(), bound, "tidied again")
        assert cpuset_of(first.pid) == "/"

    assert run_fence_worker(host, scenario) == []


def test_release_moves_out_every_process_of_a_crowded_cpuset(host: Host) -> None:
    """The kernel gives a page of cgroup.procs per read (~800 PIDs here): a cpuset that
    holds more is read to the end, and every process leaves before it is kept as a spare."""
    crowd = subprocess.Popen(
        ["sh", "-c", "for i in $(seq 1000); do sleep 600 & done; echo ready; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert crowd.stdout is not None and crowd.stdout.readline() == b"ready\n"
        backend = Cgroup1Backend(host)
        backend.confine("1-2", [crowd.pid], frozenset({JOB_CPU}))
        fence = CPUSET / host.cgroup / "job-1-2"
        sleeps = [
            int(pid)
            for pid in os.listdir("/proc")
            if pid.isdigit() and parent_of(int(pid)) == crowd.pid
        ]
        for pid in sleeps:  # as if each had been born inside
            (fence / "cgroup.procs").write_text(str(pid))
        fd = os.open(fence / "cgroup.procs", os.O_RDONLY)
        try:
            one_read = os.read(fd, 65536)
        finally:
            os.close(fd)
        assert len(one_read.split()) < len(cgroupfs.procs(fence)) == 1001
        backend.release("1-2", [])
        assert all(cpuset_of(pid) == "/" for pid in [crowd.pid, *sleeps])
    finally:
        os.killpg(crowd.pid, signal.SIGKILL)
        crowd.wait()
