"""Which threaded layer each thread of a process belongs to, from the thread's own stack.

An edge (it reads /proc and the libraries' files), behind one small interface:
`Attributor.attribute(pid) -> ProcessEvidence`, one `ThreadEvidence` per thread: its layer
(`Layer`), the runtime within the layer (which OpenMP, which tf.data thread) and the
evidence as a short sentence ("start routine blas_thread_server in libscipy_openblas64_.so").
Run it for `explain`, at a violation's onset and on demand: never on the exec path or on
every scan (a TF job costs 7-11 ms of CPU warm, ~4 ms of it reading and parsing
/proc/PID/maps, and 13-24 ms cold, when its libraries' symbols are first looked up:
docs/diagnosis.md, bench/attribution.py).

How: glibc keeps each thread's descriptor (`struct pthread`) at the top of the thread's
stack mapping, and in it the start routine and the argument that `pthread_create` was given.
1. /proc/PID/maps: the anonymous read-write mappings that sit on a PROT_NONE guard are
   thread stacks; the top page of each is read from /proc/PID/mem and the descriptor found
   in it by the x86-64 TLS ABI's self pointer (the thread pointer points at itself, and so
   does `header.self`), then matched to its TID by the descriptor's `tid` field. A thread
   whose descriptor is not at its mapping's top (the mapping merged with a neighbour) is
   found from its saved stack pointer (/proc/PID/task/TID/syscall) upwards.
2. The start routine is the one code pointer in the descriptor; the library it lies in
   comes from the mappings, its name from the library's symbol table (`SymbolTables`:
   pyelftools reads the headers, the table itself is searched for the exact address).
3. TensorFlow starts every thread through one routine (tsl's `PThread::ThreadFn`) for all of
   its pools, and the frames of an idle worker are the same in the intra-op pool, the
   inter-op pool and a tf.data private pool (`Eigen::ThreadPoolTempl<...>::WorkerLoop`
   under `EigenEnvironment::CreateThread`, seen with gdb on TF 2.21). What tells them apart
   is the name the pool gave the thread, kept whole in the start routine's argument (TF's
   `ThreadParams`, its first field a std::string): "tf_numa_-1_Eigen" (intra-op),
   "tf_Compute" (inter-op), "tf_data_private_threadpool". /proc's comm cannot: names longer
   than 15 bytes are refused by the kernel, and the thread keeps its creator's name.

Why this and not a native unwinder (measured here, docs/diagnosis.md): gdb `thread apply
all bt` stopped a TF job for 18-20 s (it loads the 788 MB libtensorflow_cc's symbols) and
its frames still do not tell the three Eigen pools apart; eu-stack and py-spy's native mode
stop the threads with ptrace too. This reads memory and stops nothing: the longest gap of
a 1 ms sleeper in the job while it was attributed (0-35 ms) was no longer than without
(0-38 ms, this 2-CPU machine's scheduling). Gdb's unwind is the ground truth of
bench/attribution.py instead: 170 of 170 threads right, over eight real workloads.
A scan of each stack for return addresses was the other candidate: it needs each thread's
stack pointer, which the kernel only gives for a thread blocked in a system call (a
runnable one reads "running": up to 16 of 26 threads of a TF + OpenMP job), it needs the
nearest symbol of every candidate address (the whole table of libtensorflow_cc: 1.2 M
symbols, 26 s through pyelftools' symbol objects), and its frames still cannot tell the TF
pools apart. The descriptor is there for every glibc thread, running or not.

What it cannot see: threads not started by glibc's pthread_create (musl, Go, raw clone),
threads on stacks the program allocated itself, other architectures than x86-64 (the
descriptor layout is the x86-64 one): all `unknown`. A process whose memory cannot be read
(another user namespace, a ptrace-denying LSM): its threads are `unknown`, with the reason.
"""

from __future__ import annotations

import enum
import errno
import itertools
import mmap
import os
import re
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

from corecapd.model import ProcKey
from corecapd.procfs import ProcessGone, vanishing


