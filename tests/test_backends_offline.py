"""The systemd and cgroup2 backends without a VM: the AllowedCPUs mask, the D-Bus messages as
jeepney serialises them, the backends' decisions against a recording fake bus, and synthetic
cgroup v2 / procfs trees. The real thing runs in the VM tier (tests/vm/guest_backends.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jeepney.low_level import Message  # type: ignore[import-untyped]

from corecapd.enforcement import (
    AffinityBackend,
    Cgroup2Backend,
    EnforcementError,
    Host,
    NoBackend,
    SystemdBackend,
    choose_backend,
)
from corecapd.enforcement.systemd import (
    NO_SUCH_UNIT,
    PID_UNKNOWN,
    BusError,
    MethodCall,
    SystemBus,
    attach,
    cpu_mask,
    mask_cpus,
    set_cpus,
    slice_cgroup,
    start_scope,
    to_message,
)
from corecapd.procfs import ProcFS, online_cpus

ONLINE = frozenset(range(4))
UNIT = "corecap-100-7.scope"
SCOPE = "corecap.slice/" + UNIT


# --- the AllowedCPUs byte mask ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "mask"),
    [
        ({0}, b"\x01"),
        ({1, 3}, b"\x0a"),
        (set(range(8, 16)), b"\x00\xff"),
        (set(range(8)), b"\xff"),
        ({9}, b"\x00\x02"),
        ({0, 63}, b"\x01" + b"\x00" * 6 + b"\x80"),
        (set(), b""),
    ],
)
def test_allowed_cpus_mask(cpus: set[int], mask: bytes) -> None:
    assert cpu_mask(cpus) == mask
    assert mask_cpus(mask) == frozenset(cpus)


@given(st.frozensets(st.integers(0, 8191)))
def test_mask_round_trips_and_has_no_trailing_zero_byte(cpus: frozenset[int]) -> None:
    mask = cpu_mask(cpus)
    assert mask_cpus(mask) == cpus
    assert mask == b"" or mask[-1] != 0


def test_slice_names_nest_at_dashes() -> None:
    assert slice_cgroup("corecap.slice") == "/corecap.slice"
    assert slice_cgroup("corecap-test-x.slice") == (
        "/corecap.slice/corecap-test.slice/corecap-test-x.slice"
    )


# --- the messages, as they go on the wire ----------------------------------------------------


def on_the_wire(call: MethodCall) -> Any:
    """The message jeepney would send, parsed back (it checks body against signature)."""
    return Message.from_buffer(to_message(call).serialise(serial=1))


def test_start_transient_unit_message() -> None:
    call = start_scope(UNIT, [100, 101], frozenset({1, 3}), "corecap.slice", "100-7")
    message = on_the_wire(call)
    fields = {key.name: value for key, value in message.header.fields.items()}
    assert fields["destination"] == "org.freedesktop.systemd1"
    assert fields["path"] == "/org/freedesktop/systemd1"
    assert fields["interface"] == "org.freedesktop.systemd1.Manager"
    assert fields["member"] == "StartTransientUnit"
    assert fields["signature"] == "ssa(sv)a(sa(sv))"
    name, mode, properties, aux = message.body
    assert (name, mode, aux) == (UNIT, "fail", [])
    assert dict(properties) == {
        "Description": ("s", "corecap job 100-7"),
        "Slice": ("s", "corecap.slice"),
        "PIDs": ("au", [100, 101]),
        "AllowedCPUs": ("ay", b"\x0a"),
        "Delegate": ("b", True),
        "CollectMode": ("s", "inactive-or-failed"),
    }


def test_update_and_attach_messages() -> None:
    update = on_the_wire(set_cpus(UNIT, frozenset(range(8, 16))))
    assert update.body == (UNIT, True, [("AllowedCPUs", ("ay", b"\x00\xff"))])  # runtime only
    joined = on_the_wire(attach(UNIT, [4242]))
    assert joined.body == (UNIT, "", [4242])


# --- synthetic hosts ---------------------------------------------------------------------------


def cgroup(path: Path, **files: str) -> Path:
    """A cgroup directory as the kernel shows it: its files (dots spelled as __)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(text)
    return path


