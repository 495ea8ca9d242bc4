"""The kernel's CPU list format ("0,2-3"), parsed and printed in one place."""

from __future__ import annotations

import re
from collections.abc import Iterable

# A sanity bound: larger ids are typos, not hardware (Linux's NR_CPUS tops out at 8192).
MAX_CPU_ID = 8191
_MAX_CPU_DIGITS = len(str(MAX_CPU_ID))


# Plain ASCII digits only: int() would also take "+1", "1_0" and other scripts' digits.
_ITEM = re.compile(r"(?P<low>[0-9]+)(?:-(?P<high>[0-9]+))?")


class CpuListError(ValueError):
    """A CPU list string that is not in the kernel's format."""


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse "0,2-3" as the kernel prints it in cpuset.cpus and sysfs; "" is the empty set.

    Raises:
        CpuListError: not in that format, or a CPU id beyond MAX_CPU_ID (also ids of
            thousands of digits: they are rejected by length, never converted).
    """
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            if text.strip():
                raise CpuListError(f"empty item in CPU list {shown(text)}")
            continue
        found = _ITEM.fullmatch(part)
        within = "" if part == text.strip() else f" in CPU list {shown(text)}"
        if found is None:
            raise CpuListError(f"{shown(part)}{within} is not a CPU number or range like 2-5")
        digits = [(number or found["low"]).lstrip("0") or "0" for number in found.group(1, 2)]
        if any(len(number) > _MAX_CPU_DIGITS for number in digits):
            raise CpuListError(f"{shown(part)}{within}: CPU ids go up to {MAX_CPU_ID}")
        low, high = int(digits[0]), int(digits[1])
        if low < 0 or high < low or high > MAX_CPU_ID:
            raise CpuListError(
                f"range {shown(part)}{within} must be ascending, within 0-{MAX_CPU_ID}"
            )
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def shown(text: str, limit: int = 40) -> str:
    """`text` quoted for a message, cut short when long: a policy may hold megabytes."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[: limit - 8]!r}... ({len(text)} characters)"


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
