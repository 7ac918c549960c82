"""EfficientNet-Lite0 in Flax NNX against the Keras Lite0, side by side in one process.

    python experiments/flax_vs_keras.py            # 180x180, 64 units -> experiments/results/flax_vs_keras.{json,md}
    python experiments/flax_vs_keras.py --units 16 --repeats 2   # what experiments/results/ holds

Measures, at the job's size: the largest difference at block4c_add (Flax: stages/3/2)
on chelsea.png, the top class of both photos at 224x224, the objective curves of the
first 10 reference steps from identical starting images, and the speed (compile and
steady state separately, best of `--repeats`), and writes both grids as PNG under
`--out` (not committed) to look at.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import fvis
from fvis import chunks, models

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def photo(name, size):
    image = Image.open(SHARED / "images" / name).convert("RGB").resize(size[::-1], Image.BILINEAR)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def read(vis_model, paths, image):
    forward = vis_model.forward(paths)
    return jax.jit(forward)(forward.weights(), image)


def parity(size):
    keras_model, flax_model = models.efficientnet_lite0(image_size=size), models.efficientnet_lite0_flax(image_size=size)
    out = {}
    for name in ("chelsea.png", "coffee.png"):
        k = read(keras_model, ["block4c_add", "predictions"], photo(name, size))
        f = read(flax_model, ["stages/3/2", "classifier"], photo(name, size))
        out[name] = {"block4c_max_abs_diff": float(np.max(np.abs(k["block4c_add"] - f["stages/3/2"]))),
                     "logits_max_abs_diff": float(np.max(np.abs(k["predictions"] - f["classifier"]))),
                     "top_class_keras": int(np.argmax(k["predictions"])), "top_class_flax": int(np.argmax(f["classifier"]))}
    return out


def timed(vis_model, layer, units, repeats):
    """(compile seconds, best steady-state seconds of one chunk, Result) for the reference job on `units`."""
    job = fvis.prepare(vis_model, layer, units, steps=30, batch_size=len(range(*map(int, units.split(":")))))
    weights = job.placed_weights()
    chunk, compile_s = job.compile(weights)
    placed = job._placed(job.units)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        rendered = jax.block_until_ready(chunk(weights, placed))
        runs.append(time.perf_counter() - start)
    return compile_s, min(runs), fvis.Result(job.units, *chunks.to_host(rendered))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="outputs/flax_vs_keras")
    args = parser.parse_args()
    size, units, out = (args.size, args.size), f"0:{args.units}", Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_1min_start": os.getloadavg()[0],
              "versions": {"jax": jax.__version__, **models.framework_versions()}, "image_size": list(size),
              "units": args.units, "steps": 30, "parity_224": parity((224, 224))}
    keras_model, flax_model = models.efficientnet_lite0(image_size=size), models.efficientnet_lite0_flax(image_size=size)
    report["parity_job_size"] = {"chelsea.png": {"block4c_max_abs_diff": float(np.max(np.abs(
        read(keras_model, ["block4c_add"], photo("chelsea.png", size))["block4c_add"]
        - read(flax_model, ["stages/3/2"], photo("chelsea.png", size))["stages/3/2"])))}}
    results = {}
    for name, vis_model, layer in (("keras", keras_model, "block4c_add"), ("flax", flax_model, "stages/3/2")):
        compile_s, run_s, result = timed(vis_model, layer, units, args.repeats)
        results[name] = result
        report[name] = {"compile_s": compile_s, "steady_chunk_s": run_s}
        fvis.images.save_png(out / f"grid_{name}.png", fvis.images.grid(fvis.outputs.tiles(result)))
    k, f = results["keras"].curves[..., :10], results["flax"].curves[..., :10]
    rel = np.abs(f - k) / np.maximum(np.abs(k), 1e-6)  # (units, 1, 10)
    report["curves_10_steps_max_rel_diff"] = float(rel.max())
    report["curves_max_rel_diff_by_step"] = [float(v) for v in rel.max(axis=(0, 1))]
    report["curves_fraction_within_1e-3"] = float(np.mean(rel <= 1e-3))
    report["units_within_1e-3_all_10_steps"] = int(np.sum(np.all(rel <= 1e-3, axis=(1, 2))))
    report["images_max_abs_diff"] = float(np.max(np.abs(results["flax"].images - results["keras"].images)))
    report["ratio_flax_over_keras"] = {key: report["flax"][key] / report["keras"][key]
                                       for key in ("compile_s", "steady_chunk_s")}
    report["loadavg_1min_end"] = os.getloadavg()[0]
    (HERE / "results" / "flax_vs_keras.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
