"""Derived figures and the table of a benchmark suite (see bench.py).

Derived, per measurement: achieved FLOP/s (XLA's FLOP count of the compiled step
over its steady-state time) and its fraction of the matmul peak measured in the
same run; per job: how many times faster fvis is than each baseline, end to end
(the whole process, start-up included) and for the job itself.
"""

import json
from pathlib import Path

import numpy as np


def _peak(records):
    peak = next((r for r in records if r.get("method") == "matmul_peak" and "float32" in r), None)
    return {k: peak[k]["best_flops_per_s"] for k in ("float32", "bfloat16") if k in peak} if peak else {}


def _image_step_flops(records):
    """FLOPs per image-step of each job (keyed by model, layer, size), from any measurement that has it."""
    out = {}
    for r in records:
        if r.get("step_flops") and r.get("method") in ("fvis", "jax_loop") and r.get("precision", "float32") == "float32":
            out.setdefault(_job_key(r), r["step_flops"] / r["step_images"])
    return out


def _job_key(r):
    job = r.get("job", {})
    return f"{job.get('model')}/{job.get('layer')}/{job.get('image_size')}"


def derive(r, peak, per_image_step):
    """Adds achieved FLOP/s figures to one measurement record."""
    flops = per_image_step.get(_job_key(r))
    if r.get("step_s") and flops:
        r["steady_image_steps_per_s"] = r["step_images"] / r["step_s"]
        r["steady_flops_per_s"] = flops * r["steady_image_steps_per_s"]
        dtype = "bfloat16" if r.get("precision") == "bfloat16" else "float32"
        if peak.get(dtype):
            r["steady_fraction_of_peak"] = r["steady_flops_per_s"] / peak[dtype]
            r["peak_used"] = dtype
    if r.get("step_s_in_flight") and flops:  # several chunks' steps in flight (fvis' workers)
        r["in_flight_image_steps_per_s"] = r["step_images"] / r["step_s_in_flight"]
        r["in_flight_flops_per_s"] = flops * r["in_flight_image_steps_per_s"]
        dtype = "bfloat16" if r.get("precision") == "bfloat16" else "float32"
        if peak.get(dtype):
            r["in_flight_fraction_of_peak"] = r["in_flight_flops_per_s"] / peak[dtype]
    work_s = r.get("optimize_s") or r.get("job_s")
    if flops and work_s and r.get("image_steps"):
        r["job_flops_per_s"] = flops * r["image_steps"] / work_s
    return r


def image_change(work, name_a, name_b):
    """How much the images of run `name_a` differ from those of `name_b` (same job, same seed)."""
    a, b = (np.load(Path(work) / f"{n}.npz") for n in (name_a, name_b))
    diff = np.abs(a["images"] - b["images"])
    final = np.abs(a["final"] - b["final"]) / np.maximum(np.abs(b["final"]), 1e-6)
    return {"compared": [name_a, name_b], "max_abs_pixel": float(diff.max()), "mean_abs_pixel": float(diff.mean()),
            "pixel_scale_std": float(b["images"].std()), "median_rel_final": float(np.median(final)),
            "max_rel_final": float(final.max()), "final_mean": [float(a["final"].mean()), float(b["final"].mean())]}


def _per_image(r, key):
    return r[key] / r["step_images"] if r.get(key) else float("nan")


def ratios(records):
    """Baseline / fvis: process wall (end to end), job wall, job CPU seconds, steady image-steps/s."""
    out = []
    for base in (r for r in records if r.get("method") in ("jax_loop", "tf_seed") and r.get("job_s")):
        for ours in (r for r in records if r.get("method") in ("fvis", "fvis_cli") and r.get("job") == base.get("job")
                     and r.get("precision") == "float32"):
            out.append({"baseline": base["name"], "fvis": ours["name"], "cache": ours["cache"],
                        "end_to_end_x": base["process_s"] / ours["process_s"], "job_x": base["job_s"] / ours["job_s"],
                        "job_cpu_x": base["job_cpu_s"] / ours["job_cpu_s"],
                        "steady_x": _per_image(base, "step_s") / _per_image(ours, "step_s"),
                        "steady_best_x": _per_image(base, "step_s_min") / _per_image(ours, "step_s_min"),
                        "in_flight_x": _per_image(base, "step_s") / _per_image(ours, "step_s_in_flight")})
    return out


def write(path, records, suite, work):
    """Writes the suite's JSON (records, derived figures, ratios) and its markdown table."""
    peak, per_image_step = _peak(records), _image_step_flops(records)
    records = [derive(dict(r), peak, per_image_step) for r in records]
    for r in records:
        twin = r.get("compare_to")
        if twin and r.get("returncode") == 0 and (Path(work) / f"{twin}.npz").exists():
            r["image_change"] = image_change(work, r["name"], twin)
    summary = {"suite": suite, "command": f"python experiments/bench.py suite={suite}",
               "matmul_peak_flops_per_s": peak, "image_step_flops": per_image_step,
               "ratios": ratios(records), "records": records}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    path.with_suffix(".md").write_text(f"# Benchmark suite `{suite}`\n\n{table(records)}\n\n{ratio_table(summary)}\n")
    return summary


def _fmt(v, scale=1.0, digits=2):
    return "" if v is None else f"{v * scale:.{digits}f}"


def table(records):
    """A markdown table, one row per measurement."""
    head = ("| run | method | B | loop | prec. | cache | process s | compile s | job s | job CPU s | s/step | "
            "image-steps/s | GFLOP/s | % peak | s/image-step in flight | % peak in flight | RSS GB | load |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        rows.append("| " + " | ".join([
            r["name"], r.get("method", ""), str(r.get("batch_size", r.get("step_images", ""))), r.get("loop", ""),
            r.get("precision", ""), r.get("cache", ""), _fmt(r.get("process_s"), digits=1),
            _fmt(r.get("compile_s", r.get("first_step_s")), digits=1), _fmt(r.get("job_s"), digits=1),
            _fmt(r.get("job_cpu_s"), digits=1),
            _fmt(r.get("step_s"), digits=3), _fmt(r.get("steady_image_steps_per_s")),
            _fmt(r.get("steady_flops_per_s", r.get("float32", {}).get("best_flops_per_s")), 1e-9, 1),
            _fmt(r.get("steady_fraction_of_peak"), 100, 1),
            _fmt(r.get("step_s_in_flight"), 1 / max(1, r.get("step_images", 1)), 3),
            _fmt(r.get("in_flight_fraction_of_peak"), 100, 1),
            _fmt(r.get("host_rss_peak_bytes"), 1e-9), _fmt(r.get("loadavg_1min_before"), digits=1)]) + " |")
    return "\n".join(rows)


def ratio_table(summary):
    """A markdown table of the speed-ups over the baselines."""
    rows = ["| baseline | fvis run | fvis cache | end to end x | job x | job CPU x | steady x (median) | steady x (best) "
            "| steady x, fvis steps in flight |",
            "|---|---|---|---|---|---|---|---|---|"]
    for q in summary["ratios"]:
        rows.append(f"| {q['baseline']} | {q['fvis']} | {q['cache']} | {q['end_to_end_x']:.2f} | {q['job_x']:.2f} "
                    f"| {q['job_cpu_x']:.2f} | {q['steady_x']:.2f} | {q['steady_best_x']:.2f} "
                    f"| {q.get('in_flight_x', float('nan')):.2f} |")
    return "\n".join(rows)
