"""The Debian package, installed for real. Guest side of the VM tier: runs inside the
tests/vm/vm.sh guest (Debian trixie, systemd as PID 1, pure cgroup v2, no network), where
tests/test_vm.py puts the package it built with scripts/build-deb.sh (/mnt/ctl; else
dist/ of the checkout, for a run by hand). The image has the package's Depends installed
(vm.sh reads them from debian/control), so `apt install ./corecap_<version>_all.deb` needs
no network.

In order: apt installs it and the service runs, enabled, in monitor mode; the manual pages
resolve; a user who is not root runs `corecapctl status` and sees a marked job of theirs,
left alone in monitor mode; with the policy switched to enforce and `systemctl reload
corecapd`, the job is confined to its grant in its scope; `apt purge corecap` then leaves no
file of the package's, no file named after it, no unit, no cgroup, no state.

The commands under test are the package's (/usr/bin, Debian's python3 and
/usr/lib/python3/dist-packages): they run without the checkout on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from guestkit import GUEST_ONLY, PYTHON, SRC, sh, wait_for

pytestmark = GUEST_ONLY

UNIT = "corecapd.service"
POLICY = Path("/etc/corecap.toml")
CGROUP = Path("/sys/fs/cgroup")
VERSION = re.findall(r'^version = "(.+)"$', (SRC / "pyproject.toml").read_text(), re.M)[0]
DEB = f"corecap_{VERSION}_all.deb"
WHERE = (Path("/mnt/ctl"), SRC / "dist")  # test_vm.py's copy, else one built by hand
RUN = uuid.uuid4().hex[:8]
MARKER = f"CORECAP_VM_DEB_{RUN}"
USER = f"ccdeb{RUN}"  # a user who is not root, uid >= 1000: the shipped rules' kind of job
# The package's commands run as an admin or a user would run them: not from the checkout.
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
APT_ENV = {**ENV, "DEBIAN_FRONTEND": "noninteractive"}
# Where files named after the package could be left: the root file system and the tmpfs's.
SEARCHED = ("/", "/run", "/tmp", "/var/tmp", "/dev/shm")


def run(
    argv: list[str], user: pwd.struct_passwd | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`argv` with the package's environment (as `user`, if given); raises on failure."""
    ids: dict[str, Any] = {}
    if user is not None:
        ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = APT_ENV if user is None else {**ENV, "HOME": "/"}
    result = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd="/", timeout=timeout, **ids
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} -> {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def show(prop: str, unit: str = UNIT) -> str:
    return sh("systemctl", "show", "--value", "-p", prop, unit).stdout.strip()


def status(user: pwd.struct_passwd | None = None) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        run(["/usr/bin/corecapctl", "status", "--json"], user).stdout
    )
    return document


