"""Attribution of threads to layers (corecapd/attribution.py).

The pure parts on synthetic input (maps, descriptors, strings, classification, symbols of a
library compiled here), a whole synthetic /proc that hostile bytes cannot crash, then real
processes: numpy's OpenBLAS with Python threads, scikit-learn's libgomp, and one real
TensorFlow job with all three TF pools at 16 threads.
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import Processes, wait_for
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corecapd.attribution import (
    TID_OFFSET,
    Layer,
    ProcessEvidence,
    Region,
    StackAttributor,
    StartRoutine,
    SymbolTables,
    attribute,
    classify,
    find_descriptors,
    parse_maps,
    region_of,
    short_symbol,
    stack_candidates,
    start_routine,
    std_string,
)
from corecapd.procfs import ProcessGone

THREAD_FN = "_ZN3tsl12_GLOBAL__N_17PThread8ThreadFnEPv"

# --- maps, regions, descriptors, strings --------------------------------------------------------

MAPS = b"""\
00400000-00404000 r-xp 00000000 08:01 1234 /usr/lib/libgomp.so.1
00600000-00610000 rw-p 00000000 00:00 0
01000000-01001000 ---p 00000000 00:00 0
01001000-01011000 rw-p 00000000 00:00 0
01100000-01110000 rw-p 00000000 00:00 0
01110000-01200000 ---p 00000000 00:00 0
7ffd0000-7ffd1000 rw-p 00000000 00:00 0    /tmp/a file with spaces (deleted)
garbage line
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_maps_parse_with_their_paths_and_skip_garbage() -> None:
    regions = parse_maps(MAPS)
    assert [region.start for region in regions] == [
        0x400000, 0x600000, 0x1000000, 0x1001000, 0x1100000, 0x1110000, 0x7FFD0000,
        0xFFFFFFFFFF600000,
    ]  # fmt: skip
    assert regions[0] == Region(0x400000, 0x404000, "r-xp", 0, 1234, "/usr/lib/libgomp.so.1")
    assert regions[0].executable and not regions[1].executable
    assert regions[6].path == "/tmp/a file with spaces (deleted)"


def test_stacks_sit_on_a_guard_and_arenas_do_not() -> None:
    # 0x1001000 has its guard below; 0x1100000 (a heap arena) has its reserve above.
    assert [region.start for region in stack_candidates(parse_maps(MAPS))] == [0x1001000]


@given(st.lists(st.integers(0, 1 << 20), min_size=0, max_size=30), st.integers(0, 1 << 21))
def test_region_of_agrees_with_a_linear_search(bounds: list[int], address: int) -> None:
    points = sorted(set(bounds))
    pairs = zip(points[::2], points[1::2], strict=False)
    regions = [Region(low, high, "r-xp", 0, 0, "") for low, high in pairs]
    expected = next((r for r in regions if r.start <= address < r.end), None)
    assert region_of(regions, address) == expected


@given(st.binary(max_size=3000))
def test_parse_maps_takes_any_bytes(text: bytes) -> None:
    for region in parse_maps(text):
        assert region.start >= 0 and len(region.perms) == 4


def descriptor_window(base: int, size: int, pd: int, tid: int, start: int, arg: int) -> bytes:
    """Memory at `base` holding a glibc x86-64 descriptor at `pd` (as glibc 2.36 lays it)."""
    window = bytearray(size)
    offset = pd - base
    struct.pack_into("<Q", window, offset, pd)  # header.tcb
    struct.pack_into("<Q", window, offset + 16, pd)  # header.self
    struct.pack_into("<i", window, offset + TID_OFFSET, tid)
    struct.pack_into("<QQ", window, offset + 0x638, start, arg)
    return bytes(window)


