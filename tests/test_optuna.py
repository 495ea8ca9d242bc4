"""Real Optuna: the README's recipe, N workers through `corecap run` sharing one storage,
each trial's threading manifest stored as its user attribute."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, Daemon, Processes, StartDaemon, marked_rule

optuna = pytest.importorskip("optuna")
pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tensorflow

CPUS = sorted(os.sched_getaffinity(0))
WORKER = Path(__file__).parent.parent / "examples" / "optuna" / "worker.py"


@pytest.mark.skipif(len(CPUS) < 2, reason="two workers on a core each: needs 2 CPUs")
def test_optuna_workers_through_corecap_run_record_their_cores_per_trial(
    start_daemon: StartDaemon, processes: Processes, marker: str, tmp_path: Path
) -> None:
    daemon: Daemon = start_daemon(daemon={"reserved_cpus": ""}, rules=marked_rule(marker, cpus=1))
    journal = tmp_path / "study.log"
    started = time.monotonic()
    workers = [
        processes.run(
            [
                *(PYTHON, "-m", "corecapd.launcher", "run", "--cpus", "1"),
                *("--socket", str(daemon.socket), "--"),
                *(PYTHON, str(WORKER), "--storage", str(journal), "--study", marker),
                *("--trials", "2", "--samples", "2000"),
            ],
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=240)
        assert worker.returncode == 0, stderr.decode()[-3000:]
    print(f"2 workers x 2 trials: {time.monotonic() - started:.1f} s")

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    trials = optuna.load_study(study_name=marker, storage=storage).trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    by_worker: dict[int, set[tuple[int, ...]]] = {}
    for trial in trials:
        manifest = trial.user_attrs["corecap"]
        assert manifest["daemon"] == str(daemon.socket) and len(manifest["cpus"]) == 1
        assert manifest["affinity"] == manifest["cpus"]
        assert manifest["environment"]["OMP_NUM_THREADS"] == "1"
        assert manifest["tensorflow"]["intra_op"] == manifest["tensorflow"]["inter_op"] == 1
        assert manifest["epoch_threads"], "the Keras callback counted no epoch"
        by_worker.setdefault(manifest["pid"], set()).add(tuple(manifest["cpus"]))
    # both workers at once, each on a core of its own
    assert sorted(cpus for seen in by_worker.values() for cpus in seen) == [(CPUS[0],), (CPUS[1],)]
    for worker in workers:
        assert daemon.events("job-started", pid=str(worker.pid))
        assert daemon.events("violation-started", pid=str(worker.pid)) == []
