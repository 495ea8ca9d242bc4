"""What the guest-side tests share (they run inside the VM: stdlib and pytest only)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

SRC = Path(__file__).resolve().parents[2]  # the checkout, read-only at /mnt/src
PYTHON = "/usr/bin/python3"  # the guest's: nothing of corecap is installed there

GUEST_ONLY = pytest.mark.skipif(
    not Path("/etc/corecap-vm-guest").exists() or os.geteuid() != 0,
    reason="guest side of the VM tier: runs as root inside the tests/vm/vm.sh guest only",
)


def sh(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} -> {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def wait_for(predicate: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def from_checkout(unit: str) -> str:
    """A unit of systemd/ with its commands run from the checkout by the guest's python3."""
    unit = unit.replace("/usr/local/bin/corecapctl", f"{PYTHON} -m corecapd.ctl")
    unit = unit.replace("/usr/local/bin/corecapd", f"{PYTHON} -m corecapd.daemon")
    environment = f"Environment=PYTHONPATH={SRC} PYTHONDONTWRITEBYTECODE=1\n"
    return unit.replace("[Service]\n", f"[Service]\n{environment}", 1)
