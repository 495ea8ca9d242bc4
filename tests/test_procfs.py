"""The /proc reader against real processes, including ones that vanish."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import wait_for

from corecapd.procfs import (
    MAX_CMDLINE,
    READ_SIZE,
    SCAN_BREAK,
    ProcessGone,
    ProcFS,
    Scanner,
    online_cpus,
)


def test_a_huge_command_line_is_read_only_as_far_as_rules_look() -> None:
    """A job chooses its arguments, up to ARG_MAX: the exec path reads the first
    MAX_CMDLINE bytes (and a read beyond), not megabytes."""
    argv = ["/bin/sh", "-c", "read line", "sh", "MARKER", *["x" * 1000] * 1000]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        # the new program's arguments show once the exec is through (vfork'd children)
        cmdline = wait_for(lambda: ProcFS().identity(child.pid).cmdline, 5, "the exec")
        assert cmdline[:5] == ("/bin/sh", "-c", "read line", "sh", "MARKER")
        assert sum(len(arg) + 1 for arg in cmdline) <= MAX_CMDLINE + READ_SIZE
    finally:
        child.kill()
        child.wait()


def test_sample_and_identity_of_this_process() -> None:
    procfs = ProcFS()
    sample = procfs.sample(os.getpid())
    assert sample.key.pid == os.getpid() and sample.ppid == os.getppid()
    assert sample.threads == len(os.listdir(f"/proc/{os.getpid()}/task"))
    assert not sample.kernel_thread
    identity = procfs.identity(os.getpid())
    assert identity.uid == os.geteuid() and identity.user == "root" and "root" in identity.groups
    assert os.path.realpath(identity.exe) == os.path.realpath(sys.executable)
    assert identity.cmdline[0].endswith(("python", "python3", "pytest")) or identity.cmdline


def test_identity_of_another_user_with_a_long_command_line() -> None:
    """Effective ids and every group from status; a command line longer than one read."""
    import grp
    import pwd

    long_argument = "x" * 3 * READ_SIZE
    child = subprocess.Popen(
        ["/bin/sh", "-c", "read line", "sh", long_argument, "tail"],  # nobody may run it
        stdin=subprocess.PIPE,
        user=65534,
        group=65534,
        extra_groups=[100],
    )
    try:
        identity = ProcFS().identity(child.pid)
        assert identity.cmdline[-2:] == (long_argument, "tail")
        assert (identity.uid, identity.user) == (65534, pwd.getpwuid(65534).pw_name)
        assert identity.groups == {grp.getgrgid(65534).gr_name, grp.getgrgid(100).gr_name}
    finally:
        child.kill()
        child.wait()


def test_the_exec_paths_identity_is_read_again_by_the_next_look() -> None:
    """The exec path reads who a process is, and its parent, before the stat file; what it
    read stands for that look only (the process may have exec'd again in between)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"  # exec'd
        procfs = ProcFS()
        identity, ppid = procfs.identity_and_parent(child.pid)
        assert ppid == os.getpid() and identity == procfs.identity(child.pid)
        scanner = Scanner(procfs)
        stale = replace(identity, cmdline=("python3", "an-earlier-program"))
        first = scanner.observe(child.pid, identity=stale)
        assert first is not None and first.identity == stale
        again = scanner.observe(child.pid)
        assert again is not None and again.identity == identity
        cached = scanner.observe(child.pid)  # verified now: the same object, from the cache
        assert cached is not None and cached.identity is again.identity
    finally:
        child.kill()
        child.wait()


def test_comm_with_spaces_and_parentheses_parses() -> None:
    procfs = ProcFS()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, ctypes; open('/proc/self/comm','w').write('a) (b c'); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        import time

        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/comm").read_text().strip() != "a) (b c":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sample = procfs.sample(child.pid)
        assert sample.ppid == os.getpid() and sample.threads == 1
    finally:
        child.kill()
        child.wait()


def test_a_vanished_process_is_process_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    procfs = ProcFS()
    for read in (procfs.sample, procfs.identity, procfs.libraries, procfs.thread_ids):
        with pytest.raises(ProcessGone):
            read(child.pid)


def test_zombie_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    import time

    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        with pytest.raises(ProcessGone):
            ProcFS().sample(child.pid)
    finally:
        child.wait()


def test_kernel_threads_are_flagged_and_left_out_of_scans() -> None:
    procfs = ProcFS()
    kthreadd = procfs.sample(2)  # PID 2 is kthreadd on Linux
    assert kthreadd.kernel_thread
    assert all(key.pid != 2 for key in Scanner(procfs).scan(frozenset()))


def test_libraries_of_a_numpy_process() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import numpy, sys; print(1, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline()
        libraries = ProcFS().libraries(child.pid)
        assert any("openblas" in name for name in libraries), libraries
        assert not any("tensorflow" in name for name in libraries)
    finally:
        child.kill()
        child.wait()


def test_scanner_reads_libraries_only_when_asked() -> None:
    scanner = Scanner(ProcFS())
    first = scanner.scan(frozenset())
    me = next(key for key in first if key.pid == os.getpid())
    assert first[me].libraries is None
    second = scanner.scan(frozenset({me}))
    libraries = second[me].libraries
    assert libraries is not None and any("libc" in name for name in libraries)
    assert scanner.scan(frozenset())[me].libraries == second[me].libraries  # remembered


def test_a_scan_breaks_for_the_exec_path_every_few_processes() -> None:
    scanning = Scanner(ProcFS()).scanning(frozenset())
    breaks = 0
    while True:
        try:
            next(scanning)
        except StopIteration as done:
            seen = done.value
            break
        breaks += 1
    assert len(seen) // SCAN_BREAK <= breaks <= len(os.listdir("/proc")) // SCAN_BREAK + 1


def test_online_cpus_matches_the_kernel() -> None:
    assert online_cpus() == frozenset(range(os.cpu_count() or 1)) or online_cpus()
    assert os.sched_getaffinity(0) <= online_cpus()


@pytest.mark.parametrize(
    ("version", "path", "expected"),
    [
        (1, "/", None),
        (1, "/corecap/job-1-2", None),  # our own fence is no outer bound
        (1, "/slurm/uid_1000/job_7", frozenset({2, 3})),
        (2, "/", None),
        (2, "/kubepods.slice/pod1/ctr", frozenset({4, 5})),  # the nearest cpuset ancestor
    ],
)
def test_cpuset_bounds_from_synthetic_trees(
    tmp_path: Path, version: int, path: str, expected: frozenset[int] | None
) -> None:
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cpuset").write_text(path + "\n")
    (proc / "stat").write_text("btime 1\n")
    if version == 1:
        leaf = cgroups / "cpuset" / path.lstrip("/")
        leaf.mkdir(parents=True, exist_ok=True)
        (cgroups / "cpuset" / "cpuset.cpus").write_text("0-7\n")
        (leaf / "cpuset.effective_cpus").write_text("2-3\n")
    else:
        leaf = cgroups / path.lstrip("/")
        leaf.mkdir(parents=True, exist_ok=True)
        (cgroups / "kubepods.slice").mkdir(exist_ok=True)
        (cgroups / "kubepods.slice" / "cpuset.cpus.effective").write_text("4-5\n")
    procfs = ProcFS(root=proc, cgroup_root=cgroups)
    assert procfs.cpuset_cpus(42) == expected


def test_cpuset_of_this_process_on_this_machine() -> None:
    assert ProcFS().cpuset_cpus(os.getpid()) in (None, frozenset(os.sched_getaffinity(0)))


@pytest.mark.parametrize(
    "path",
    [
        "/corecap/job-1-2",
        "/system.slice/corecapd.service/corecap/job-1-2",
        "/corecap.slice/corecap-1-2.scope",
    ],
)
def test_our_own_fences_are_no_outer_bound(tmp_path: Path, path: str) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cpuset").write_text(path + "\n")
    (tmp_path / "stat").write_text("btime 1\n")
    assert ProcFS(root=tmp_path, cgroup_root=tmp_path / "none").cpuset_cpus(7) is None
