"""Chunks optimised at once from several threads (`Settings.workers`): the same images as one at a
time, finished chunks saved even when a neighbour fails, and the optimisation time counted once."""

import importlib
import json
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import fvis
from fvis import cli, devices, outputs
from fvis.errors import InvalidValueError, NonFiniteError
from fvis.objectives import Objective
from fvis.settings import Display, Quality, Settings
from fvis.visualize import _ChunkRunner, _Running
from tests.conftest import shared_path
from tests.test_cli import composed


def test_two_workers_give_the_images_and_curves_of_one_bit_for_bit(tiny):
    one = fvis.visualize(tiny, "conv2", "0:5", steps=3, batch_size=1, workers=1, progress=False)
    two = fvis.visualize(tiny, "conv2", "0:5", steps=3, batch_size=1, workers=2, progress=False)
    for field in ("units", "images", "curves", "final", "grad_norms", "transparency"):
        np.testing.assert_array_equal(getattr(two, field), getattr(one, field), err_msg=field)
    assert two.batch_sizes == one.batch_sizes == [1] * 5
    assert two.curves[:, 0, -1].std() > 0  # five different units, not one repeated


def test_workers_auto_is_the_backends_measured_row_and_bad_values_are_refused_naming_them(tiny):
    job = fvis.prepare(tiny, "conv2", "0:2", steps=1)
    assert job.workers == devices.AUTO["cpu"]["workers"] == 2
    assert fvis.prepare(tiny, "conv2", "0:2", steps=1, workers=3).workers == 3
    for bad in (0, -1, 1.5, "two", None):
        with pytest.raises(InvalidValueError, match=rf"workers must be an integer >= 1 .* or \"auto\"\. "
                                                    rf"Received: workers={bad!r}"):
            Settings(workers=bad)


def test_a_failing_chunk_lets_the_chunk_running_beside_it_finish_and_be_handed_on():
    handled, started, release = [], threading.Event(), threading.Event()

    def on_done(name, value):
        handled.append(name)
        if value == "nan":
            release.set()  # the second chunk ends only after the failure was seen
            raise NonFiniteError(f"chunk {name}")

    def bad():
        assert started.wait(10)  # fails once the second chunk is running
        return ("nan",)

    def slow():
        started.set()
        assert release.wait(10)
        return ("ok",)

    with pytest.raises(NonFiniteError, match="chunk bad"):
        with _Running(2, on_done) as running:
            running.submit(("bad",), bad)
            running.submit(("slow",), slow)
            running.submit(("never",), lambda: ("ok",))  # not reached: the failure is raised first
    assert handled == ["bad", "slow"]


def test_chunks_are_handed_on_in_submission_order_so_the_first_chunks_error_wins():
    """The second chunk fails first in time; the error raised is the first chunk's, as one at a time."""
    second_failed, handled = threading.Event(), []

    def first():
        assert second_failed.wait(10)
        raise ValueError("first chunk")

    def second():
        second_failed.set()
        raise ValueError("second chunk")

    with pytest.raises(ValueError, match="first chunk"):
        with _Running(2, lambda name: handled.append(name)) as running:
            running.submit(("a",), first)
            running.submit(("b",), second)
    assert handled == []


def test_an_interrupt_in_the_caller_still_hands_on_the_chunk_in_flight():
    handled = []
    with pytest.raises(KeyboardInterrupt):
        with _Running(2, lambda name, value: handled.append((name, value))) as running:
            running.submit(("a",), lambda: ("done",))
            raise KeyboardInterrupt
    assert handled == [("a", "done")]


def test_with_one_worker_chunks_run_at_once_in_the_calling_thread():
    handled = []
    with _Running(1, lambda name, ran_in: handled.append((name, ran_in))) as running:
        running.submit(("a",), lambda: (threading.current_thread(),))
        assert handled == [("a", threading.current_thread())]  # already done, here