def test_a_descriptor_is_found_by_its_self_pointers_and_tid() -> None:
    base, top = 0x7F0000000000, 0x7F0000002000
    window = descriptor_window(base, top - base, top - 0x940, 4321, 0x401234, 0x600100)
    assert find_descriptors(window, base, {4321, 99}) == {4321: top - 0x940}
    assert find_descriptors(window, base, {99}) == {}  # a TID of another process: no
    cut = top - 0x940 - base + TID_OFFSET + 2
    assert find_descriptors(window[:cut], base, {4321}) == {}  # cut in the TID
    blob = window[top - 0x940 - base :]
    assert start_routine(blob, lambda word: 0x400000 <= word < 0x404000) == (0x401234, 0x600100)
    assert start_routine(blob, lambda word: False) is None


@given(st.binary(max_size=5000), st.integers(0, (1 << 47) - 1), st.sets(st.integers(1, 1 << 22)))
def test_garbage_windows_give_only_wanted_tids_at_self_pointers(
    window: bytes, base: int, tids: set[int]
) -> None:
    for tid, address in find_descriptors(window, base, tids).items():
        assert tid in tids
        at = address - base
        assert struct.unpack_from("<Q", window, at)[0] == address
    assert start_routine(window, lambda word: word % 7 == 0) is None or len(window) > TID_OFFSET


def test_std_strings_inline_heap_and_implausible() -> None:
    inline = struct.pack("<QQ", 0x1010, 10) + b"tf_Compute".ljust(16, b"\0")
    assert std_string(inline, 0x1000) == b"tf_Compute"
    heap = struct.pack("<QQQQ", 0x5000, 26, 26, 0)
    assert std_string(heap, 0x1000) == (0x5000, 26)
    assert std_string(struct.pack("<QQQQ", 0x5000, 26, 3, 0), 0x1000) is None  # capacity < size
    assert std_string(struct.pack("<QQQQ", 0x5000, 1 << 40, 1 << 40, 0), 0x1000) is None
    assert std_string(b"short", 0x1000) is None


# --- classification -------------------------------------------------------------------------


def started(library: str, symbol: str | None) -> StartRoutine:
    return StartRoutine(0x401234, library, 0x1234, symbol)


@pytest.mark.parametrize(
    ("start", "created_as", "layer", "runtime"),
    [
        (started("libgomp.so.1", "gomp_thread_start"), None, Layer.OPENMP, "libgomp"),
        (started("libgomp-e985bcbb.so.1.0.0", None), None, Layer.OPENMP, "libgomp"),
        (started("libiomp5.so", "__kmp_launch_worker"), None, Layer.OPENMP, "Intel libiomp5"),
        (started("libomp.so", "__kmp_launch_worker"), None, Layer.OPENMP, "LLVM libomp"),
        (started("libopenblas.so.0", "blas_thread_server"), None, Layer.OPENBLAS, ""),
        (started("libscipy_openblas64_-32a4b2a6.so", None), None, Layer.OPENBLAS, ""),
        (started("libmkl_core.so.2", None), None, Layer.MKL, ""),
        (started("libpython3.11.so.1.0", "pythread_wrapper"), None, Layer.PYTHON_THREADING, ""),
        (started("python3.11", None), None, Layer.PYTHON_THREADING, ""),
        (started("libtensorflow_framework.so.2", THREAD_FN), "tf_numa_-1_Eigen",
         Layer.TF_INTRA_OP, ""),
        (started("libtensorflow_framework.so.2", THREAD_FN), "tf_Eigen", Layer.TF_INTRA_OP, ""),
        (started("libtensorflow_framework.so.2", THREAD_FN), "tf_Compute", Layer.TF_INTER_OP, ""),
        (started("libtensorflow_framework.so.2", THREAD_FN), "tf_data_private_threadpool",
         Layer.TF_DATA, "private pool"),
        (started("libtensorflow_framework.so.2", THREAD_FN), "tf_data_iterator_resource",
         Layer.TF_DATA, "iterator"),
        (started("libtensorflow_framework.so.2", THREAD_FN), "dataset-memory-logging-thread",
         Layer.TF_DATA, ""),
        (started("libtensorflow_framework.so.2", THREAD_FN), "tf_graph_runner",
         Layer.OTHER_NATIVE, "TensorFlow"),
        # A TF thread whose pool name is unreadable is unknown, never guessed.
        (started("libtensorflow_framework.so.2", THREAD_FN), None, Layer.UNKNOWN, ""),
        # Stripped TF: the name alone must be one of TF's.
        (started("libtensorflow_framework.so.2", None), "tf_Compute", Layer.TF_INTER_OP, ""),
        (started("libtensorflow_framework.so.2", None), "hello", Layer.UNKNOWN, ""),
        # Another routine in TF's library (LLVM's workers in libtensorflow_cc).
        (started("libtensorflow_cc.so.2", "_ZN4llvm6thread11ThreadProxy"), None,
         Layer.OTHER_NATIVE, ""),
        (started("libstdc++.so.6", "execute_native_thread_routine"), None, Layer.OTHER_NATIVE, ""),
        (started("", None), None, Layer.OTHER_NATIVE, ""),
        (None, None, Layer.UNKNOWN, ""),
    ],
)  # fmt: skip
def test_classification(
    start: StartRoutine | None, created_as: str | None, layer: Layer, runtime: str
) -> None:
    verdict = classify(7, 1, start, created_as)
    assert (verdict.layer, verdict.runtime) == (layer, runtime)
    assert verdict.evidence


