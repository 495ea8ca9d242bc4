"""The machine's CPU topology: which CPUs share a physical core, a package, a NUMA node.

`Topology` is plain data (online CPUs, each with its core, package and node); SMT siblings,
cores and nodes are derived from it. `read_topology` is the one reader, from sysfs under a
root that tests point at a synthetic tree. `Topology.synthetic` builds the machines tests and
benchmarks need, numbered as the kernel usually numbers them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from corecapd.cpulist import CpuListError, format_cpulist, parse_cpulist

K = TypeVar("K")


class TopologyError(ValueError):
    """sysfs describes a topology we cannot read or that contradicts itself."""


@dataclass(frozen=True)
class Cpu:
    id: int
    core: int  # the kernel's core_id: unique within a package, not across packages
    package: int  # physical_package_id (the socket)
    node: int  # NUMA node


@dataclass(frozen=True)
class Topology:
    cpus: tuple[Cpu, ...]  # the online CPUs, in id order

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.cpus, key=lambda cpu: cpu.id))
        ids = [cpu.id for cpu in ordered]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"CPUs {format_cpulist(twice)} appear more than once in a topology")
        object.__setattr__(self, "cpus", ordered)
        for siblings in self.cores.values():
            nodes = {self.by_id[cpu].node for cpu in siblings}
            if len(nodes) > 1:
                raise ValueError(
                    f"CPUs {format_cpulist(siblings)} share a core but are on NUMA nodes"
                    f" {format_cpulist(nodes)}"
                )

    @cached_property
    def by_id(self) -> Mapping[int, Cpu]:
        return {cpu.id: cpu for cpu in self.cpus}

    @cached_property
    def online(self) -> frozenset[int]:
        return frozenset(self.by_id)

    @cached_property
    def cores(self) -> Mapping[tuple[int, int], frozenset[int]]:
        """(package, core_id) -> the CPUs of that physical core (its SMT siblings)."""
        return _group(((cpu.package, cpu.core), cpu.id) for cpu in self.cpus)

    @cached_property
    def nodes(self) -> Mapping[int, frozenset[int]]:
        return _group((cpu.node, cpu.id) for cpu in self.cpus)

    @cached_property
    def packages(self) -> Mapping[int, frozenset[int]]:
        return _group((cpu.package, cpu.id) for cpu in self.cpus)

    @cached_property
    def threads_per_core(self) -> int:
        """The most SMT siblings any core has (cores may differ: hybrid CPUs, offline CPUs)."""
        return max(map(len, self.cores.values()), default=1)

    @cached_property
    def uniform(self) -> bool:
        """One NUMA node and no SMT: any free CPU is as good as another for a grant."""
        return len(self.nodes) == 1 and self.threads_per_core == 1

    def siblings(self, cpu: int) -> frozenset[int]:
        """The online CPUs sharing `cpu`'s physical core, `cpu` included."""
        known = self.by_id[cpu]
        return self.cores[known.package, known.core]

    @classmethod
    def synthetic(
        cls,
        sockets: int = 1,
        cores_per_socket: int = 4,
        threads_per_core: int = 2,
        numa_per_socket: int = 1,
    ) -> Topology:
        """A regular machine, numbered like Linux on x86: CPU n's sibling is n + total cores.

        Socket s holds cores s * cores_per_socket ...; its cores are split evenly, in order,
        over `numa_per_socket` nodes (sub-NUMA clustering when > 1).
        """
        for name, value in (
            ("sockets", sockets),
            ("cores_per_socket", cores_per_socket),
            ("threads_per_core", threads_per_core),
            ("numa_per_socket", numa_per_socket),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if cores_per_socket % numa_per_socket:
            raise ValueError(
                f"cores_per_socket ({cores_per_socket}) must divide evenly"
                f" into numa_per_socket ({numa_per_socket}) nodes"
            )
        total_cores = sockets * cores_per_socket
        cores_per_node = cores_per_socket // numa_per_socket
        return cls(
            tuple(
                Cpu(
                    id=thread * total_cores + socket * cores_per_socket + core,
                    core=core,
                    package=socket,
                    node=socket * numa_per_socket + core // cores_per_node,
                )
                for thread in range(threads_per_core)
                for socket in range(sockets)
                for core in range(cores_per_socket)
            )
        )


def _group(pairs: Iterable[tuple[K, int]]) -> Mapping[K, frozenset[int]]:
    groups: defaultdict[K, set[int]] = defaultdict(set)
    for key, cpu in pairs:
        groups[key].add(cpu)
    return {key: frozenset(cpus) for key, cpus in groups.items()}


def read_topology(sys_root: Path = Path("/sys")) -> Topology:
    """Read online CPUs, their cores and packages, and NUMA nodes from sysfs under `sys_root`.

    Only online CPUs are read: an offline CPU has no `topology` directory. A machine without
    `devices/system/node/node*` (a kernel without NUMA) is one node 0.
    """
    cpu_root = sys_root / "devices/system/cpu"
    online = _read_cpulist(cpu_root / "online")
    node_of = _read_nodes(sys_root / "devices/system/node", online)
    cpus = []
    for cpu in sorted(online):
        topology = cpu_root / f"cpu{cpu}" / "topology"
        if not topology.is_dir():
            raise TopologyError(f"CPU {cpu} is online but {topology} does not exist")
        cpus.append(
            Cpu(
                id=cpu,
                core=_read_int(topology / "core_id"),
                package=_read_int(topology / "physical_package_id"),
                node=node_of[cpu],
            )
        )
    try:
        found = Topology(tuple(cpus))
    except ValueError as err:
        raise TopologyError(f"{sys_root}: {err}") from None
    for known in found.cpus:
        _check_siblings(cpu_root / f"cpu{known.id}" / "topology", found, known, online)
    return found


def _read_nodes(node_root: Path, online: frozenset[int]) -> dict[int, int]:
    """CPU -> NUMA node for every online CPU."""
    node_dirs = sorted(node_root.glob("node[0-9]*"))
    if not node_dirs:
        return dict.fromkeys(online, 0)
    node_of: dict[int, int] = {}
    for node_dir in node_dirs:
        node = int(node_dir.name.removeprefix("node"))
        for cpu in _read_cpulist(node_dir / "cpulist") & online:
            if cpu in node_of:
                raise TopologyError(
                    f"CPU {cpu} is listed in both node{node_of[cpu]} and node{node}"
                    f" under {node_root}"
                )
            node_of[cpu] = node
    missing = online - node_of.keys()
    if missing:
        raise TopologyError(
            f"online CPUs {format_cpulist(missing)} are in no node's cpulist under {node_root}"
        )
    return node_of


def _check_siblings(topology: Path, found: Topology, cpu: Cpu, online: frozenset[int]) -> None:
    """The kernel's own sibling list must agree with the cores derived from core_id."""
    listed = topology / "core_cpus_list"
    if not listed.exists():
        listed = topology / "thread_siblings_list"
    kernel = _read_cpulist(listed) & online
    derived = found.siblings(cpu.id)
    if kernel != derived:
        raise TopologyError(
            f"{listed} says CPU {cpu.id}'s core is {format_cpulist(kernel)}, but"
            f" core_id {cpu.core} in package {cpu.package} is CPUs {format_cpulist(derived)}"
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise TopologyError(f"cannot read {path}: {err.strerror}") from err


def _read_int(path: Path) -> int:
    text = _read_text(path).strip()
    try:
        return int(text)
    except ValueError:
        raise TopologyError(f"{path} holds {text!r}, expected an integer") from None


def _read_cpulist(path: Path) -> frozenset[int]:
    try:
        return parse_cpulist(_read_text(path))
    except CpuListError as err:
        raise TopologyError(f"{path}: {err}") from None
