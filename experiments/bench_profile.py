"""Where a step's time goes: a `jax.profiler` trace of fvis chunks, op time by category.

Used by `python experiments/bench.py method=profile` (see bench.py). Each loop
form runs one chunk of the job under the profiler; the XLA op events of the
trace (summed over the CPU thread pool's threads, so "op-seconds", close to
CPU time) are grouped into convolutions (library calls: YNNPACK fusions or
Eigen), generic emitted convolutions (`conv_general_dilated.*`, XLA's own
loops, used where no library call fits), max-pool gradient (reduce-window,
iota, scatter) and the rest (elementwise fusions: BatchNorm, ReLU, adds, pads,
the pooling-as-slices gradient, copies).
"""

import collections
import glob
import tempfile
import time

import jax
from jax.profiler import ProfileData

import fvis


def category(name):
    """The cost category of an XLA op event name."""
    if name.startswith(("ynn_fusion", "convolution")):
        return "convolution (library call)"
    if name.startswith("conv_general_dilated"):
        return "convolution (XLA-emitted loops)"
    if any(k in name for k in ("reduce-window", "iota", "scatter", "select-and")):
        return "max-pool gradient (reduce-window, iota, scatter)"
    if "copy" in name or "transpose" in name:
        return "copies, transposes"
    return "elementwise and other fusions"


def op_times(folder):
    """{category: seconds} and the top op names, from the trace in `folder`."""
    data = ProfileData.from_file(sorted(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True))[-1])
    by_category, by_name = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "while", "SlinkyThreadPool")):
                    continue  # containers and waits, not ops
                by_category[category(event.name)] += event.duration_ns / 1e9
                by_name[event.name] += event.duration_ns / 1e9
    return by_category, by_name


def measure_profile(model, job_cfg, *, batch_size, loops, cpu_ops):
    """Profiles one chunk per (loop, cpu_ops) variant; op-seconds per image-step by category."""
    from fvis import devices
    out = []
    for slices in cpu_ops:
        devices.AUTO[jax.default_backend()]["cpu_ops"] = slices
        for loop in loops:
            job = fvis.prepare(model, job_cfg.layer, f"0:{batch_size}", steps=job_cfg.steps, batch_size=batch_size,
                               loop=loop)
            weights, units = job.placed_weights(), job._placed(job.units)
            chunk, _ = job.compile(weights)
            jax.block_until_ready(chunk(weights, units))
            folder = tempfile.mkdtemp(prefix="fvis_trace_")
            jax.profiler.start_trace(folder)
            start = time.perf_counter()
            jax.block_until_ready(chunk(weights, units))
            wall = time.perf_counter() - start
            jax.profiler.stop_trace()
            by_category, by_name = op_times(folder)
            n = batch_size * job_cfg.steps
            out.append({"loop": loop, "cpu_ops": slices, "wall_per_image_step_s": wall / n,
                        "op_s_per_image_step": {k: v / n for k, v in by_category.most_common()},
                        "top_ops": [[k, v / n] for k, v in by_name.most_common(12)]})
    return out