def test_the_main_thread_is_main_whatever_it_runs() -> None:
    assert classify(1, 1, started("libgomp.so.1", None), None).layer == Layer.MAIN


def test_evidence_names_the_start_routine_and_its_library() -> None:
    verdict = classify(7, 1, started("libgomp.so.1", "gomp_thread_start"), None)
    assert verdict.evidence == "start routine gomp_thread_start in libgomp.so.1"
    verdict = classify(7, 1, started("libtensorflow_framework.so.2", THREAD_FN), "tf_Compute")
    assert verdict.evidence == (
        "'tf_Compute', start routine tsl::(anonymous namespace)::PThread::ThreadFn"
        " in libtensorflow_framework.so.2"
    )
    assert "+0x1234 (no symbol)" in classify(7, 1, started("libgomp.so.1", None), None).evidence


@given(st.text(max_size=400))
def test_short_symbol_takes_anything(symbol: str) -> None:
    assert len(short_symbol(symbol)) <= 120


@given(
    st.one_of(st.none(), st.builds(StartRoutine, st.integers(0), st.text(), st.integers(0),
                                    st.one_of(st.none(), st.text()))),
    st.one_of(st.none(), st.text()),
    st.integers(1, 1 << 22),
)  # fmt: skip
def test_classify_is_total(start: StartRoutine | None, created_as: str | None, tid: int) -> None:
    verdict = classify(tid, 1, start, created_as)
    assert isinstance(verdict.layer, Layer)
    if start is None and tid != 1:
        assert verdict.layer == Layer.UNKNOWN


# --- symbols of a library compiled here -----------------------------------------------------

