"""The measurements and the bookkeeping of experiments/gpu_check.sh (see its header).

    python3 experiments/gpu_check.py probe OUT.json [--smoke]   # devices; matmul precision: recorded vs measured
    python3 experiments/gpu_check.py auto OUT.json [--smoke]    # the `auto` defaults: cpu_ops, Lite0's loop
    python3 experiments/gpu_check.py part NAME RC SECONDS CAP OUT.json ARGS...  # record a part, rewrite gpu.json

`part` imports nothing heavy (no JAX): it runs after every part of the shell script, so
gpu.json always holds every part finished so far, and the verdicts they allow.
"""

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("FVIS_GPU_WORK", HERE / "runs" / "gpu"))  # parts' JSON (git-ignored)
RESULTS = Path(os.environ.get("FVIS_GPU_RESULTS", HERE / "results" / "gpu.json"))
NEAR = 1.10  # a setting "agrees" when its time is within 10% of the best measured
LITE0_LAYER = "block4a_expand_activation"  # 240 channels: room for the GPU batch of 128


def _write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---- bookkeeping (no JAX) ----

def record_part(name, rc, seconds, cap, out, args):
    """Adds one part's status (and its JSON, when it wrote one) to the parts list; rewrites gpu.json."""
    status = {0: "done", 124: "timed_out", 137: "timed_out", -1: "skipped"}.get(int(rc), "failed")
    parts_file = WORK / "parts.json"
    parts = _read(parts_file) or {}
    parts[name] = {"status": status, "returncode": int(rc), "seconds": round(float(seconds), 1),
                   "cap_s": int(cap), "args": args, "result": _read(out) if status == "done" else None}
    _write(parts_file, parts)
    collect()


def collect():
    """gpu.json from the parts so far: each part, the headline figures and the verdicts on `auto`."""
    parts = _read(WORK / "parts.json") or {}
    meta = _read(WORK / "meta.json") or {}
    results = lambda name: (parts.get(name) or {}).get("result") or {}
    summary = {**meta, "elapsed_s": round(time.time() - meta.get("started_unix", time.time()), 1),
               "headline": headline(results), "auto_check": auto_verdicts(results), "parts": parts}
    _write(RESULTS, summary)
    out = os.environ.get("OUT")
    if out:
        _write(Path(out) / "gpu.json", summary)


def headline(results):
    """The headline suite's fvis rows in a few numbers (None where a part did not finish)."""
    peak = results("peak").get("float32", {}).get("best_flops_per_s")
    row = {}
    for name in ("ref_fvis_cold", "ref_fvis_warm", "scale_fvis_cold"):
        r = results(name)
        flops_per_s = r["step_flops"] / r["step_s"] if r.get("step_s") else None
        row[name] = {k: r.get(k) for k in ("job_s", "build_model_s", "compile_s", "optimize_s", "batch_size", "loop",
                                            "job_image_steps_per_s", "step_s", "step_images", "device_peak_bytes")}
        row[name].update(step_flops_per_s=flops_per_s,
                         step_fraction_of_f32_peak=flops_per_s / peak if flops_per_s and peak else None)
    bf16 = results("peak").get("bfloat16", {}).get("best_flops_per_s")
    return {"matmul_peak_flops_per_s": {"float32": peak, "bfloat16": bf16}, **row}


def _study(results):
    """{(batch size, loop): seconds per image-step} from the batch-study parts."""
    times = {}
    for name in ("study_scan", "study_host"):
        for v in results(name).get("variants", []):
            times[(v["batch_size"], v["loop"])] = v["image_step_s"]
    return times


