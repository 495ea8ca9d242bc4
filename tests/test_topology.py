"""read_topology() on synthetic sysfs trees written as data, and on this machine's /sys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corecapd.cpulist import format_cpulist
from corecapd.topology import Cpu, Topology, TopologyError, read_topology


def write_sysfs(
    root: Path,
    topology: Topology,
    offline: frozenset[int] = frozenset(),
    numa: bool = True,
    siblings_file: str = "thread_siblings_list",
) -> Path:
    """Lay `topology` out as the kernel does under `root`; `offline` CPUs get a bare cpuN dir."""
    cpu_root = root / "devices/system/cpu"
    cpu_root.mkdir(parents=True)
    (cpu_root / "online").write_text(format_cpulist(topology.online) + "\n")
    for gone in offline:
        (cpu_root / f"cpu{gone}").mkdir()
    for cpu in topology.cpus:
        directory = cpu_root / f"cpu{cpu.id}" / "topology"
        directory.mkdir(parents=True)
        (directory / "core_id").write_text(f"{cpu.core}\n")
        (directory / "physical_package_id").write_text(f"{cpu.package}\n")
        (directory / siblings_file).write_text(format_cpulist(topology.siblings(cpu.id)) + "\n")
    if numa:
        for node, cpus in topology.nodes.items():
            directory = root / f"devices/system/node/node{node}"
            directory.mkdir(parents=True)
            (directory / "cpulist").write_text(format_cpulist(cpus) + "\n")
    return root


# -- the synthetic builder ---------------------------------------------------------------


def test_synthetic_numbers_siblings_like_the_kernel() -> None:
    machine = Topology.synthetic(sockets=1, cores_per_socket=8, threads_per_core=2)
    assert machine.online == frozenset(range(16))
    for cpu in range(8):
        assert machine.siblings(cpu) == {cpu, cpu + 8}
        assert machine.siblings(cpu + 8) == {cpu, cpu + 8}
    assert len(machine.cores) == 8
    assert machine.nodes == {0: frozenset(range(16))}
    assert machine.packages == {0: frozenset(range(16))}


def test_synthetic_two_sockets_two_nodes() -> None:
    machine = Topology.synthetic(sockets=2, cores_per_socket=32, threads_per_core=2)
    assert len(machine.online) == 128
    assert machine.siblings(0) == {0, 64}
    assert machine.siblings(63) == {63, 127}
    assert machine.by_id[32] == Cpu(id=32, core=0, package=1, node=1)
    assert machine.by_id[96] == Cpu(id=96, core=0, package=1, node=1)
    assert machine.nodes[0] == frozenset(range(32)) | frozenset(range(64, 96))
    assert machine.nodes[1] == frozenset(range(32, 64)) | frozenset(range(96, 128))
    # core_id repeats across packages; the core is (package, core_id).
    assert len(machine.cores) == 64


def test_synthetic_sub_numa_clustering() -> None:
    machine = Topology.synthetic(
        sockets=2, cores_per_socket=4, threads_per_core=2, numa_per_socket=2
    )
    assert machine.nodes == {
        0: frozenset({0, 1, 8, 9}),
        1: frozenset({2, 3, 10, 11}),
        2: frozenset({4, 5, 12, 13}),
        3: frozenset({6, 7, 14, 15}),
    }


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sockets": 0}, "sockets must be at least 1"),
        ({"threads_per_core": 0}, "threads_per_core must be at least 1"),
        ({"cores_per_socket": 6, "numa_per_socket": 4}, "divide evenly"),
    ],
)
def test_synthetic_rejects_impossible_machines(arguments: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Topology.synthetic(**arguments)


def test_a_cpu_listed_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="CPUs 1 appear more than once"):
        Topology((Cpu(1, 0, 0, 0), Cpu(1, 1, 0, 0)))


def test_siblings_on_two_nodes_are_an_error() -> None:
    with pytest.raises(ValueError, match="CPUs 0-1 share a core but are on NUMA nodes 0-1"):
        Topology((Cpu(0, 0, 0, 0), Cpu(1, 0, 0, 1)))


def test_threads_per_core_is_the_most_any_core_has() -> None:
    assert Topology.synthetic(threads_per_core=4).threads_per_core == 4
    hybrid = Topology((Cpu(0, 0, 0, 0), Cpu(1, 0, 0, 0), Cpu(2, 1, 0, 0)))  # a P- and an E-core
    assert hybrid.threads_per_core == 2
    assert hybrid.siblings(2) == {2}


def test_cpus_are_kept_in_id_order_and_compare_as_data() -> None:
    shuffled = Topology((Cpu(3, 1, 0, 0), Cpu(0, 0, 0, 0), Cpu(2, 0, 0, 0), Cpu(1, 1, 0, 0)))
    assert [cpu.id for cpu in shuffled.cpus] == [0, 1, 2, 3]
    assert shuffled == Topology(tuple(sorted(shuffled.cpus, key=lambda cpu: -cpu.id)))
    assert shuffled.siblings(1) == {1, 3}


# -- synthetic sysfs trees read back -----------------------------------------------------


@pytest.mark.parametrize(
    "machine",
    [
        Topology.synthetic(sockets=1, cores_per_socket=8, threads_per_core=2),
        Topology.synthetic(sockets=2, cores_per_socket=32, threads_per_core=2),
        Topology.synthetic(sockets=2, cores_per_socket=32, threads_per_core=2, numa_per_socket=2),
        Topology.synthetic(sockets=1, cores_per_socket=6, threads_per_core=1),
        Topology.synthetic(sockets=1, cores_per_socket=2, threads_per_core=4),
    ],
    ids=["1s-8c-16t", "2s-32c-64t-2numa", "2s-32c-64t-4numa", "no-smt", "smt4"],
)
def test_synthetic_trees_read_back(tmp_path: Path, machine: Topology) -> None:
    assert read_topology(write_sysfs(tmp_path, machine)) == machine


def test_core_cpus_list_is_read_when_thread_siblings_list_is_absent(tmp_path: Path) -> None:
    machine = Topology.synthetic(sockets=1, cores_per_socket=4, threads_per_core=2)
    assert read_topology(write_sysfs(tmp_path, machine, siblings_file="core_cpus_list")) == machine


def test_offline_and_non_contiguous_cpus(tmp_path: Path) -> None:
    # 2 sockets x 4 cores x 2 threads with a whole core (5, 13) and CPU 10 offline; CPUs are
    # 0-4,6-9,11-12,14-15. Offline CPUs have a cpuN directory but no topology in it.
    full = Topology.synthetic(sockets=2, cores_per_socket=4, threads_per_core=2)
    offline = frozenset({5, 10, 13})
    machine = Topology(tuple(cpu for cpu in full.cpus if cpu.id not in offline))
    found = read_topology(write_sysfs(tmp_path, machine, offline=offline))
    assert found == machine
    assert format_cpulist(found.online) == "0-4,6-9,11-12,14-15"
    assert found.siblings(2) == {2}  # its sibling 10 is offline: a core of one thread now
    assert found.siblings(1) == {1, 9}
    assert (1, 1) not in found.cores  # core 1 of package 1 (CPUs 5 and 13) is all offline
    assert found.nodes[1] == frozenset({4, 6, 7, 12, 14, 15})


def test_no_node_directory_is_one_node(tmp_path: Path) -> None:
    machine = Topology.synthetic(sockets=2, cores_per_socket=2, threads_per_core=2)
    found = read_topology(write_sysfs(tmp_path, machine, numa=False))
    assert found.nodes == {0: frozenset(range(8))}
    assert found.packages == machine.packages


def test_node_cpulists_may_name_offline_cpus(tmp_path: Path) -> None:
    machine = Topology((Cpu(0, 0, 0, 0), Cpu(2, 1, 0, 0)))
    root = write_sysfs(tmp_path, machine, offline=frozenset({1}), numa=False)
    node = root / "devices/system/node/node0"
    node.mkdir(parents=True)
    (node / "cpulist").write_text("0-3\n")
    assert read_topology(root) == machine


def test_an_online_cpu_without_topology_is_an_error(tmp_path: Path) -> None:
    machine = Topology.synthetic(cores_per_socket=2, threads_per_core=1)
    root = write_sysfs(tmp_path, machine, numa=False)
    (root / "devices/system/cpu/online").write_text("0-2\n")
    with pytest.raises(TopologyError, match=r"CPU 2 is online but .*cpu2/topology does not"):
        read_topology(root)


def test_a_cpu_in_no_node_is_an_error(tmp_path: Path) -> None:
    root = write_sysfs(tmp_path, Topology.synthetic(cores_per_socket=2, threads_per_core=2))
    (root / "devices/system/node/node0/cpulist").write_text("0-2\n")
    with pytest.raises(TopologyError, match="online CPUs 3 are in no node's cpulist"):
        read_topology(root)


def test_a_cpu_in_two_nodes_is_an_error(tmp_path: Path) -> None:
    machine = Topology.synthetic(cores_per_socket=2, threads_per_core=1, numa_per_socket=2)
    root = write_sysfs(tmp_path, machine)
    (root / "devices/system/node/node1/cpulist").write_text("0-1\n")
    with pytest.raises(TopologyError, match="CPU 0 is listed in both node0 and node1"):
        read_topology(root)


def test_siblings_that_contradict_core_id_are_an_error(tmp_path: Path) -> None:
    root = write_sysfs(tmp_path, Topology.synthetic(cores_per_socket=2, threads_per_core=2))
    (root / "devices/system/cpu/cpu0/topology/thread_siblings_list").write_text("0-1\n")
    with pytest.raises(TopologyError, match=r"CPU 0's core is 0-1, but core_id 0 .* is CPUs 0,2"):
        read_topology(root)


def test_a_core_on_two_nodes_is_an_error_naming_the_tree(tmp_path: Path) -> None:
    root = write_sysfs(tmp_path, Topology.synthetic(cores_per_socket=2, numa_per_socket=2))
    (root / "devices/system/node/node0/cpulist").write_text("0\n")
    (root / "devices/system/node/node1/cpulist").write_text("1-3\n")
    with pytest.raises(TopologyError, match="share a core but are on NUMA nodes 0-1"):
        read_topology(root)


@pytest.mark.parametrize(
    ("path", "text", "message"),
    [
        ("cpu/cpu1/topology/core_id", "one\n", r"core_id holds 'one', expected an integer"),
        ("cpu/online", "0-a\n", r"online: 'a'|online: .*not a CPU number"),
        ("node/node0/cpulist", "3-1\n", r"cpulist: .*ascending"),
    ],
)
def test_malformed_files_name_the_file(tmp_path: Path, path: str, text: str, message: str) -> None:
    root = write_sysfs(tmp_path, Topology.synthetic(cores_per_socket=2, threads_per_core=1))
    (root / "devices/system" / path).write_text(text)
    with pytest.raises(TopologyError, match=message):
        read_topology(root)


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    root = write_sysfs(tmp_path, Topology.synthetic(cores_per_socket=2, threads_per_core=1))
    (root / "devices/system/cpu/cpu1/topology/physical_package_id").unlink()
    with pytest.raises(TopologyError, match=r"cannot read .*cpu1/topology/physical_package_id"):
        read_topology(root)


# -- the real thing ----------------------------------------------------------------------


def test_this_machine() -> None:
    found = read_topology()
    assert len(found.online) == os.cpu_count()
    assert os.sched_getaffinity(0) <= found.online
    assert found.online == frozenset().union(*found.nodes.values())
    assert found.online == frozenset().union(*found.cores.values())
    for cpu in found.online:
        assert cpu in found.siblings(cpu)
        assert sum(cpu in cpus for cpus in found.nodes.values()) == 1
