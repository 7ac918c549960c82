"""Compares the seed, lucid and maco presets on real weights: picture quality and wall time.

    python experiments/quality_compare.py            # runs what is missing, then writes the table
    python experiments/quality_compare.py --table    # only rebuilds the table from finished runs
    python experiments/quality_compare.py --docs     # the README's seed-vs-lucid picture
    python experiments/quality_compare.py --filters 0:32 --runs mobilenet_0.25:lucid mobilenet_0.25:lucid_exact
                                                     # chosen runs on fewer filters (own folder and table)

Each run is the `fvis` command (so it resumes where it stopped) writing into
experiments/runs/quality/<model>_<preset>/; the table goes to
experiments/results/quality_compare.json and experiments/quality_compare.md.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RUNS = ROOT / "experiments" / "runs" / "quality"
COMMON = ["filters=0:64", "seed=0", f"quality.natural_images={SHARED / 'images'}"]
# EfficientNet-Lite0 runs at 160x160: at 224 its lucid run alone would take about 2.3 h on the
# 2 shared CPU cores (measured: 4 image-steps/s); "efficientnet_lite0_224" keeps the seed at 224.
MODELS = {
    "mobilenet_0.25": ["model=mobilenet", f"model.weights={SHARED / 'weights' / 'mobilenet_0.25_224.weights.h5'}",
                       "layer=conv_pw_5_relu", "image_size=[224,224]"],
    "efficientnet_lite0": ["model=efficientnet_lite0", "layer=block4c_add", "image_size=[160,160]"],
    "efficientnet_lite0_224": ["model=efficientnet_lite0", "layer=block4c_add", "image_size=[224,224]"],
    # The same MobileNet channels before their ReLU6 (batch-norm output): no dead or saturated units.
    "mobilenet_0.25_bn": ["model=mobilenet", f"model.weights={SHARED / 'weights' / 'mobilenet_0.25_224.weights.h5'}",
                          "layer=conv_pw_5_bn", "image_size=[224,224]"],
}
PRESETS = ["seed", "maco", "lucid", "lucid_512", "lucid_exact", "maco_exact"]
# A preset name -> its overrides; "_exact": the preset with the ReLUs' exact gradient (no redirect).
VARIANTS = {"lucid_exact": ["experiment=lucid", "param.decay_power=1.0", "steps=512", "redirect_relu=false"],
            # lucid as it was before issue 13's tuning: lucid's own 1/f and 512 steps
            "lucid_512": ["experiment=lucid", "param.decay_power=1.0", "steps=512"],
            "maco_exact": ["experiment=maco", "redirect_relu=false"]}
HEADER = """# seed, maco and lucid presets on real weights (issue 4)

Made by `python experiments/quality_compare.py` (figures: experiments/results/quality_compare.json).
The same 64 filters (0-63) of each layer, seed 0, one process per run (`fvis ...`, see the script),
on 2 shared CPU cores. Selectivity, robustness and slope as defined in the README's "Picture quality";
"/ best photo" is the activation over the highest activation of the 2 photos in ../shared/images;
"dead units" never moved (zero gradient from the start) and keep gray tiles. The times come from
the code before the CPU defaults of the benchmark work (these runs used 16 filters per `lax.scan`
chunk; fvis now runs 1 filter per compiled step on a CPU, measured faster), with other jobs
sharing the 2 cores.

"""
HEADER_SUBSET = """# lucid and maco presets with the redirected ReLU, re-measured (issue 13)

