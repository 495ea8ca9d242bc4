"""The VM test tier: boots tests/vm/vm.sh's Debian guest once (systemd as PID 1, pure cgroup
v2, this checkout read-only at /mnt/src) and runs tests/vm/guest_*.py there with the guest's
pytest. Before it boots, it builds the Debian package (tests/test_deb.py's build_deb:
scripts/build-deb.sh), which vm.sh puts in the guest's /mnt/ctl for tests/vm/guest_deb.py.
Skips, saying why, where this machine cannot: not root, no apt to install QEMU or
debootstrap (or the package's build dependencies), no Debian mirror to build the image from,
no usable QEMU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_deb import build_deb

VM_SH = Path(__file__).parent / "vm" / "vm.sh"
CANNOT = 77  # vm.sh: this machine cannot run the VM tier; the reason is its last stderr line
PANIC_RETRIED = "the guest kernel panicked"  # vm.sh's line when it boots a second time
# vm.sh's backstop for one boot-run-poweroff; its real budget follows progress (a boot budget,
# then a bound on silence between the guest's per-test lines), see tests/vm/vm.sh.
VM_TIMEOUT = int(os.environ.get("CORECAP_VM_TIMEOUT", "3600"))
# Per guest test (pytest-timeout): a hung test fails alone, named, with its stack, and the
# suite goes on. The slowest guest test takes ~45 s under TCG here; 300 s leaves room for a
# machine twice as slow and loaded.
GUEST_TEST_TIMEOUT = int(os.environ.get("CORECAP_VM_TEST_TIMEOUT", "300"))
GUEST_PYTEST = (
    "PYTHONPATH=/mnt/src PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 python3 -m pytest -v -rfEs"
    f" --timeout={GUEST_TEST_TIMEOUT} --durations=5"
    " -p no:cacheprovider --confcutdir=/mnt/src/tests/vm tests/vm/guest_*.py"
)


def vm_sh(
    *args: str, timeout: float, env: dict[str, str] | None = None
) -> tuple[int, str, str, float]:
    """Run vm.sh in its own session (with `env` added to the environment); on timeout end
    it (it ends QEMU) and then its group."""
    start = time.monotonic()
    process = subprocess.Popen(
        [str(VM_SH), *args],
        env={**os.environ, **(env or {})},
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
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("VM tier cannot run here: needs root (debootstrap, chroot, mkfs, QEMU)")

    rc, out, err, build_s = vm_sh("build", timeout=1800)
    print(f"\n--- vm.sh build: exit {rc}, {build_s:.1f} s ---\n{out}{err}")
    record_property("vm_build_seconds", round(build_s, 1))
    skip_if_cannot(rc, err)
    assert rc == 0, f"image build failed:\n{err}"

    deb = build_deb(tmp_path)  # for guest_deb.py: `apt install` in the guest, then purge
    print(f"--- build-deb.sh: {deb.seconds:.1f} s ---")
    files = {"CORECAP_VM_FILES": str(deb.deb)}
    # two boots at most: vm.sh boots once more after a guest kernel panic
    rc, out, err, run_s = vm_sh("run", GUEST_PYTEST, timeout=2 * VM_TIMEOUT + 60, env=files)
    print(f"--- guest output ---\n{out}--- vm.sh run: exit {rc}, boot+run {run_s:.1f} s ---\n{err}")
    panics = [line for line in err.splitlines() if PANIC_RETRIED in line]
    with capsys.disabled():  # the timings and any panic show in every run's output
        print(f"\nVM tier wall time: build {build_s:.1f} s, boot+run {run_s:.1f} s")
        for line in panics:
            print(line)
    record_property("vm_boot_run_seconds", round(run_s, 1))
    record_property("vm_guest_panics", len(panics))
    skip_if_cannot(rc, err)
    assert rc == 0, f"guest tests failed (exit {rc}); guest output above:\n{out[-4000:]}\n{err}"
    assert " passed" in out and "skipped" not in out.splitlines()[-1], out[-2000:]


def watch(ctl: Path, guest: str, **budget: int) -> tuple[str, float, bool]:
    """vm.sh's watch_progress over a stand-in for QEMU (`guest`, a shell command in its own
    process group writing to `ctl`): (the reason it gave, seconds taken, whether the group
    was still alive at the end)."""
    settings = {"BOOT_TIMEOUT": 300, "STALL_TIMEOUT": 300, "TIMEOUT": 300, **budget}
    stand_in = subprocess.Popen(
        ["sh", "-c", guest], cwd=ctl, start_new_session=True, stdin=subprocess.DEVNULL
    )
    try:
        start = time.monotonic()
        script = f'source "{VM_SH}"; watch_progress {stand_in.pid} "{ctl}"'
        env = {**os.environ, **{f"CORECAP_VM_{k}": str(v) for k, v in settings.items()}}
        watched = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        took = time.monotonic() - start
        alive = stand_in.poll() is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stand_in.pid, signal.SIGKILL)
        stand_in.wait()
    return watched.stdout.strip(), took, alive


def test_vm_budget_ends_a_guest_that_stops_printing_and_names_the_last_line(
    tmp_path: Path,
) -> None:
    guest = (
        "touch started; echo 'guest_a.py::test_one PASSED' >> run.log;"
        " echo 'guest_a.py::test_two' >> run.log; sleep 300"
    )
    reason, took, alive = watch(tmp_path, guest, STALL_TIMEOUT=4)
    assert not alive
    assert "printed nothing for CORECAP_VM_STALL_TIMEOUT=4 s" in reason
    assert reason.endswith("its last line: guest_a.py::test_two"), reason
    assert took < 60


def test_vm_budget_follows_progress_past_the_silence_bound(tmp_path: Path) -> None:
    # prints a line every second for 10 s: longer than the silence bound, never silent
    guest = "touch started; for i in $(seq 10); do echo line $i >> run.log; sleep 1; done"
    reason, took, alive = watch(tmp_path, guest, STALL_TIMEOUT=4)
    assert reason == "" and not alive
    assert took >= 9


def test_vm_budget_ends_a_guest_that_never_starts_the_command(tmp_path: Path) -> None:
    reason, took, alive = watch(tmp_path, "sleep 300", BOOT_TIMEOUT=3)
    assert not alive
    assert "did not start the command within CORECAP_VM_BOOT_TIMEOUT=3 s" in reason
    assert took < 60


def test_vm_budget_has_a_backstop_for_the_whole_run(tmp_path: Path) -> None:
    guest = "touch started; while :; do echo tick >> run.log; sleep 1; done"
    reason, _, alive = watch(tmp_path, guest, STALL_TIMEOUT=60, TIMEOUT=5)
    assert not alive
    assert "passed CORECAP_VM_TIMEOUT=5 s" in reason


# A stand-in for QEMU in vm.sh's run(): boot N does the Nth word of $PLAN to the control dir
# ($1) and the console (-serial file:...), as the guest would.
STAND_IN = r"""
ctl=$1; shift
for a; do case $a in file:*) console=${a#file:} ;; esac; done
n=$(( $(cat boots 2>/dev/null || echo 0) + 1 )); echo $n > boots
touch "$ctl/started"; echo "boot $n: collecting ..." >> "$ctl/run.log"
case $(echo $PLAN | cut -d' ' -f$n) in
  panic) echo '[   40.5] Kernel panic - not syncing: Fatal exception in interrupt' > "$console" ;;
  exit) echo '[   40.5] reboot: Power down' > "$console" ;;
  pass) echo "boot $n: 1 passed" >> "$ctl/run.log"; echo 0 > "$ctl/rc" ;;
  fail) echo "boot $n: 1 failed" >> "$ctl/run.log"; echo 1 > "$ctl/rc" ;;
