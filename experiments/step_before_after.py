"""The compiled reference step, before issue 15 and now, side by side: fresh processes alternating.

    git worktree add /tmp/before 38c40ba && (cd /tmp/before && python -m venv .venv && .venv/bin/pip install -e .)
    python experiments/step_before_after.py --before /tmp/before --before-python /tmp/before/.venv/bin/python
    # -> experiments/results/step_before_after.jsonl (one line per process) and a summary on stdout

Each round runs `bench.py method=fvis job=small steady_repeats=N` with the code before, then with
this checkout, each in its own process (its own compile, the machine's load as it is then). The
step is timed alone (one image, `step_s`) and, where the code runs several chunks at once
(`Settings.workers`, this checkout), with that many steps in flight from their own threads as a
job runs them (`step_s_in_flight`, seconds per image-step).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_measure import cpu_model

HERE = Path(__file__).resolve().parent
KEYS = ("step_s", "step_s_min", "step_cpu_s", "step_s_in_flight", "step_s_in_flight_min", "step_cpu_s_in_flight",
        "step_workers", "step_flops", "compile_s", "loadavg_1min")


def one(tree, python, repeats):
    """One process of `tree`'s bench.py: the fields of KEYS from its JSON."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out.json"
        subprocess.run([python, str(Path(tree) / "experiments" / "bench.py"), "method=fvis", "job=small",
                        f"steady_repeats={repeats}", f"out={out}", f"hydra.run.dir={folder}"], check=True,
                       capture_output=True, cwd=folder)
        record = json.loads(out.read_text())
    return {key: record[key] for key in KEYS if key in record}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a checkout of the code before (e.g. 38c40ba)")
    parser.add_argument("--before-python", required=True, help="a Python with that checkout installed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--out", default=str(HERE / "results" / "step_before_after.jsonl"))
    args = parser.parse_args()
    rows = []
    for round_ in range(1, args.rounds + 1):
        for code, tree, python in (("before", args.before, args.before_python), ("now", HERE.parent, sys.executable)):
            rows.append({"code": code, "round": round_, **one(tree, python, args.repeats)})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))
    median = lambda code, key: float(np.median([r[key] for r in rows if r["code"] == code and key in r]))
    before = median("before", "step_s")
    print(f"before {before * 1e3:.1f} ms/step; now {median('now', 'step_s') * 1e3:.1f} ms alone "
          f"({before / median('now', 'step_s'):.2f}x), {median('now', 'step_s_in_flight') * 1e3:.1f} ms per "
          f"image-step with {int(median('now', 'step_workers'))} in flight "
          f"({before / median('now', 'step_s_in_flight'):.2f}x); CPU: {cpu_model()}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
