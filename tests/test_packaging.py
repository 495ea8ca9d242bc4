"""`pip install corecap` without the daemon's extra, for real: a fresh virtual environment,
the checkout installed with pip where nothing can be compiled (cc, gcc and pkg-config on
PATH fail, CC=false, PKG_CONFIG=false: systemd-python could not build), then the job
library, `corecap run` and corecapctl used from it, without a daemon and against one.
pip reuses wheels it built before (its cache), so a systemd-python wheel built for the
daemon could install without a compiler: the test also checks that no project of the
`daemon` extra was installed, and that `corecapd` names every one (corecapd.entry's
DAEMON_MODULES, held equal to pyproject.toml's extra here).

Marked `packaging`: it makes a venv and pip-installs (about 20 s; pip needs the package
index or its cache for setuptools and threadpoolctl). `-m "not packaging"` leaves it out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Daemon, Processes, StartDaemon, marked_rule

from corecapd.entry import DAEMON_MODULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
# What the package is made of (pyproject.toml): copied, so that building leaves the
# checkout as it is (no build/ or egg-info beside the sources others are editing).
SOURCES = ("pyproject.toml", "README.md", "corecapd", "man", "completions")
DAEMON_ONLY = set(DAEMON_MODULES.values())


def project_name(name: str) -> str:
    """A project's name as PEP 503 normalises it: prometheus_client -> prometheus-client."""
    return re.sub(r"[-_.]+", "-", name).lower()


