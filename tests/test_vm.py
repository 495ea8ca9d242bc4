"""The VM test tier: boots tests/vm/vm.sh's Debian guest once (systemd as PID 1, pure cgroup
v2, this checkout read-only at /mnt/src) and runs tests/vm/guest_*.py there with the guest's
pytest. Skips, saying why, where this machine cannot: not root, no apt to install QEMU or
debootstrap, no Debian mirror to build the image from, no usable QEMU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

VM_SH = Path(__file__).parent / "vm" / "vm.sh"
CANNOT = 77  # vm.sh: this machine cannot run the VM tier; the reason is its last stderr line
VM_TIMEOUT = int(os.environ.get("CORECAP_VM_TIMEOUT", "300"))  # vm.sh's hard limit per boot
GUEST_PYTEST = (
    "PYTHONPATH=/mnt/src PYTHONDONTWRITEBYTECODE=1 python3 -m pytest -v -rfEs"
    " -p no:cacheprovider --confcutdir=/mnt/src/tests/vm tests/vm/guest_*.py"
)


def vm_sh(*args: str, timeout: float) -> tuple[int, str, str, float]:
    """Run vm.sh in its own session; on timeout end it (it ends QEMU) and then its group."""
    start = time.monotonic()
    process = subprocess.Popen(
        [str(VM_SH), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        err += f"\n(test_vm: vm.sh {args[0]} ran over {timeout} s and was ended)"
    return process.returncode, out, err, time.monotonic() - start


def skip_if_cannot(rc: int, err: str) -> None:
    if rc == CANNOT:
        lines = err.strip().splitlines() or ["vm.sh gave no reason"]
        pytest.skip(lines[-1])


@pytest.mark.vm
def test_guest_suite_passes_in_the_vm(
    record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("VM tier cannot run here: needs root (debootstrap, chroot, mkfs, QEMU)")

    rc, out, err, build_s = vm_sh("build", timeout=1800)
    print(f"\n--- vm.sh build: exit {rc}, {build_s:.1f} s ---\n{out}{err}")
    record_property("vm_build_seconds", round(build_s, 1))
    skip_if_cannot(rc, err)
    assert rc == 0, f"image build failed:\n{err}"

    rc, out, err, run_s = vm_sh("run", GUEST_PYTEST, timeout=VM_TIMEOUT + 60)
    print(f"--- guest output ---\n{out}--- vm.sh run: exit {rc}, boot+run {run_s:.1f} s ---\n{err}")
    with capsys.disabled():  # the timings show in every run's output, captured or not
        print(f"\nVM tier wall time: build {build_s:.1f} s, boot+run {run_s:.1f} s")
    record_property("vm_boot_run_seconds", round(run_s, 1))
    skip_if_cannot(rc, err)
    assert rc == 0, f"guest tests failed (exit {rc}); guest output above:\n{out[-4000:]}\n{err}"
    assert " passed" in out and "skipped" not in out.splitlines()[-1], out[-2000:]
