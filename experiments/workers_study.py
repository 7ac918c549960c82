"""Chunks optimised at once (`Settings.workers`) against the optimisation's throughput on this machine.

    python experiments/workers_study.py      # ~3 min on 2 CPU cores -> experiments/results/workers_study.json

The reference job's model (ResNet50V2, random weights: ImageNet's FLOPs), `conv3_block4_out`, 12 filters
of 30 steps at 180x180, one filter per chunk, the host loop: each `workers` value runs the same job
(compiled once per value), the values alternating, `rounds` times. Per run: ms per image-step of the
optimisation (`Result.optimize_s`: chunks that ran at once count once), CPU seconds per wall second of
the run, and whether the images equal those of workers=1 bit for bit.
"""

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

import fvis
from fvis import models
from bench_measure import cpu_model

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--filters", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "workers_study.json"))
    args = parser.parse_args()
    model = models.keras_application("ResNet50V2", weights=None, image_size=(180, 180))
    jobs = {w: fvis.prepare(model, "conv3_block4_out", f"0:{args.filters}", steps=30, batch_size=1, loop="host",
                            workers=w) for w in args.workers}
    rows, reference = [], None
    for round_ in range(1, args.rounds + 1):
        for workers, job in jobs.items():
            start, cpu0 = time.perf_counter(), time.process_time()
            result = job.run(progress=False)
            wall = time.perf_counter() - start
            reference = result.images if reference is None else reference
            rows.append({"round": round_, "workers": workers, "ms_per_image_step": 1e3 * result.optimize_s / (
                args.filters * 30), "cpu_per_wall": (time.process_time() - cpu0) / wall,
                "compile_s": result.compile_s, "images_equal_workers_1": bool(np.array_equal(result.images, reference)),
                "loadavg_1min": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "rows": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
