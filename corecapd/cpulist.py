"""The kernel's CPU list format ("0,2-3"), parsed and printed in one place."""

from __future__ import annotations

import re
from collections.abc import Iterable

# A sanity bound: larger ids are typos, not hardware (Linux's NR_CPUS tops out at 8192).
MAX_CPU_ID = 8191


# Plain ASCII digits only: int() would also take "+1", "1_0" and other scripts' digits.
_ITEM = re.compile(r"(?P<low>[0-9]+)(?:-(?P<high>[0-9]+))?")


class CpuListError(ValueError):
    """A CPU list string that is not in the kernel's format."""


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse "0,2-3" as the kernel prints it in cpuset.cpus and sysfs; "" is the empty set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            if text.strip():
                raise CpuListError(f"empty item in CPU list {text!r}")
            continue
        found = _ITEM.fullmatch(part)
        if found is None:
            raise CpuListError(
                f"{part!r} in CPU list {text!r} is not a CPU number or range like 2-5"
            )
        low = int(found["low"])
        high = int(found["high"]) if found["high"] is not None else low
        if low < 0 or high < low or high > MAX_CPU_ID:
            raise CpuListError(
                f"range {part!r} in CPU list {text!r} must be ascending, within 0-{MAX_CPU_ID}"
            )
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The shortest kernel-style list: {0, 1, 2, 5} -> "0-2,5"."""
    ordered = sorted(set(cpus))
    runs: list[str] = []
    start = prev = None
    for cpu in ordered:
        if prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            runs.append(_run(start, prev))
        start = prev = cpu
    if start is not None:
        runs.append(_run(start, prev))
    return ",".join(runs)


def _run(start: int, end: int | None) -> str:
    return str(start) if end == start else f"{start}-{end}"
