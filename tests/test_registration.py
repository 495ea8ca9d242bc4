"""A job declares itself: registration over the socket, the library, `corecap run`, explain."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, Daemon, Processes, StartDaemon, marked_rule
from hypothesis import given
from hypothesis import strategies as st

from corecapd import __version__
from corecapd.client import call
from corecapd.declaration import tensorflow_pools
from corecapd.diagnosis import THREADING_VARIABLES
from corecapd.protocol import RemoteError

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs: one is reserved")
JOB_CPU = CPUS[-1]

# A job that registers with the arguments in argv[2] (JSON) and prints its plan's manifest.
REGISTERING_JOB = """
import json, sys, warnings
import corecapd
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    plan = corecapd.register(**json.loads(sys.argv[2]))
manifest = plan.manifest()
manifest["warnings"] = [str(w.message) for w in caught]
print(json.dumps(manifest), flush=True)
sys.stdin.read()
"""


def run_job(
    processes: Processes, daemon: Daemon | None, env: dict[str, str] | None = None, **asked: object
) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    environment = dict(os.environ) | (env or {})
    if daemon is not None:
        environment["CORECAP_SOCKET"] = str(daemon.socket)
    job = processes.python(
        REGISTERING_JOB,
        json.dumps(asked),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=environment,
    )
    assert job.stdout is not None
    line = job.stdout.readline()
    assert line, f"the job died: exit {job.wait()}"
    return job, json.loads(line)


@pytest.fixture
def daemon(start_daemon: StartDaemon, marker: str) -> Daemon:
    return start_daemon(
        daemon={"reserved_cpus": str(CPUS[0])},
        rules=marked_rule(marker, "training", cpus=4),
    )


def test_registered_job_gets_its_grant_pinned_and_sized(
    daemon: Daemon, processes: Processes
) -> None:
    job, manifest = run_job(processes, daemon, cpus=1)
    assert manifest["cpus"] == [JOB_CPU] and manifest["affinity"] == [JOB_CPU]
    assert manifest["daemon"] == str(daemon.socket) and manifest["warnings"] == []
    environment = manifest["environment"]
    assert isinstance(environment, dict)
    assert environment["OMP_NUM_THREADS"] == "1" and environment["TF_NUM_INTRAOP_THREADS"] == "1"
    assert environment["TF_NUM_INTEROP_THREADS"] == "1"
    status = daemon.wait_job(job.pid)
    assert status["rule"] == "training" and status["cpus"] == [JOB_CPU]
    assert status["budget_basis"].startswith("declared: intra 1 + inter 1")
    # intra 1 + inter 1 + 2 x data 1 + BLAS 1 + 11 runtime + 8 slack
    assert status["budget"] == 24


def test_an_unmatched_process_that_registers_becomes_a_job(
    daemon: Daemon, processes: Processes
) -> None:
    unmatched = processes.run(  # no marker: no rule matches it, it registers all the same
        [PYTHON, "-c", REGISTERING_JOB, "unmarked", json.dumps({"cpus": 2})],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, CORECAP_SOCKET=str(daemon.socket)),
    )
    assert unmatched.stdout is not None and json.loads(unmatched.stdout.readline())
    job = daemon.wait_job(unmatched.pid)
    assert job["rule"] == "registered" and job["cpus"] == [JOB_CPU]


def test_asking_for_a_thousand_cores_gets_a_capped_grant_with_the_reason(
    daemon: Daemon, processes: Processes
) -> None:
    _job, manifest = run_job(processes, daemon, cpus=1000)
    assert manifest["cpus"] == [JOB_CPU]
    notes = " ".join(manifest["notes"])  # type: ignore[arg-type]
    assert "asked for 1000 CPUs, rule training allows 4" in notes
    assert "only 1 are eligible" in notes
    warned = manifest["warnings"]
    assert isinstance(warned, list) and len(warned) == 1
    assert warned[0].startswith("corecapd: granted 1 of the 1000 CPUs asked for (asked for 1000")


def test_in_monitor_mode_a_registered_job_is_sized_to_its_grant_and_not_pinned(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    daemon = start_daemon(
        daemon={"mode": "monitor", "reserved_cpus": str(CPUS[0])},
        rules=marked_rule(marker, "training", cpus=4),
    )
    job, manifest = run_job(processes, daemon, cpus=1)
    assert manifest["cpus"] == [JOB_CPU] and manifest["affinity"] == CPUS  # a dry run
    assert manifest["environment"]["OMP_NUM_THREADS"] == "1"  # type: ignore[index]
    warned = manifest["warnings"]
    assert isinstance(warned, list) and len(warned) == 1
    assert warned[0].startswith("corecapd: monitor mode: the pools are sized to the grant of CPUs")
    assert "monitor mode: not pinned" in " ".join(manifest["notes"])  # type: ignore[arg-type]
    assert sorted(os.sched_getaffinity(job.pid)) == CPUS
    assert daemon.wait_job(job.pid)["cpus"] == [JOB_CPU]


def test_a_declaration_wider_than_the_grant_is_accepted_as_oversubscribed(
    daemon: Daemon, processes: Processes
) -> None:
    job, manifest = run_job(processes, daemon, cpus=1, intra_op=8)
    assert "intra_op=8 on 1 CPUs: oversubscribed by design" in " ".join(manifest["notes"])  # type: ignore[arg-type]
    assert daemon.wait_job(job.pid)["budget"] == 8 + 1 + 2 + 1 + 11 + 8


# numpy loads OpenBLAS, which sizes its pool to the mask (both CPUs: the job is unmatched)
# before the job registers for 1 CPU.
BLAS_FIRST_JOB = """
import json, sys
import numpy
from threadpoolctl import threadpool_info
before = {info["internal_api"]: info["num_threads"] for info in threadpool_info()}
import corecapd
plan = corecapd.register(cpus=1)
print(json.dumps({"before": before, "manifest": plan.manifest()}), flush=True)
sys.stdin.read()
"""


def test_the_daemon_gets_the_blas_pools_as_register_left_them(
    daemon: Daemon, processes: Processes
) -> None:
    environment = {k: v for k, v in os.environ.items() if k not in THREADING_VARIABLES}
    job = processes.run(
        [PYTHON, "-c", BLAS_FIRST_JOB, "unmarked"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=environment | {"CORECAP_SOCKET": str(daemon.socket)},
    )
    assert job.stdout is not None
    seen = json.loads(job.stdout.readline())
    assert seen["before"]["openblas"] == len(CPUS)  # sized to the mask as numpy loaded
    [openblas] = [i for i in seen["manifest"]["threadpool_info"] if i["internal_api"] == "openblas"]
    assert openblas["num_threads"] == 1
    explained = daemon.call("explain", pid=job.pid)
    assert {p["layer"]: p["threads"] for p in explained["pools"]}["openblas"] == 1
    assert not [hint for hint in explained["hints"] if "openblas" in hint]


# A job by its rule that never registered reports pools, once the daemon has it as a job.
REPORTING_JOB = """
import os, sys, time
from pathlib import Path
from corecapd.client import call
from corecapd.protocol import RemoteError
socket, pools = Path(os.environ["CORECAP_SOCKET"]), [{"layer": "openblas", "threads": 1}]
for _ in range(500):
    try:
        call(socket, "report", pools=pools)
        print("accepted", flush=True)
        break
    except RemoteError as err:
        if "register first" not in str(err):
            print(err, flush=True)
            break
    time.sleep(0.02)
