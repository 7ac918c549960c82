"""Chunks optimised at once from several threads (`Settings.workers`): the same images as one at a
time, finished chunks saved even when a neighbour fails, and the optimisation time counted once."""

import importlib
import threading
import time

import numpy as np
import pytest

import fvis
from fvis import devices
from fvis.errors import InvalidValueError, NonFiniteError
from fvis.settings import Display, Quality, Settings
from fvis.visualize import _ChunkRunner, _Running


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
