"""One Optuna worker of a search shared by several, each on cores of its own.

Start N of them, each through `corecap run`, on one storage (a journal file here; an SQLite
or RDB URL works the same):

    for i in 1 2; do
        corecap run --cpus 1 -- python examples/optuna/worker.py --storage study.log --trials 4 &
    done; wait

`corecap run` registers the worker with corecapd for its cores and leaves the grant in
CORECAP_*; `corecapd.register()` below finds it there and sizes TensorFlow, tf.data and
BLAS / OpenMP to it. Every trial stores the worker's threading manifest as its user
attribute "corecap" (`study.trials[i].user_attrs["corecap"]`): the CPUs, the pools, the
threading variables, what TensorFlow runs. The objective is the project's seed Keras model
(Dense(64) on random (N, 20)), its width and learning rate searched.
"""

from __future__ import annotations

import argparse
from typing import Any

import corecapd


def main() -> None:
    parser = argparse.ArgumentParser(description="One Optuna worker, on cores of its own.")
    parser.add_argument("--storage", required=True, help="journal file, or an RDB URL")
    parser.add_argument("--study", default="corecap-search", help="the study's name")
    parser.add_argument("--trials", type=int, default=4, help="trials this worker runs")
    parser.add_argument("--samples", type=int, default=10000, help="training rows per trial")
    args = parser.parse_args()

    plan = corecapd.register()  # before `import tensorflow`: its pools get sized at import
    import numpy as np
    import optuna
    import tensorflow as tf
    from optuna.storages.journal import JournalFileBackend

    storage: Any = args.storage
    if "://" not in args.storage:  # a journal file: shared through the file system
        storage = optuna.storages.JournalStorage(JournalFileBackend(args.storage))
    study = optuna.create_study(study_name=args.study, storage=storage, load_if_exists=True)
    rows = np.random.default_rng(0)
    x, y = rows.random((args.samples, 20)), rows.random((args.samples, 1))

    def objective(trial: optuna.Trial) -> float:
        model = tf.keras.Sequential(
            [
                tf.keras.Input((20,)),
                tf.keras.layers.Dense(trial.suggest_int("units", 16, 128), activation="relu"),
                tf.keras.layers.Dense(1),
            ]
        )
        learning_rate = trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate), loss="mse")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
        history = model.fit(
            data.with_options(plan.data_options()),
            epochs=1,
            verbose=0,
            callbacks=[plan.keras_callback()],
        )
        trial.set_user_attr("corecap", plan.manifest())  # after fit: TF's pools as they ran
        return float(history.history["loss"][-1])

    study.optimize(objective, n_trials=args.trials)


if __name__ == "__main__":
    main()