class Layer(enum.Enum):
    """A threaded layer of a job. The values are the names used in output."""

    TF_INTRA_OP = "tf-intra-op"
    TF_INTER_OP = "tf-inter-op"
    TF_DATA = "tf-data"  # private pool, autotune, iterator and other tf.data threads
    OPENMP = "openmp"  # runtime: libgomp, Intel libiomp5, LLVM libomp
    OPENBLAS = "openblas"
    MKL = "mkl"
    PYTHON_THREADING = "python-threading"  # threading.Thread, concurrent.futures, _thread
    OTHER_NATIVE = "other-native"  # a known start routine of no layer above
    MAIN = "main"  # the process's first thread (TID = PID)
    UNKNOWN = "unknown"  # no evidence: reported as such, never guessed


@dataclass(frozen=True)
class ThreadEvidence:
    """One thread's layer and why."""

    tid: int
    comm: str  # /proc/PID/task/TID/comm as read: what the job chose, print via `visible`
    layer: Layer
    runtime: str  # within the layer: "libgomp", "private pool", ...; "" when there is none
    evidence: str  # a short sentence: "start routine gomp_thread_start in libgomp.so.1"
    library: str = ""  # the file its start routine lies in (pools of one layer, told apart)


@dataclass(frozen=True)
class ProcessEvidence:
    """Every thread of one process, attributed, as read at one moment."""

    key: ProcKey
    threads: tuple[ThreadEvidence, ...]

    def by_layer(self) -> dict[Layer, tuple[ThreadEvidence, ...]]:
        """The threads grouped by layer, layers in `Layer` order, empty layers left out."""
        grouped: dict[Layer, list[ThreadEvidence]] = {}
        for thread in self.threads:
            grouped.setdefault(thread.layer, []).append(thread)
        return {layer: tuple(grouped[layer]) for layer in Layer if layer in grouped}


class Attributor(Protocol):
    """What the daemon needs: the evidence for one process. Tests give a fake."""

    def attribute(self, pid: int) -> ProcessEvidence:
        """Every thread of `pid`, attributed.

        Raises:
            ProcessGone: the process exited (or its PID was reused) while it was read.
            Threads that exit meanwhile raise nothing: they are left out, or `unknown`."""
        ...


# --- the pure part: maps, descriptors, strings, classification ------------------------------


class Region(NamedTuple):
    """One line of /proc/PID/maps. A tuple: a TF process has ~1500 of them."""

    start: int
    end: int
    perms: str  # "r-xp"
    offset: int  # in the file
    inode: int
    path: str  # "" for anonymous memory; "[heap]", "[stack]", ...

    @property
    def executable(self) -> bool:
        return self.perms[2:3] == "x"


_MAPS_LINE = re.compile(
    rb"^([0-9a-f]+)-([0-9a-f]+) ([-rwxsp]{4}) ([0-9a-f]+) [0-9a-f]+:[0-9a-f]+ (\d+) *(.*)$",
    re.MULTILINE,
)


def parse_maps(text: bytes) -> list[Region]:
    """The lines of /proc/PID/maps, in address order. Lines that do not parse are skipped
    (a path may hold anything but a newline; the first five fields are the kernel's)."""
    return [
        Region(
            int(start, 16),
            int(end, 16),
            perms.decode(),
            int(offset, 16),
            int(inode),
            path.decode(errors="surrogateescape"),
        )
        for start, end, perms, offset, inode, path in _MAPS_LINE.findall(text)
    ]


def region_of(regions: Sequence[Region], address: int) -> Region | None:
    """The region holding `address`, by bisection (`regions` in address order)."""
    low, high = 0, len(regions)
    while low < high:
        middle = (low + high) // 2
        if regions[middle].end <= address:
            low = middle + 1
        else:
            high = middle
    if low < len(regions) and regions[low].start <= address:
        return regions[low]
    return None


def stack_candidates(regions: Sequence[Region]) -> list[Region]:
    """Anonymous read-write regions right above a PROT_NONE one: glibc maps each thread's
    stack with its guard below it (heap arenas have their reserve above, not below)."""
    return [
        region
        for below, region in itertools.pairwise(regions)
        if region.perms == "rw-p"
        and not region.path
        and below.end == region.start
        and below.perms.startswith("---")
    ]


