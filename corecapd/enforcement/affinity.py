"""Per-thread CPU affinity: the fast path, and the only fence that works everywhere.

A thread's mask is per TID and new threads inherit their creator's, so every existing
thread is set, and the task list is read again until a pass finds no thread it had not
seen (a thread created during the pass inherits the old mask otherwise).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from corecapd.cpulist import format_cpulist
from corecapd.enforcement.base import Backend, EnforcementError
from corecapd.procfs import ProcessGone, vanishing

# A job that spawns threads faster than we can set them still converges next scan.
MAX_PASSES = 8


class AffinityBackend(Backend):
    name = "affinity"

    def problem(self) -> str | None:
        return None if hasattr(os, "sched_setaffinity") else "no sched_setaffinity on this OS"

    def confine(self, job: str, pids: Sequence[int], cpus: frozenset[int]) -> int:
        return sum(self._set_all_threads(pid, cpus) for pid in pids)

    def release(self, job: str, pids: Sequence[int]) -> None:
        # The kernel narrows a mask to the thread's cpuset, so "all online" means "as before".
        for pid in pids:
            self._set_all_threads(pid, self.host.online_cpus)

    def _set_all_threads(self, pid: int, cpus: frozenset[int]) -> int:
        changed = 0
        done: set[int] = set()
        try:
            for _ in range(MAX_PASSES):
                fresh = [tid for tid in self.host.procfs.thread_ids(pid) if tid not in done]
                if not fresh:
                    break
                for tid in fresh:
                    changed += self._set_thread(pid, tid, cpus)
                    done.add(tid)
        except ProcessGone:
            pass
        return changed

    def _set_thread(self, pid: int, tid: int, cpus: frozenset[int]) -> int:
        try:
            with vanishing(pid):
                if os.sched_getaffinity(tid) == cpus:
                    return 0
                os.sched_setaffinity(tid, cpus)
                return 1
        except ProcessGone:
            return 0  # the thread ended; the others still count
        except OSError as err:
            if err.errno == errno.EINVAL:
                allowed = self._allowed(pid)
                raise EnforcementError(
                    f"CPUs {format_cpulist(cpus)} are outside PID {pid}'s cpuset"
                    f" (allowed: {allowed})"
                ) from err
            raise EnforcementError(f"sched_setaffinity on TID {tid} of PID {pid}: {err}") from err

    def _allowed(self, pid: int) -> str:
        try:
            with vanishing(pid):
                status = (self.host.procfs.root / str(pid) / "status").read_text()
        except ProcessGone:
            return "unknown, the process is gone"
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
        return "unknown"