LIBRARY_SOURCE = f"""
__attribute__((used)) static void *gomp_thread_start(void *arg) {{ return arg; }}
void *thread_fn(void *arg) __asm__("{THREAD_FN}");
void *thread_fn(void *arg) {{ return gomp_thread_start(arg); }}
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("elf")
    (folder / "lib.c").write_text(LIBRARY_SOURCE)
    built = folder / "libtest.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O0", "-o", str(built), str(folder / "lib.c")], check=True
    )
    return built


def file_offset(path: Path, name: str) -> int:
    """Where function `name` starts in the file (not in memory), from its symbol."""
    with open(path, "rb") as file:
        elf = ELFFile(file)
        symbols = elf.get_section_by_name(".symtab")
        assert isinstance(symbols, SymbolTableSection)
        value = next(s["st_value"] for s in symbols.iter_symbols() if s.name == name)
        for segment in elf.iter_segments():
            low = segment["p_vaddr"]
            if segment["p_type"] == "PT_LOAD" and low <= value < low + segment["p_filesz"]:
                return int(value - low + segment["p_offset"])
    raise AssertionError(f"{name} is in no PT_LOAD segment of {path}")


def test_symbols_by_exact_address_from_symtab_and_dynsym(library: Path) -> None:
    tables = SymbolTables()
    assert tables.symbol(str(library), file_offset(library, "gomp_thread_start")) == (
        "gomp_thread_start"  # static: only in .symtab
    )
    assert tables.symbol(str(library), file_offset(library, THREAD_FN)) == THREAD_FN
    assert tables.symbol(str(library), file_offset(library, THREAD_FN) + 1) is None  # not a start
    assert tables.symbol(str(library), 1 << 40) is None  # in no segment
    assert len(tables) == 1  # one file, read once


def test_a_changed_library_is_read_again(library: Path, tmp_path: Path) -> None:
    copy = tmp_path / "libcopy.so"
    copy.write_bytes(library.read_bytes())
    tables = SymbolTables()
    offset = file_offset(copy, "gomp_thread_start")
    assert tables.symbol(str(copy), offset) == "gomp_thread_start"
    copy.write_bytes(b"\x7fELF not any more")
    assert tables.symbol(str(copy), offset) is None
    assert tables.symbol(str(tmp_path / "missing.so"), offset) is None
    assert len(tables) == 1  # what is not ELF is not kept


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096), st.integers(0, 1 << 16))
def test_hostile_files_give_no_symbol(tmp_path: Path, content: bytes, offset: int) -> None:
    path = tmp_path / "hostile.so"
    path.write_bytes(b"\x7fELF\x02\x01\x01" + content)
    found = SymbolTables().symbol(str(path), offset)  # must not raise
    assert found is None or isinstance(found, str)


def test_a_corrupt_symbol_table_gives_no_symbol(library: Path, tmp_path: Path) -> None:
    data = bytearray(library.read_bytes())
    with open(library, "rb") as file:
        symtab = ELFFile(file).get_section_by_name(".symtab")
        assert symtab is not None
        start, size = symtab["sh_offset"], symtab["sh_size"]
    data[start : start + size] = os.urandom(size)
    corrupt = tmp_path / "libcorrupt.so"
    corrupt.write_bytes(bytes(data))
    SymbolTables().symbol(str(corrupt), file_offset(library, "gomp_thread_start"))  # no raise


# --- a whole synthetic /proc --------------------------------------------------------------------

PID = 100
HEAP, STACKS, STACK_SIZE = 0x600000, 0x1000000, 0x10000


def fake_proc(
    root: Path,
    library: Path,
    *,
    threads: dict[int, tuple[str, str | None]],
    comms: dict[int, bytes | None] | None = None,
    garbage: bytes = b"",
    unguarded: frozenset[int] = frozenset(),
) -> Path:
    """A /proc with process PID: threads {tid: (library name, TF name)}, each on its own
    stack whose descriptor starts it in that library (hard links to the compiled one)."""
    proc = root / "proc"
    base = proc / str(PID)
    (base / "root/lib").mkdir(parents=True)
    inode = library.stat().st_ino
    maps = []
    libraries: dict[str, int] = {}
    for number, name in enumerate(sorted({lib for lib, _ in threads.values() if lib})):
        os.link(library, base / "root/lib" / name)
        low = 0x400000 + number * 0x100000
        libraries[name] = low
        maps.append(f"{low:08x}-{low + 0x10000:08x} r-xp 00000000 08:01 {inode} /lib/{name}")
    maps.append(f"{HEAP:08x}-{HEAP + 0x10000:08x} rw-p 00000000 00:00 0")
    memory = {HEAP: garbage}
    for index, (tid, (lib, tf_name)) in enumerate(sorted(threads.items())):
        guard = STACKS + index * 2 * STACK_SIZE
        low, top = guard + 0x1000, guard + 0x1000 + STACK_SIZE
        if tid not in unguarded:
            maps.append(f"{guard:08x}-{low:08x} ---p 00000000 00:00 0")
        maps.append(f"{low:08x}-{top:08x} rw-p 00000000 00:00 0")
        if not lib:
            if garbage:
                memory[top - len(garbage)] = garbage
            continue
        symbol = THREAD_FN if tf_name is not None else "gomp_thread_start"
        start = libraries[lib] + file_offset(library, symbol)
        arg = HEAP + 0x1000 + index * 0x100
        if tf_name is not None:
            text = tf_name.encode()
            memory[arg] = struct.pack("<QQQQ", arg + 0x40, len(text), len(text), 0)
            memory[arg + 0x40] = text
        window = descriptor_window(top - 0x2000, 0x2000, top - 0x940, tid, start, arg)
        memory[top - 0x2000] = window
    (base / "maps").write_text("\n".join(maps) + "\n")
    (base / "stat").write_text(f"{PID} (py thon) S 1 " + " ".join(["0"] * 17) + " 4242 0 0\n")
    with open(base / "mem", "wb") as mem:
        for address, content in memory.items():
            mem.seek(address)
            mem.write(content)
    for index, tid in enumerate(sorted(threads)):
        # blocked in futex(2): the saved stack pointer lies in its stack, below the descriptor
        pointer = STACKS + index * 2 * STACK_SIZE + 0x1000 + STACK_SIZE - 0x3000
        (base / "task" / str(tid)).mkdir(parents=True)
        (base / "task" / str(tid) / "syscall").write_text(
            f"202 0x1 0x189 0x0 0x0 0x0 0xffffffff {pointer:#x} 0x7f0000001234\n"
        )
    for tid in [PID, *threads]:
        (base / "task" / str(tid)).mkdir(parents=True, exist_ok=True)
        comm = (comms or {}).get(tid, b"python\n")
        if comm is not None:
            (base / "task" / str(tid) / "comm").write_bytes(comm)
    return proc


def test_a_synthetic_process_is_attributed_thread_by_thread(library: Path, tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        library,
        threads={
            101: ("libgomp.so.1", None),
            102: ("libtensorflow_framework.so.2", "tf_data_private_threadpool"),
            103: ("", None),  # its stack holds no descriptor
        },
    )
    evidence = attribute(PID, proc=proc)
    assert evidence.key == (PID, 4242)
    by_tid = {thread.tid: thread for thread in evidence.threads}
    assert by_tid[PID].layer == Layer.MAIN
    assert (by_tid[101].layer, by_tid[101].runtime) == (Layer.OPENMP, "libgomp")
    assert by_tid[101].evidence == "start routine gomp_thread_start in libgomp.so.1"
    assert (by_tid[102].layer, by_tid[102].runtime) == (Layer.TF_DATA, "private pool")
    assert "'tf_data_private_threadpool'" in by_tid[102].evidence
    assert by_tid[103].layer == Layer.UNKNOWN
    assert list(evidence.by_layer()) == [Layer.TF_DATA, Layer.OPENMP, Layer.MAIN, Layer.UNKNOWN]


def test_a_stack_without_a_guard_is_found_from_the_stack_pointer(
    library: Path, tmp_path: Path
) -> None:
    """A stack merged with its neighbour is no candidate: its thread's saved stack pointer
    (/proc/PID/task/TID/syscall) leads to it."""
    proc = fake_proc(
        tmp_path, library, threads={101: ("libgomp.so.1", None)}, unguarded=frozenset({101})
    )
    (thread,) = (t for t in attribute(PID, proc=proc).threads if t.tid == 101)
    assert (thread.layer, thread.runtime) == (Layer.OPENMP, "libgomp")
    (proc / str(PID) / "task/101/syscall").write_text("running\n")
    (thread,) = (t for t in attribute(PID, proc=proc).threads if t.tid == 101)
    assert thread.layer == Layer.UNKNOWN  # running, and no guard: not found, not guessed


def test_a_thread_that_vanished_is_unknown_and_raises_nothing(
    library: Path, tmp_path: Path
) -> None:
    proc = fake_proc(tmp_path, library, threads={101: ("libgomp.so.1", None)})
    (proc / str(PID) / "task" / "105").mkdir()  # listed, but its files are gone
    evidence = attribute(PID, proc=proc)
    assert [(t.tid, t.layer) for t in evidence.threads][-1] == (105, Layer.UNKNOWN)


def test_a_vanished_process_raises_process_gone(tmp_path: Path) -> None:
    with pytest.raises(ProcessGone):
        attribute(PID, proc=tmp_path)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    garbage=st.binary(max_size=0x3000),
    comm=st.binary(max_size=40),
    tf_name=st.text(max_size=40),
)
def test_hostile_memory_and_names_never_crash(
    library: Path, tmp_path_factory: pytest.TempPathFactory, garbage: bytes, comm: bytes,
    tf_name: str,
) -> None:  # fmt: skip
    root = tmp_path_factory.mktemp("hostile")
    proc = fake_proc(
        root,
        library,
        threads={101: ("libtensorflow_framework.so.2", tf_name), 102: ("", None)},
        comms={101: comm},
        garbage=garbage,
    )
    evidence = attribute(PID, proc=proc)
    assert {thread.tid for thread in evidence.threads} == {PID, 101, 102}
    assert next(t for t in evidence.threads if t.tid == 102).layer == Layer.UNKNOWN


# --- real processes ------------------------------------------------------------------------------

NUMPY_AND_THREADS = """
import concurrent.futures, sys, threading, numpy
stop = threading.Event()
for _ in range(3):
    threading.Thread(target=stop.wait, daemon=True).start()
