"""The per-layer diagnosis (pure) and the core's layer checks, on synthetic evidence. The
same against real TensorFlow, scikit-learn, numpy and a real cgroup quota:
test_diagnosis_live.py."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from test_core import T0, World
from test_core_effects import name, scan

from corecapd.declaration import Settings
from corecapd.diagnosis import Evidence, JobFacts, Quota, ThreadLayer, diagnose
from corecapd.effects import EvidenceRead, Exit, GatherEvidence
from corecapd.events import LayerOversized

TF = "libtensorflow_framework.so.2"


def thread(layer: str, pid: int = 100, runtime: str = "", library: str = "lib.so") -> ThreadLayer:
    return ThreadLayer(pid, 0, "python", layer, runtime, library, f"start routine in {library}")


def threads(count: int, layer: str, **given: str | int) -> list[ThreadLayer]:
    return [thread(layer, **given)] * count  # type: ignore[arg-type]


def facts(cpus: int, settings: Settings | None = None) -> JobFacts:
    return JobFacts(cpus, threads=30, budget=21, tensorflow=True, settings=settings, pools=())


def evidence(found: list[ThreadLayer], mask: int = 1, **more: object) -> Evidence:
    return Evidence({}, tuple(found), mask, **more)  # type: ignore[arg-type]


# c13: a Keras fit whose tf.data private pool is 16 on 1 CPU, intra-op and inter-op 1.
C13 = [
    thread("main"),
    *threads(1, "tf-intra-op", library=TF),
    *threads(1, "tf-inter-op", library=TF),
    *threads(16, "tf-data", runtime="private pool", library=TF),
    *threads(5, "tf-data", runtime="iterator", library=TF),
    thread("python-threading"),
]


def test_the_oversized_tf_data_private_pool_is_named_and_no_other_layer() -> None:
    diagnosis = diagnose(facts(1), evidence(C13))
    [oversized] = diagnosis.oversized
    assert (oversized.name, oversized.threads, oversized.expected) == (
        "tf.data private pool",
        16,
        1,
    )
    assert "options.threading.private_threadpool_size = 1" in oversized.fix
    assert "tf.data private pool of 16 threads on 1 CPUs" in diagnosis.summary()
    assert "intra" not in diagnosis.summary() and "inter" not in diagnosis.summary()
    rows = {finding.name: finding for finding in diagnosis.layers}
    assert (
        rows["TensorFlow intra-op pool"].fix == ""
        and rows["TensorFlow intra-op pool"].expected == 1
    )
    assert rows["tf-data (iterator)"].expected is None  # not sized from the CPUs: not checked


def test_an_openmp_pool_counts_its_caller_and_names_the_variable_in_the_environment() -> None:
    found = [thread("main"), *threads(15, "openmp", runtime="libgomp", library="libgomp.so.1")]
    seen = Evidence({"OMP_NUM_THREADS": "16"}, tuple(found), 1)
    [oversized] = diagnose(facts(1), seen).oversized
    assert (oversized.name, oversized.threads) == ("OpenMP pool (libgomp)", 16)
    assert oversized.fix.startswith(
        "OMP_NUM_THREADS=16 in the job's environment; set OMP_NUM_THREADS=1"
    )
    assert 'threadpoolctl.threadpool_limits(1, user_api="openmp")' in oversized.fix


def test_pools_of_one_layer_add_up_across_processes_not_across_libraries_of_one() -> None:
    # numpy's and scipy's OpenBLAS, each sized to 2 CPUs (1 thread and the caller).
    one = [
        thread("openblas", library="libscipy_openblas.so"),
        thread("openblas", library="libopenblas64_.so"),
    ]
    alone = diagnose(facts(2), evidence(one, mask=2))
    assert not alone.oversized and alone.layers[0].threads == 2
    workers = [replace(t, pid=pid) for pid in range(100, 104) for t in one]
    [oversized] = diagnose(facts(2), evidence(workers, mask=2)).oversized
    assert (oversized.threads, oversized.processes, oversized.expected) == (8, 4, 2)
    assert (
        "OPENBLAS_NUM_THREADS=1" in oversized.fix and "in each of its 4 processes" in oversized.fix
    )


def test_unknown_threads_are_reported_as_unknown_never_as_a_layer() -> None:
    found = [thread("main"), *threads(40, "unknown")]
    diagnosis = diagnose(facts(1), evidence(found))
    assert not diagnosis.oversized
    assert diagnosis.summary().startswith("40 threads of unknown layer")


def test_over_budget_with_no_layer_oversized_names_the_widest_unchecked_layer() -> None:
    found = [thread("main"), *threads(20, "python-threading", library="libpython3.11.so")]
    over = replace(facts(1), threads=21, budget=14, tensorflow=False)
    diagnosis = diagnose(over, evidence(found))
    assert not diagnosis.oversized
    assert diagnosis.summary().startswith(
        "the widest layer: python-threading, 20 of the job's 21 threads (start routine in"
        " libpython3.11.so); no setting sizes this layer to the CPUs"
    )
    within = replace(over, threads=14)
    assert not any("widest" in hint for hint in diagnose(within, evidence(found)).hints)
    # a checked layer at least as wide, even within its grant, is no "widest unchecked" one
    wide_pool = [*found, *threads(20, "tf-intra-op", library=TF)]
    on_20 = diagnose(replace(over, cpus=20), evidence(wide_pool, 20))
    assert not on_20.oversized and not any("widest" in hint for hint in on_20.hints)
    # and an oversized layer is the diagnosis, with nothing else ahead of it
    assert diagnose(over, evidence(wide_pool)).summary().startswith("TensorFlow intra-op pool")


def test_a_declared_size_is_what_the_layer_is_held_to() -> None:
    settings = Settings(cpus=2, intra_op=4, inter_op=1, data_workers=1, blas=1)
    found = [*threads(4, "tf-intra-op", library=TF), *threads(2, "tf-inter-op", library=TF)]
    [oversized] = diagnose(facts(2, settings), evidence(found, mask=2)).oversized
    assert (oversized.layer, oversized.expected) == ("tf-inter-op", 1)
    assert "set_inter_op_parallelism_threads(1)" in oversized.fix


def test_a_quota_below_the_mask_says_the_pools_were_sized_from_the_mask() -> None:
    quota = Quota(0.5, "cpu.cfs_quota_us=50000, cpu.cfs_period_us=100000 in /x")
    found = [thread("main"), thread("openmp", runtime="libgomp")]
    diagnosis = diagnose(facts(2), evidence(found, mask=2, quota=quota))
    [oversized] = diagnosis.oversized
    assert (oversized.threads, oversized.expected) == (2, 1)
    [said] = [hint for hint in diagnosis.hints if "quota" in hint]
    assert "sized from the CPU mask (2 CPUs), not from the quota (0.5 CPUs)" in said
    assert "OMP_NUM_THREADS=1" in said
    quiet = diagnose(facts(2), evidence([thread("main")], mask=2, quota=quota))
    assert not quiet.oversized and "no pool is wider than 1 CPUs" in quiet.hints[0]
    # A quota at least as large as the mask changes nothing.
    assert diagnose(facts(2), evidence(found, mask=2, quota=replace(quota, cpus=2.0))).hints == ()


LAYERS = ["tf-intra-op", "tf-inter-op", "tf-data", "openmp", "openblas", "mkl", "python-threading",
          "other-native", "main", "unknown"]  # fmt: skip


@given(
    st.lists(
        st.tuples(
            st.integers(1, 4),
            st.sampled_from(LAYERS),
            st.sampled_from(["", "private pool", "iterator", "libgomp"]),
            st.sampled_from(["a.so", "b.so"]),
        ),
        max_size=60,
    ),
    st.integers(1, 8),
    st.none() | st.floats(0.1, 8),
)
def test_a_fix_is_named_for_an_oversized_layer_only(
    found: list[tuple[int, str, str, str]], cpus: int, quota: float | None
) -> None:
    seen = [
        ThreadLayer(pid, 0, "x", layer, runtime, lib, "e") for pid, layer, runtime, lib in found
    ]
    limit = None if quota is None else Quota(quota, "q")
    diagnosis = diagnose(facts(cpus), evidence(seen, mask=cpus, quota=limit))
    for finding in diagnosis.layers:
        assert bool(finding.fix) == finding.oversized
        if finding.layer in ("unknown", "main", "python-threading", "other-native"):
            assert finding.expected is None
    assert sum(
        f.threads for f in diagnosis.layers if f.layer not in ("openmp", "openblas", "mkl")
    ) + sum(
        f.threads - f.processes
        for f in diagnosis.layers
        if f.layer in ("openmp", "openblas", "mkl")
    ) <= len(seen)


# -- the core: layer checks within budget ---------------------------------------------------


def test_a_job_within_budget_has_its_layers_checked_at_a_new_high_rate_limited() -> None:
    world = World()  # rule "py": 2 CPUs, budget 4 + 2 x 2 + 8 = 16
    key = world.spawn(500, threads=1)
    scan(world, 0)
    world.set(key, threads=2)
    assert not [e for e in scan(world, 20).effects if isinstance(e, GatherEvidence)]  # not > 2
    world.set(key, threads=5)
    [gather] = [e for e in scan(world, 21).effects if isinstance(e, GatherEvidence)]
    assert gather == GatherEvidence(name(key), (500,))
    pool = [thread("main", pid=500), *threads(4, "openmp", pid=500, runtime="libgomp")]
    found = world.table.handle(EvidenceRead(name(key), evidence(pool, mask=2)), T0 + 21)
    [event] = found.events
    assert isinstance(event, LayerOversized) and (event.layer_threads, event.expected) == (5, 2)
    assert event.message_id != "" and event.fields()["CORECAP_LAYER"] == "openmp"
    [record] = world.table.snapshot().violations
    assert (record.kind, record.layer, record.threads, record.budget) == ("layer", "openmp", 5, 2)
    # A new high within LAYER_CHECK_INTERVAL: no check; after it: one.
    world.set(key, threads=7)
    assert not [e for e in scan(world, 40).effects if isinstance(e, GatherEvidence)]
    assert [e for e in scan(world, 52).effects if isinstance(e, GatherEvidence)]
    # The same evidence again: nothing new to report; a narrower pool: the record ends.
    again = world.table.handle(EvidenceRead(name(key), evidence(pool, mask=2)), T0 + 52)
    assert again.events == []
    world.set(key, threads=9)
    assert [e for e in scan(world, 83).effects if isinstance(e, GatherEvidence)]
    fine = [thread("main", pid=500), thread("openmp", pid=500, runtime="libgomp")]
    assert world.table.handle(EvidenceRead(name(key), evidence(fine, mask=2)), T0 + 83).events == []
    [record] = world.table.snapshot().violations
    assert (record.ended, record.ended_by) == (T0 + 83, "resolved")


def test_a_layer_record_ends_with_its_job() -> None:
    world = World()
    key = world.spawn(500, threads=5)
    scan(world, 0)
    scan(world, 20)
    pool = [*threads(8, "tf-intra-op", pid=500, library=TF)]
    world.table.handle(EvidenceRead(name(key), evidence(pool, mask=2)), T0 + 20)
    world.kill(key)
    world.table.handle(Exit(500), T0 + 30)
    [record] = world.table.snapshot().violations
    assert (record.ended, record.ended_by, record.layer) == (T0 + 30, "exited", "tf-intra-op")


def test_evidence_nobody_asked_for_changes_nothing() -> None:
    world = World()
    key = world.spawn(500, threads=1)
    scan(world, 0)
    pool = threads(8, "openmp", pid=500)
    assert world.table.handle(EvidenceRead(name(key), evidence(pool)), T0 + 1).events == []
    assert world.table.snapshot().violations == ()