def test_optimisation_time_counts_chunks_that_ran_at_once_once(tiny):
    runner = _ChunkRunner(fvis.prepare(tiny, "conv2", "0:2", steps=1), weights=None)
    runner.spans = [(10.0, 12.0), (11.0, 13.0), (15.0, 16.0), (15.2, 15.5)]
    assert runner.optimize_s == pytest.approx(4.0)  # [10, 13] and [15, 16]
    runner.spans = []
    assert runner.optimize_s == 0.0


def test_a_job_resumed_with_other_workers_reuses_its_chunks_and_records_what_ran(tiny, tmp_path):
    quality, display = Quality(enabled=False), Display(crop=2)
    first = fvis.run_job(tiny, "conv2", "0:4", tmp_path, settings=Settings(steps=2, batch_size=1, workers=1),
                         quality=quality, display=display, progress=False)
    first_images = np.load(tmp_path / "images.npz")["images"]
    again = fvis.run_job(tiny, "conv2", "0:4", tmp_path, settings=Settings(steps=2, batch_size=1, workers=2),
                         quality=quality, display=display, progress=False)
    assert again.attempt["chunks"]["reused"] == 4 and again.attempt["chunks"]["computed"] == 0
    assert first.results["workers"] == 1 and again.results["workers"] == 2
    np.testing.assert_array_equal(np.load(tmp_path / "images.npz")["images"], first_images)




FIELDS = ("units", "images", "curves", "final", "grad_norms", "transparency", "snapshots")
CLI_FAST = ["model=tiny", "layer=conv2", "image_size=[32,32]", "steps=2", "quality.enabled=false"]


def nan_at(*bad_units):
    """conv2's channel mean, NaN for `bad_units` (every step)."""
    bad = jnp.asarray(bad_units)
    return Objective(lambda acts, unit: jnp.where(jnp.any(unit == bad), jnp.nan, jnp.mean(acts["conv2"][..., unit])),
                     layers=["conv2"], name="nan_at")


def chunk_files(folder):
    return sorted(int(p.stem.split("_")[1]) for p in (folder / "chunks").glob("chunk_*.npz"))


def test_more_workers_than_chunks_with_a_padded_last_chunk_several_images_and_snapshots_match_one_worker(tiny):
    """5 units at batch_size 2 (3 chunks, the last padded), 2 images per unit, snapshots, 8 workers:
    every field equals a one-worker run's."""
    kw = dict(steps=3, batch_size=2, images_per_unit=2, snapshots=[1, 3], progress=False)
    one = fvis.visualize(tiny, "conv2", "0:5", workers=1, **kw)
    many = fvis.visualize(tiny, "conv2", "0:5", workers=8, **kw)
    assert many.images.shape == (5, 2, 32, 32, 3) and many.snapshots.shape[:3] == (5, 2, 2)
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(many, field), getattr(one, field), err_msg=field)
    assert many.batch_sizes == one.batch_sizes == [2, 2, 2]
    assert not np.array_equal(many.images[:, 0], many.images[:, 1])  # two different images per unit


def test_a_nan_chunk_in_the_middle_names_the_earliest_failing_filter_and_keeps_every_chunk_before_it(tiny, tmp_path):
    """Filters 4 and 5 give NaN, one unit a chunk, three workers: the error names filter 4 (the
    earliest, as one at a time), chunks 0-3 are saved, chunk 4 is not, and a resume with one
    worker reuses what was saved."""
    settings = Settings(steps=2, batch_size=1, workers=3)
    quality, display = Quality(enabled=False), Display(crop=2)
    with pytest.raises(NonFiniteError, match=r"for nan_at, filter 4\. "):
        fvis.run_job(tiny, nan_at(4, 5), "0:8", tmp_path, settings=settings, quality=quality, display=display,
                     progress=False)
    saved = chunk_files(tmp_path)
    assert saved[:4] == [0, 1, 2, 3] and 4 not in saved and 5 not in saved
    assert set(saved) <= {0, 1, 2, 3, 6, 7}  # 6 and 7 only if they were running beside 4 and 5


