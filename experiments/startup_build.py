"""Model build time, cache cold: Keras' own initializers (before) against `fvis.models.keras_init` (after).

    python experiments/startup_build.py [--rounds 3]   # ~4 min on 2 CPU cores -> experiments/results/startup_build.json

Each measurement is a fresh process with JAX's persistent compilation cache off, building one
model with `fvis.models` (ResNet50V2 with random weights at 180x180; MobileNet 0.25 from
../shared/weights/mobilenet_0.25_224.weights.h5 at 224x224; EfficientNet-Lite0 at 180x180 from
its converted checkpoint, converted once before the runs). "before" runs the same code with
`keras_models._initial_values` replaced by a no-op, i.e. every variable built by Keras' compiled
initializers and then overwritten by the load (or kept, for random weights). The variants
alternate, model by model, round by round. Recorded per run: the build's wall and CPU seconds,
the XLA programs compiled during the build, the process' wall seconds, and the 1-minute load.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_0.25_224.weights.h5"
MODELS = {
    "resnet50v2_random": "models.keras_application('ResNet50V2', weights=None, image_size=(180, 180))",
    "mobilenet_0.25_file": (f"models.keras_application('MobileNet', alpha=0.25, include_top=True, "
                            f"weights={str(WEIGHTS)!r}, image_size=(224, 224))"),
    "efficientnet_lite0": "models.efficientnet_lite0(image_size=(180, 180))",
}
CHILD = """
import contextlib, json, sys, time
import jax
jax.config.update("jax_enable_compilation_cache", False)
import fvis
from fvis import models
from fvis.models import keras_models
if sys.argv[1] == "before":
    keras_models._initial_values = lambda **kwargs: contextlib.nullcontext()
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: compiles.append(seconds) if event == "/jax/core/compile/backend_compile_duration" else None)
wall, cpu = time.perf_counter(), time.process_time()
model = {build}
print(json.dumps({{"build_s": time.perf_counter() - wall, "build_cpu_s": time.process_time() - cpu,
                  "compiled_programs": len(compiles), "compile_s": sum(compiles)}}))
"""


def run(model, variant):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(build=MODELS[model]), variant], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"model": model, "variant": variant, **row, "process_s": time.perf_counter() - start,
            "load_1min": os.getloadavg()[0]}


def cpu_name():
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "startup_build.json"))
    args = parser.parse_args()
    run("efficientnet_lite0", "after")  # converts the Lite0 checkpoint once (cached), outside the figures
    rows = []
    for round_ in range(args.rounds):
        for model in MODELS:
            for variant in (("before", "after") if round_ % 2 == 0 else ("after", "before")):
                rows.append({"round": round_ + 1, **run(model, variant)})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for model in MODELS:
        median = lambda variant, key: statistics.median(r[key] for r in rows
                                                        if r["model"] == model and r["variant"] == variant)
        summary[model] = {f"{v}_{k}": median(v, k) for v in ("before", "after")
                          for k in ("build_s", "build_cpu_s", "process_s", "compiled_programs")}
        summary[model]["build_speedup"] = summary[model]["before_build_s"] / summary[model]["after_build_s"]
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds, "median": summary, "runs": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