# x86-64 glibc `struct pthread`: it starts with the TCB header, whose words 0 and 2 (`tcb`,
# `self`) point at the descriptor itself (the TLS ABI); `tid` sits at 0x2d0 in glibc 2.3
# through 2.41 (%fs:0x2d0 in its own code; gdb reads it through libthread_db). The start
# routine lies after it: the only word of the descriptor that points into code (found by
# that, not by its offset, 0x638 in glibc 2.36), followed by its argument.
TID_OFFSET = 0x2D0
DESCRIPTOR_BYTES = 0x1000  # more than struct pthread in any glibc (0x940 in 2.36)
TOP_WINDOW = 0x2000  # bytes read at the top of each stack: descriptor + its alignment
SP_SCAN_LIMIT = 1 << 20  # how far above a saved stack pointer a descriptor is looked for
# Bytes read above stack pointers per attribution, all threads together: a process whose
# threads have no descriptors (musl, Go) costs at most this (~25 ms), not 1 MiB per thread.
SP_SCAN_BUDGET = 2 << 20


def find_descriptors(window: bytes, base: int, tids: AbstractSet[int]) -> dict[int, int]:
    """Thread descriptors in `window` (memory read at address `base`): {tid: address}.

    A descriptor is an 8-aligned word equal to its own address, the word two further on
    equal to it too, and a TID of `tids` at TID_OFFSET. Garbage yields nothing."""
    found: dict[int, int] = {}
    skew = -base % 8
    count = (len(window) - skew) // 8
    if count < 3 or base + skew + 8 * count > 1 << 64:
        return found
    first = base + skew
    # Words equal to their own address are the zero words of window XOR addresses: in C.
    addresses = struct.pack(f"<{count}Q", *range(first, first + 8 * count, 8))
    words = window[skew : skew + 8 * count]
    same = (int.from_bytes(words, "little") ^ int.from_bytes(addresses, "little")).to_bytes(
        8 * count, "little"
    )
    at = same.find(ZERO_WORD)
    while at != -1:
        if at % 8:
            at = same.find(ZERO_WORD, at + 8 - at % 8)
            continue
        address = first + at
        tid_at = skew + at + TID_OFFSET
        self_at = skew + at + 16
        if tid_at + 4 <= len(window) and struct.unpack_from("<Q", window, self_at)[0] == address:
            (tid,) = struct.unpack_from("<i", window, tid_at)
            if tid in tids and tid not in found:
                found[tid] = address
        at = same.find(ZERO_WORD, at + 8)
    return found


ZERO_WORD = bytes(8)


def start_routine(descriptor: bytes, is_code: Callable[[int], bool]) -> tuple[int, int] | None:
    """(start routine, argument) from a descriptor's bytes: the first word past the TID that
    points into code, and the word after it. None when no word does."""
    count = (len(descriptor) - TID_OFFSET - 8) // 8
    if count < 2:
        return None
    words = struct.unpack_from(f"<{count}Q", descriptor, TID_OFFSET + 8)
    for index, word in enumerate(words[:-1]):
        if word > 0xFFFF and is_code(word):
            return word, words[index + 1]
    return None


MAX_NAME = 128  # bytes of a thread name read from a std::string


def std_string(blob: bytes, address: int) -> tuple[int, int] | bytes | None:
    """A libstdc++ std::string at `address` (`blob` its first 32 bytes): the characters when
    they are inline (short-string buffer), (pointer, length) when they are elsewhere, None
    when the bytes are not a plausible string of at most MAX_NAME characters."""
    if len(blob) < 32:
        return None
    pointer, length = struct.unpack_from("<QQ", blob)
    if pointer == address + 16:
        return blob[16 : 16 + length] if 0 < length <= 15 else None
    if not 0 < length <= MAX_NAME:
        return None
    (capacity,) = struct.unpack_from("<Q", blob, 16)
    return (pointer, length) if capacity >= length else None


def thread_name(raw: bytes) -> str | None:
    """A name TF gave a thread: printable ASCII, else None."""
    if raw and all(32 < byte < 127 for byte in raw):
        return raw.decode("ascii")
    return None


