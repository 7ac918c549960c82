"""The measurements of experiments/bench.py, one per process (see bench.py).

Each `measure_*` function returns a JSON-able dict. Times are wall seconds from
`time.perf_counter`, with the process' CPU seconds next to them where it helps
(on a shared machine CPU time is less disturbed by other processes than wall time).
"""

import contextlib
import os
import platform
import resource
import time
from pathlib import Path

import fvis  # noqa: F401  (selects Keras' JAX backend first)
import jax
import jax.numpy as jnp
import keras
import numpy as np

from fvis import devices, images, models, outputs, render


def environment():
    """Versions, device kind and count, and the machine's load (1-min average, runnable processes)."""
    device = jax.devices()[0]
    return {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
            else __import__("jaxlib").__version__, "keras": keras.__version__, "backend": jax.default_backend(),
            "device_kind": device.device_kind, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "loadavg_1min": os.getloadavg()[0]}


def cpu_model():
    """The CPU's model name as /proc/cpuinfo gives it (Linux; lscpu says no more here), else the
    processor name Python knows, else "unknown"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def peak_memory():
    """Peak host RSS of this process (bytes) and the device's peak, where the backend reports it."""
    stats = jax.devices()[0].memory_stats() or {}
    return {"host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device_peak_bytes": stats.get("peak_bytes_in_use")}


def flops_of(compiled):
    """FLOPs of one call of a compiled function, from XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["flops"])


def timed_calls(fn, n):
    """Per-call wall and CPU seconds of `fn()` (blocking), first call excluded: (median, min, cpu)."""
    jax.block_until_ready(fn())
    walls, cpu0 = [], time.process_time()
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - start)
    return float(np.median(walls)), float(min(walls)), (time.process_time() - cpu0) / n


def build_model(job):
    """The job's Keras application with random weights (the same FLOPs as ImageNet's)."""
    return models.keras_application(job.model, weights=None, image_size=tuple(job.image_size))


def measure_matmul_peak(n=2048, repeats=10):
    """FLOP/s of an n x n matmul in float32 and bfloat16 (best and median of `repeats`)."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda a, b: a @ b).lower(a, a).compile()
        median, best, _ = timed_calls(lambda: f(a, a), repeats)
        out[dtype] = {"n": n, "best_flops_per_s": 2 * n ** 3 / best, "median_flops_per_s": 2 * n ** 3 / median}
    return out


def compiled_step(job, weights=None, states=1):
    """The job's step compiled on its own (state donated), as the host loop runs it, under the job's
    matmul precision: (step, weights, state, units); with states > 1, a list of that many states."""
    weights = job.placed_weights() if weights is None else weights
    units = job._placed(job.units[: job.batch_size])
    keys = render.image_keys(jax.random.key(job.seed), units, job.images_per_unit)
    options = getattr(job, "compiler_options", {})  # the XLA options the job compiles with (none before issue 15)
    init = jax.jit(job.renderer.init, compiler_options=options)
    state = [init(units, keys) for _ in range(states)] if states > 1 else init(units, keys)
    with getattr(job, "matmul_scope", contextlib.nullcontext)():  # (absent from fvis before issue 15)
        example = state[0] if states > 1 else state
        step = jax.jit(job.renderer.step, donate_argnums=1, compiler_options=options)
        step = step.lower(weights, example, units, np.int32(0)).compile()
    return step, weights, state, units


def steady_step(job, weights, repeats):
    """Compiles the job's step alone (state donated) and times it: s/step, FLOPs/step. Where the job
    runs several chunks at once (`job.workers`, fvis after issue 15), also the steps' throughput with
    that many in flight, each called from its own thread as `Job.run` does: s per image-step."""
    workers = getattr(job, "workers", 1)
    step, weights, states, units = compiled_step(job, weights, states=workers + 1)
    holder = [states.pop()]

    def call():
        holder[0], aux = step(weights, holder[0], units, np.int32(0))
        return aux

    median, best, cpu = timed_calls(call, repeats)
    out = {"step_s": median, "step_s_min": best, "step_cpu_s": cpu, "step_flops": flops_of(step),
           "step_images": job.batch_size * job.images_per_unit}
    if workers > 1:
        out.update(steps_in_flight(step, weights, states, units, repeats))
    return out


def steps_in_flight(step, weights, states, units, repeats, rounds=3):
    """`len(states)` threads each call `step` `repeats` times on its own state (blocking each call):
    wall and CPU seconds per call, the median and best of `rounds`."""
    from concurrent.futures import ThreadPoolExecutor

    def run(i):
        for _ in range(repeats):
            states[i], aux = step(weights, states[i], units, np.int32(0))
            jax.block_until_ready(aux)

    walls, cpus = [], []
    with ThreadPoolExecutor(len(states)) as pool:
        list(pool.map(run, range(len(states))))  # warm-up
        for _ in range(rounds):
            start, cpu0 = time.perf_counter(), time.process_time()
            list(pool.map(run, range(len(states))))
            calls = repeats * len(states)
            walls.append((time.perf_counter() - start) / calls)
            cpus.append((time.process_time() - cpu0) / calls)
    return {"step_workers": len(states), "step_s_in_flight": float(np.median(walls)),
            "step_s_in_flight_min": float(min(walls)), "step_cpu_s_in_flight": float(np.median(cpus))}


