"""Batch norms folded into convolutions, and the loop form, per model on CPU (issue 15).

    python experiments/fold_by_model.py      # ~5 min on 2 CPU cores -> experiments/results/fold_by_model.json

Each model's job (1 unit per chunk, the CPU rewrites on) runs with fold_batchnorm off and on, in
both loop forms, alternating, three rounds in one process; the first round (compilation
warm-up) is dropped. This is the measurement behind `fvis.devices.AUTO["cpu"]`'s
"fold_batchnorm" and "loop".
"""

from fvis import devices

from loop_by_model import JOBS as LOOP_JOBS, timed_job, write  # the same models, layers and steps

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
                    timing = timed_job(model, layer, units, steps, loop)
                    if round_ == 1:
                        continue
                    rows.append({"job": name, "round": round_, "loop": loop, "fold_batchnorm": fold, **timing})
                    print(rows[-1], flush=True)
    write(rows, "fold_by_model.json")


if __name__ == "__main__":
    main()
