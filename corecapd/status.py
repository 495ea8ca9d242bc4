"""What `status` and `violations` answer, as JSON-ready data. Pure."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict
from typing import Any

from corecapd.effects import JobView, Snapshot


def status_document(
    snapshot: Snapshot,
    mode: str,
    backend: str,
    policy_source: str,
    now: float,
    daemon_facts: Mapping[str, Any],
) -> dict[str, Any]:
    jobs = snapshot.jobs
    return {
        "host": {
            "mode": mode,
            "backend": backend,
            "policy": policy_source,
            "online_cpus": sorted(snapshot.online_cpus),
            "reserved_cpus": sorted(snapshot.reserved_cpus),
            "eligible_cpus": sorted(snapshot.eligible_cpus),
            "jobs": len(jobs),
            "violations": sum(1 for job in jobs if job.violating),
            **daemon_facts,
        },
        "jobs": [
            {
                "pid": job.pid,
                "parent": job.parent,  # the enclosing job's PID for a sub-job; else None
                "user": job.user,
                "rule": job.rule,
                "cpus": sorted(job.cpus),
                "threads": job.threads,
                "budget": job.budget.threads,
                "budget_basis": job.budget.basis,
                "cpu_percent": round(job.cpu_percent, 1),
                "state": "violation" if job.violating else "ok",
                "age": round(now - job.started_at, 1),
                "tensorflow": job.tensorflow,
                "pids": sorted(job.pids),
                "members": members_document(job),
                "notes": list(job.notes),
            }
            for job in jobs
        ],
    }


def members_document(job: JobView) -> list[dict[str, Any]]:
    """Every process of the job, root first (`effects.Member`)."""
    return [asdict(member) for member in job.members]


def violations_document(snapshot: Snapshot) -> list[dict[str, Any]]:
    return [asdict(record) for record in snapshot.violations]


def latency_summary(samples_us: Collection[float]) -> dict[str, float] | None:
    """count, p50, p99 and max of latencies in microseconds; None before the first."""
    if not samples_us:
        return None
    ordered = sorted(samples_us)
    middle = len(ordered) // 2  # the median from the sorted list: `statistics` costs the
    # daemon 0.8 MB of RSS (decimal, fractions) for this one use
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {
        "count": len(ordered),
        "p50": round(median, 1),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "max": round(ordered[-1], 1),
    }


def grant_document(job: JobView, enforced: bool) -> dict[str, Any]:
    """The answer to `register`: what the job got, and what it should run."""
    settings = job.settings
    return {
        "pid": job.pid,
        "rule": job.rule,
        "cpus": sorted(job.cpus),
        "settings": None if settings is None else settings.pools(),
        "budget": job.budget.threads,
        "budget_basis": job.budget.basis,
        "notes": list(job.notes),
        "enforced": enforced,
    }