def auto_verdicts(results):
    """Does the measurement agree with `fvis.devices.AUTO["gpu"]` (batch_size 128, loop scan, cpu_ops false)?"""
    auto = results("auto").get("auto_gpu") or {"batch_size": 128, "loop": "scan", "cpu_ops": False}
    times, out = _study(results), {"auto_gpu": auto}
    scan = {size: t for (size, loop), t in times.items() if loop == "scan"}
    if scan:
        best = min(scan.values())
        near = sorted(size for size, t in scan.items() if t <= NEAR * best)
        at_auto = scan.get(auto["batch_size"])
        out["batch_size"] = {
            "image_step_s_by_size": {str(k): v for k, v in sorted(scan.items())},
            "fastest": min(scan, key=scan.get), "smallest_within_10pct": near[0],
            "auto_vs_fastest": at_auto / best if at_auto else None,
            "agrees": None if at_auto is None else at_auto <= NEAR * best}
    both = sorted(size for (size, loop) in times if loop == "host" and (size, "scan") in times)
    if both:
        ratios = {str(size): times[(size, "host")] / times[(size, "scan")] for size in both}
        out["loop"] = {"host_over_scan_by_size": ratios,
                       "agrees": all(r >= 1 / NEAR for r in ratios.values()) if auto["loop"] == "scan" else None}
    measured = results("auto")
    if measured.get("cpu_ops"):
        c = measured["cpu_ops"]
        faster = c["false"]["chunk_s"] <= NEAR * c["true"]["chunk_s"]
        out["cpu_ops"] = {**c, "agrees": faster if auto["cpu_ops"] is False else not faster}
    if measured.get("lite0_loop"):
        c = measured["lite0_loop"]
        out["lite0_loop"] = {**c, "agrees": c["scan"]["chunk_s"] <= NEAR * c["host"]["chunk_s"]}
    return out


# ---- measurements (JAX) ----

def _time_chunk(job, rounds):
    """Compile seconds and the best of `rounds` wall seconds of one chunk of `job` (its batch size)."""
    import jax
    weights, units = job.placed_weights(), job._placed(job.units)
    chunk, compile_s = job.compile(weights)
    first = chunk(weights, units)
    jax.block_until_ready(first)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(chunk(weights, units))
        best = min(best, time.perf_counter() - start)
    import numpy as np
    final = np.asarray(first.final)
    return {"compile_s": compile_s, "chunk_s": best, "batch_size": job.batch_size, "steps": job.steps,
            "image_step_s": best / (job.batch_size * job.steps), "final_mean": float(final.mean())}, final


def measure_auto(out, smoke):
    """cpu_ops on and off (ResNet50V2, scan) and Lite0's loop (scan, host), at the GPU's auto batch size."""
    import fvis
    import numpy as np
    from fvis import devices, models
    platform = __import__("jax").default_backend()
    auto = dict(devices.AUTO.get(platform, devices.AUTO["gpu"]))
    result = {"platform": platform, "auto_gpu": devices.AUTO["gpu"], "auto_here": auto}
    size, steps, rounds = (2, 1, 1) if smoke else (devices.AUTO["gpu"]["batch_size"], 3, 3)
    if smoke:
        resnet, layer = models.tiny_convnet(), "conv2"
    else:
        resnet, layer = models.keras_application("ResNet50V2", weights=None, image_size=(180, 180)), "conv3_block4_out"
    row, finals = {}, {}
    for flag in (False, True):
        devices.AUTO[platform]["cpu_ops"] = flag  # prepare reads it per backend
        try:
            job = fvis.prepare(resnet, layer, f"0:{size}", steps=steps, batch_size=size, loop="scan")
            row[str(flag).lower()], finals[flag] = _time_chunk(job, rounds)
        finally:
            devices.AUTO[platform]["cpu_ops"] = auto["cpu_ops"]
        result["cpu_ops"] = row
        _write(out, result)  # what is measured is kept, should the next variant time out
    row["max_abs_diff_final"] = float(np.max(np.abs(finals[True] - finals[False])))
    start = time.perf_counter()
    lite0 = models.efficientnet_lite0(image_size=(64, 64) if smoke else (180, 180))
    result["lite0_build_s"], loops = time.perf_counter() - start, {}
    for loop in ("scan", "host"):
        job = fvis.prepare(lite0, LITE0_LAYER, f"0:{size}", steps=steps, batch_size=size, loop=loop)
        loops[loop] = _time_chunk(job, rounds)[0]
        result["lite0_loop"] = {"layer": LITE0_LAYER, **loops}
        _write(out, result)
    _write(out, {**result, **_environment()})