def measure_fvis(job_cfg, *, batch_size, loop, precision, compilation_cache, steady_repeats, save_images=None):
    """The fvis job end to end (model build, compile, all chunks, tiles), then its steady-state step."""
    start, cpu0 = time.perf_counter(), time.process_time()
    devices.use_compilation_cache(compilation_cache)  # before the model, as the fvis command does
    model = build_model(job_cfg)
    built = time.perf_counter()
    job = fvis.prepare(model, job_cfg.layer, f"0:{job_cfg.filters}", steps=job_cfg.steps, batch_size=batch_size,
                       loop=loop, precision=precision)
    result = job.run(progress=False)
    images.grid(outputs.tiles(result))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    memory = peak_memory()
    if save_images:
        np.savez(save_images, images=result.images, final=result.final)
    steady = steady_step(job, job.placed_weights(), steady_repeats) if steady_repeats else {}
    image_steps = job_cfg.filters * job_cfg.steps
    return {"build_model_s": built - start, "compile_s": result.compile_s, "optimize_s": result.optimize_s,
            "job_s": wall, "job_cpu_s": cpu, "image_steps": image_steps,
            "job_image_steps_per_s": image_steps / result.optimize_s, "batch_size": job.batch_size,
            "loop": job.loop, "chunks": len(job.chunks()), "precision": precision,
            "final_mean": float(result.final.mean()), **steady, **memory}


def measure_jax_loop(job_cfg, *, steady_repeats=5):
    """Baseline (a): the reference's method in JAX as a user would write it.

    The seed's code ported line by line to Keras' JAX backend: a jitted
    `gradient_ascent_step` for one (1, H, W, 3) image, called in a Python loop over
    steps, inside a Python loop over filters.
    """
    start, cpu0 = time.perf_counter(), time.process_time()
    model = getattr(keras.applications, job_cfg.model)(weights=None, include_top=False)  # as the seed builds it
    extractor = keras.Model(model.inputs, model.get_layer(job_cfg.layer).output)
    trainable = [v.value for v in extractor.trainable_variables]
    frozen = [v.value for v in extractor.non_trainable_variables]

    def compute_loss(image, filter_index):
        activation, _ = extractor.stateless_call(trainable, frozen, image)
        return jnp.mean(activation[:, 2:-2, 2:-2, filter_index])

    @jax.jit
    def gradient_ascent_step(image, filter_index, learning_rate):
        loss, grads = jax.value_and_grad(compute_loss)(image, filter_index)
        grads = grads / jnp.sqrt(jnp.maximum(jnp.sum(grads * grads), 1e-12))  # tf.math.l2_normalize
        return loss, image + learning_rate * grads

    h, w = job_cfg.image_size
    first_s, tiles = None, []
    for filter_index in range(job_cfg.filters):
        key = jax.random.fold_in(jax.random.key(0), filter_index)
        image = (jax.random.uniform(key, (1, h, w, 3)) - 0.5) * 0.25
        for _ in range(job_cfg.steps):
            t = time.perf_counter()
            loss, image = gradient_ascent_step(image, filter_index, 10.0)
            if first_s is None:
                jax.block_until_ready(image)
                first_s = time.perf_counter() - t
        tiles.append(images.deprocess(np.asarray(image[0])))
    images.grid(tiles)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    memory = peak_memory()
    image = (jax.random.uniform(jax.random.key(1), (1, h, w, 3)) - 0.5) * 0.25
    compiled = gradient_ascent_step.lower(image, 0, 10.0).compile()
    median, best, step_cpu = timed_calls(lambda: compiled(image, 0, 10.0), steady_repeats)
    image_steps = job_cfg.filters * job_cfg.steps
    return {"first_step_s": first_s, "job_s": wall, "job_cpu_s": cpu, "image_steps": image_steps,
            "job_image_steps_per_s": image_steps / wall, "step_s": median, "step_s_min": best,
            "step_cpu_s": step_cpu, "step_flops": flops_of(compiled), "step_images": 1, **memory}


def measure_batch_study(job_cfg, *, sizes, loops, steps, rounds):
    """Per image-step cost of a whole chunk against batch size and loop form.

    Every (batch size, loop) variant is compiled first; then each round times one
    chunk of every variant in turn, so all variants see the same machine load.
    """
    model = build_model(job_cfg)
    variants, out = {}, {}
    for size in sizes:
        for loop in loops:
            job = fvis.prepare(model, job_cfg.layer, f"0:{size}", steps=steps, batch_size=size, loop=loop)
            weights, units = job.placed_weights(), job._placed(job.units)
            chunk, compile_s = job.compile(weights)
            jax.block_until_ready(chunk(weights, units))
            variants[f"{size}/{loop}"] = (lambda c=chunk, w=weights, u=units: c(w, u))
            out[f"{size}/{loop}"] = {"batch_size": size, "loop": loop, "compile_s": compile_s, "wall": [], "cpu": []}
    for _ in range(rounds):
        for name, call in variants.items():
            start, cpu0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(call())
            image_steps = out[name]["batch_size"] * steps
            out[name]["wall"].append((time.perf_counter() - start) / image_steps)
            out[name]["cpu"].append((time.process_time() - cpu0) / image_steps)
    for record in out.values():
        record["image_step_s"] = min(record.pop("wall"))
        record["image_step_cpu_s"] = min(record.pop("cpu"))
    return {"steps": steps, "rounds": rounds, "variants": list(out.values()), **peak_memory()}
