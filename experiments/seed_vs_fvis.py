"""The seed's own TensorFlow code against fvis' seed preset, on the same weights and starts.

    python experiments/seed_vs_fvis.py --tf-python /path/to/venv-with-tensorflow/bin/python
    python experiments/seed_vs_fvis.py --filters 8 --steps 30

The seed's code (experiments/seed_tf.py, the reference job as the seed writes it: a
`tf.function` step, Python loops) runs in its own process under Keras' TensorFlow
backend with a fixed random state, and saves ResNet50V2's weights, each filter's start
image, its loss at every step and its final image. fvis then loads those weights into
its JAX model and runs its seed preset from exactly those starts (its own
parameterization, objective, optimizer and compiled loop; only the start images are
handed in), and this script reports, per step, how far the objective curves and the
images agree. Results: experiments/results/seed_vs_fvis.json and .md.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fvis  # noqa: E402
from fvis import render  # noqa: E402


def run_seed(tf_python, folder, filters, steps, image_size):
    job = {"model": "ResNet50V2", "layer": "conv3_block4_out", "filters": filters,
           "image_size": list(image_size), "steps": steps, "record": str(folder), "seed": 0}
    proc = subprocess.run([tf_python, str(ROOT / "experiments" / "seed_tf.py"), json.dumps(job)],
                          capture_output=True, text=True, check=True, env={"KERAS_BACKEND": "tensorflow",
                                                                             "CUDA_VISIBLE_DEVICES": "",
                                                                             "PATH": "/usr/bin:/bin"})
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(np.load(folder / "seed_tf.npz")), timing


def run_fvis(weights, starts, steps, image_size):
    """fvis' seed preset from the given (N, H, W, 3) starts: its renderer, its start replaced."""
    model = fvis.models.keras_application("ResNet50V2", weights=str(weights), image_size=image_size)
    job = fvis.prepare(model, "conv3_block4_out", list(range(len(starts))), steps=steps, loop="scan",
                       batch_size=len(starts))
    given = jnp.asarray(starts, jnp.float32)[:, None]  # (N, D=1, H, W, 3)

    def init(units, keys):
        _, *rest = job.renderer.init(units, keys)
        return (given, *rest)  # pixel parameterization: the params are the image

    run = jax.jit(render.scan_chunk(job.renderer._replace(init=init), steps))
    units = jnp.arange(len(starts), dtype=jnp.int32)
    keys = render.image_keys(jax.random.key(0), units, 1)
    out = run(job.forward.weights(), units, keys, units)
    return np.asarray(out.curves[:, 0]), np.asarray(out.images[:, 0])


def compare(seed, curves, images):
    """Per step: the largest relative difference of the objective; at the end: the images'."""
    losses = seed["losses"]  # (N, steps), the loss before each step, as fvis' curves
    scale = np.maximum(np.abs(losses).max(axis=1, keepdims=True), 1e-12)
    per_step = (np.abs(curves - losses) / scale).max(axis=0)
    finals = seed["finals"]
    image_scale = np.abs(finals).reshape(len(finals), -1).max(axis=1)
    image_diff = np.abs(images - finals).reshape(len(finals), -1).max(axis=1) / image_scale
    correlation = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(images, finals)]
    return {"curve_rel_diff_per_step": [float(v) for v in per_step],
            "image_rel_max_diff_per_filter": [float(v) for v in image_diff],
            "image_correlation_per_filter": correlation,
            "final_objective_seed": [float(v) for v in losses[:, -1]],
            "final_objective_fvis": [float(v) for v in curves[:, -1]]}


def report(found, args):
    per_step = found["curve_rel_diff_per_step"]
    steps_within = lambda tol: next((i for i, v in enumerate(per_step) if v > tol), len(per_step))
    lines = [
        "# The seed's TensorFlow code against fvis' seed preset (issue 13)",
        "",
        f"Made by `python experiments/seed_vs_fvis.py --filters {args.filters} --steps {args.steps}`: ResNet50V2 "
        f"(random weights, seeded, saved by the TensorFlow process and loaded by fvis), `conv3_block4_out`, "
        f"filters 0-{args.filters - 1}, {args.image_size[0]}x{args.image_size[1]}, {args.steps} steps, the same "
        "start images. Curves: the objective before each step (the seed's `loss`).",
        "",
        f"Machine: {found['machine']}; TensorFlow {found['tf']['tensorflow']}, Keras {found['tf']['keras']}, "
        f"JAX {jax.__version__}.",
        "",
        "| step | max over filters of abs(fvis - seed) / max abs(seed curve) |",
        "|---|---|",
        *[f"| {i} | {v:.2e} |" for i, v in enumerate(per_step)],
        "",
        f"Steps before the curves part by more than 1e-5: {steps_within(1e-5)}; 1e-3: {steps_within(1e-3)}; "
        f"1e-1: {steps_within(1e-1)}.",
        "",
        "| filter | final objective, seed | final objective, fvis | image max diff / max abs | image correlation |",
        "|---|---|---|---|---|",
        *[f"| {i} | {a:.4g} | {b:.4g} | {c:.2e} | {d:.6f} |" for i, (a, b, c, d) in enumerate(zip(
            found["final_objective_seed"], found["final_objective_fvis"], found["image_rel_max_diff_per_filter"],
            found["image_correlation_per_filter"]))],
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-python", default=sys.executable, help="a Python with tensorflow (fvis[bench-tf])")
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--image-size", type=int, nargs=2, default=[180, 180])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seed, timing = run_seed(args.tf_python, Path(tmp), args.filters, args.steps, args.image_size)
        curves, images = run_fvis(Path(tmp) / "weights.weights.h5", seed["starts"], args.steps,
                                  tuple(args.image_size))
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown CPU")
    found = {"machine": cpu, "tf": {k: timing[k] for k in ("tensorflow", "keras")}, **compare(seed, curves, images)}
    out = ROOT / "experiments" / "results"
    (out / "seed_vs_fvis.json").write_text(json.dumps(found, indent=2) + "\n")
    (out / "seed_vs_fvis.md").write_text(report(found, args))
    print(report(found, args))


if __name__ == "__main__":
    main()
