"""The Keras Lite0 against itself, compiled two ways: how far float rounding alone moves the reference curves.

    python experiments/rounding_floor.py    # ~2 min on 2 CPU cores; prints the per-step figures

The same model, units, starting images and settings (180x180, block4c_add, units 0-15, normalized
ascent lr 10, 10 steps, one chunk of 16); only the loop form differs ("scan" vs "host"), so XLA
compiles the step differently and rounds differently. The maximum relative difference of the
objective curves per step is the floor below which no second implementation (e.g. the Flax Lite0,
experiments/flax_vs_keras.py) can be expected to agree with Keras. Recorded in
experiments/results/flax_vs_keras.md.
"""

import json
import time

import numpy as np

import fvis


def main():
    model = fvis.models.efficientnet_lite0(image_size=(180, 180))
    runs = {}
    for loop in ("scan", "host"):
        start = time.perf_counter()
        runs[loop] = fvis.visualize(model, "block4c_add", "0:16", steps=10, batch_size=16, loop=loop, progress=False)
        print(f"{loop}: {time.perf_counter() - start:.1f} s", flush=True)
    a, b = runs["scan"].curves[:, 0], runs["host"].curves[:, 0]
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
    print(json.dumps({"max_rel_per_step": [float(f"{v:.2g}") for v in rel.max(axis=0)],
                      "units_within_1e-3_all_steps": int(np.sum(np.all(rel <= 1e-3, axis=1)))}))


if __name__ == "__main__":
    main()
