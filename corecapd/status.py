"""What `status` and `violations` answer, as JSON-ready data. Pure."""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping
from dataclasses import asdict
from typing import Any

from corecapd.budget import declared_budget, member_budget
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
                "members": members_document(job),
                "notes": list(job.notes),
            }
            for job in jobs
        ],
    }


def members_document(job: Job) -> list[dict[str, Any]]:
    """Every process of the job, root first: what it runs (`kind`: "tensorflow",
    "python", "other", or "registered" for a root that declared its pools), its threads
    at the last scan, and its share of the job's budget without slack (None when the
    rule's `max_threads` is the budget)."""
    settings, rows = job.settings, []
    for key in sorted(job.members, key=lambda k: (k != job.id, k.start_ticks, k.pid)):
        kind = job.kinds.get(key, "other")
        share: int | None = None
        if settings is not None and key == job.id:  # the declaration is the root's
            kind, share = "registered", declared_budget(settings, slack=0).threads
        elif settings is not None or job.rule.max_threads is None:
            share = member_budget(kind, len(job.cpus))
        rows.append(
            {
                "pid": key.pid,
                "kind": kind,
                "threads": job.member_threads.get(key, 0),
                "budget": share,
            }
        )
    return rows


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
