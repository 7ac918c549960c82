"""What each job of a sweep of many small jobs costs, phase by phase.

    python experiments/sweep_overhead.py                       # tiny x 100 and MobileNet x 20 -> results/sweep_overhead.json
    git worktree add /tmp/fvis-main <commit>; python experiments/sweep_overhead.py --label before --code /tmp/fvis-main
    python experiments/sweep_overhead.py --over lr --jobs tiny=8   # lr=range(1,9) instead of the seeds

Each sweep is the `fvis` command as a user runs it, Hydra's basic launcher (one process, jobs one
after another), swept over `seed` (or `lr`, 1 to N), with a fresh compilation-cache folder (so the first job
compiles and the others can hit the cache) and the quality report on:

    fvis -m model=tiny filters=0:2 steps=2 seed=range(0,100) compilation_cache=<fresh folder>
    fvis -m model=mobilenet model.weights=../shared/weights/mobilenet_0.25_224.weights.h5 \\
         filters=0:2 steps=2 'image_size=[128,128]' seed=range(0,20) compilation_cache=<fresh folder>

Per job, from its run.json and results.json: model build (`load_model_s`: the config checks
and the model), compile, optimise, quality, and the rest of the job (preparing it, writing the
files, the report); between jobs, what Hydra and the launcher take (the sweep's wall time less
the jobs' own). Start-up is the process' time before the first job. Figures are medians over
the jobs after the first (the first pays the cold compile) and the first job alone.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_0.25_224.weights.h5"
SWEEPS = {
    "tiny": ["model=tiny", "filters=0:2", "steps=2"],
    "mobilenet": ["model=mobilenet", f"model.weights={WEIGHTS}", "filters=0:2", "steps=2", "image_size=[128,128]"],
    "resnet50v2": ["model=resnet50v2", "model.weights=null", "filters=0:2", "steps=2"],  # the reference's 180 px
}
PHASES = ("build_s", "compile_s", "optimize_s", "quality_s", "rest_s", "total_s")


def _started(run):
    return datetime.datetime.fromisoformat(run["attempts"][-1]["started"]).timestamp()


def job_rows(folder):
    rows = []
    for run_json in sorted(Path(folder).glob("*/run.json")):
        run = json.loads(run_json.read_text())
        results = json.loads((run_json.parent / "results.json").read_text())
        t = run["attempts"][-1]["timings"]
        quality = results.get("timings", {}).get("quality_s", 0.0)
        row = {"job": run_json.parent.name, "status": run["status"], "started": _started(run),
               "build_s": t["load_model_s"], "compile_s": t["compile_s"], "optimize_s": t["optimize_s"],
               "quality_s": quality, "total_s": t["total_s"]}
        row["rest_s"] = row["total_s"] - row["build_s"] - row["compile_s"] - row["optimize_s"] - row["quality_s"]
        rows.append(row)
    return sorted(rows, key=lambda r: r["started"])


def sweep(name, jobs, label, code, over="seed"):
    with tempfile.TemporaryDirectory(prefix="fvis-sweep-") as tmp:
        folder, cache = Path(tmp) / "sweep", Path(tmp) / "cache"
        args = [sys.executable, "-m", "fvis", "-m", *SWEEPS[name], f"seed=range(0,{jobs})" if over == "seed" else f"lr=range(1,{jobs + 1})",
                f"compilation_cache={cache}", f"hydra.sweep.dir={folder}"]
        start, cpu, clock = time.perf_counter(), os.times(), time.time()
        out = subprocess.run(args, capture_output=True, text=True, cwd=code)  # `python -m fvis` imports code/fvis
        wall = time.perf_counter() - start
        cpu_s = sum(os.times()[2:4]) - sum(cpu[2:4])
        if out.returncode != 0:
            raise RuntimeError(f"sweep {name} failed:\n{out.stderr[-3000:]}")
        rows = job_rows(folder)
    jobs_s = sum(r["total_s"] for r in rows)
    later = rows[1:]
    median = {k: statistics.median(r[k] for r in later) for k in PHASES}
    return {"label": label, "sweep": name, "over": over, "jobs": len(rows), "command": " ".join(args[2:]), "wall_s": wall,
            "startup_s": rows[0]["started"] - clock,  # to the second (run.json's clock)
            "cpu_s": cpu_s, "per_job_s": wall / len(rows), "jobs_s": jobs_s,
            "between_jobs_s": (wall - jobs_s) / len(rows), "first_job": {k: rows[0][k] for k in PHASES},
            "median_later_job": median, "load_1min": os.getloadavg()[0], "rows": rows}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", default="tiny=100,mobilenet=20", help="sweep=count,...")
    parser.add_argument("--label", default="after")
    parser.add_argument("--over", default="seed", choices=["seed", "lr"], help="the key the sweep varies")
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose fvis runs (e.g. a worktree of main)")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "sweep_overhead.json"))
    args = parser.parse_args()
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {"runs": []}
    for item in args.jobs.split(","):
        name, count = item.split("=")
        result = sweep(name, int(count), args.label, args.code, args.over)
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1), flush=True)
        key = (args.label, name, args.over)
        saved["runs"] = [r for r in saved["runs"] if (r["label"], r["sweep"], r.get("over", "seed")) != key] + [result]
    saved["cpu"] = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1].split("\n")[0].strip()
    out.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