@dataclass
class FakeHost:
    root: Path
    pid1: str = "systemd"
    own: str = "/system.slice/corecapd.service"

    def __post_init__(self) -> None:
        cgroup(self.proc, stat="btime 1\n")
        cgroup(self.proc / "1", comm=self.pid1 + "\n")
        cgroup(self.proc / "self", cgroup=f"0::{self.own}\n")

    @property
    def proc(self) -> Path:
        return self.root / "proc"

    @property
    def sys(self) -> Path:
        return self.root / "cgroup"

    def process(self, pid: int, where: str) -> int:
        cgroup(self.proc / str(pid), cgroup=f"0::{where}\n")
        return pid

    def host(self, name: str = "corecap", cgroup_root: Path | None = None) -> Host:
        return Host(ProcFS(self.proc), ONLINE, cgroup_root or self.sys, name)


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    fake = FakeHost(tmp_path)
    cgroup(fake.sys, cgroup__controllers="cpuset cpu memory pids\n", cgroup__subtree_control="")
    return fake


@dataclass
class FakeBus:
    """Records calls; answers from `replies` (method -> body or BusError, or a callable)."""

    replies: dict[str, Any] = field(default_factory=dict)
    calls: list[MethodCall] = field(default_factory=list)
    job_result: str = "done"

    def call(self, call: MethodCall) -> tuple[Any, ...]:
        self.calls.append(call)
        reply = self.replies.get(call.method, ())
        if callable(reply):
            reply = reply(call)
        if isinstance(reply, BusError):
            raise reply
        return tuple(reply)

    def start_job(self, call: MethodCall) -> str:
        self.call(call)
        return self.job_result

    def methods(self) -> list[str]:
        return [call.method for call in self.calls]


def systemd(fake: FakeHost, bus: FakeBus) -> SystemdBackend:
    return SystemdBackend(fake.host(), bus)


# --- systemd backend ---------------------------------------------------------------------------


def test_systemd_problem_names_what_is_missing(fake: FakeHost, tmp_path: Path) -> None:
    bus = FakeBus({"Get": [("s", "252.39-1~deb12u2")]})
    assert systemd(fake, bus).problem() is None
    assert bus.calls[0].body == ("org.freedesktop.systemd1.Manager", "Version")
    old = FakeBus({"Get": [("s", "243")]})
    assert "systemd 243 is too old: AllowedCPUs= needs 244" in str(systemd(fake, old).problem())
    gone = FakeBus({"Get": BusError("org.freedesktop.DBus.Error.ServiceUnknown", "no systemd")})
    assert systemd(fake, gone).problem() == (
        "systemd is not reachable on the system D-Bus:"
        " org.freedesktop.DBus.Error.ServiceUnknown: no systemd"
    )
    v1 = cgroup(tmp_path / "v1", cpuset__cpus="0-3")
    hybrid = SystemdBackend(fake.host(cgroup_root=v1), bus)
    assert "not cgroup v2: " in str(hybrid.problem())
    init = FakeHost(tmp_path / "init", pid1="init")
    assert SystemdBackend(init.host(), bus).problem() == "PID 1 is not systemd"
    assert "not a valid slice name" in str(SystemdBackend(fake.host("-x"), bus).problem())


def test_systemd_problem_without_a_bus(fake: FakeHost, tmp_path: Path) -> None:
    nowhere = SystemBus(timeout=2, bus=f"unix:path={tmp_path}/no-such-socket")
    problem = str(SystemdBackend(fake.host(), nowhere).problem())
    assert problem.startswith("systemd is not reachable on the system D-Bus: connection:")


def test_systemd_problem_on_this_machine() -> None:
    if Path("/proc/1/comm").read_text().strip() == "systemd":
        pytest.skip("PID 1 is systemd here")
    backend = SystemdBackend(Host(ProcFS(), online_cpus()))
    assert backend.problem() == "PID 1 is not systemd"


