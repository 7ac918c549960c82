"""The fvis benchmark: speed against the reference's own code, measured in one run.

    python experiments/bench.py suite=full        # everything -> experiments/results/ (see its README)
    python experiments/bench.py suite=quick       # a small smoke run of every method, ~5 min on 2 cores
    python experiments/bench.py method=fvis job=reference batch_size=4   # one measurement -> stdout

One measurement per process (so peak memory and start-up are its own):
`method=fvis` (the fvis job from Python), `fvis_cli` (the `fvis` command as a user
runs it, quality report on), `jax_loop` (baseline a: the reference's method in
JAX, one filter at a time), `tf_seed` (baseline b: the seed's TensorFlow code,
when TensorFlow is installed: `pip install -e ".[bench-tf]"`), `matmul_peak`
(the device's measured peak), `batch_study` (chunk cost against batch size
and loop form), `profile` (op time by category from a `jax.profiler` trace). A `suite` runs a list of measurements, each as a subprocess of
this script, and writes their JSON and a table to `results_dir`.
"""

import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent


def job_config(cfg):
    """The job with its step count for this backend (`steps_on_cpu` on a CPU)."""
    import jax
    job = OmegaConf.to_container(cfg.job)
    if jax.default_backend() == "cpu" and job.get("steps_on_cpu"):
        job["steps"] = job["steps_on_cpu"]
    return OmegaConf.create(job)


def tf_seed(cfg):
    """Runs experiments/seed_tf.py in its own process (Keras' backend is fixed per process)."""
    python = cfg.get("tf_python") or sys.executable
    if python == sys.executable and importlib.util.find_spec("tensorflow") is None:
        return {"skipped": "TensorFlow is not installed; `pip install -e \".[bench-tf]\"` (or tf_python=<a Python "
                           "with TensorFlow>) to measure the seed's code."}
    job = OmegaConf.to_container(job_config(cfg))
    start = time.perf_counter()
    done = subprocess.run([python, str(HERE / "seed_tf.py"), json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode != 0:
        raise RuntimeError(f"seed_tf.py failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "tf_process_s": time.perf_counter() - start,
            "tf_python": python,
            "loadavg_1min": os.getloadavg()[0]}


CLI_MODELS = {"ResNet50V2": ["model=resnet50v2", "model.weights=null"]}


def fvis_cli(cfg):
    """The job as a user runs it: the `fvis` command in its own process (quality report on, the
    compilation cache in `compilation_cache`, or off), its run folder in a temporary directory."""
    import tempfile
    job = job_config(cfg)
    if job.model not in CLI_MODELS:
        raise ValueError(f"method=fvis_cli knows {list(CLI_MODELS)}. Received: job.model={job.model}")
    cache = cfg.compilation_cache if cfg.compilation_cache not in (None, "off") else "false"
    with tempfile.TemporaryDirectory(prefix="fvis_cli_") as folder:
        args = [*CLI_MODELS[job.model], f"layer={job.layer}", f"filters=0:{job.filters}", f"steps={job.steps}",
                f"image_size=[{job.image_size[0]},{job.image_size[1]}]", f"compilation_cache={cache}",
                f"hydra.run.dir={folder}"]
        start, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([sys.executable, "-m", "fvis", *args], capture_output=True, text=True)
        wall, cpu1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"fvis {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        results = json.loads((Path(folder) / "results.json").read_text())
    timings = results["timings"]
    return {"command": "fvis " + " ".join(args[:-1]), "job_s": wall,
            "job_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "image_steps": job.filters * job.steps, "batch_size": results.get("batch_size"), "loop": results.get("loop"),
            "precision": "float32", "timings": timings, "compile_s": timings.get("compile_s"),
            "optimize_s": timings.get("optimize_s"), "quality_s": timings.get("quality_s"),
            "quality_share": (timings.get("quality_s") or 0.0) / wall}


def measure(cfg):
    """One measurement, in this process, as a JSON-able dict."""
    if cfg.method == "tf_seed":
        return {"method": "tf_seed", "job": OmegaConf.to_container(job_config(cfg)), **tf_seed(cfg)}
    if cfg.method == "fvis_cli":
        return {"method": "fvis_cli", "job": OmegaConf.to_container(job_config(cfg)), **fvis_cli(cfg)}
    import bench_measure as m
    job = job_config(cfg)
    if cfg.method == "matmul_peak":
        result = m.measure_matmul_peak(cfg.matmul_n)
    elif cfg.method == "fvis":
        cache = cfg.compilation_cache if cfg.compilation_cache not in (None, "off") else False
        result = m.measure_fvis(job, batch_size=cfg.batch_size, loop=cfg.loop, precision=cfg.precision,
                                compilation_cache=cache, steady_repeats=cfg.steady_repeats,
                                save_images=cfg.save_images)
    elif cfg.method == "jax_loop":
        result = m.measure_jax_loop(job, steady_repeats=cfg.steady_repeats)
    elif cfg.method == "batch_study":
        s = cfg.batch_study
        result = m.measure_batch_study(job, sizes=list(s.sizes), loops=list(s.loops), steps=s.steps, rounds=s.rounds)
    elif cfg.method == "profile":
        import bench_profile
        p = cfg.profile
        result = {"variants": bench_profile.measure_profile(
            m.build_model(job), job, batch_size=p.batch_size, loops=list(p.loops),
            cpu_ops=list(p.cpu_ops))}
    else:
        raise ValueError(f"Unknown method '{cfg.method}'. Use fvis, fvis_cli, jax_loop, tf_seed, matmul_peak, "
                         f"batch_study or profile. Received: method={cfg.method}")
    return {"method": cfg.method, "job": OmegaConf.to_container(job), **result, **m.environment()}


def run_suite(cfg):
    """Runs every measurement of the suite in its own process; writes <results_dir>/<suite>.json."""
    import bench_report
    results_dir = Path(cfg.results_dir)
    work = HERE / "runs" / cfg.suite.name
    shutil.rmtree(work, ignore_errors=True)  # a fresh start: cold caches are cold
    work.mkdir(parents=True)
    path, records = results_dir / f"{cfg.suite.name}.json", []
    for run in cfg.suite.runs:
        cache = work / f"jax_cache_{run.cache}" if run.get("cache") else None
        state = "off" if cache is None else ("warm" if cache.exists() else "cold")
        out = work / f"{run.name}.json"
        args = [*run.args, f"out={out}", f"compilation_cache={cache or 'off'}"]
        if cfg.get("tf_python"):
            args.append(f"tf_python={cfg.tf_python}")
        if run.get("save_images") or run.get("compare_to"):
            args.append(f"save_images={work / (run.name + '.npz')}")
        print(f"[bench] {run.name}: {' '.join(run.args)} (cache {state})", flush=True)
        load, start = os.getloadavg()[0], time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / "bench.py"), *args])
        record = {"name": run.name, "args": list(run.args), "cache": state, "process_s": time.perf_counter() - start,
                  "loadavg_1min_before": load, "returncode": done.returncode, "compare_to": run.get("compare_to")}
        if done.returncode == 0:
            record.update(json.loads(out.read_text()))
        records.append(record)
        summary = bench_report.write(path, records, cfg.suite.name, work)
    print(bench_report.table(summary["records"]))
    return path


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg):
    if cfg.get("suite") is not None:
        print(f"[bench] results in {run_suite(cfg)}")
        return
    result = measure(cfg)
    text = json.dumps(result, indent=2)
    if cfg.out:
        Path(cfg.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
