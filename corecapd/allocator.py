"""Which cores a job gets. Pure: the current holdings in, one grant out.

Free cores first; when the pool runs out, the least loaded ones, and the grant says so.
A user's jobs together never hold more distinct cores than the user's cap.

With a `Topology`, the free cores are chosen together: on one NUMA node where the job fits
(else one package, else the fewest nodes), whole physical cores before single SMT siblings.
With `allowed` (the process's cgroup cpuset: Slurm, Kubernetes, a container), nothing outside
it is granted.

After a restart, `keep` says whether the cores a job held before (its fence, or its mask)
are still a grant `allocate` could make; only then does the job keep them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from corecapd.cpulist import format_cpulist
from corecapd.topology import Topology


@dataclass(frozen=True)
class Holding:
    user: str
    cpus: frozenset[int]


@dataclass(frozen=True)
class Grant:
    cpus: frozenset[int]
    shared: bool  # some of these cores are also held by other jobs
    notes: tuple[str, ...]  # why the grant is smaller than asked, shared, or spread over nodes


def allocate(
    requested: int,
    user: str,
    eligible: frozenset[int],
    holdings: Iterable[Holding],
    user_cap: int | None,
    topology: Topology | None = None,
    allowed: frozenset[int] | None = None,
) -> Grant:
    """Grant up to `requested` cores out of `eligible` (online minus reserved) and `allowed`."""
    pool = _pool(eligible, allowed, topology)
    load, user_held = _load(pool, eligible, user, holdings)
    size, headroom, notes = _size(requested, user, pool, eligible, allowed, user_cap, user_held)

    # Free cores first (all of them are new to the user), as many as size and cap allow.
    free = sorted(pool - load.keys())
    fresh = min(size, headroom, len(free))
    # (a uniform host skips the topology work: ~30 us of the exec path's ~500 us, measured)
    chosen = (
        _pick_free(fresh, free, topology) if topology and not topology.uniform else free[:fresh]
    )
    headroom -= fresh

    # Then the least loaded; among equals the user's own cores (they count against no cap),
    # then those on the NUMA nodes the grant already uses, then id.
    near = {topology.by_id[cpu].node for cpu in chosen} if topology else set()

    def rank(cpu: int) -> tuple[int, bool, bool, int]:
        far = topology is not None and topology.by_id[cpu].node not in near
        return (load[cpu], cpu not in user_held, far, cpu)

    for cpu in sorted(pool.difference(free), key=rank):
        if len(chosen) == size:
            break
        if cpu not in user_held:
            if headroom == 0:
                continue
            headroom -= 1
        chosen.append(cpu)

    if len(chosen) < size:
        # Only with a cpuset: the cap is used up, partly by the user's cores outside it.
        why = (
            f"user {user} already holds its cap of {user_cap} CPUs"
            f" ({format_cpulist(user_held)}), {len(chosen) or 'none'} of them within the"
            f" job's cpuset ({format_cpulist(pool)})"
        )
        if not chosen:  # a job cannot run on nothing
            chosen = [min(pool, key=lambda cpu: (load[cpu], cpu))]
            why += ": granted 1 CPU beyond the cap"
        notes.append(why)

    cpus = frozenset(chosen)
    shared = any(load[c] for c in cpus)
    if shared:
        busy = format_cpulist(c for c in cpus if load[c])
        notes.append(f"no free CPUs left: sharing the least loaded ({busy})")
    return Grant(cpus=cpus, shared=shared, notes=tuple(notes + _spread(cpus, topology)))


def keep(
    cpus: frozenset[int],
    requested: int,
    user: str,
    eligible: frozenset[int],
    holdings: Iterable[Holding],
    user_cap: int | None,
    topology: Topology | None = None,
    allowed: frozenset[int] | None = None,
    shared_before: frozenset[int] = frozenset(),
) -> Grant | str:
    """`cpus`, which the job held before the daemon restarted (its fence, or its mask), as
    its grant now, when `allocate` could have made it: inside the eligible CPUs and `allowed`,
    of the size `allocate` would grant, within the user's cap, and sharing cores with other
    holdings only as far as `allocate` would have to (no free core left for it) -- except the
    cores in `shared_before`, which it shared with other jobs before the restart. Else why
    not, for the job's notes; the caller then allocates afresh. Where it lies on the NUMA
    nodes is not judged: a job is not moved for that."""
    try:
        pool = _pool(eligible, allowed, topology)
    except ValueError as err:
        return str(err)
    outside = cpus - pool
    if outside:
        where = "eligible" if allowed is None else "eligible and within its cpuset"
        return f"CPUs {format_cpulist(outside)} are not {where} now"
    load, user_held = _load(pool, eligible, user, holdings)
    size, headroom, notes = _size(requested, user, pool, eligible, allowed, user_cap, user_held)
    if len(cpus) != size:
        return f"that is {len(cpus)} CPUs, and its grant now is {size}"
    if len(cpus - user_held) > headroom:
        return f"user {user} would hold more than its cap of {user_cap} CPUs"
    free = pool - load.keys()
    fresh = min(size, headroom, len(free))  # the free cores `allocate` would take
    unjustified = (cpus & load.keys()) - shared_before
    if len(unjustified) > size - fresh:
        return (
            f"it would share CPUs {format_cpulist(unjustified)} with other jobs while"
            f" CPUs {format_cpulist(free - cpus)} are free"
        )
    busy = format_cpulist(c for c in cpus if load[c])
    if busy:
        notes.append(f"kept across a restart, sharing CPUs {busy} with other jobs")
    return Grant(cpus=cpus, shared=bool(busy), notes=tuple(notes + _spread(cpus, topology)))


def _load(
    pool: frozenset[int], eligible: frozenset[int], user: str, holdings: Iterable[Holding]
) -> tuple[Counter[int], set[int]]:
    """How many holdings use each CPU of the pool, and the eligible CPUs `user` holds."""
    load: Counter[int] = Counter()
    user_held: set[int] = set()
    for holding in holdings:
        load.update(holding.cpus & pool)
        if holding.user == user:
            user_held |= holding.cpus & eligible
    return load, user_held


def _size(
    requested: int,
    user: str,
    pool: frozenset[int],
    eligible: frozenset[int],
    allowed: frozenset[int] | None,
    user_cap: int | None,
    user_held: set[int],
) -> tuple[int, int, list[str]]:
    """How many CPUs a grant has, how many of them may be new to the user (its headroom
    under its cap), and why the size is smaller than asked."""
    notes: list[str] = []
    size = requested
    if size > len(pool):
        size = len(pool)
        if allowed is None or pool == eligible:
            why = f"are eligible ({format_cpulist(pool)})"
        else:
            why = (
                f"of the eligible CPUs ({format_cpulist(eligible)}) are within the job's"
                f" cpuset ({format_cpulist(allowed)})"
            )
        notes.append(f"asked for {requested} CPUs, only {len(pool)} {why}")
    headroom = len(pool)  # cores the user does not hold yet that this job may take
    if user_cap is not None:
        if size > user_cap:
            size = user_cap
            notes.append(f"user {user} is capped at {user_cap} CPUs")
        headroom = max(0, user_cap - len(user_held))
    return size, headroom, notes


def _spread(cpus: frozenset[int], topology: Topology | None) -> list[str]:
    if topology is not None:
        nodes = {topology.by_id[cpu].node for cpu in cpus}
        if len(nodes) > 1:
            return [f"spread over NUMA nodes {format_cpulist(nodes)}"]
    return []


def _pool(
    eligible: frozenset[int], allowed: frozenset[int] | None, topology: Topology | None
) -> frozenset[int]:
    """The CPUs this job may get at all: eligible, and inside its cpuset if it has one."""
    if not eligible:
        raise ValueError("no eligible CPUs to allocate from")
    if topology is not None and not eligible <= topology.online:
        raise ValueError(
            f"eligible CPUs {format_cpulist(eligible - topology.online)} are not in the"
            f" topology (online CPUs {format_cpulist(topology.online)})"
        )
    if allowed is None:
        return eligible
    pool = eligible & allowed
    if not pool:
        raise ValueError(
            f"none of the eligible CPUs ({format_cpulist(eligible)}) is within the job's"
            f" cpuset ({format_cpulist(allowed) or 'empty'})"
        )
    return pool


class _FreeCore(NamedTuple):
    cpus: list[int]  # its free CPUs, ascending
    whole: bool  # all its siblings are free


def _pick_free(count: int, free: list[int], topology: Topology) -> list[int]:
    """`count` of the `free` CPUs, on as few NUMA nodes as fit, whole cores first."""
    if not count:
        return []
    free_set = frozenset(free)
    cores_in: defaultdict[int, list[_FreeCore]] = defaultdict(list)  # node -> its free cores
    for siblings in topology.cores.values():  # in order of their first CPU
        here = sorted(siblings & free_set)
        if here:
            node = topology.by_id[here[0]].node  # siblings share a node
            cores_in[node].append(_FreeCore(here, len(here) == len(siblings)))

    chosen: list[int] = []
    for node in _home_nodes(count, cores_in, topology):
        chosen += _take(count - len(chosen), cores_in[node])
    return chosen


def _home_nodes(count: int, cores_in: dict[int, list[_FreeCore]], topology: Topology) -> list[int]:
    """The nodes to fill, in order: the best-fitting node that holds `count` free CPUs;
    else the nodes of the best-fitting package that does, largest first; else all nodes,
    largest first (the fewest nodes)."""
    free_in = {node: sum(len(core.cpus) for core in cores) for node, cores in cores_in.items()}
    whole_wanted = (
        count - count % topology.threads_per_core
    )  # the CPUs that could come as whole cores
    fits = [node for node, free in free_in.items() if free >= count]
    if fits:

        def fit(node: int) -> tuple[bool, int, int]:
            whole = sum(len(core.cpus) for core in cores_in[node] if core.whole)
            return (whole < whole_wanted, free_in[node], node)

        return [min(fits, key=fit)]

    package_of = {node: topology.by_id[min(topology.nodes[node])].package for node in free_in}
    free_per_package: Counter[int] = Counter()
    for node, free in free_in.items():
        free_per_package[package_of[node]] += free
    packages = [package for package, free in free_per_package.items() if free >= count]
    nodes = list(free_in)
    if packages:
        home = min(packages, key=lambda package: (free_per_package[package], package))
        nodes = [node for node in nodes if package_of[node] == home]
    return sorted(nodes, key=lambda node: (-free_in[node], node))


def _take(need: int, cores: list[_FreeCore]) -> list[int]:
    """`need` CPUs from one node's free cores: whole cores that fit entirely, then cores
    already partly busy (so no whole core is split while a broken one would do), then the
    remaining whole cores."""
    taken: list[int] = []
    whole_left: list[_FreeCore] = []
    for core in (core for core in cores if core.whole):
        if len(core.cpus) <= need - len(taken):
            taken += core.cpus
        else:
            whole_left.append(core)
    broken = sorted((core for core in cores if not core.whole), key=lambda c: -len(c.cpus))
    for core in broken + whole_left:
        taken += core.cpus[: need - len(taken)]
    return taken