executor = concurrent.futures.ThreadPoolExecutor(2)
list(executor.map(abs, [-1, -2, -3, -4]))
a = numpy.random.rand(300, 300)
a.dot(a)  # OpenBLAS's pool is up
print("ready", flush=True)
sys.stdin.read()
"""


def ready(process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()  # the workloads print "ready" or die
    assert line == b"ready\n", f"the workload did not start ({line!r})"


def layers(evidence: ProcessEvidence) -> Counter[tuple[Layer, str]]:
    return Counter((thread.layer, thread.runtime) for thread in evidence.threads)


def test_numpy_openblas_and_python_threads(processes: Processes) -> None:
    job = processes.python(
        NUMPY_AND_THREADS,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, OPENBLAS_NUM_THREADS="2"),
    )
    ready(job)
    evidence = StackAttributor().attribute(job.pid)
    counts = layers(evidence)
    assert counts[Layer.MAIN, ""] == 1
    assert counts[Layer.PYTHON_THREADING, ""] == 5  # 3 threading.Threads + 2 executor workers
    assert counts[Layer.OPENBLAS, ""] == 1  # OpenBLAS starts N - 1 workers
    assert sum(counts.values()) == len(os.listdir(f"/proc/{job.pid}/task"))
    blas = next(t for t in evidence.threads if t.layer == Layer.OPENBLAS)
    assert blas.evidence.startswith("start routine blas_thread_server in libscipy_openblas")


def test_scikit_learn_kmeans_runs_libgomp(processes: Processes) -> None:
    pytest.importorskip("sklearn")
    job = processes.python(
        """
        import sys, numpy
        from sklearn.cluster import KMeans
        KMeans(4, n_init=1, max_iter=5).fit(numpy.random.rand(2000, 8))
        print("ready", flush=True)
        sys.stdin.read()
        """,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="4"),
    )
    ready(job)
    counts = layers(StackAttributor().attribute(job.pid))
    assert counts[Layer.OPENMP, "libgomp"] == 3  # libgomp starts N - 1 workers
    assert counts[Layer.UNKNOWN, ""] == 0


def test_threads_that_come_and_go_raise_nothing(processes: Processes) -> None:
    job = processes.python(
        """
        import threading, time
        print("ready", flush=True)
        while True:
            threads = [threading.Thread(target=time.sleep, args=(0.001,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        """,
        stdout=subprocess.PIPE,
    )
    ready(job)
    attributor = StackAttributor()
    for _ in range(100):
        for thread in attributor.attribute(job.pid).threads:
            assert thread.layer in (Layer.MAIN, Layer.PYTHON_THREADING, Layer.UNKNOWN)


def test_a_process_that_exited_raises_process_gone(processes: Processes) -> None:
    job = processes.python("pass")
    job.wait(timeout=30)
    with pytest.raises(ProcessGone):
        StackAttributor().attribute(job.pid)


def test_attribution_reads_a_thread_it_created_itself() -> None:
    """This very process: its main thread and a threading.Thread, without a subprocess."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        evidence = StackAttributor().attribute(os.getpid())
        mine = next(t for t in evidence.threads if t.tid == thread.native_id)
        assert mine.layer == Layer.PYTHON_THREADING
        assert next(t for t in evidence.threads if t.tid == os.getpid()).layer == Layer.MAIN
    finally:
        stop.set()
        thread.join()


TF_POOLS = """
import sys, time
import numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(16)
tf.config.threading.set_inter_op_parallelism_threads(16)
x = np.random.rand(10000, 20).astype("float32")
y = np.random.rand(10000, 1).astype("float32")
model = tf.keras.Sequential([tf.keras.Input((20,)), tf.keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
ds = tf.data.Dataset.from_tensor_slices((x, y)).map(
    lambda a, b: (a * 2.0, b), num_parallel_calls=tf.data.AUTOTUNE
).batch(32).prefetch(tf.data.AUTOTUNE).repeat()
options = tf.data.Options()
options.threading.private_threadpool_size = 16
ds = ds.with_options(options)
class Ready(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 20:
            print("ready", flush=True)
        time.sleep(0.01)
model.fit(ds, epochs=1, steps_per_epoch=10**6, verbose=0, callbacks=[Ready()])
"""


@pytest.mark.tensorflow
def test_tensorflow_pools_told_apart(processes: Processes) -> None:
    """intra-op, inter-op and a tf.data private pool, 16 threads each, in one real job:
    the private pool's threads carry the process's name, and so do the intra-op ones."""
    pytest.importorskip("tensorflow")
    job = processes.python(
        TF_POOLS, stdout=subprocess.PIPE, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    )
    ready(job)
    attributor = StackAttributor()

    def pool_up() -> ProcessEvidence | None:
        evidence = attributor.attribute(job.pid)
        return evidence if layers(evidence)[Layer.TF_DATA, "private pool"] == 16 else None

    evidence = wait_for(pool_up, timeout=30, what="the private pool's 16 threads")
    counts = layers(evidence)
    assert counts[Layer.TF_INTRA_OP, ""] == 16
    assert counts[Layer.TF_INTER_OP, ""] == 16
    assert counts[Layer.UNKNOWN, ""] == 0
    private = [t for t in evidence.threads if t.runtime == "private pool"]
    assert {t.comm for t in private} != {"tf_data_private"}  # not from the name: it is refused
    assert all("'tf_data_private_threadpool'" in t.evidence for t in private)


def test_cost_of_a_warm_attribution_is_small(processes: Processes) -> None:
    """The symbol cache keeps the second attribution cheap (figures: bench/attribution.py)."""
    job = processes.python(NUMPY_AND_THREADS, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready(job)
    attributor = StackAttributor()
    attributor.attribute(job.pid)
    start = time.process_time()
    for _ in range(10):
        attributor.attribute(job.pid)
    assert (time.process_time() - start) / 10 < 0.05  # ~1.5 ms measured; generous