Made by `python experiments/quality_compare.py --filters {filters} --runs ...` (figures:
experiments/results/quality_compare{suffix}.json): filters {filters} of each layer, seed 0, one process per run,
on 2 AMD EPYC cores. "rank-1 selectivity",
"robustness" and "spectral slope" count every failed image as a failure (not rank 1, robustness 0, slope 0;
see the README's "Picture quality"), with the live images' figure in brackets where some failed;
"dead units" never moved; "failed images" also counts units that read the same on every image.
`lucid_512` is the lucid preset as it was before its tuning (Lucid's 1/f and 512 steps; the current
lucid uses 1/f**1.25 and 256 steps); `*_exact` rows are that earlier lucid (or maco) with
`redirect_relu=false` (the ReLUs' exact gradient). The two `lucid` rows ran on the code of issue 15
(depthwise convolutions as slices, batch norms folded on CPU) on a machine with little else
running; the others on the earlier code with other jobs sharing the 2 cores: their times are not
comparable with each other.

"""
ORDER = [("mobilenet_0.25", "seed"), ("mobilenet_0.25", "maco"), ("mobilenet_0.25", "lucid"),
         ("efficientnet_lite0", "seed"), ("efficientnet_lite0", "maco"), ("efficientnet_lite0", "lucid"),
         ("efficientnet_lite0_224", "seed"), ("mobilenet_0.25_bn", "seed"), ("mobilenet_0.25_bn", "maco"),
         ("mobilenet_0.25_bn", "lucid")]


def run(model, preset):
    folder = RUNS / f"{model}_{preset}"
    if (folder / "results.json").exists():
        return
    args = [*MODELS[model], *VARIANTS.get(preset, [f"experiment={preset}"]), *COMMON, f"hydra.run.dir={folder}"]
    print("fvis", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "fvis", *args], check=True, cwd=ROOT)


def row(model, preset):
    results = json.loads((RUNS / f"{model}_{preset}" / "results.json").read_text())
    q, t = results["quality"], results["timings"]
    return {"run": model, "model": results["model"], "layer": results["config"]["layer"], "preset": preset, "filters": len(results["units"]),
            "image_size": results["image_size"], "steps": results["config"]["steps"],
            "rank1_fraction": q["rank1_fraction"], "robustness_median": q["robustness_median"],
            "live": q.get("live"), "failed_images": q.get("failed_images"),
            "spectral_slope_median": q["spectral_slope_median"], "activation_median": q["activation_median"],
            "natural_ratio_median": q.get("natural_ratio_median"), "compile_s": t["compile_s"],
            "optimize_s": t["optimize_s"], "quality_s": t.get("quality_s"), "total_s": t.get("total_s", t["compile_s"] + t["optimize_s"] + (t.get("quality_s") or 0)),
            "dead_filters": len(results.get("dead_filters", [])), "batch_size": results.get("batch_size"),
            "loop": results.get("loop", "scan")}


def table(rows):
    head = ("| model (layer) | image | preset | filters | steps | rank-1 selectivity | dead units | failed images "
            "| robustness (median) | spectral slope (median) | activation (median) | / best photo (median) "
            "| optimise s | total s |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        size = "x".join(str(v) for v in r["image_size"])
        live = r.get("live") or {}
        both = lambda key, fmt: (f"{r[key]:{fmt}}" + (f" (live {live[key]:{fmt}})" if live.get(key) is not None
                                                      and r.get("failed_images") else ""))
        failed = "-" if r.get("failed_images") is None else r["failed_images"]
        lines.append(f"| {r['model']} ({r['layer']}) | {size} | {r['preset']} | {r['filters']} | {r['steps']} "
                     f"| {both('rank1_fraction', '.3f')} | {r['dead_filters']} | {failed} "
                     f"| {both('robustness_median', '.3f')} | {both('spectral_slope_median', '.2f')} "
                     f"| {r['activation_median']:.3g} | {r['natural_ratio_median']:.3g} | {r['optimize_s']:.0f} "
                     f"| {r['total_s']:.0f} |")
    return "\n".join(lines)


def docs_image(model="efficientnet_lite0", presets=("seed", "lucid"), units=range(16), tile=112, gap=16):
    """Side-by-side 4x4 grids of the same units, one per preset, as a small JPEG in docs/."""
    grids = []
    for preset in presets:
        tiles = [Image.open(RUNS / f"{model}_{preset}" / "filters" / f"filter_{u:04d}.png").convert("RGB")
                 .resize((tile, tile), Image.LANCZOS) for u in units]
        grid = np.zeros((4 * tile + 3 * 4, 4 * tile + 3 * 4, 3), np.uint8)
        for i, t in enumerate(tiles):
            y, x = (i // 4) * (tile + 4), (i % 4) * (tile + 4)
            grid[y: y + tile, x: x + tile] = np.asarray(t)
        grids.append(grid)
    spacer = np.full((grids[0].shape[0], gap, 3), 255, np.uint8)
    out = ROOT / "docs" / f"quality_{'_vs_'.join(presets)}.jpg"
    Image.fromarray(np.concatenate([grids[0], spacer, grids[1]], axis=1)).save(out, quality=80)
    print(out, out.stat().st_size, "bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--docs", action="store_true", help="only write the README's seed-vs-lucid JPEG")
    parser.add_argument("--filters", default="0:64", help="the filters of every run (not 0:64: own folder and table)")
    parser.add_argument("--runs", nargs="*", metavar="MODEL:PRESET", help="only these runs, in this order")
    args = parser.parse_args()
    if args.docs:
        return docs_image()
    global RUNS
    suffix = "" if args.filters == "0:64" else "_" + args.filters.replace(":", "-")
    RUNS = RUNS.with_name(RUNS.name + suffix)
    COMMON[0] = f"filters={args.filters}"
    order = [tuple(r.split(":")) for r in args.runs] if args.runs else ORDER
    if not args.table:
        for model, preset in order:
            run(model, preset)
    rows = [row(m, p) for m in MODELS for p in PRESETS if (RUNS / f"{m}_{p}" / "results.json").exists()]
    out = ROOT / "experiments" / "results" / f"quality_compare{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    header = HEADER if not suffix else HEADER_SUBSET.format(filters=args.filters, suffix=suffix)
    (ROOT / "experiments" / f"quality_compare{suffix}.md").write_text(header + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
