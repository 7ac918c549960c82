"""Which loop form is faster on CPU, per model: a step compiled alone ("host") or inside `lax.scan`.

    python experiments/loop_by_model.py     # ~4 min on 2 CPU cores -> experiments/results/loop_by_model.json
    python experiments/loop_by_model.py OUT.json

Each model's job runs with loop=host and loop=scan (1 unit per chunk), alternating, twice
each, in one process; the first round includes compilation warm-up and is kept but the
decision uses the second. This is the measurement behind `fvis.devices.auto_loop`.
"""

import json
import os
import sys
import time
from pathlib import Path

import fvis

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
JOBS = {  # name: (model factory, layer, units, steps)
    "ResNet50V2 (random weights), conv3_block4_out, 180x180": (
        lambda: fvis.models.keras_application("ResNet50V2", weights=None, image_size=(180, 180)), "conv3_block4_out",
        "0:3", 8),
    "EfficientNet-Lite0, block4c_add, 180x180": (
        lambda: fvis.models.efficientnet_lite0(image_size=(180, 180)), "block4c_add", "0:8", 10),
    "MobileNet 0.25 (random weights), conv_pw_5_relu, 224x224": (
        lambda: fvis.models.keras_application("MobileNet", weights=None, image_size=(224, 224), alpha=0.25),
        "conv_pw_5_relu", "0:4", 10),
}


def timed_job(model, layer, units, steps, loop):
    """One job (1 unit per chunk): its compile and optimisation seconds, ms per image-step, process CPU s."""
    cpu = time.process_time()
    result = fvis.visualize(model, layer, units, steps=steps, batch_size=1, loop=loop, progress=False)
    return {"compile_s": result.compile_s, "optimize_s": result.optimize_s,
            "ms_per_image_step": 1000 * result.optimize_s / (result.final.size * steps),
            "process_cpu_s": time.process_time() - cpu, "load_1min": os.getloadavg()[0]}


def write(rows, default_name):
    """The rows as JSON in argv[1], or experiments/results/<default_name>."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "experiments" / "results" / default_name
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(path)


def main():
    rows = []
    for name, (make, layer, units, steps) in JOBS.items():
        model = make()
        for round_ in (1, 2):
            for loop in ("host", "scan"):
                rows.append({"job": name, "round": round_, "loop": loop, **timed_job(model, layer, units, steps, loop)})
                print(rows[-1], flush=True)
    write(rows, "loop_by_model.json")


if __name__ == "__main__":
    main()
