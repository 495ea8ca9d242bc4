"""The Debian package, built for real with scripts/build-deb.sh (debhelper, dh-python,
pybuild; about 5 s here once the build dependencies are installed, lintian included), then
read with dpkg-deb: its files, its control fields and Depends, its conffile, its unit, its
maintainer scripts, and lintian's verdict. Installing it is the VM tier's part
(tests/vm/guest_deb.py): systemd as PID 1, which this machine does not have.

The build installs its own build dependencies with apt-get when they are missing (root);
where it cannot, the tests skip and say why. It builds in a copy of the sources in a
temporary directory: the checkout is left as it was.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BUILD_DEB = ROOT / "scripts" / "build-deb.sh"
CANNOT = 77  # build-deb.sh: this machine cannot build the package (the reason is its last line)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SITE = "usr/lib/python3/dist-packages"
UNIT_DIRS = ("lib/systemd/system", "usr/lib/systemd/system")  # bookworm's, trixie's debhelper
# What the daemon's, corecapctl's and the job library's third-party imports are in Debian.
# A module not here fails test_depends_are_what_the_code_imports: add it here and to
# debian/control's Depends.
DEBIAN_PACKAGES = {
    "systemd": "python3-systemd",
    "jeepney": "python3-jeepney",
    "prometheus_client": "python3-prometheus-client",
    "regex": "python3-regex",
    "rich": "python3-rich",
    "threadpoolctl": "python3-threadpoolctl",
    "elftools": "python3-pyelftools",
}
# Imported, but not a dependency: the job's own TensorFlow (the job library sizes it when
# the job has it) and Ray (corecapd.ray runs in a Ray worker; Debian has no Ray), and tomli
# before Python 3.11 (dh_python3 writes that alternative itself from pyproject.toml's marker).
NOT_DEPENDS = {"tensorflow", "tomli", "ray"}
# daemon.metrics' socket unit and drop-in, and the Prometheus rules (README, Fleet)
METRICS_EXAMPLES = {
    "corecapd-metrics.socket": ROOT / "systemd/corecapd-metrics.socket",
    "metrics.conf": ROOT / "systemd/metrics.conf",
    "corecap-rules.yml": ROOT / "etc/prometheus/corecap-rules.yml",
}


@dataclass(frozen=True)
class Built:
    deb: Path
    seconds: float


def build_deb(outdir: Path) -> Built:
    """scripts/build-deb.sh --outdir `outdir`; skips the calling test where this machine
    cannot build (exit 77), fails on any other error (lintian's included)."""
    start = time.monotonic()
    result = subprocess.run(
        [str(BUILD_DEB), "--outdir", str(outdir)],
        capture_output=True,
        text=True,
        timeout=1200,  # a first run installs debhelper, dh-python and lintian with apt-get
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - start
    if result.returncode == CANNOT:
        pytest.skip((result.stderr.strip().splitlines() or ["build-deb.sh gave no reason"])[-1])
    assert result.returncode == 0, f"build-deb.sh failed:\n{result.stdout}\n{result.stderr}"
    deb = Path(result.stdout.strip().splitlines()[-1])
    assert deb == outdir / f"corecap_{VERSION}_all.deb" and deb.is_file(), result.stdout
    return Built(deb, seconds)


def sources() -> list[str]:
    """The checkout's files the package is built from (build-deb.sh's own list)."""
    listed = subprocess.run(
        [str(BUILD_DEB), "--list-sources"], capture_output=True, text=True, check=True
    )
    return listed.stdout.splitlines()


def dpkg_deb(*argv: str) -> str:
    return subprocess.run(["dpkg-deb", *argv], capture_output=True, text=True, check=True).stdout


def members(deb: Path) -> dict[str, tarfile.TarInfo]:
    """The package's files, by path without the leading "./"."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tar.getmembers()}


def file_text(deb: Path, path: str) -> str:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        extracted = tar.extractfile(f"./{path}")
        assert extracted is not None, path
        return extracted.read().decode()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    checkout_before = debhelper_leftovers()
    result = build_deb(tmp_path_factory.mktemp("deb"))
    assert debhelper_leftovers() == checkout_before, "the build wrote into the checkout"
    return result


@pytest.fixture(scope="module")
def deb(built: Built) -> Path:
    return built.deb


def debhelper_leftovers() -> set[str]:
    """What building in the checkout itself would leave there."""
    names = ("debian/.debhelper", "debian/corecap", "debian/files", "debian/tmp", ".pybuild")
    found = {name for name in names if (ROOT / name).exists()}
    return found | {p.name for p in (ROOT / "debian").glob("*.substvars")}


def control_field(deb: Path, name: str) -> str:
    return dpkg_deb("-f", str(deb), name).strip()


def test_builds_into_corecap_version_all_deb(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():  # the time shows in every run's output, captured or not
        print(f"\nbuild-deb.sh: {built.seconds:.1f} s (build and lintian)")
    assert built.deb.name == f"corecap_{VERSION}_all.deb"


def test_changelog_version_is_pyprojects() -> None:
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"corecap ({VERSION}) "), (
        f"debian/changelog's top entry is {first!r}, pyproject.toml's version {VERSION}:"
        " add a changelog entry"
    )


def test_file_list_is_the_commands_unit_policy_manuals_completions_and_modules(
    deb: Path,
) -> None:
    files = {path: m for path, m in members(deb).items() if not m.isdir()}
    unit_dir = next(d for d in UNIT_DIRS if f"{d}/corecapd.service" in files)
    modules = {
        f"{SITE}/{path}"
        for path in sources()
        if path.startswith("corecapd/") and path.endswith(".py")
    }
    manuals = {f"usr/share/man/man{p.suffix[1:]}/{p.name}.gz" for p in (ROOT / "man").iterdir()}
    completions = {
        f"usr/share/bash-completion/completions/{p.name}"
        for p in (ROOT / "completions" / "bash").iterdir()
    }
    expected = {
        "etc/corecap.toml",
        f"{unit_dir}/corecapd.service",
        "usr/bin/corecapd",
        "usr/bin/corecapctl",
        "usr/bin/corecap",
        "usr/share/doc/corecap/examples/cgroup2.conf",
        *(f"usr/share/doc/corecap/examples/{name}" for name in METRICS_EXAMPLES),
        "usr/share/doc/corecap/copyright",
        "usr/share/doc/corecap/changelog.gz",
        "usr/share/lintian/overrides/corecap",
        *manuals,
        *completions,
        *modules,
    }
    assert len(manuals) == 4 and len(completions) == 2 and len(modules) > 30
    dist_info = f"{SITE}/corecap-{VERSION}.dist-info/"
    assert {f"{dist_info}METADATA", f"{dist_info}entry_points.txt"} <= set(files)
    shipped = {path for path in files if not path.startswith(dist_info)}
    assert sorted(shipped - expected) == [], "files the package should not have"
    assert sorted(expected - shipped) == [], "files the package lacks"
    for path, member in files.items():
        assert member.isfile(), f"{path}: not a regular file"
        assert (member.uname, member.gname) == ("root", "root"), path
        mode = 0o755 if path.startswith("usr/bin/") else 0o644
        assert member.mode == mode, f"{path}: mode {member.mode:o}, expected {mode:o}"


def test_commands_run_debians_python3(deb: Path) -> None:
    for command in ("corecapd", "corecapctl", "corecap"):
        assert file_text(deb, f"usr/bin/{command}").startswith("#!/usr/bin/python3\n"), command


def test_control_fields(deb: Path) -> None:
    assert control_field(deb, "Package") == "corecap"
    assert control_field(deb, "Version") == VERSION
    assert control_field(deb, "Architecture") == "all"
    assert control_field(deb, "Section") == "admin"


def depends(deb: Path) -> list[str]:
    return [d.strip() for d in control_field(deb, "Depends").split(",")]


def third_party_imports() -> dict[str, str]:
    """Top-level modules the shipped code imports that are neither the standard library's
    nor corecapd's, each with a file that imports it."""
    found: dict[str, str] = {}
    for path in sources():
        if not (path.startswith("corecapd/") and path.endswith(".py")):
            continue
        for node in ast.walk(ast.parse((ROOT / path).read_text(), path)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top != "corecapd" and top not in sys.stdlib_module_names:
                    found.setdefault(top, path)
    return found


def test_depends_are_what_the_code_imports(deb: Path) -> None:
    imported = third_party_imports()
    unknown = {
        module: path
        for module, path in imported.items()
        if module not in DEBIAN_PACKAGES and module not in NOT_DEPENDS
    }
    assert unknown == {}, (
        f"imported, with no Debian package known for it: {unknown}; add it to"
        " DEBIAN_PACKAGES (tests/test_deb.py) and to debian/control's Depends"
    )
    wanted = {DEBIAN_PACKAGES[m] for m in imported if m in DEBIAN_PACKAGES}
    plain = {d.split()[0] for d in depends(deb) if "|" not in d and d.startswith("python3-")}
    assert plain == wanted, f"Depends: {depends(deb)}; the code imports {sorted(imported)}"
    # Debian's python3 (dh_python3, from requires-python), and tomli where tomllib is missing
    assert any(re.fullmatch(r"python3:any \(>= 3\.10~\)", d) for d in depends(deb)), depends(deb)
    assert any(d.startswith("python3-tomli | python3 (>> 3.11") for d in depends(deb))


def test_policy_is_a_conffile_and_the_shipped_one_in_monitor_mode(deb: Path) -> None:
    assert dpkg_deb("-I", str(deb), "conffiles").split() == ["/etc/corecap.toml"]
    shipped = (ROOT / "etc" / "corecap.toml").read_text()
    assert file_text(deb, "etc/corecap.toml") == shipped
    assert tomllib.loads(shipped)["daemon"]["mode"] == "monitor"


def test_unit_is_the_shipped_one_run_from_usr_bin(deb: Path) -> None:
    files = members(deb)
    unit_dir = next(d for d in UNIT_DIRS if f"{d}/corecapd.service" in files)
    unit = file_text(deb, f"{unit_dir}/corecapd.service")
    shipped = (ROOT / "systemd" / "corecapd.service").read_text()
    assert unit == shipped.replace("/usr/local/bin/", "/usr/bin/")
    assert "ExecStart=/usr/bin/corecapd --config /etc/corecap.toml\n" in unit
    assert "ExecStartPre=/usr/bin/corecapctl check /etc/corecap.toml\n" in unit
    example = file_text(deb, "usr/share/doc/corecap/examples/cgroup2.conf")
    assert example == (ROOT / "systemd" / "cgroup2.conf").read_text()
    for name, source in METRICS_EXAMPLES.items():
        assert file_text(deb, f"usr/share/doc/corecap/examples/{name}") == source.read_text()


def test_maintainer_scripts_enable_start_and_purge(deb: Path) -> None:
    postinst = dpkg_deb("-I", str(deb), "postinst")
    prerm = dpkg_deb("-I", str(deb), "prerm")
    postrm = dpkg_deb("-I", str(deb), "postrm")
    # dh_installsystemd: enabled on first install, started, restarted on upgrade, stopped on
    # removal, its enablement state purged
    assert "deb-systemd-helper enable 'corecapd.service'" in postinst
    assert "deb-systemd-invoke $_dh_action 'corecapd.service'" in postinst
    assert "_dh_action=restart" in postinst and "_dh_action=start" in postinst
    assert "deb-systemd-invoke stop 'corecapd.service'" in prerm
    assert "deb-systemd-helper purge 'corecapd.service'" in postrm
    # ours: the state directory on purge, an empty corecap.slice on remove and purge
    assert re.search(r'if \[ "\$1" = purge \]; then\n(\t#.*\n)*\trm -rf /run/corecap\n', postrm)
    assert "systemctl stop corecap.slice" in postrm
    for name, script in (("postinst", postinst), ("prerm", prerm), ("postrm", postrm)):
        assert script.startswith("#!/bin/sh\nset -e\n"), name
        check = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
        assert check.returncode == 0, f"{name}: {check.stderr}"


def test_lintian_reports_no_error_and_no_warning(deb: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory() as readable:
        argv = ["lintian", "--display-info", str(deb)]
        if os.geteuid() == 0:  # lintian need not be root, and says so when it is
            os.chmod(readable, 0o755)
            argv = [*argv[:-1], shutil.copy(deb, readable)]
            os.chmod(argv[-1], 0o644)
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", timeout=300)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert [line for line in report.splitlines() if line[:2] in ("E:", "W:")] == [], report


def test_every_lintian_override_says_why() -> None:
    lines = (ROOT / "debian" / "corecap.lintian-overrides").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert number > 0 and lines[number - 1].startswith("#"), (
                f"debian/corecap.lintian-overrides:{number + 1}: {line!r} has no reason above it"
            )