def run(
    argv: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    # Not in the checkout: `python -c` would import its corecapd ("" on sys.path), not the venv's.
    cwd = Path(env["VIRTUAL_ENV"]).parent
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A venv with `pip install corecap` (no extra) in it, and the environment to run it
    in: the venv's bin first on PATH, no compiler, no pkg-config."""
    work = tmp_path_factory.mktemp("light")
    source = work / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    refuse = work / "no-compiler"
    refuse.mkdir()
    for tool in ("cc", "gcc", "c++", "g++", "pkg-config"):
        (refuse / tool).write_text(f"#!/bin/sh\necho 'no {tool} here' >&2\nexit 1\n")
        (refuse / tool).chmod(0o755)
    venv = work / "venv"
    environ = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env = environ | {
        "PATH": f"{venv / 'bin'}:{refuse}:{environ.get('PATH', '/usr/bin:/bin')}",
        "CC": "false",
        "CXX": "false",
        "PKG_CONFIG": "false",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "VIRTUAL_ENV": str(venv),
    }
    base = getattr(sys, "_base_executable", sys.executable)
    made = run([base, "-m", "venv", str(venv)], env)
    assert made.returncode == 0, made.stderr
    installed = run([str(venv / "bin/pip"), "install", "-q", str(source)], env, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv, env


def test_the_install_has_the_job_library_and_not_the_daemon_dependencies(
    light: tuple[Path, dict[str, str]],
) -> None:
    venv, env = light
    listed = run([str(venv / "bin/pip"), "list", "--format", "json"], env)
    names = {project_name(package["name"]) for package in json.loads(listed.stdout)}
    assert "corecap" in names and "threadpoolctl" in names
    assert not names & DAEMON_ONLY
    for page in ("man1/corecap.1", "man1/corecapctl.1", "man5/corecap.toml.5", "man8/corecapd.8"):
        assert (venv / "share/man" / page).is_file(), page
    assert (venv / "share/bash-completion/completions/corecapctl").is_file()


def test_import_corecapd_and_the_commands_need_no_systemd(
    light: tuple[Path, dict[str, str]],
) -> None:
    venv, env = light
    code = (
        "import sys\n"
        "import corecapd, corecapd.launcher, corecapd.ctl\n"
        "from corecapd import Plan, register\n"
        "loaded = {name.partition('.')[0] for name in sys.modules}\n"
        f"assert not loaded & {set(DAEMON_MODULES)}, loaded & {set(DAEMON_MODULES)}\n"
        "assert corecapd.__file__.startswith(sys.prefix), corecapd.__file__\n"
        # corecapctl check may try the systemd backend: without jeepney, a reason, no crash
        "from corecapd.enforcement.systemd import MANAGER, MANAGER_PATH, BusError, SystemBus\n"
        "from corecapd.enforcement.systemd import get_property\n"
        "try:\n"
        "    SystemBus(timeout=1).call(get_property(MANAGER_PATH, MANAGER, 'Version'))\n"
        "except BusError as err:\n"
        "    assert \"pip install 'corecap[daemon]'\" in str(err), err\n"
        "else:\n"
        "    raise AssertionError('a bus without jeepney')\n"
    )
    checked = run([str(venv / "bin/python"), "-c", code], env)
    assert checked.returncode == 0, checked.stderr


def test_corecap_run_without_a_daemon_runs_the_job(
    light: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    venv, env = light
    job = "import os; print(os.environ['CORECAP_CPUS'], os.environ['OMP_NUM_THREADS'])"
    ran = run(
        [
            str(venv / "bin/corecap"),
            "run",
            "--cpus",
            "1",
            "--socket",
            str(tmp_path / "no-daemon.sock"),
            "--",
            "python",
            "-c",
            job,
        ],
        env,
    )
    assert ran.returncode == 0, ran.stderr
    cpus, omp = ran.stdout.split()
    assert len(cpus.split(",")) == 1 and omp == "1"
    (warning,) = ran.stderr.splitlines()
    assert warning.startswith("corecap: warning: ") and "cannot reach corecapd" in warning


def test_the_daemon_modules_are_those_of_the_daemon_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["daemon"]
    required = {project_name(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in extra}
    assert {project_name(name) for name in DAEMON_MODULES.values()} == required


def test_corecapd_without_its_extra_says_which_to_install(
    light: tuple[Path, dict[str, str]],
) -> None:
    venv, env = light
    started = run([str(venv / "bin/corecapd"), "--version"], env)
    assert started.returncode == 1
    assert started.stderr == (
        "corecapd: the daemon needs its dependencies (systemd-python, jeepney, pyelftools,"
        " prometheus-client are not installed): pip install 'corecap[daemon]'\n"
    )


def test_registers_with_a_running_daemon_and_corecapctl_shows_it(
    light: tuple[Path, dict[str, str]],
    start_daemon: StartDaemon,
    processes: Processes,
    marker: str,
) -> None:
    venv, env = light
    daemon: Daemon = start_daemon(rules=marked_rule(marker, "light", cpus=1))
    code = (
        "import json, os, sys\n"
        "import corecapd\n"
        "plan = corecapd.register()\n"  # the grant corecap run left in CORECAP_*
        "print(json.dumps({'pid': os.getpid(), 'cpus': plan.cpus, 'daemon': plan.daemon,"
        " 'affinity': sorted(os.sched_getaffinity(0))}), flush=True)\n"
        "sys.stdin.read()\n"
    )
    launcher = processes.run(
        [
            str(venv / "bin/corecap"),
            "run",
            "--cpus",
            "1",
            "--socket",
            str(daemon.socket),
            "--",
            str(venv / "bin/python"),
            "-c",
            code,
            marker,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=venv.parent,
    )
    assert launcher.stdout is not None
    line = launcher.stdout.readline()
    assert line, f"the job died: exit {launcher.wait()}"
    seen = json.loads(line)
    assert seen["pid"] == launcher.pid and seen["daemon"] == str(daemon.socket)
    assert len(seen["cpus"]) == 1 and seen["affinity"] == seen["cpus"]
    job = daemon.wait_job(launcher.pid)
    assert job["cpus"] == seen["cpus"]
    shown = run(
        [str(venv / "bin/corecapctl"), "--socket", str(daemon.socket), "status", "--json"], env
    )
    assert shown.returncode == 0, shown.stderr
    assert launcher.pid in [j["pid"] for j in json.loads(shown.stdout)["jobs"]]
