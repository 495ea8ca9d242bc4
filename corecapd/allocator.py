"""Which cores a job gets. Pure: the current holdings in, one grant out.

Free cores first; when the pool runs out, the least loaded ones, and the grant says so.
A user's jobs together never hold more distinct cores than the user's cap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from corecapd.cpulist import format_cpulist


@dataclass(frozen=True)
class Holding:
    user: str
    cpus: frozenset[int]


@dataclass(frozen=True)
class Grant:
    cpus: frozenset[int]
    shared: bool  # some of these cores are also held by other jobs
    notes: tuple[str, ...]  # why the grant is smaller than asked, or shared


def allocate(
    requested: int,
    user: str,
    eligible: frozenset[int],
    holdings: Iterable[Holding],
    user_cap: int | None,
) -> Grant:
    """Grant up to `requested` cores out of `eligible` (online minus reserved)."""
    if not eligible:
        raise ValueError("no eligible CPUs to allocate from")
    load: Counter[int] = Counter()
    user_held: set[int] = set()
    for holding in holdings:
        load.update(holding.cpus & eligible)
        if holding.user == user:
            user_held |= holding.cpus & eligible

    notes: list[str] = []
    size = requested
    if size > len(eligible):
        size = len(eligible)
        notes.append(
            f"asked for {requested} CPUs, only {len(eligible)} are eligible"
            f" ({format_cpulist(eligible)})"
        )
    new_allowed = len(eligible)
    if user_cap is not None:
        if size > user_cap:
            size = user_cap
            notes.append(f"user {user} is capped at {user_cap} CPUs")
        new_allowed = max(0, user_cap - len(user_held))

    # Least loaded first; among equals the user's own cores (they count against no cap), then id.
    chosen: list[int] = []
    for cpu in sorted(eligible, key=lambda c: (load[c], c not in user_held, c)):
        if len(chosen) == size:
            break
        if cpu not in user_held:
            if new_allowed == 0:
                continue
            new_allowed -= 1
        chosen.append(cpu)

    cpus = frozenset(chosen)
    shared = any(load[c] for c in cpus)
    if shared:
        busy = format_cpulist(c for c in cpus if load[c])
        notes.append(f"no free CPUs left: sharing the least loaded ({busy})")
    return Grant(cpus=cpus, shared=shared, notes=tuple(notes))