def test_confine_starts_one_scope_with_the_movable_processes(fake: FakeHost) -> None:
    bus = FakeBus()
    user = fake.process(100, "/user.slice/user-1000.slice/session-3.scope")
    root = fake.process(101, "/")
    other_job = fake.process(102, "/corecap.slice/corecap-5-5.scope")
    slurm = fake.process(103, "/slurm/job_9")
    cgroup(fake.sys / "slurm", cpuset__cpus__effective="0-3")
    cgroup(fake.sys / "slurm/job_9", cpuset__cpus__effective="2")  # narrower: theirs
    plain = fake.process(104, "/system.slice/x.service")  # no cpuset files: unbounded
    pids = [user, root, other_job, slurm, plain, 105]  # 105 is gone
    assert systemd(fake, bus).confine("100-7", pids, frozenset({1, 3})) == 4
    (call,) = bus.calls
    assert call == start_scope(
        UNIT, [100, 101, 102, 104], frozenset({1, 3}), "corecap.slice", "100-7"
    )


def test_confine_again_changes_only_what_differs(fake: FakeHost) -> None:
    scope = cgroup(fake.sys / SCOPE, cpuset__cpus="1,3", cgroup__events="populated 1\n")
    inside = fake.process(100, f"/{SCOPE}")
    child = fake.process(101, f"/{SCOPE}/sub")  # delegated scope: the job may nest
    bus = FakeBus()
    backend = systemd(fake, bus)
    assert backend.confine("100-7", [inside, child], frozenset({1, 3})) == 0
    assert bus.calls == []  # nothing to change: no round trip
    fresh = fake.process(102, "/user.slice")
    assert backend.confine("100-7", [inside, fresh], frozenset({1, 3})) == 1
    assert bus.calls == [attach(UNIT, [102])]
    bus.calls.clear()
    (scope / "cpuset.cpus").write_text("1\n")  # drift, or a new grant
    assert backend.confine("100-7", [inside], frozenset({1, 3})) == 0
    assert bus.calls == [set_cpus(UNIT, frozenset({1, 3}))]


def test_a_process_that_exits_before_systemd_takes_it(fake: FakeHost) -> None:
    alive = fake.process(100, "/user.slice")
    gone = fake.process(101, "/user.slice")

    def start(call: MethodCall) -> Any:
        if 101 in dict(call.body[2])["PIDs"][1]:
            (fake.proc / "101/cgroup").unlink()
            (fake.proc / "101").rmdir()
            return BusError(PID_UNKNOWN, "Process with ID 101 does not exist.")
        return ("/org/freedesktop/systemd1/job/9",)

    bus = FakeBus({"StartTransientUnit": start})
    assert systemd(fake, bus).confine("100-7", [alive, gone], frozenset({1})) == 1
    assert [dict(c.body[2])["PIDs"] for c in bus.calls] == [("au", [100, 101]), ("au", [100])]


def test_systemd_errors_carry_the_dbus_error(fake: FakeHost) -> None:
    fake.process(100, "/user.slice")
    denied = BusError("org.freedesktop.DBus.Error.AccessDenied", "Access denied")
    backend = systemd(fake, FakeBus({"StartTransientUnit": denied}))
    with pytest.raises(EnforcementError) as caught:
        backend.confine("100-7", [100], frozenset({1}))
    assert str(caught.value) == (
        f"systemd StartTransientUnit for {UNIT} failed:"
        " org.freedesktop.DBus.Error.AccessDenied: Access denied"
    )
    failed = systemd(fake, FakeBus(job_result="failed"))
    with pytest.raises(EnforcementError, match=rf"could not start {UNIT} .*: job failed"):
        failed.confine("100-7", [100], frozenset({1}))
    with pytest.raises(EnforcementError, match="cannot be part of a unit name"):
        failed.confine("a/b", [100], frozenset({1}))


def test_release_widens_a_scope_with_processes_left_and_stops_an_empty_one(
    fake: FakeHost,
) -> None:
    bus = FakeBus()
    backend = systemd(fake, bus)
    backend.release("100-7", [])
    assert bus.calls == []  # the scope went with its last process
    scope = cgroup(fake.sys / SCOPE, cpuset__cpus="1", cgroup__events="populated 1\n")
    backend.release("100-7", [101])
    assert bus.calls == [set_cpus(UNIT, ONLINE)]  # not empty: AllowedCPUs= "" is not re-applied
    (scope / "cgroup.events").write_text("populated 0\n")
    bus.calls.clear()
    backend.release("100-7", [])
    assert bus.methods() == ["StopUnit"]
    gone = FakeBus({"StopUnit": BusError(NO_SUCH_UNIT, f"Unit {UNIT} not loaded.")})
    systemd(fake, gone).release("100-7", [])  # gone meanwhile: fine