esac
"""


def run_planned(tmp_path: Path, plan: str) -> tuple[int, str, str, int]:
    """vm.sh's run() with QEMU stood in for by STAND_IN following `plan` (a word per boot):
    (its exit code, stdout, stderr, how many boots it made)."""
    (tmp_path / "stand_in.sh").write_text(STAND_IN)
    script = (
        f'source "{VM_SH}"; build() {{ :; }};'
        f' qemu_cmd() {{ ACCEL=(); QEMU=(sh "{tmp_path}/stand_in.sh" "$1"); }}; run "true"'
    )
    env = {**os.environ, "PLAN": plan, "CORECAP_VM_DIR": str(tmp_path / "vm")}
    (tmp_path / "vm").mkdir()
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stdout, done.stderr, int((tmp_path / "boots").read_text())


def test_vm_run_boots_once_more_after_a_guest_kernel_panic(tmp_path: Path) -> None:
    rc, out, err, boots = run_planned(tmp_path, "panic pass")
    assert (rc, boots) == (0, 2), err
    assert "boot 1: collecting" in out and "boot 2: 1 passed" in out
    assert err.count(PANIC_RETRIED) == 1
    kept = tmp_path / "vm" / "panic-console.log"
    assert "Kernel panic" in kept.read_text()
    assert f"(console: {kept})" in err


def test_vm_run_fails_when_the_guest_kernel_panics_twice(tmp_path: Path) -> None:
    rc, _, err, boots = run_planned(tmp_path, "panic panic pass")
    assert (rc, boots) == (125, 2), err
    assert err.count(PANIC_RETRIED) == 1
    assert "Kernel panic - not syncing" in err.splitlines()[-2]  # the console's tail


@pytest.mark.parametrize(("plan", "code"), [("fail pass", 1), ("exit pass", 125)])
def test_vm_run_takes_a_failure_that_is_no_panic_at_once(
    tmp_path: Path, plan: str, code: int
) -> None:
    rc, _, err, boots = run_planned(tmp_path, plan)
    assert (rc, boots) == (code, 1), err
    assert PANIC_RETRIED not in err
