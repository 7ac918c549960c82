"""Does a filter's image depend on the batch size or the chunk it ran in? What would exactness cost?

    python experiments/determinism.py        # ~8 min on 2 CPU cores; writes results/determinism.json

Every filter is compared with the same filter run at a reference batch size: how
many filters come out bit-identical, and the largest and mean absolute difference,
for the images and for the objective values (curves, final). Then, at a fixed batch
size, other chunk compositions (order reversed, rotated). Last, the price of the
one batch-size-independent schedule there is, a batch of one (no batching), measured
against a batch of 16 side by side.
"""

import json
import platform
import sys
from pathlib import Path

import jax
import numpy as np

import fvis
from fvis import models

FIELDS = ("images", "curves", "final")


def run(model, layer, units, batch_size, steps):
    result = fvis.visualize(model, layer, list(units), steps=steps, batch_size=batch_size, progress=False)
    order = np.argsort(result.units)
    return {f: getattr(result, f)[order] for f in FIELDS} | {"optimize_s": result.optimize_s}


def compare(a, b):
    out = {}
    for f in FIELDS:
        x, y = a[f], b[f]
        out[f] = {"bit_identical": int(np.all(x == y, axis=tuple(range(1, x.ndim))).sum()), "of": len(x),
                  "max_abs_diff": float(np.abs(x - y).max()), "mean_abs_diff": float(np.abs(x - y).mean())}
    return out


def batch_study(model, layer, units, steps, reference, batch_sizes):
    base = run(model, layer, units, reference, steps)
    rows = {f"B={b} vs B={reference}": compare(run(model, layer, units, b, steps), base) for b in batch_sizes}
    for b in (3, 5):
        same = run(model, layer, units, b, steps)
        rows[f"B={b} reversed order vs B={b}"] = compare(run(model, layer, units[::-1], b, steps), same)
        rows[f"B={b} rotated by 4 vs B={b}"] = compare(run(model, layer, np.roll(units, 4), b, steps), same)
    return rows


def batching_cost(model, layer, units, steps, repeats=2):
    """Optimisation seconds, batch of one vs batch of 16, interleaved."""
    times = {"B=1": [], "B=16": []}
    for _ in range(repeats):
        times["B=1"].append(run(model, layer, units, 1, steps)["optimize_s"])
        times["B=16"].append(run(model, layer, units, 16, steps)["optimize_s"])
    return times | {"ratio_B1_over_B16": float(np.median(times["B=1"]) / np.median(times["B=16"]))}


def main():
    tiny32 = models.tiny_convnet(image_size=(32, 32), width=16, seed=1)
    tiny24 = models.tiny_convnet(image_size=(24, 24), width=16, seed=1)
    lite0 = models.efficientnet_lite0(image_size=(128, 128))
    lite0_180 = models.efficientnet_lite0(image_size=(180, 180))
    out = {
        "platform": {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                     "processor": platform.processor() or platform.machine(), "python": sys.version.split()[0]},
        "tiny 32px conv3, 64 filters, 10 steps": batch_study(tiny32, "conv3", np.arange(64), 10, 2, (1, 3, 5, 16, 64)),
        "tiny 24px conv3, 10 filters, 6 steps": batch_study(tiny24, "conv3", np.arange(10), 6, 2, (1, 3, 5, 10)),
        "lite0 128px block4c_add, 16 filters, 10 steps": batch_study(lite0, "block4c_add", np.arange(16), 10, 2,
                                                                     (1, 4, 16)),
        "cost: lite0 180px block4c_add, 16 filters, 30 steps": batching_cost(lite0_180, "block4c_add",
                                                                            np.arange(16), 30),
    }
    path = Path(__file__).parent / "results" / "determinism.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
