"""Where the compiled step's time goes, per model and per model rewrite (issue 15).

    python experiments/profile_step.py                    # -> experiments/results/profile_step.json and .md
    python experiments/profile_step.py --models resnet50v2 --calls 3

For each model (ResNet50V2 with random weights at conv3_block4_out, the reference job;
EfficientNet-Lite0 at block4c_add; MobileNet 0.25 at conv_pw_5_relu), all at 180x180,
and each variant of fvis' CPU model rewrites, one step (one image) is compiled alone
and traced (see bench_profile.py for the categories). Variants alternate within a
round, so all see similar machine load; the table gives the last round.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import fvis  # noqa: E402
import jax  # noqa: E402

import bench_profile  # noqa: E402
from bench_measure import cpu_model  # noqa: E402
from fvis import devices  # noqa: E402

SHARED = ROOT.parent / "shared"
MODELS = {
    "resnet50v2": ("conv3_block4_out", lambda size: fvis.models.keras_application("ResNet50V2", weights=None,
                                                                                   image_size=size)),
    "efficientnet_lite0": ("block4c_add", lambda size: fvis.models.efficientnet_lite0(image_size=size)),
    "mobilenet_0.25": ("conv_pw_5_relu", lambda size: fvis.models.keras_application(
        "MobileNet", alpha=0.25, include_top=True, image_size=size,
        weights=str(SHARED / "weights" / "mobilenet_0.25_224.weights.h5"))),
}
# Variant name -> the CPU rewrites in force (fvis.devices.AUTO["cpu"] keys).
VARIANTS = {
    "no rewrites": {"cpu_ops": False, "fold_batchnorm": False, "winograd": False},
    "cpu_ops": {"cpu_ops": True, "fold_batchnorm": False, "winograd": False},
    "cpu_ops + fold_batchnorm": {"cpu_ops": True, "fold_batchnorm": True, "winograd": False},
    "cpu_ops + fold_batchnorm + winograd": {"cpu_ops": True, "fold_batchnorm": True, "winograd": True},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "profile_step"))
    args = parser.parse_args()
    records = []
    for name in args.models:
        layer, build = MODELS[name]
        model = build((args.size, args.size))
        jobs = {}
        for variant in args.variants:
            devices.AUTO["cpu"].update(VARIANTS[variant])
            jobs[variant] = fvis.prepare(model, layer, "0:1", steps=2, batch_size=1, loop="host")
        for round_ in range(args.rounds):
            for variant, job in jobs.items():
                devices.AUTO["cpu"].update(VARIANTS[variant])
                load = os.getloadavg()[0]
                result = bench_profile.profile_step(job, model, calls=args.calls)
                print(f"{name} {variant} round {round_}: {result['wall_per_step_s'] * 1e3:.1f} ms/step "
                      f"(load {load:.1f})", flush=True)
                if round_ == args.rounds - 1:
                    records.append({"model": name, "layer": layer, "image_size": [args.size, args.size],
                                    "variant": variant, "rewrites": VARIANTS[variant], "loadavg_1min": load, **result})
    meta = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()}
    Path(args.out + ".json").write_text(json.dumps({"machine": meta, "records": records}, indent=1) + "\n")
    Path(args.out + ".md").write_text(table(records, meta) + "\n")
    print(table(records, meta))


def table(records, meta):
    """Markdown: op-milliseconds per step by category, one column per (model, variant)."""
    categories = sorted({c for r in records for c in r["op_s_per_step"]},
                        key=lambda c: -max(r["op_s_per_step"].get(c, 0) for r in records))
    head = "| op-ms per step | " + " | ".join(f"{r['model']}<br>{r['variant']}" for r in records) + " |"
    lines = [f"Machine: {meta['cpu']} ({meta['cpu_count']} cores), jax {meta['jax']}; each XLA op's traced "
             f"duration (ops run one after another), milliseconds per step of one image.", "", head,
             "|---|" + "---|" * len(records)]
    for c in categories:
        lines.append(f"| {c} | " + " | ".join(f"{r['op_s_per_step'].get(c, 0) * 1e3:.1f}" for r in records) + " |")
    lines.append("| **all ops** | " + " | ".join(f"**{sum(r['op_s_per_step'].values()) * 1e3:.1f}**" for r in records)
                 + " |")
    lines.append("| between ops (wall - all ops) | " + " | ".join(
        f"{(r['wall_per_step_s'] - sum(r['op_s_per_step'].values())) * 1e3:.1f}" for r in records) + " |")
    lines.append("| wall ms per step (median) | " + " | ".join(f"{r['wall_per_step_s'] * 1e3:.1f}" for r in records)
                 + " |")
    lines.append("| GFLOP/s (XLA's count / wall) | " + " | ".join(
        f"{r['step_flops'] / r['wall_per_step_s'] / 1e9:.0f}" for r in records) + " |")
    lines.append("| load (1 min) | " + " | ".join(f"{r['loadavg_1min']:.1f}" for r in records) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