def _environment():
    import jax
    device = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": device.device_kind,
            "device_count": jax.device_count(), "compute_capability": getattr(device, "compute_capability", None),
            "python": sys.version.split()[0], "cpu_count": os.cpu_count()}


def _classify(error):
    """What a relative error of a random float32 product says about the arithmetic that made it."""
    if error < 2e-5:
        return "float32"
    return "tensorfloat32" if error < 1.5e-3 else "bfloat16"


def measure_probe(out, smoke):
    """Each matmul_precision setting: fvis' record (`fvis.matmul_precision.describe`) against the error a
    float32 matmul and a convolution measurably have here (vs float64 on the host), their speed, and
    the record of a small fvis job (the lowered program's precisions, under this JAX)."""
    import fvis
    import jax
    import jax.numpy as jnp
    import numpy as np
    from fvis import matmul_precision as mp
    result = _environment()
    _write(out, result)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
    x = rng.standard_normal((1, 16, 16, 64)).astype(np.float32)
    k = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    exact_dot = a.astype(np.float64) @ b.astype(np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), (1, 2))
    exact_conv = np.einsum("nhwcij,ijco->nhwo", windows.astype(np.float64), k.astype(np.float64))
    n = 256 if smoke else 8192
    big = jnp.ones((n, n), jnp.float32)
    rel = lambda y, exact: float(np.linalg.norm(np.asarray(y, np.float64) - exact) / np.linalg.norm(exact))
    settings = {}
    for setting in ("auto", "default", "high", "highest"):
        record = mp.describe(setting)
        with jax.default_matmul_precision(record["level"]):
            dot = jax.jit(lambda p, q: p @ q)
            conv = jax.jit(lambda p, q: jax.lax.conv_general_dilated(p, q, (1, 1), "SAME",
                                                                      dimension_numbers=("NHWC", "HWIO", "NHWC")))
            errors = {"matmul": rel(dot(a, b), exact_dot), "convolution": rel(conv(x, k), exact_conv)}
            product = dot.lower(big, big).compile()
        jax.block_until_ready(product(big, big))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(product(big, big))
            times.append(time.perf_counter() - start)
        measured = {op: _classify(e) for op, e in errors.items()}
        expected = "float32" if record["effective"].startswith("bfloat16_") else record["effective"]  # TPU passes
        settings[setting] = {"record": record, "relative_error": errors, "measured": measured,
                             "agrees": all(m == expected for m in measured.values()),
                             "matmul_n": n, "matmul_flops_per_s": 2 * n ** 3 / min(times)}
        result["settings"] = settings
        _write(out, result)
    model = fvis.models.tiny_convnet()
    jobs = {}
    for setting in ("auto", "highest"):
        res = fvis.visualize(model, "conv2", "0:2", steps=2, matmul_precision=setting, progress=False)
        jobs[setting] = res.matmul_precision
    result["fvis_job_records"] = jobs
    _write(out, result)


def main(argv):
    command, rest = argv[0], argv[1:]
    smoke = "--smoke" in rest
    rest = [r for r in rest if r != "--smoke"]
    if command == "part":
        name, rc, seconds, cap, out, *args = rest
        record_part(name, rc, seconds, cap, out, args)
    elif command == "meta":
        _write(WORK / "meta.json", json.loads(rest[0]))
        collect()
    elif command == "collect":
        collect()
    elif command == "probe":
        measure_probe(rest[0], smoke)
    elif command == "auto":
        measure_auto(rest[0], smoke)
    else:
        raise SystemExit(f"Unknown command {command!r}; use part, meta, collect, probe or auto.")


if __name__ == "__main__":
    main(sys.argv[1:])
