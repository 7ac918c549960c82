"""The quality report's cost on the reference job, before and after (issue 15).

    python experiments/quality_cost.py                 # ~7 min on 2 CPU cores -> experiments/results/quality_cost.json
    python experiments/quality_cost.py --steps 2 --rounds 1 --out /tmp/q.json   # the quality split alone, ~3 min

The reference job (ResNet50V2 with random weights, conv3_block4_out, 64 filters, 180x180, 30
steps) runs once in this process, timed from the model build to its images (no persistent
compilation cache: cold, as a first run). Then `fvis.quality.measure` of its images is timed
for the code BEFORE (`fvis/quality.py` as of the git revision `--before`, loaded from git as
a module) and the code of the working tree (AFTER), alternating, `--rounds` times each, with
`jax.clear_caches()` before each measurement so each is what a fresh job pays. Each
measurement is split into its parts (the module functions `measure` calls) and, per part,
the seconds JAX spent tracing, lowering and compiling (`jax.monitoring` duration events).
The summaries of both are compared (they must agree to float rounding).

The quality cost does not depend on how long the images were optimised, so `--steps 2`
gives the quality split faster; the job's share then needs the 30-step job time.
"""

import argparse
import collections
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import fvis  # noqa: F401  (sets the Keras backend)
import jax
import numpy as np

from fvis import devices, quality

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REV = "38c40ba"  # main before the quality-cost change
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                  "/jax/core/compile/backend_compile_duration": "compile_s"}
PARTS = ("unit_values", "robustness", "spectral_slopes", "selectivity_ranks", "_add_natural")
_events = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _events.update({COMPILE_EVENTS[event]: duration}) if event in COMPILE_EVENTS else None)


def cpu_name():
    """The CPU model as lscpu names it."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def load_before(rev):
    """fvis/quality.py as of git revision `rev`, imported as the module `quality_before`."""
    source = subprocess.run(["git", "show", f"{rev}:fvis/quality.py"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    path = Path("/tmp") / f"quality_before_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("quality_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(module, call):
    """Runs call() with the module's PARTS wrapped to record their wall and compile seconds."""
    parts, originals = {}, {}
    for name in PARTS:
        if hasattr(module, name):
            originals[name] = fn = getattr(module, name)

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                before, start, cpu = dict(_events), time.perf_counter(), time.process_time()
                out = _fn(*args, **kwargs)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                spent = {k: round(_events[k] - before.get(k, 0.0), 3) for k in COMPILE_EVENTS.values()}
                parts[_name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), **spent}
                return out

            setattr(module, name, wrapper)
    try:
        jax.clear_caches()
        before, start, cpu = dict(_events), time.perf_counter(), time.process_time()
        out = call()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    total = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
             **{k: round(_events[k] - before.get(k, 0.0), 3) for k in COMPILE_EVENTS.values()}}
    return out, {"total": total, "parts": parts}