def test_an_interrupted_run_with_three_workers_resumes_with_two_to_the_images_of_one_worker(tiny, tmp_path, monkeypatch):
    """Interrupted after chunk 2 is saved, chunks in flight saved too; chunk 1's file removed; the
    resume with workers=2 computes the missing chunks only and gives a one-worker run's images."""
    quality, display = Quality(enabled=False), Display(crop=2)
    run = lambda folder, workers: fvis.run_job(tiny, "conv2", "0:7", folder, quality=quality, display=display,
                                               settings=Settings(steps=2, batch_size=1, workers=workers),
                                               progress=False)
    run(tmp_path / "ref", 1)
    real_save = outputs.ChunkStore.save

    def save(self, index, *args, **kwargs):
        real_save(self, index, *args, **kwargs)
        if index == 2:
            raise KeyboardInterrupt

    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(outputs.ChunkStore, "save", save)
        with pytest.raises(KeyboardInterrupt):
            run(folder, 3)
    saved = chunk_files(folder)
    # the chunks in flight beside chunk 2 (3, and 4 where chunk 1 ended first: timing) are kept, handed on in
    # order; test_an_interrupt_in_the_caller_still_hands_on_the_chunk_in_flight checks that deterministically
    assert saved == list(range(len(saved))) and 3 <= len(saved) < 7, saved
    (folder / "chunks" / "chunk_00001.npz").unlink()
    again = run(folder, 2)
    assert again.attempt["chunks"]["reused"] == len(saved) - 1
    assert again.attempt["chunks"]["computed"] == 7 - len(saved) + 1
    with np.load(folder / "images.npz") as got, np.load(tmp_path / "ref" / "images.npz") as want:
        for field in FIELDS:
            np.testing.assert_array_equal(got[field], want[field], err_msg=field)


@pytest.mark.parametrize("value, received", [("0", "0"), ("-1", "-1"), ("two", "'two'"), ("2.5", "2.5"),
                                             ("true", "True"), ("null", "None")])
def test_a_bad_workers_from_the_command_line_is_refused_naming_it_before_anything_compiles(tmp_path, monkeypatch,
                                                                                           value, received):
    """Hydra hands on ints, floats, strings, booleans and null: each refused, naming the value received."""
    compiled = []
    monkeypatch.setattr(importlib.import_module("fvis.chunks"), "lower_chunk",
                        lambda *a, **k: compiled.append(1))
    with pytest.raises(InvalidValueError, match=rf"workers must be an integer >= 1 .*Received: workers={received}$"):
        cli.run(composed(*CLI_FAST, f"workers={value}"), tmp_path / "run")
    assert compiled == []


def test_the_quality_figures_from_the_background_compiled_program_equal_a_fresh_measure(tiny, tmp_path):
    """Two workers, photos, 2 draws: results.json's quality figures equal `fvis.quality.measure` traced
    anew on the images written; a second run that reuses every chunk and figure writes the same."""
    from fvis import quality as quality_lib
    photos = shared_path("images")
    quality = Quality(natural_images=str(photos), draws=2)
    run = lambda: fvis.run_job(tiny, "conv2", "0:3", tmp_path, settings=Settings(steps=2, batch_size=1, workers=2),
                               quality=quality, display=Display(crop=2), progress=False)
    first = run().results
    with np.load(tmp_path / "images.npz") as data:
        images = data["images"]
    job = fvis.prepare(tiny, "conv2", "0:3", steps=2)
    natural = quality_lib.load_photos(photos, tiny.image_size, channels=tiny.channels)
    records, summary = quality_lib.measure(job.forward, job.objective, job.units, images, natural=natural, draws=2)
    got = [f["quality"] for f in first["filters"]]
    assert len(got) == 3 and first["dead_filters"] == [] and sum(r["natural_ratio"] is not None for r in got) >= 1
    for mine, want in zip(got, records):
        for key in ("activation", "robustness", "natural_ratio", "spectral_slope"):
            assert mine[key] == (None if want[key] is None else pytest.approx(want[key], rel=1e-5, abs=1e-6)), key
        assert [t["activation"] for t in mine["top_natural"]] == pytest.approx(
            [t["activation"] for t in want["top_natural"]], rel=1e-5, abs=1e-6)
    assert first["quality"]["rank1_fraction"] == pytest.approx(summary["rank1_fraction"])
    again = run()
    assert again.attempt["chunks"]["reused"] == 3 and again.results["quality"] == first["quality"]