@dataclass(frozen=True)
class StartRoutine:
    """Where a thread started: the code address, the library it lies in, its symbol."""

    address: int
    library: str  # the file's basename; "" for anonymous code
    offset: int  # from the library's first mapping
    symbol: str | None  # None: the library has no symbol for it (stripped)

    def describe(self) -> str:
        where = self.library or "anonymous memory"
        if self.symbol:
            return f"start routine {short_symbol(self.symbol)} in {where}"
        return f"start routine at {where}+{self.offset:#x} (no symbol)"


@dataclass(frozen=True)
class Attribution:
    layer: Layer
    runtime: str
    evidence: str


# Libraries by their file's basename (a wheel's bundled copy carries a hash:
# libgomp-e985bcbb.so.1.0.0, libscipy_openblas64_-32a4b2a6.so).
_LIBRARIES: tuple[tuple[re.Pattern[str], Layer, str], ...] = (
    (re.compile(r"^libgomp\b"), Layer.OPENMP, "libgomp"),
    (re.compile(r"^libiomp5\b"), Layer.OPENMP, "Intel libiomp5"),
    (re.compile(r"^libomp\b"), Layer.OPENMP, "LLVM libomp"),
    (re.compile(r"openblas"), Layer.OPENBLAS, ""),
    (re.compile(r"^libmkl_"), Layer.MKL, ""),
    (re.compile(r"^libpython\d|^python\d"), Layer.PYTHON_THREADING, ""),
)
_TENSORFLOW = re.compile(r"^(libtensorflow_(framework|cc)\.so|_pywrap_tensorflow)")
TF_THREAD_FN = "PThread8ThreadFn"  # tsl::(anonymous namespace)::PThread::ThreadFn, mangled
# Pools by the name TF gave their threads (tsl's ThreadPool prefixes "tf_").
_TF_POOLS: tuple[tuple[re.Pattern[str], Layer, str], ...] = (
    (re.compile(r"^tf_(numa_-?\d+_)?Eigen$"), Layer.TF_INTRA_OP, ""),
    (re.compile(r"^tf_Compute$"), Layer.TF_INTER_OP, ""),
    (re.compile(r"^tf_data_private_threadpool$"), Layer.TF_DATA, "private pool"),
    (re.compile(r"^tf_data_(model|autotune)"), Layer.TF_DATA, "autotune"),
    (re.compile(r"^tf_data_iterator"), Layer.TF_DATA, "iterator"),
    (re.compile(r"^(tf_data_|dataset-)"), Layer.TF_DATA, ""),
)


def classify(tid: int, pid: int, start: StartRoutine | None, created_as: str | None) -> Attribution:
    """A thread's layer from its start routine and, for TensorFlow's threads, the name its
    pool gave it (`created_as`, read from the start routine's argument). Pure and total."""
    if tid == pid:
        return Attribution(Layer.MAIN, "", "the process's main thread (TID = PID)")
    if start is None:
        return Attribution(Layer.UNKNOWN, "", "no thread descriptor found")
    where = start.describe()
    symbol = start.symbol or ""
    tensorflow = bool(_TENSORFLOW.match(start.library))
    if tensorflow and (TF_THREAD_FN in symbol or not symbol):
        if created_as is None:
            return Attribution(Layer.UNKNOWN, "", f"{where}; its pool's name is unreadable")
        for pattern, layer, runtime in _TF_POOLS:
            if pattern.match(created_as):
                return Attribution(layer, runtime, f"{created_as!r}, {where}")
        if symbol:
            return Attribution(Layer.OTHER_NATIVE, "TensorFlow", f"{created_as!r}, {where}")
        return Attribution(Layer.UNKNOWN, "", f"{where}; {created_as!r} is no TF pool's name")
    for pattern, layer, runtime in _LIBRARIES:
        if pattern.search(start.library):
            return Attribution(layer, runtime, where)
    return Attribution(Layer.OTHER_NATIVE, "", where)


_LENGTH = re.compile(r"[0-9]+")