def batch_study(job, images, sizes, workers=(1, 2), rounds=2, count=32):
    """Wall and CPU ms per image of the quality report's forward (all units) per batch size and
    number of calling threads (`fvis.devices.AUTO` "quality_batch_size", "quality_workers").

    Each size is compiled first, then the settings are timed in turn, `rounds` times, on
    `count` of the job's images; on a shared machine compare the CPU seconds first.
    """
    fn = quality.values_function(job.forward, job.objective)
    values = lambda x, size: quality.unit_values(job.forward, job.objective, x, job.units, batch_size=size, function=fn)
    compile_s, default = {}, devices.AUTO["cpu"]["quality_workers"]
    for size in sizes:
        start = time.perf_counter()
        values(images[:size], size)
        compile_s[size] = round(time.perf_counter() - start, 3)
    rows = []
    try:
        for round_ in range(1, rounds + 1):
            for threads in workers:
                devices.AUTO["cpu"]["quality_workers"] = threads
                for size in sizes:
                    start, cpu = time.perf_counter(), time.process_time()
                    values(images[:count], size)
                    rows.append({"batch": size, "workers": threads, "round": round_, "first_call_s": compile_s[size],
                                 "wall_ms_per_image": round(1000 * (time.perf_counter() - start) / count, 2),
                                 "cpu_ms_per_image": round(1000 * (time.process_time() - cpu) / count, 2)})
                    print("batch", json.dumps(rows[-1]), flush=True)
    finally:
        devices.AUTO["cpu"]["quality_workers"] = default
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--units", default="0:64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default=BEFORE_REV)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="the forward batch study; '' to skip")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/quality_cost.json"))
    args = parser.parse_args()
    before_module = load_before(args.before)
    start, cpu = time.perf_counter(), time.process_time()
    model = fvis.models.keras_application("ResNet50V2", weights=None, image_size=(180, 180))
    job = fvis.prepare(model, "conv3_block4_out", args.units, steps=args.steps)
    result = job.run(progress=False)
    job_s, job_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    print(f"job: {job_s:.1f} s, {job_cpu_s:.1f} CPU s ({args.steps} steps, {result.images.shape})", flush=True)
    measure = lambda module: module.measure(job.forward, job.objective, result.units, result.images, dead=result.dead)
    load_at_start = os.getloadavg()
    rows, summaries = [], {}
    for round_ in range(1, args.rounds + 1):
        for label, module in (("before", before_module), ("after", quality)):
            (_, summary), timing = timed(module, lambda: measure(module))
            summaries[label] = summary
            rows.append({"code": label, "round": round_, **timing})
            print(label, round_, json.dumps(timing["total"]), flush=True)
            for name, part in timing["parts"].items():
                print("   ", name, json.dumps(part), flush=True)
    flat = np.asarray(result.images, np.float32).reshape(-1, *result.images.shape[2:])
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    study = batch_study(job, flat, sizes) if sizes else []
    best = {label: min(r["total"]["wall_s"] for r in rows if r["code"] == label) for label in ("before", "after")}
    best_cpu = {label: min(r["total"]["cpu_s"] for r in rows if r["code"] == label) for label in ("before", "after")}
    share = {label: round(s / (job_s + s), 4) for label, s in best.items()}
    share_cpu = {label: round(s / (job_cpu_s + s), 4) for label, s in best_cpu.items()}
    keys = ("rank1_fraction", "robustness_median", "spectral_slope_median", "activation_median")
    record = {
        "what": "fvis.quality.measure on the reference job's images, before vs after, alternating in one process",
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "python": platform.python_version(), "jax": jax.__version__,
        "job": {"model": "ResNet50V2 (random weights)", "layer": "conv3_block4_out", "units": args.units,
                "image_size": [180, 180], "steps": args.steps, "seconds": round(job_s, 2),
                "cpu_seconds": round(job_cpu_s, 2),
                "timed": "model build + prepare + compile + optimisation, no persistent compilation cache"},
        "before_rev": args.before, "rounds": rows,
        "best_quality_s": best, "best_quality_cpu_s": best_cpu,
        "share_of_job": share, "share_of_job_cpu": share_cpu,
        "share_is": "quality / (job + quality), the job timed above; best of the rounds",
        "speedup": round(best["before"] / best["after"], 2),
        "speedup_cpu": round(best_cpu["before"] / best_cpu["after"], 2),
        "load_average": {"start_of_quality": load_at_start, "end": os.getloadavg()},
        "batch_study": study,
        "quality_batch_size_after": quality.default_batch_size(),
        "quality_workers_after": devices.auto_setting("quality_workers"),
        "summaries": {label: {k: s[k] for k in keys} for label, s in summaries.items()},
    }
    print(json.dumps({k: record[k] for k in ("best_quality_s", "best_quality_cpu_s", "share_of_job", "share_of_job_cpu",
                                             "speedup", "speedup_cpu", "summaries")}, indent=1))
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