def test_adopt_lists_this_daemons_active_scopes(fake: FakeHost) -> None:
    def unit(name: str, active: str = "active") -> tuple[Any, ...]:
        path = "/org/freedesktop/systemd1/unit/" + name.replace("-", "_2d")
        return (name, "", "loaded", active, "running", "", path, 0, "", "/")

    listing = [
        unit("corecap-100-7.scope"),
        unit("corecap-test-x-1-2.scope"),  # another daemon.cgroup's
        unit("corecap-200-8.scope", active="deactivating"),
    ]
    bus = FakeBus({"ListUnitsByPatterns": [listing], "Get": [("ay", b"\x0a")]})
    assert systemd(fake, bus).adopt() == {"100-7": frozenset({1, 3})}
    assert bus.calls[0].body == ([], ["corecap-*.scope"])
    assert bus.calls[1].body == ("org.freedesktop.systemd1.Scope", "AllowedCPUs")


# --- cgroup2 backend ---------------------------------------------------------------------------


def test_cgroup2_problem_names_what_is_missing(tmp_path: Path) -> None:
    plain = FakeHost(tmp_path / "a", pid1="init", own="/")
    assert "no cgroup v2 hierarchy at" in str(Cgroup2Backend(plain.host()).problem())
    hybrid = FakeHost(tmp_path / "b", pid1="init", own="/")
    cgroup(hybrid.sys / "cpuset", cpuset__cpus="0-3")
    cgroup(hybrid.sys / "unified", cgroup__controllers="hugetlb\n", cgroup__subtree_control="")
    assert Cgroup2Backend(hybrid.host()).problem() == (
        f"no cpuset controller in the cgroup v2 hierarchy at {hybrid.sys / 'unified'}"
        " (a hybrid host: cpuset belongs to cgroup v1 here)"
    )
    service = FakeHost(tmp_path / "c")
    cgroup(service.sys, cgroup__controllers="cpuset\n")
    cgroup(service.sys / "system.slice/corecapd.service", cgroup__controllers="cpuset\n")
    assert Cgroup2Backend(service.host()).problem() == (
        "neither corecapd's cgroup /system.slice/corecapd.service nor its parent is delegated"
        " to it (run it as a systemd service with Delegate=yes and DelegateSubgroup=supervisor:"
        " the drop-in systemd/cgroup2.conf)"
    )


def test_cgroup2_problem_on_this_machine() -> None:
    backend = Cgroup2Backend(Host(ProcFS(), online_cpus()))
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if not unified.is_file() or "cpuset" in unified.read_text():
        pytest.skip("not a hybrid host without cpuset on cgroup v2")
    assert "a hybrid host: cpuset belongs to cgroup v1 here" in str(backend.problem())


def job_cgroups(parent: Path, *names: str) -> None:
    """What the kernel shows in a new cgroup: made up front here, mkdir finds them."""
    cgroup(parent, cgroup__subtree_control="", cgroup__procs="", cpuset__cpus="")
    for name in names:
        cgroup(parent / name, cgroup__procs="", cpuset__cpus="", cgroup__subtree_control="")


def test_cgroup2_without_systemd_fences_in_its_own_subtree(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path, pid1="init", own="/")
    cgroup(fake.sys, cgroup__controllers="cpuset memory\n", cgroup__subtree_control="memory\n")
    cgroup(fake.sys, cgroup__procs="1\n")
    job_cgroups(fake.sys / "corecap", "job-100-7")
    cgroup(fake.sys / "corecap", cpuset__cpus__effective="0-3\n")
    cgroup(fake.sys / "k8s", cpuset__cpus__effective="3")
    user, boxed = fake.process(100, "/"), fake.process(101, "/k8s")
    backend = Cgroup2Backend(fake.host())
    assert backend.problem() is None
    assert backend.describe() == f"cgroup2 ({fake.sys / 'corecap'})"
    assert backend.confine("100-7", [user, boxed, 102], frozenset({2, 3})) == 1
    assert (fake.sys / "cgroup.subtree_control").read_text() == "+cpuset"
    assert (fake.sys / "corecap/cgroup.subtree_control").read_text() == "+cpuset"
    fence = fake.sys / "corecap/job-100-7"
    assert (fence / "cpuset.cpus").read_text() == "2-3"
    assert (fence / "cgroup.procs").read_text() == "100"  # the Kubernetes one stays
    assert backend.adopt() == {"100-7": frozenset({2, 3})}
    fake.process(100, "/corecap/job-100-7")
    (fence / "cgroup.procs").write_text("")
    assert backend.confine("100-7", [user], frozenset({2, 3})) == 0  # inside already
    assert (fence / "cgroup.procs").read_text() == ""
    (fence / "cgroup.procs").write_text("100\n")
    backend.release("100-7", [user])  # a real cgroup with a process left is EBUSY
    assert (fence / "cpuset.cpus").read_text() == "0-3"  # widened to the parent's CPUs
    assert backend.adopt() == {"100-7": ONLINE}


