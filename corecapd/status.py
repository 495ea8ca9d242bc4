"""What `status` and `violations` answer, as JSON-ready data. Pure."""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping
from dataclasses import asdict
from typing import Any

from corecapd.core import Job, JobTable


def status_document(
    table: JobTable,
    mode: str,
    backend: str,
    policy_source: str,
    now: float,
    daemon_facts: Mapping[str, Any],
) -> dict[str, Any]:
    jobs = sorted(table.jobs.values(), key=lambda job: job.started_at)
    return {
        "host": {
            "mode": mode,
            "backend": backend,
            "policy": policy_source,
            "online_cpus": sorted(table.online_cpus),
            "reserved_cpus": sorted(table.policy.daemon.reserved_cpus & table.online_cpus),
            "eligible_cpus": sorted(table.eligible_cpus),
            "jobs": len(jobs),
            "violations": sum(1 for job in jobs if job.violation.active),
            **daemon_facts,
        },
        "jobs": [
            {
                "pid": job.pid,
                "user": job.user,
                "rule": job.rule.name,
                "cpus": sorted(job.cpus),
                "threads": job.threads,
                "budget": job.budget.threads,
                "budget_basis": job.budget.basis,
                "cpu_percent": round(job.cpu_percent, 1),
                "state": "violation" if job.violation.active else "ok",
                "age": round(now - job.started_at, 1),
                "tensorflow": job.tensorflow,
                "pids": sorted(key.pid for key in job.members),
                "notes": list(job.notes),
            }
            for job in jobs
        ],
    }


def violations_document(table: JobTable) -> list[dict[str, Any]]:
    return [asdict(record) for record in table.violations]


def latency_summary(samples_us: Collection[float]) -> dict[str, float] | None:
    """count, p50, p99 and max of latencies in microseconds; None before the first."""
    if not samples_us:
        return None
    ordered = sorted(samples_us)
    return {
        "count": len(ordered),
        "p50": round(statistics.median(ordered), 1),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "max": round(ordered[-1], 1),
    }


def grant_document(job: Job, enforced: bool) -> dict[str, Any]:
    """The answer to `register`: what the job got, and what it should run."""
    settings = job.settings
    return {
        "pid": job.pid,
        "rule": job.rule.name,
        "cpus": sorted(job.cpus),
        "settings": None if settings is None else settings.pools(),
        "budget": job.budget.threads,
        "budget_basis": job.budget.basis,
        "notes": list(job.notes),
        "enforced": enforced,
    }
