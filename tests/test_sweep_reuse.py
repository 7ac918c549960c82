"""Sweeps of many small jobs in one process: a job reuses the previous job's model only when nothing
about it changed, gives the images a fresh process gives, and jobs that differ only in their seed hit
the compilation cache."""

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from hydra import compose, initialize_config_module

from fvis import cli

FAST = ["filters=0:2", "steps=2", "quality.enabled=false", "compilation_cache=false"]


def run(tmp_path, name, *overrides):
    """One job through the command's in-process path: (images, the attempt's record)."""
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, *overrides])
    cli.run(cfg, tmp_path / name)
    with np.load(tmp_path / name / "images.npz") as data:
        images = data["images"]
    return images, json.loads((tmp_path / name / "run.json").read_text())["attempts"][-1]


def fresh(tmp_path, name, *overrides):
    """The job as the first job of a process runs it (no model kept from an earlier job)."""
    cli._LAST_MODEL.clear()
    return run(tmp_path, name, *overrides)


def kept_model():
    """The Keras model the command keeps for the next job (internals, in one place)."""
    return cli._LAST_MODEL["model"].model


def test_next_job_with_the_same_model_reuses_it_and_gives_a_fresh_jobs_images(tmp_path):
    """seed 0 then seed 1 with the same model: the second job reuses the model and its images are the
    images of seed 1 run first in a process (bit for bit)."""
    alone, record = fresh(tmp_path, "alone", "model=tiny", "seed=1")
    assert record["model_reused"] is False
    run(tmp_path, "first", "model=tiny", "seed=0")
    images, record = run(tmp_path, "second", "model=tiny", "seed=1")
    assert record["model_reused"] is True
    np.testing.assert_array_equal(images, alone)


def test_a_changed_model_config_builds_the_model_again(tmp_path):
    """A different model setting (width) or image size is another model."""
    fresh(tmp_path, "a", "model=tiny")
    images, record = run(tmp_path, "b", "model=tiny", "model.width=4")
    assert record["model_reused"] is False
    assert kept_model().get_layer("conv1").kernel.shape[-1] == 4
    _, record = run(tmp_path, "c", "model=tiny", "model.width=4", "image_size=[40,40]")
    assert record["model_reused"] is False and kept_model().inputs[0].shape[1:3] == (40, 40)
    alone, _ = fresh(tmp_path, "b_alone", "model=tiny", "model.width=4")
    np.testing.assert_array_equal(images, alone)


def test_a_model_whose_variables_changed_is_built_again(tmp_path):
    """Whatever wrote into the kept model's variables, the next job sees a freshly built model."""
    alone, _ = fresh(tmp_path, "alone", "model=tiny")
    variable = kept_model().get_layer("conv2").kernel
    variable.assign(np.asarray(variable.value) + 1.0)
    images, record = run(tmp_path, "after", "model=tiny")
    assert record["model_reused"] is False
    np.testing.assert_array_equal(images, alone)


def test_a_model_file_rewritten_between_jobs_is_loaded_again(tmp_path):
    """model=saved: the same path with other contents is another model."""
    import fvis
    path = tmp_path / "m.keras"
    first_model = fvis.models.tiny_convnet(image_size=(32, 32), seed=0).model
    first_model.save(path)
    saved = ["model=saved", f"model.path={path}", "layer=conv2", "display.crop=2"]
    first, _ = fresh(tmp_path, "first", *saved)
    second_model = fvis.models.tiny_convnet(image_size=(32, 32), seed=1).model
    second_model.save(path)
    images, record = run(tmp_path, "second", *saved)
    assert record["model_reused"] is False
    assert not np.array_equal(images, first)
    alone, _ = fresh(tmp_path, "alone", *saved)
    np.testing.assert_array_equal(images, alone)


SWEEP = textwrap.dedent("""
    import json, sys
    import jax
    from hydra import compose, initialize_config_module
    from fvis import cli
    events = []
    jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        for i, override in enumerate(sys.argv[2:]):
            cfg = compose("config", overrides=["model=tiny", "filters=0:2", "steps=2", "quality.draws=2",
                                               *override.split(), f"compilation_cache={sys.argv[1]}/cache"])
            events.clear()
            cli.run(cfg, f"{sys.argv[1]}/job{i}")
            print(json.dumps({"misses": events.count("/jax/compilation_cache/cache_misses"),
                              "hits": events.count("/jax/compilation_cache/cache_hits")}))
""")


def sweep(tmp_path, *overrides):
    """The jobs `overrides` (one string of overrides each) in one fresh process with its own compilation cache: each job's
    cache misses and hits, and the cache folder."""
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = subprocess.run([sys.executable, "-c", SWEEP, str(tmp_path), *overrides], env=env, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()
    return [json.loads(line) for line in out[-len(overrides):]], tmp_path / "cache"


def test_jobs_that_differ_only_in_their_seed_compile_once(tmp_path):
    """A seed sweep in one process: the second job's programs, the quality report's too (its robustness draws
    take the seed as an argument), all come from the compilation cache."""
    (first, second), _ = sweep(tmp_path, "seed=0", "seed=1")
    assert first["misses"] > 0  # the model's initializers and the job's programs
    assert second["misses"] == 0 and second["hits"] > 0  # the model is reused: only the job's programs


def test_jobs_that_differ_only_in_their_learning_rate_share_the_step_program(tmp_path):
    """An lr sweep in one process: the learning rate is a value in the optimiser state (set by the init
    program), so the step, finish and quality programs are compiled once for both jobs and only the small
    init program once per lr. With the rate compiled into the step, each lr had its own step program.
    (That the images are those of the rate compiled in, bit for bit: tests/test_config_flow.py.)"""
    for optimizer in ("normalized_ascent", "adam"):
        folder = tmp_path / optimizer
        _, cache = sweep(folder, f"optimizer={optimizer} lr=1", f"optimizer={optimizer} lr=5")
        programs = collections.Counter(entry.name.rsplit("-", 2)[0] for entry in cache.iterdir())
        assert programs["jit_step"] == programs["jit_finish"] == programs["jit_quality_values"] == 1, programs
        assert programs["jit_init"] == 2, programs  # the init program, holding the rate
        with np.load(folder / "job0" / "images.npz") as a, np.load(folder / "job1" / "images.npz") as b:
            assert not np.array_equal(a["images"], b["images"])  # the rate reached the step
