"""XLA's memory estimate of a chunk against the measured peak memory, for three batch sizes.

    python experiments/memory_estimate.py      # ~6 min on 2 busy CPU cores -> experiments/results/memory.md

MobileNet 0.25 (the ImageNet weights in ../shared/weights; random weights where absent),
layer conv_pw_5_relu, 128x128, 5 steps, batch sizes 1, 16 and 64, with both loop forms
(scan, the CPU default for this model, and host), one fresh process each.
Each process builds the model, records its resident memory (VmRSS), runs one chunk of the
batch size with `fvis.visualize` (compile included) and records its peak resident memory
(VmHWM). The estimate is `Result.memory["estimate_bytes"]` (`fvis.memory.Estimate.total`:
XLA's arguments + outputs + temporaries - aliased of the compiled chunk), the figure fvis
compares with the memory available before it optimises anything.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_0.25_224.weights.h5"
BATCHES = (1, 16, 64)
LOOPS = ("scan", "host")
SIZE, STEPS, LAYER = 128, 5, "conv_pw_5_relu"

ONE_RUN = """
import json, sys
import fvis

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

batch, size, steps, layer, weights, loop = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                            sys.argv[5], sys.argv[6])
model = fvis.models.keras_application("MobileNet", alpha=0.25, include_top=True, image_size=(size, size),
                                      weights=weights if weights != "none" else None)
before = status("VmRSS")
result = fvis.visualize(model, layer, f"0:{batch}", steps=steps, batch_size=batch, loop=loop, progress=False)
print(json.dumps({"batch": batch, "loop": loop, "rss_before": before, "peak_rss": status("VmHWM"),
                  "estimate": result.memory["estimate_bytes"]}))
"""


def measure(batch, loop):
    weights = str(WEIGHTS) if WEIGHTS.exists() else "none"
    out = subprocess.run([sys.executable, "-c", ONE_RUN, str(batch), str(SIZE), str(STEPS), LAYER, weights, loop],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows):
    gb = lambda n: f"{n / 1e9:.3f}"
    lines = ["| loop | batch size | XLA estimate (GB) | peak RSS (GB) | RSS before the job (GB) | peak - before (GB) "
             "| estimate - estimate at batch 1 (GB) | peak - peak at batch 1 (GB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = next(f for f in rows if f["loop"] == r["loop"] and f["batch"] == BATCHES[0])
        lines.append(f"| {r['loop']} | {r['batch']} | {gb(r['estimate'])} | {gb(r['peak_rss'])} | {gb(r['rss_before'])} "
                     f"| {gb(r['peak_rss'] - r['rss_before'])} | {gb(r['estimate'] - first['estimate'])} "
                     f"| {gb(r['peak_rss'] - first['peak_rss'])} |")
    return "\n".join(lines)


def main():
    write([measure(batch, loop) for loop in LOOPS for batch in BATCHES])


def write(rows):
    weights = "ImageNet weights (../shared/weights)" if WEIGHTS.exists() else "random weights"
    text = (f"# Memory estimate against measured peak\n\n"
            f"`python experiments/memory_estimate.py`: MobileNet 0.25 ({weights}), layer `{LAYER}`, "
            f"{SIZE}x{SIZE}, {STEPS} steps, CPU, one fresh process per row.\n\n"
            f"{table(rows)}\n\n"
            "The estimate is XLA's compiled memory analysis of the chunk (arguments + outputs + temporaries "
            "- aliased), what fvis checks against the memory available before it optimises. Peak RSS is the "
            "process' high-water mark (VmHWM) after the chunk ran; it includes the Python, JAX and Keras "
            "baseline (the RSS before the job) and what compiling the chunk used.\n\n"
            "Reading (the run of 2026-11-30): the baseline and compilation (the batch-1 row) dominate at this size. From batch 1 to 64 "
            "the peak grew 1.9x (scan) and 2.7x (host) what the estimate grew: XLA's CPU runtime allocates "
            "working memory of its own (convolution workspaces, thread-local buffers) outside the buffer "
            "assignment the estimate reads. On the tiny convnet at 128x128 (host loop, batch 16 x 16 images) "
            "the resident growth matched the estimate (0.80 GiB), while the address space grew 4x it, hence "
            "`fvis.memory.ADDRESS_SPACE_FACTOR`. So on CPU the estimate is a lower bound that refuses the "
            "impossible (an 8192x8192 image: 11 GiB for one tiny-convnet filter) before compute; a chunk it lets "
            "through that still runs out is retried at half the batch size.\n")
    path = ROOT / "experiments" / "results" / "memory.md"
    path.write_text(text)
    (ROOT / "experiments" / "results" / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