def test_a_whole_model_job_measures_each_layer_with_its_own_background_program(tiny, tmp_path):
    """conv1 and conv3 with 5 filters each at two workers: every layer's quality
    activations equal a fresh `measure` of that layer's images, and its images a one-worker run's."""
    from fvis import quality as quality_lib
    layers = ["conv1", "conv3"]
    common = dict(layers=layers, quality=Quality(draws=1), display=Display(crop=2), progress=False)
    fvis.run_job(tiny, None, "0:5", tmp_path / "two", settings=Settings(steps=2, batch_size=2, workers=2), **common)
    fvis.run_job(tiny, None, "0:5", tmp_path / "one", settings=Settings(steps=2, batch_size=2, workers=1),
                 **{**common, "quality": Quality(enabled=False)})
    for index, layer in enumerate(layers):
        folder = f"layers/{index:03d}_{layer}"
        with np.load(tmp_path / "two" / folder / "images.npz") as two, np.load(tmp_path / "one" / folder / "images.npz") as one:
            images = two["images"]
            np.testing.assert_array_equal(images, one["images"], err_msg=layer)
        job = fvis.prepare(tiny, layer, "0:5", steps=2)
        records, _ = quality_lib.measure(job.forward, job.objective, job.units, images, draws=1)
        with open(tmp_path / "two" / folder / "results.json") as f:
            got = [r["quality"]["activation"] for r in json.load(f)["filters"]]
        assert got == pytest.approx([r["activation"] for r in records], rel=1e-5, abs=1e-6), layer


def chunks_at_once(monkeypatch):
    """A list that ends up holding the most chunks ever optimised at the same time (each chunk
    held for 50 ms, so that two started together overlap); internals kept to this helper."""
    visualize = importlib.import_module("fvis.visualize")
    real, lock, state = visualize._ChunkRunner.run, threading.Lock(), {"now": 0, "most": [0]}

    def run(self, *args):
        with lock:
            state["now"] += 1
            state["most"][0] = max(state["most"][0], state["now"])
        try:
            time.sleep(0.05)
            return real(self, *args)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(visualize._ChunkRunner, "run", run)
    return state["most"]


def test_where_memory_holds_one_chunk_only_chunks_really_run_one_at_a_time(tiny, monkeypatch):
    """The memory check leaves workers=2 room for one chunk: never two chunks in flight (and
    results.json's workers, 1, says what ran); with room for two, two do run at once."""
    from fvis import memory
    job = fvis.prepare(tiny, "conv2", "0:5", steps=2, batch_size=1)
    one = job.compile_sized(job.placed_weights(), 1)[1].total
    most = {}
    for budget in (2 * one, 2 * one - 1):
        with monkeypatch.context() as patch:
            patch.setattr(memory, "host_budget", lambda: (budget, "a test's limit"))
            seen = chunks_at_once(patch)
            job = fvis.prepare(tiny, "conv2", "0:5", steps=2, batch_size=1, workers=2)
            job.run(progress=False)
            most[budget] = seen[0], job.workers
    assert most == {2 * one: (2, 2), 2 * one - 1: (1, 1)}