def thread_masks(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


def cgroup_of(pid: int) -> str:
    text = Path(f"/proc/{pid}/cgroup").read_text()
    return next(line[3:] for line in text.splitlines() if line.startswith("0::"))


def job_name(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return f"{pid}-{stat[stat.rindex(')') + 2 :].split()[19]}"


def named_after_the_package() -> set[str]:
    """Every path on the searched file systems whose name says corecap."""
    found: set[str] = set()
    for top in SEARCHED:
        out = sh("find", top, "-xdev", "-name", "*corecap*", check=False, timeout=300).stdout
        found.update(out.splitlines())
    return found


def cgroups_of_ours() -> list[str]:
    """cgroups named after the package: corecap.slice, its scopes, corecapd.service."""
    found = [*CGROUP.glob("*corecap*"), *CGROUP.glob("*/*corecap*"), *CGROUP.glob("*/*/*corecap*")]
    return sorted(str(path) for path in found if path.is_dir())


def deb_paths(deb: Path) -> list[str]:
    """The package's paths (dpkg-deb -c), absolute; directories end with "/"."""
    listing = sh("dpkg-deb", "-c", str(deb)).stdout
    return [
        line.split(maxsplit=5)[5].split(" -> ")[0].removeprefix(".")
        for line in listing.splitlines()
    ]


@dataclass
class Installed:
    deb: Path
    user: pwd.struct_passwd
    paths: list[str]  # the package's, before it was installed
    existed: set[str]  # of those, the ones already there (shared directories: /usr/bin/, ...)
    named_before: set[str]
    job: subprocess.Popen[bytes] | None = None
    online: frozenset[int] = field(default_factory=lambda: frozenset(os.sched_getaffinity(0)))

    def end_job(self) -> None:
        if self.job is not None and self.job.poll() is None:
            self.job.kill()
        if self.job is not None:
            self.job.wait(timeout=30)


def installed_state() -> str:
    result = sh("dpkg-query", "-W", "-f", "${db:Status-Status}", "corecap", check=False)
    return result.stdout.strip() if result.returncode == 0 else "not-installed"


@pytest.fixture(scope="module")
def package() -> Iterator[Installed]:
    found = [where / DEB for where in WHERE if (where / DEB).is_file()]
    if not found:
        pytest.skip(f"no {DEB} in {' or '.join(map(str, WHERE))}: tests/test_vm.py builds it")
    assert installed_state() == "not-installed", "corecap is installed before the test"
    assert not POLICY.exists(), f"{POLICY} is there before the package: a test left it"
    # a directory apt's unprivileged _apt user can read the package from
    readable = Path(tempfile.mkdtemp(prefix="deb-"))
    readable.chmod(0o755)
    deb = Path(shutil.copy(found[0], readable))
    deb.chmod(0o644)
    sh("useradd", "--no-create-home", "--shell", "/bin/sh", USER)
    paths = deb_paths(deb)
    state = Installed(
        deb=deb,
        user=pwd.getpwnam(USER),
        paths=paths,
        existed={path for path in paths if os.path.lexists(path)},
        named_before=named_after_the_package(),
    )
    try:
        start = time.monotonic()
        run(["apt", "install", "-y", str(deb)], timeout=280)
        print(f"apt install: {time.monotonic() - start:.1f} s")
        yield state
    finally:
        state.end_job()
        if installed_state() != "not-installed":
            run(["apt-get", "purge", "-y", "corecap"], timeout=280)
        sh("userdel", USER, check=False)
        shutil.rmtree(readable)


def require_active() -> None:
    if show("ActiveState") != "active":
        log = sh("journalctl", "--no-pager", "-n", "40", "-u", UNIT, check=False).stdout
        pytest.fail(f"corecapd is not active\n{log}")


def test_apt_install_enables_and_starts_the_service_in_monitor_mode(package: Installed) -> None:
    assert installed_state() == "installed"
    assert sh("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert sh("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active"
    assert show("FragmentPath").endswith("/lib/systemd/system/corecapd.service")
    main_pid = show("MainPID")
    cmdline = Path(f"/proc/{main_pid}/cmdline").read_text().split("\0")
    assert cmdline[1:4] == ["/usr/bin/corecapd", "--config", str(POLICY)], cmdline
    assert status()["host"]["mode"] == "monitor"
    assert "monitor" in show("StatusText")


def test_manual_pages_resolve(package: Installed) -> None:
    assert run(["man", "-w", "corecapctl"]).stdout.strip() == (
        "/usr/share/man/man1/corecapctl.1.gz"
    )
    # every page the unit's Documentation= names
    documentation = show("Documentation").replace('"', "").split()  # systemd 257 quotes each
    pages = [doc for doc in documentation if doc.startswith("man:")]
    assert len(pages) == 4, pages
    for page in pages:
        name, _, section = page.removeprefix("man:").rstrip(")").partition("(")
        where = run(["man", "-w", section, name]).stdout.strip()
        assert where == f"/usr/share/man/man{section}/{name}.{section}.gz", page


def test_a_user_sees_their_job_in_status_left_alone_in_monitor_mode(package: Installed) -> None:
    require_active()
    user = package.user
    assert user.pw_uid >= 1000
    text = run(["/usr/bin/corecapctl", "status"], user).stdout
    assert "monitor" in text, text
    package.job = subprocess.Popen(
        [PYTHON, "-c", "import time; time.sleep(600)", MARKER],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        env={**ENV, "HOME": "/"},
        cwd="/",
        stdin=subprocess.DEVNULL,
    )
    pid = package.job.pid
    job = wait_for(
        lambda: next((j for j in status(user)["jobs"] if j["pid"] == pid), None),
        f"the marked job {pid} in corecapctl status, run as {USER}",
    )
    assert (job["user"], job["rule"]) == (USER, "python"), job
    time.sleep(2)  # two scans: monitor mode touches nothing
    assert thread_masks(pid) == {package.online}
    assert "corecap" not in cgroup_of(pid)


def test_enforce_and_reload_confine_the_job(package: Installed) -> None:
    require_active()
    assert package.job is not None and package.job.poll() is None
    pid = package.job.pid
    text = POLICY.read_text()
    assert text.count('\nmode = "monitor"\n') == 1
    POLICY.write_text(text.replace('\nmode = "monitor"\n', '\nmode = "enforce"\n'))
    main_pid = show("MainPID")
    sh("systemctl", "reload", UNIT)
    wait_for(lambda: status()["host"]["mode"] == "enforce", "enforce mode after the reload")
    granted = frozenset(
        wait_for(
            lambda: next((j["cpus"] for j in status()["jobs"] if j["pid"] == pid), None),
            "the job in status after the reload",
        )
    )
    assert granted and granted <= package.online
    if len(package.online) > 1:
        assert granted != package.online and 0 not in granted  # reserved_cpus = "0"
    wait_for(lambda: thread_masks(pid) == {granted}, f"every thread of {pid} on {set(granted)}")
    scope = f"/corecap.slice/corecap-{job_name(pid)}.scope"
    wait_for(lambda: cgroup_of(pid) == scope, f"the job in {scope}")
    assert show("MainPID") == main_pid, "a reload, not a restart"


def test_apt_purge_leaves_no_file_unit_cgroup_or_state(package: Installed) -> None:
    package.end_job()
    wait_for(lambda: not [c for c in cgroups_of_ours() if ".scope" in c], "the job's scope gone")
    # systemd keeps the empty slice: the package's postrm stops it
    assert str(CGROUP / "corecap.slice") in cgroups_of_ours()
    start = time.monotonic()
    run(["apt", "purge", "-y", "corecap"], timeout=280)
    print(f"apt purge: {time.monotonic() - start:.1f} s")
    assert installed_state() == "not-installed"
    left = [p for p in package.paths if p not in package.existed and os.path.lexists(p)]
    assert left == [], "the package's paths left after purge"
    assert not POLICY.exists() and not Path("/run/corecap").exists()
    # (list-unit-files exits 1 when nothing matches)
    files = sh("systemctl", "list-unit-files", "--no-legend", "corecap*", check=False).stdout
    assert files.strip() == "", files
    units = sh("systemctl", "list-units", "--all", "--no-legend", "--plain", "corecap*").stdout
    assert units.strip() == "", units
    assert cgroups_of_ours() == []
    assert sorted(named_after_the_package() - package.named_before) == []
