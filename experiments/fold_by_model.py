"""Batch norms folded into convolutions, and the loop form, per model on CPU (issue 15).

    python experiments/fold_by_model.py      # ~5 min on 2 CPU cores -> experiments/results/fold_by_model.json

Each model's job (1 unit per chunk, the CPU rewrites on) runs with fold_batchnorm off and on, in
both loop forms, alternating, three rounds in one process; the first round (compilation
warm-up) is dropped. This is the measurement behind `fvis.devices.AUTO["cpu"]`'s
"fold_batchnorm" and "loop".
"""

import json
import os
import sys
import time
from pathlib import Path

import fvis
from fvis import devices

from loop_by_model import JOBS as LOOP_JOBS  # the same models, layers and steps

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"ResNet50V2": "0:3", "EfficientNet-Lite0": "0:6", "MobileNet 0.25": "0:6"}  # units per job here
JOBS = {name: (make, layer, next(u for k, u in UNITS.items() if name.startswith(k)), steps)
        for name, (make, layer, _, steps) in LOOP_JOBS.items()}


def main():
    rows = []
    for name, (make, layer, units, steps) in JOBS.items():
        model = make()
        for round_ in (1, 2, 3):
            for loop in ("host", "scan"):
                for fold in (False, True):
                    devices.AUTO["cpu"]["fold_batchnorm"] = fold
                    cpu = time.process_time()
                    result = fvis.visualize(model, layer, units, steps=steps, batch_size=1, loop=loop, progress=False)
                    if round_ == 1:
                        continue
                    rows.append({"job": name, "round": round_, "loop": loop, "fold_batchnorm": fold,
                                 "ms_per_image_step": 1000 * result.optimize_s / (result.final.size * steps),
                                 "process_cpu_s": time.process_time() - cpu, "load_1min": os.getloadavg()[0]})
                    print(rows[-1], flush=True)
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "experiments" / "results" / "fold_by_model.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
