"""The project's seed Keras model, fitted once: a workload for `corecap bench`.

    corecap bench --cpus 1 --metric 'epoch_s: (\\S+)' --vs 'python examples/seed_fit.py 64' \\
        -- python examples/seed_fit.py 32

Registers first (`corecapd.register()` finds the grant `corecap bench` or `corecap run`
left in CORECAP_*), fits Dense(64) on random (10000, 20) for 3 epochs with the batch size
given (default 32), and prints the median epoch time after the first (`epoch_s: 0.312`)
and the last loss (`loss: 0.0831`).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import corecapd


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    plan = corecapd.register()  # before `import tensorflow`: its pools get sized at import
    import numpy as np
    import tensorflow as tf

    model = tf.keras.Sequential(
        [
            tf.keras.Input((20,)),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    times: list[float] = []

    class Clock(tf.keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.began = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            times.append(time.perf_counter() - self.began)

    rows = np.random.default_rng(0)
    history = model.fit(
        rows.random((10000, 20)),
        rows.random((10000, 1)),
        batch_size=batch,
        epochs=3,
        verbose=0,
        callbacks=[Clock(), plan.keras_callback()],
    )
    print(f"epoch_s: {statistics.median(times[1:]):.4f}")  # the first builds the graph
    print(f"loss: {history.history['loss'][-1]:.4f}")


if __name__ == "__main__":
    main()