def short_symbol(symbol: str) -> str:
    """A readable form of a symbol: `ns::Class::method` for an Itanium-mangled nested name
    (`_ZN3tsl12_GLOBAL__N_17PThread8ThreadFnEPv` → `tsl::(anonymous namespace)::PThread::
    ThreadFn`), the symbol itself otherwise, at most 120 characters. A small parser of the
    common case, not a demangler: library symbols are input a job controls."""
    parts: list[str] = []
    if symbol.startswith("_ZN"):
        at = 3
        while symbol[at : at + 1] in ("K", "V", "r", "R", "O"):  # cv- and ref-qualifiers
            at += 1
        while len(parts) < 16 and (length := _LENGTH.match(symbol, at)):
            at = length.end()
            name = symbol[at : at + int(length.group())]
            if len(name) != int(length.group()) or not name:
                break
            parts.append("(anonymous namespace)" if name == "_GLOBAL__N_1" else name)
            at += len(name)
        if parts and symbol[at : at + 1] == "E":
            return "::".join(parts)[:120]
    return symbol[:120]


# --- symbol tables ------------------------------------------------------------------------


@dataclass(frozen=True)
class FileKey:
    """A library file's identity: a path names different files over time."""

    device: int
    inode: int
    mtime_ns: int
    size: int


@dataclass(frozen=True)
class _Table:
    offset: int  # of the symbol table in the file
    size: int
    strings: int  # offset of its string table
    strings_size: int


@dataclass
class _Library:
    loads: tuple[tuple[int, int, int], ...]  # PT_LOAD (file offset, file size, address)
    tables: tuple[_Table, ...]  # .symtab first, then .dynsym
    symbols: dict[int, str | None]  # looked up so far: offset in the file → name


_SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym
_FUNCTION_TYPES = (2, 10)  # STT_FUNC, STT_GNU_IFUNC


def _elf_errors() -> tuple[type[Exception], ...]:
    """What reading a library may raise: it is malformed, unreadable, or gone."""
    _keep_readline_out()
    from elftools.common.exceptions import ELFError

    return (ELFError, OSError, ValueError, IndexError, KeyError, struct.error)


def _keep_readline_out() -> None:
    """Called before pyelftools is imported, which is on the first look at a job: imported
    with the daemon, it and what it imports add 11 MB to an RSS of 36, and most daemons
    never explain a job.

    pyelftools imports pdb (elftools.construct.debug), Python 3.13's pdb imports rlcompleter,
    and rlcompleter imports readline, whose initialisation reads the terminal's terminfo entry:
    ncurses 6.5 (Debian 13) opens it after setfsuid(), a @privileged system call for which the
    unit's SystemCallFilter= kills corecapd (SIGSYS). Nothing here reads a line from a terminal:
    readline is made unimportable (None in sys.modules) unless it is loaded already, and
    rlcompleter and pdb carry on without it.
    """
    sys.modules.setdefault("readline", None)  # type: ignore[arg-type]  # None: not importable


class SymbolTables:
    """Library symbols, looked up by exact address and kept per file (device, inode, mtime,
    size), so that a library shared by many jobs is read once.

    Only start routines are looked up, and a start routine is a function's first byte: the
    symbol table is searched for that exact value (`mmap.find`, in C) instead of being loaded
    whole. libtensorflow_cc's .symtab holds 1.2 M symbols (29 MB): building a table of them
    through pyelftools costs 26 s; the exact search costs 35 ms once (5 ms in the 130 k of
    libtensorflow_framework), then ~10 us per lookup, and holds nothing but the answers."""

    def __init__(self, max_libraries: int = 64, max_symbols: int = 4096) -> None:
        self._libraries: OrderedDict[FileKey, _Library | None] = OrderedDict()
        self.max_libraries = max_libraries
        self.max_symbols = max_symbols

    def symbol(self, path: str, file_offset: int) -> str | None:
        """The name of the function that starts at `file_offset` in the file at `path`
        (an offset into the file, as /proc/PID/maps gives it), or None: no such symbol, or
        the file is gone, unreadable or not a 64-bit ELF. Raises nothing.

        Warm (file and offset seen before): one stat(2), ~10 us."""
        try:
            key = _file_key(os.stat(path))
            library = self._libraries.get(key)
            if library is not None and file_offset in library.symbols:
                self._libraries.move_to_end(key)
                return library.symbols[file_offset]
            with open(path, "rb") as file:
                key = _file_key(os.fstat(file.fileno()))  # the file opened, if replaced since
                library = self._library(key, file)
                if library is None:
                    return None
                if len(library.symbols) >= self.max_symbols:
                    library.symbols.clear()
                address = _address(library.loads, file_offset)
                found = None if address is None else _find_symbol(file, library.tables, address)
                library.symbols[file_offset] = found
                return found
        except _elf_errors():  # evaluated only when something was raised
            return None

    def _library(self, key: FileKey, file: IO[bytes]) -> _Library | None:
        if key in self._libraries:
            self._libraries.move_to_end(key)
            return self._libraries[key]
        library = _read_library(file)
        self._libraries[key] = library
        while len(self._libraries) > self.max_libraries:
            self._libraries.popitem(last=False)
        return library

    def __len__(self) -> int:
        return len(self._libraries)