def delegated_service(fake: FakeHost) -> Path:
    """systemd's cgroup of a service with Delegate=yes: marked by the xattr, with a subgroup."""
    cgroup(fake.sys, cgroup__controllers="cpuset memory\n", cgroup__subtree_control="cpuset\n")
    service = cgroup(
        fake.sys / "system.slice/corecapd.service",
        cgroup__controllers="cpuset memory\n",
        cgroup__subtree_control="",
        cgroup__procs="",
    )
    cgroup(service / "supervisor", cgroup__procs="4242\n")
    try:
        os.setxattr(service, "user.delegate", b"1")
    except OSError as err:
        pytest.skip(f"no user xattrs in {fake.root}: {err}")
    return service


def test_cgroup2_in_a_delegated_service_fences_beside_its_subgroup(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path, own="/system.slice/corecapd.service/supervisor")
    service = delegated_service(fake)
    job_cgroups(service / "corecap", "job-100-7")
    fake.process(100, "/user.slice")
    backend = Cgroup2Backend(fake.host())
    assert backend.problem() is None
    assert backend.describe() == f"cgroup2 ({service / 'corecap'})"
    assert backend.confine("100-7", [100], frozenset({1})) == 1
    assert (service / "supervisor/cgroup.procs").read_text() == "4242\n"  # left where it is
    assert (service / "cgroup.subtree_control").read_text() == "+cpuset"
    assert (service / "corecap/job-100-7/cgroup.procs").read_text() == "100"
    assert (fake.sys / "cgroup.subtree_control").read_text() == "cpuset\n"  # not ours


def test_cgroup2_adopts_the_job_cgroups_a_previous_daemon_left(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path, own="/system.slice/corecapd.service/supervisor")
    service = delegated_service(fake)
    (service / "cgroup.subtree_control").write_text("cpuset\n")
    job_cgroups(service / "corecap", "job-100-7")
    (service / "corecap/cgroup.subtree_control").write_text("cpuset\n")
    (service / "corecap/job-100-7/cpuset.cpus").write_text("1\n")
    (service / "corecap/job-100-7/cgroup.procs").write_text("100\n")
    fake.process(100, "/system.slice/corecapd.service/corecap/job-100-7")
    backend = Cgroup2Backend(fake.host())
    assert backend.adopt() == {"100-7": frozenset({1})}
    assert backend.confine("100-7", [100], frozenset({1})) == 0  # in its fence: left as it is
    for written in ("cgroup.subtree_control", "corecap/cgroup.subtree_control"):
        assert (service / written).read_text() == "cpuset\n"  # enabled already: not written
    assert (service / "corecap/job-100-7/cpuset.cpus").read_text() == "1\n"
    assert (service / "corecap/job-100-7/cgroup.procs").read_text() == "100\n"


