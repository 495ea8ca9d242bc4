"""A cgroup v2 CPU quota (`cpu.max`) read for a diagnosis, against a real systemd and a pure
cgroup v2 kernel. Guest side of the VM tier (tests/vm/vm.sh); the cgroup v1 quota is tested
on the host (tests/test_diagnosis_live.py).

A process in a transient scope with `CPUQuota=50%` (systemd writes `cpu.max` = "50000
100000"): its quota is read from its cgroup, the diagnosis says that the pools were sized
from the CPU mask, not from the quota. The scope is stopped by its name, also on failure.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from guestkit import GUEST_ONLY, PYTHON, sh, wait_for

pytestmark = GUEST_ONLY

UNIT = f"cctest-quota-{uuid.uuid4().hex[:10]}.scope"


def test_a_cpu_max_quota_is_read_and_said_to_be_no_thread_control() -> None:
    from corecapd.attribution import StackAttributor
    from corecapd.diagnosis import Evidence, JobFacts, ThreadLayer, diagnose
    from corecapd.quota import cpu_quota

    job = subprocess.Popen(
        [
            *("systemd-run", "--scope", "--quiet", f"--unit={UNIT}", "-p", "CPUQuota=50%"),
            *(PYTHON, "-c", "import sys; sys.stdin.read()"),
        ],
        stdin=subprocess.PIPE,
    )
    try:
        cgroup = Path(f"/proc/{job.pid}/cgroup")
        wait_for(lambda: UNIT in cgroup.read_text(), f"PID {job.pid} in {UNIT}")
        quota = cpu_quota(job.pid)
        assert quota is not None and quota.cpus == 0.5
        assert quota.source.startswith("cpu.max=50000 100000 in /sys/fs/cgroup/")
        assert UNIT in quota.source
        mask = len(os.sched_getaffinity(job.pid))
        threads = tuple(
            ThreadLayer(job.pid, t.tid, t.comm, t.layer.value, t.runtime, t.library, t.evidence)
            for t in StackAttributor().attribute(job.pid).threads
        )
        assert [thread.layer for thread in threads] == ["main"]
        facts = JobFacts(mask, len(threads), 14, False, None, ())
        diagnosis = diagnose(facts, Evidence({}, threads, mask, quota))
        [said] = diagnosis.hints
        assert f"sized from the CPU mask ({mask} CPUs), not from the quota (0.5 CPUs)" in said
        assert not diagnosis.oversized  # one thread: no pool, and no fix named
    finally:
        job.kill()
        job.wait(timeout=30)
        sh("systemctl", "stop", UNIT, check=False)