MAX_HEADERS = 4096  # sections or segments read of one file (a hostile file may claim 65535)


def _file_key(stat: os.stat_result) -> FileKey:
    return FileKey(stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _read_library(file: IO[bytes]) -> _Library | None:
    """The load segments and symbol tables of an ELF file, None if not 64-bit little-endian.

    pyelftools parses the headers; its section objects are not built, since making the
    sections of libtensorflow_cc parses its GNU hash tables whole (0.7 s, measured).

    """
    _keep_readline_out()
    from elftools.common.utils import struct_parse
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(file)
    if elf.elfclass != 64 or not elf.little_endian:
        return None
    header = elf.header

    def parsed(kind: Any, offset: int) -> Any:
        return struct_parse(kind, file, stream_pos=offset)

    loads = []
    for index in range(min(header["e_phnum"], MAX_HEADERS)):
        segment = parsed(elf.structs.Elf_Phdr, header["e_phoff"] + index * header["e_phentsize"])
        if segment["p_type"] == "PT_LOAD":
            loads.append((segment["p_offset"], segment["p_filesz"], segment["p_vaddr"]))
    sections = [
        parsed(elf.structs.Elf_Shdr, header["e_shoff"] + index * header["e_shentsize"])
        for index in range(min(elf.num_sections(), MAX_HEADERS))
    ]
    names = sections[elf.get_shstrndx()]["sh_offset"]

    def name_of(section: Any) -> bytes:
        file.seek(names + section["sh_name"])
        return file.read(16).partition(b"\0")[0]

    tables = []
    for wanted in (b".symtab", b".dynsym"):
        for section in sections:
            if name_of(section) != wanted or section["sh_entsize"] != _SYMBOL.size:
                continue
            strings = sections[section["sh_link"]]
            tables.append(
                _Table(
                    section["sh_offset"],
                    section["sh_size"],
                    strings["sh_offset"],
                    strings["sh_size"],
                )
            )
            break
    return _Library(tuple(loads), tuple(tables), {})


def _address(loads: Iterable[tuple[int, int, int]], file_offset: int) -> int | None:
    for offset, size, address in loads:
        if offset <= file_offset < offset + size:
            return address + file_offset - offset
    return None


def _find_symbol(file: IO[bytes], tables: Iterable[_Table], address: int) -> str | None:
    size = os.fstat(file.fileno()).st_size
    if size == 0:
        return None
    needle = struct.pack("<Q", address)
    with mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as memory:
        for table in tables:
            end = min(table.offset + table.size, size)
            at = memory.find(needle, table.offset + 8, end)
            while at != -1:
                entry = at - 8
                if (entry - table.offset) % _SYMBOL.size == 0 and entry + _SYMBOL.size <= end:
                    name, info, _, section, _, _ = _SYMBOL.unpack_from(memory, entry)
                    if info & 0xF in _FUNCTION_TYPES and section != 0:
                        found = _c_string(memory, table, name)
                        if found:
                            return found
                at = memory.find(needle, at + 1, end)
    return None


def _c_string(memory: mmap.mmap, table: _Table, offset: int) -> str | None:
    if not 0 <= offset < table.strings_size:
        return None
    start = table.strings + offset
    end = memory.find(b"\0", start, min(start + 4096, table.strings + table.strings_size))
    if end <= start:
        return None
    text = memory[start:end].decode("ascii", errors="replace")
    return text if text.isprintable() else None


# --- the edge ---------------------------------------------------------------------------------


class StackAttributor:
    """`Attributor` from the threads' descriptors and the libraries' symbol tables.

    Reads /proc/PID/{stat,maps,task/*/comm,task/*/syscall,mem} and the libraries through
    /proc/PID/root (the job's own mount namespace). Needs to be allowed to read the job's
    memory (root, or CAP_SYS_PTRACE). Never stops the job."""

    def __init__(self, proc: Path = Path("/proc"), symbols: SymbolTables | None = None) -> None:
        self.proc = proc
        self.symbols = symbols if symbols is not None else SymbolTables()
        self.native = os.uname().machine == "x86_64"  # the descriptor layout known here

    def attribute(self, pid: int) -> ProcessEvidence:
        """See `Attributor.attribute`."""
        base = f"{self.proc}/{pid}"
        start_ticks = self._start_ticks(pid)
        with vanishing(pid):
            tids = sorted(int(name) for name in os.listdir(f"{base}/task") if name.isdigit())
            regions = parse_maps(_read(f"{base}/maps"))
        comms = {tid: self._comm(base, tid) for tid in tids}
        found, problem = self._starts(pid, base, set(tids) - {pid}, regions)
        threads = []
        for tid in tids:
            if tid != pid and tid not in found:
                evidence = problem or "no thread descriptor found"
                threads.append(ThreadEvidence(tid, comms[tid], Layer.UNKNOWN, "", evidence))
                continue
            start, created_as = found.get(tid, (None, None))
            verdict = classify(tid, pid, start, created_as)
            library = start.library if start is not None else ""
            threads.append(
                ThreadEvidence(
                    tid, comms[tid], verdict.layer, verdict.runtime, verdict.evidence, library
                )
            )
        if self._start_ticks(pid) != start_ticks:
            raise ProcessGone(pid)  # the PID now names another process
        return ProcessEvidence(ProcKey(pid, start_ticks), tuple(threads))

    def _start_ticks(self, pid: int) -> int:
        with vanishing(pid):
            raw = _read(f"{self.proc}/{pid}/stat")
        try:
            return int(raw[raw.rindex(b")") + 2 :].split()[19])
        except (ValueError, IndexError) as err:
            raise ProcessGone(pid) from err

    @staticmethod
    def _comm(base: str, tid: int) -> str:
        try:
            return _read(f"{base}/task/{tid}/comm").rstrip(b"\n").decode(errors="replace")
        except OSError:
            return ""

    def _starts(
        self, pid: int, base: str, tids: set[int], regions: list[Region]
    ) -> tuple[dict[int, tuple[StartRoutine | None, str | None]], str]:
        """{tid: (start routine, the name TF gave it)} for the threads whose descriptor was
        found, and why none were when none could be."""
        if not tids:
            return {}, ""
        if not self.native:
            return {}, f"thread descriptors are read on x86-64 only, not {os.uname().machine}"
        try:
            memory = os.open(f"{base}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ESRCH):
                raise ProcessGone(pid) from err
            return {}, f"memory not readable ({errno.errorcode.get(err.errno or 0, err)})"
        try:
            descriptors = self._descriptors(memory, base, tids, regions)
            found: dict[int, tuple[StartRoutine | None, str | None]] = {}
            code = [(region.start, region.end) for region in regions if region.executable]
            firsts: dict[str, int] = {}
            for region in regions:
                firsts.setdefault(region.path, region.start)
            for tid, blob in descriptors.items():
                start = start_routine(blob, lambda word: _within(code, word))
                if start is None:
                    found[tid] = (None, None)
                    continue
                routine = self._symbolize(pid, regions, firsts, start[0])
                created_as = None
                if _TENSORFLOW.match(routine.library):
                    created_as = _read_name(memory, start[1])
                found[tid] = (routine, created_as)
            return found, ""
        finally:
            os.close(memory)

    def _descriptors(
        self, memory: int, base: str, tids: set[int], regions: list[Region]
    ) -> dict[int, bytes]:
        """{tid: the bytes of its descriptor, up to DESCRIPTOR_BYTES or its mapping's end}."""
        found: dict[int, bytes] = {}

        def search(window: bytes, address: int, wanted: AbstractSet[int]) -> None:
            for tid, at in find_descriptors(window, address, wanted).items():
                found[tid] = window[at - address : at - address + DESCRIPTOR_BYTES]

        for region in stack_candidates(regions):
            size = min(TOP_WINDOW, region.end - region.start)
            search(_pread(memory, size, region.end - size), region.end - size, tids - found.keys())
            if len(found) == len(tids):
                return found
        budget = SP_SCAN_BUDGET
        for tid in sorted(tids - found.keys()):  # not at a mapping's top: from its stack pointer
            pointer = _stack_pointer(base, tid)
            stack = region_of(regions, pointer) if pointer else None
            if stack is not None and budget > 0:
                end = min(stack.end, pointer + SP_SCAN_LIMIT, pointer + budget)
                budget -= end - pointer
                search(_pread(memory, end - pointer, pointer), pointer, {tid})
        return found

    def _symbolize(
        self, pid: int, regions: list[Region], firsts: dict[str, int], address: int
    ) -> StartRoutine:
        region = region_of(regions, address)
        if region is None or not region.path.startswith("/"):
            return StartRoutine(address, region.path if region else "", 0, None)
        library = os.path.basename(region.path)
        first = firsts.get(region.path, region.start)
        file_offset = region.offset + address - region.start
        symbol = None
        path = f"{self.proc}/{pid}/root{region.path}"
        try:
            same_file = os.stat(path).st_ino == region.inode
        except OSError:
            same_file = False
        if same_file:  # not replaced since it was mapped (" (deleted)" fails the stat)
            symbol = self.symbols.symbol(path, file_offset)
        return StartRoutine(address, library, address - first, symbol)


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _pread(memory: int, size: int, address: int) -> bytes:
    """`size` bytes of the job's memory at `address`; b"" when unmapped meanwhile."""
    if size <= 0 or address <= 0:
        return b""
    try:
        return os.pread(memory, size, address)
    except (OSError, OverflowError):
        return b""


def _within(ranges: Sequence[tuple[int, int]], address: int) -> bool:
    """Whether `address` lies in one of `ranges` ((start, end), in address order)."""
    low, high = 0, len(ranges)
    while low < high:
        middle = (low + high) // 2
        if ranges[middle][1] <= address:
            low = middle + 1
        else:
            high = middle
    return low < len(ranges) and ranges[low][0] <= address


def _stack_pointer(base: str, tid: int) -> int:
    """The saved stack pointer of a thread blocked in a system call, else 0."""
    try:
        fields = _read(f"{base}/task/{tid}/syscall").split()
        return int(fields[-2], 16) if len(fields) >= 3 else 0
    except (OSError, ValueError):
        return 0


def _read_name(memory: int, address: int) -> str | None:
    """The std::string at the start of TF's ThreadParams (the start routine's argument)."""
    found = std_string(_pread(memory, 32, address), address)
    if isinstance(found, tuple):
        found = _pread(memory, found[1], found[0])
    return thread_name(found) if found is not None else None


def attribute(
    pid: int, *, proc: Path = Path("/proc"), symbols: SymbolTables | None = None
) -> ProcessEvidence:
    """`StackAttributor(proc, symbols).attribute(pid)`: pass `symbols` to keep the symbol
    cache between calls (the daemon keeps one attributor)."""
    return StackAttributor(proc, symbols).attribute(pid)


__all__ = [
    "Attributor",
    "Layer",
    "ProcessEvidence",
    "StackAttributor",
    "SymbolTables",
    "ThreadEvidence",
    "attribute",
]