def test_cgroup2_adopt_lists_half_made_job_cgroups_with_no_cpus(tmp_path: Path) -> None:
    """A crash can leave a job cgroup made but never given CPUs, or made before the
    subtree had the cpuset controller (no cpuset.cpus at all); strays are not jobs."""
    fake = FakeHost(tmp_path, pid1="init", own="/")
    cgroup(fake.sys, cgroup__controllers="cpuset\n", cgroup__subtree_control="", cgroup__procs="")
    subtree = fake.sys / "corecap"
    job_cgroups(subtree, "job-100-7", "job-101-8")
    (subtree / "job-100-7/cpuset.cpus").write_text("1\n")
    (subtree / "job-102-9").mkdir()  # no controller: no cpuset.cpus
    cgroup(subtree / "job-103-10", cpuset__cpus="garbage")
    (subtree / "job-104-11").write_text("")  # not a directory
    cgroup(subtree / "supervisor", cpuset__cpus="0")
    assert Cgroup2Backend(fake.host()).adopt() == {
        "100-7": frozenset({1}),
        "101-8": frozenset(),
        "102-9": frozenset(),
        "103-10": frozenset(),
    }
    assert Cgroup2Backend(FakeHost(tmp_path / "none", pid1="init", own="/").host()).adopt() == {}


def test_cgroup2_completes_a_half_made_subtree(tmp_path: Path) -> None:
    """The subtree and a job cgroup made, the controller never enabled, no CPUs written."""
    fake = FakeHost(tmp_path, pid1="init", own="/")
    cgroup(fake.sys, cgroup__controllers="cpuset\n", cgroup__subtree_control="", cgroup__procs="")
    job_cgroups(fake.sys / "corecap", "job-100-7")
    backend = Cgroup2Backend(fake.host())
    assert backend.adopt() == {"100-7": frozenset()}
    assert backend.confine("100-7", [fake.process(100, "/")], frozenset({2})) == 1
    assert (fake.sys / "cgroup.subtree_control").read_text() == "+cpuset"
    assert (fake.sys / "corecap/cgroup.subtree_control").read_text() == "+cpuset"
    assert (fake.sys / "corecap/job-100-7/cpuset.cpus").read_text() == "2"


def test_cgroup2_enables_the_controller_again_for_a_job_cgroup_without_it(
    tmp_path: Path,
) -> None:
    """Prepared once, the subtree found without the controller later (a job cgroup with no
    cpuset.cpus): enabled again rather than failing every confine from then on."""
    fake = FakeHost(tmp_path, pid1="init", own="/")
    cgroup(fake.sys, cgroup__controllers="cpuset\n", cgroup__subtree_control="", cgroup__procs="")
    job_cgroups(fake.sys / "corecap", "job-100-7")
    backend = Cgroup2Backend(fake.host())
    backend.confine("100-7", [fake.process(100, "/")], frozenset({1}))
    (fake.sys / "corecap/cgroup.subtree_control").write_text("")
    (fake.sys / "corecap/job-101-8").mkdir()  # what the kernel makes without the controller
    with pytest.raises(EnforcementError):  # (a fake tree grows no cpuset.cpus on enabling)
        backend.confine("101-8", [fake.process(101, "/")], frozenset({2}))
    assert (fake.sys / "corecap/cgroup.subtree_control").read_text() == "+cpuset"


def test_cgroup2_refuses_the_root_of_its_delegated_cgroup(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path)  # in /system.slice/corecapd.service itself: no DelegateSubgroup=
    delegated_service(fake)
    problem = str(Cgroup2Backend(fake.host()).problem())
    assert problem.startswith(
        "corecapd runs in the root of its delegated cgroup /system.slice/corecapd.service:"
    )
    for says in ("systemd could not start corecapd there again", "jobs would be stopped"):
        assert says in problem
    for fix in ("DelegateSubgroup=supervisor", "KillMode=process", "systemd/cgroup2.conf"):
        assert fix in problem
    with pytest.raises(NoBackend, match="'cgroup2' cannot work here: corecapd runs in the root"):
        choose_backend("cgroup2", fake.host())


def test_auto_order_on_synthetic_hosts(tmp_path: Path) -> None:
    v2 = FakeHost(tmp_path / "v2", pid1="init", own="/")
    cgroup(v2.sys, cgroup__controllers="cpuset\n", cgroup__subtree_control="", cgroup__procs="")
    chosen, why = choose_backend("auto", v2.host())
    assert isinstance(chosen, Cgroup2Backend)
    assert why == "auto: not systemd: PID 1 is not systemd; cgroup2 works here"
    bare = FakeHost(tmp_path / "bare", pid1="init", own="/")
    chosen, why = choose_backend("auto", bare.host())
    assert isinstance(chosen, AffinityBackend)
    assert why.startswith("auto: not systemd: PID 1 is not systemd; not cgroup2: no cgroup v2")
