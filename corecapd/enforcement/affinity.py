"""Per-thread CPU affinity: the fast path, and the only fence that works everywhere.

A thread's mask is per TID and new threads inherit their creator's, so every existing
thread is set, and the task list is read again until a pass finds no thread it had not
seen (a thread created during the pass inherits the old mask otherwise). The leader goes
first, before any list: at exec it is the only thread, so one list read then suffices.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from corecapd.cpulist import format_cpulist
from corecapd.enforcement.base import Backend, EnforcementError, Host
from corecapd.procfs import ProcessGone, vanishing

# A job that spawns threads faster than we can set them still converges next scan.
MAX_PASSES = 8
MAX_KNOWN_TIDS = 100_000  # per job, before the record of confined threads starts afresh


class AffinityBackend(Backend):
    name = "affinity"

    def problem(self) -> str | None:
        return None if hasattr(os, "sched_setaffinity") else "no sched_setaffinity on this OS"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        # job -> (its CPUs, the TIDs set to them): a known thread found with another mask
        # was changed by the job itself, an "escape" (a new thread inherits its creator's).
        self._confined: dict[str, tuple[frozenset[int], set[int]]] = {}
        self._escapes: dict[str, int] = {}

    def confine(self, job: str, pids: Sequence[int], cpus: frozenset[int]) -> int:
        granted, known = self._confined.get(job, (cpus, set()))
        if granted != cpus:
            known = set()  # a new grant: the changes now are ours
        seen: set[int] = set()
        changed = [tid for pid in pids for tid in self._set_all_threads(pid, cpus, seen)]
        escaped = sum(1 for tid in changed if tid in known)
        if escaped:
            self._escapes[job] = self._escapes.get(job, 0) + escaped
        self._note(job, cpus, known, seen)
        return len(changed)

    def confined_alone(self, job: str, pid: int, cpus: frozenset[int]) -> None:
        """`confine` for a process that `pin` set and that had no other thread after that
        (its stat file, read after the pin, counts one): the threads it makes inherit the
        mask, so nothing is listed or set, only the books are kept. The exec path's
        common case: listing a new process's threads cost it ~50 us of CPU per job here."""
        granted, known = self._confined.get(job, (cpus, set()))
        self._note(job, cpus, known if granted == cpus else set(), {pid})

    def _note(self, job: str, cpus: frozenset[int], known: set[int], seen: set[int]) -> None:
        self._confined[job] = (cpus, seen if len(known) > MAX_KNOWN_TIDS else known | seen)

    def pin(self, pid: int, cpus: frozenset[int]) -> bool:
        """Set the leader of `pid` now, before its job is known (the exec path: a process
        that just exec'd has no other thread, and the threads it makes inherit the mask);
        `confine` follows, sets any thread made before this, and keeps the books. Whether
        it was set; an error is left for `confine` to raise. No read of the mask first: a
        process that just exec'd has its parent's."""
        try:
            with vanishing(pid):
                os.sched_setaffinity(pid, cpus)
        except (ProcessGone, OSError):
            return False
        return True

    def take_escapes(self) -> dict[str, int]:
        """Threads each job moved out of its mask since the last call (set back already)."""
        escapes, self._escapes = self._escapes, {}
        return escapes

    def release(self, job: str, pids: Sequence[int]) -> None:
        self._confined.pop(job, None)
        self._escapes.pop(job, None)
        # The kernel narrows a mask to the thread's cpuset, so "all online" means "as before".
        for pid in pids:
            self._set_all_threads(pid, self.host.online_cpus, set())

    def adopt(self) -> dict[str, frozenset[int]]:
        """Every process's mask where narrower than the host (job name -> CPUs): without a
        fence, what a previous daemon set is only there. A job can set its own mask too, so
        the core keeps one only when it is a grant it could have made (`allocator.keep`)."""
        masks: dict[str, frozenset[int]] = {}
        for pid in self.host.procfs.pids():
            try:
                with vanishing(pid):
                    mask = frozenset(os.sched_getaffinity(pid))
                    if mask >= self.host.online_cpus:
                        continue  # never narrowed (the commonest): no stat read
                    sample = self.host.procfs.sample(pid)
            except (ProcessGone, PermissionError):
                continue
            if not sample.kernel_thread:  # per-CPU kernel threads are never jobs
                masks[f"{sample.key.pid}-{sample.key.start_ticks}"] = mask
        return masks

    def _set_all_threads(self, pid: int, cpus: frozenset[int], seen: set[int]) -> list[int]:
        """Set every thread of `pid`; the TIDs that had another mask. Adds all to `seen`."""
        changed: list[int] = []
        done: set[int] = set()
        fresh = [pid]  # the leader before the list: a process just exec'd has no other thread
        try:
            for _ in range(MAX_PASSES):
                for tid in fresh:
                    if self._set_thread(pid, tid, cpus):
                        changed.append(tid)
                    done.add(tid)
                fresh = [tid for tid in self.host.procfs.thread_ids(pid) if tid not in done]
                if not fresh:
                    break
        except ProcessGone:
            pass
        seen |= done
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