sys.stdin.read()
"""


def test_only_the_process_that_registered_reports_its_pools(
    daemon: Daemon, processes: Processes
) -> None:
    pools = [{"layer": "openblas", "threads": 1}]
    with pytest.raises(RemoteError, match="is in no job: register first"):
        call(daemon.socket, "report", pools=pools)
    job = processes.python(
        REPORTING_JOB,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, CORECAP_SOCKET=str(daemon.socket)),
    )
    assert job.stdout is not None
    answer = job.stdout.readline().decode()
    assert "did not register: only the process that registered reports its pools" in answer
    assert daemon.call("explain", pid=job.pid)["pools"] == []


@pytest.mark.parametrize(
    ("intra_op", "inter_op", "environment", "cpus", "expected"),
    [
        # Measured with TensorFlow 2.21 (docs/budgets.md): unset pools run one thread per
        # CPU in the mask at the first op, 1 and 2 CPUs alike.
        (0, 0, {}, 1, (1, 1)),
        (0, 0, {}, 2, (2, 2)),
        (3, 1, {}, 2, (3, 1)),
        (0, 1, {}, 2, (2, 1)),
        (0, 0, {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "3"}, 2, (1, 3)),
        (2, 0, {"TF_NUM_INTRAOP_THREADS": "5"}, 1, (2, 1)),  # the setting over its variable
        (0, 0, {"TF_NUM_INTRAOP_THREADS": "0", "TF_NUM_INTEROP_THREADS": "x"}, 2, (2, 2)),
    ],
)
def test_tensorflow_pools_resolve_its_unset_to_the_threads_it_runs(
    intra_op: int, inter_op: int, environment: dict[str, str], cpus: int, expected: tuple[int, int]
) -> None:
    pools = tensorflow_pools(intra_op, inter_op, environment, cpus)
    assert (pools["intra_op"], pools["inter_op"]) == expected


@given(
    st.integers(0, 64),
    st.integers(0, 64),
    st.dictionaries(
        st.sampled_from(["TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"]),
        st.one_of(st.integers(-2, 64).map(str), st.text(max_size=3)),
    ),
    st.integers(1, 256),
)
def test_tensorflow_pools_are_never_zero_and_a_setting_is_taken_as_is(
    intra_op: int, inter_op: int, environment: dict[str, str], cpus: int
) -> None:
    pools = tensorflow_pools(intra_op, inter_op, environment, cpus)
    assert min(pools.values()) >= 1
    for name, configured in (("intra_op", intra_op), ("inter_op", inter_op)):
        assert pools[name] == configured or configured == 0


def test_a_client_cannot_register_another_pid(daemon: Daemon) -> None:
    # This test process registers, claiming PID 1: it gets itself registered instead.
    grant = call(daemon.socket, "register", declaration={"cpus": 1}, pid=1)
    try:
        assert grant["pid"] == os.getpid()
        assert any("can only register itself, not PID 1" in n for n in grant["notes"])
        assert daemon.job(1) is None
    finally:
        os.sched_setaffinity(0, CPUS)  # registration pinned this test process: undo it


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"declaration": {"cpus": "two"}}, "cpus: expected an integer"),
        ({"declaration": {"cpus": 0}}, "cpus: expected 1 to 4096"),
        ({"declaration": {"threads": 4}}, "unknown field 'threads'"),
        ({"declaration": []}, "declaration: expected an object"),
        ({"pools": [{"layer": "openmp"}]}, "pools[0]"),
        ({"tensorflow_initialized": "yes"}, "tensorflow_initialized"),
        ({"pid": -5}, '"pid"'),
    ],
)
def test_malformed_registrations_are_refused(
    daemon: Daemon, arguments: dict[str, Any], error: str
) -> None:
    with pytest.raises(RemoteError, match=re.escape(error)):
        call(daemon.socket, "register", **arguments)
    assert daemon.status()["jobs"] == []  # nothing registered, nothing pinned
    assert os.sched_getaffinity(0) == set(CPUS)


def test_without_a_daemon_the_library_works_standalone_and_warns_once(
    processes: Processes, tmp_path: Path
) -> None:
    _job, manifest = run_job(
        processes, None, env={"CORECAP_SOCKET": str(tmp_path / "none.sock")}, cpus=1
    )
    assert manifest["daemon"] is None and manifest["cpus"] == [CPUS[0]]
    assert manifest["affinity"] == [CPUS[0]]
    warned = manifest["warnings"]
    assert isinstance(warned, list) and len(warned) == 1 and "cannot reach corecapd" in warned[0]
    assert manifest["environment"]["OPENBLAS_NUM_THREADS"] == "1"  # type: ignore[index]


def test_corecap_run_registers_sets_the_environment_and_execs(
    daemon: Daemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import json, os, sys\n"
        "import corecapd\n"
        "plan = corecapd.register()\n"  # finds the grant the launcher left in CORECAP_*
        "print(json.dumps({'pid': os.getpid(), 'affinity': sorted(os.sched_getaffinity(0)),"
        " 'env': {k: v for k, v in os.environ.items() if k.startswith(('CORECAP_', 'OMP_',"
        " 'TF_NUM', 'OPENBLAS_', 'MKL_'))}, 'cpus': plan.cpus}), flush=True)\n"
        "sys.stdin.read()\n"
    )
    launcher = processes.run(
        [
            PYTHON,
            "-m",
            "corecapd.launcher",
            "run",
            "--cpus",
            "1",
            "--socket",
            str(daemon.socket),
            "--",
            PYTHON,
            str(script),
            marker,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert launcher.stdout is not None
    seen = json.loads(launcher.stdout.readline())
    assert seen["pid"] == launcher.pid  # exec kept the PID, and with it the registration
    assert seen["affinity"] == [JOB_CPU] and seen["cpus"] == [JOB_CPU]
    env = seen["env"]
    assert env["CORECAP_CPUS"] == str(JOB_CPU) and env["OMP_NUM_THREADS"] == "1"
    assert env["TF_NUM_INTRAOP_THREADS"] == "1" and env["CORECAP_SOCKET"] == str(daemon.socket)
    status = daemon.wait_job(launcher.pid)
    assert status["budget_basis"].startswith("declared")


def test_corecapctl_finds_the_daemon_a_job_was_given_in_its_environment(daemon: Daemon) -> None:
    env = dict(os.environ, CORECAP_SOCKET=str(daemon.socket))  # what `corecap run` leaves
    shown = subprocess.run(
        [PYTHON, "-m", "corecapd.ctl", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["host"]["mode"] == "enforce"


def test_corecap_run_argument_errors() -> None:
    def launch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "corecapd.launcher", *args], capture_output=True, text=True
        )

    assert "give the command after --" in launch("run", "--cpus", "1").stderr
    assert launch("--version").stdout == f"corecap {__version__}\n"
    assert "expected at least 1" in launch("run", "--cpus", "0", "--", "true").stderr
    missing = launch("run", "--socket", "/nonexistent.sock", "--", "/no/such/program")
    assert missing.returncode == 127 and "cannot run '/no/such/program'" in missing.stderr


def test_kmeans_with_omp_16_on_one_core_is_a_violation_naming_openmp(
    start_daemon: StartDaemon, processes: Processes, marker: str
) -> None:
    pytest.importorskip("sklearn")
    daemon = start_daemon(
        daemon={"reserved_cpus": str(CPUS[0])},
        defaults={"grace": 0.5, "violation_after": 2},
        rules=marked_rule(marker, "sklearn", cpus=1),
    )
    job = processes.python(
        """
        import numpy as np, sys
        from sklearn.cluster import KMeans
        data = np.random.rand(200000, 10)
        for _ in range(40):
            KMeans(n_clusters=8, n_init=1, max_iter=50).fit(data)
        """,
        env=dict(os.environ, OMP_NUM_THREADS="16"),
    )
    onset = daemon.wait_event("violation-started", timeout=60, pid=str(job.pid))
    assert "OpenMP pool (libgomp) of 16 threads on 1 CPUs" in onset["diagnosis"]
    assert "OMP_NUM_THREADS=16" in onset["diagnosis"]
    explained = subprocess.run(
        [PYTHON, "-m", "corecapd.ctl", "--socket", str(daemon.socket), "explain", str(job.pid)],
        capture_output=True,
        text=True,
    )
    assert explained.returncode == 0, explained.stderr
    assert "OMP_NUM_THREADS=16" in explained.stdout and "diagnosis:" in explained.stdout
    records = [v for v in daemon.call("violations") if v["pid"] == job.pid]
    [record] = [v for v in records if v["kind"] == "threads"]  # and the layer's own record
    assert "OpenMP" in record["diagnosis"]
    job.kill()


def test_explain_of_a_pid_in_no_job(daemon: Daemon) -> None:
    with pytest.raises(RemoteError, match="is in no job"):
        call(daemon.socket, "explain", pid=os.getpid())


def test_registrations_survive_a_killed_daemon(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    settings = {"reserved_cpus": str(CPUS[0]), "state_dir": str(tmp_path / "kept")}
    first = start_daemon(daemon=settings, rules=marked_rule(marker, "training", cpus=4))
    unmatched = processes.run(
        [PYTHON, "-c", REGISTERING_JOB, "unmarked", json.dumps({"cpus": 1, "intra_op": 3})],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, CORECAP_SOCKET=str(first.socket)),
    )
    assert unmatched.stdout is not None and json.loads(unmatched.stdout.readline())
    first.wait_job(unmatched.pid)
    first.process.kill()  # kill -9: no goodbye, no cleanup
    first.process.wait()

    second = start_daemon(daemon=settings, rules=marked_rule(marker, "training", cpus=4))
    job = second.wait_job(unmatched.pid)
    assert job["rule"] == "registered" and job["cpus"] == [JOB_CPU]
    assert job["budget_basis"].startswith("declared: intra 3 + inter 1")
    assert os.sched_getaffinity(unmatched.pid) == {JOB_CPU}


def test_a_corrupt_state_file_is_reported_and_ignored(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    state = tmp_path / "broken"
    state.mkdir()
    (state / "state.json").write_text("{not json")
    daemon = start_daemon(daemon={"state_dir": str(state)})
    problem = daemon.wait_event("state-problem")
    assert "state.json: unreadable" in problem["error"]
