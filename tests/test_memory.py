"""Memory: XLA's estimate of a chunk, refusal before compute, and the half-batch retry on running out."""

import json
import logging
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_module

import fvis
from fvis import chunks, cli, devices, memory
from fvis.memory import OutOfMemoryError

FAST = ["model=tiny", "steps=3", "quality.enabled=false"]


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def chunk_estimate(job, batch_size):
    """XLA's estimate for one compiled chunk of `batch_size` units (the library's internals, in one place)."""
    return job.compile_sized(job.placed_weights(), batch_size)[1]


def with_budget(monkeypatch, n_bytes):
    """The host memory fvis sees is `n_bytes` (as under a tight `ulimit -v`)."""
    monkeypatch.setattr(memory, "host_budget", lambda: (n_bytes, "a test's limit"))


def images(folder):
    with np.load(folder / "images.npz") as data:
        return data["images"]


def test_estimate_holds_the_arguments_and_outputs_exactly_and_grows_linearly_with_the_batch(tiny):
    """Arguments = weights + unit indices + seed + value units, outputs = images, curves, final values,
    gradient norms, transparency maps and unit values (no snapshots asked: zero bytes) (hand-counted bytes); the rest grows by the same
    amount per unit."""
    steps, size = 3, 32
    job = fvis.prepare(tiny, "conv2", "0:4", steps=steps, batch_size=4, loop="scan")
    weight_bytes = sum(np.asarray(w).nbytes for w in jax.tree.leaves(job.forward.weights()))
    one, two, four = (chunk_estimate(job, b) for b in (1, 2, 4))
    for b, estimate in ((1, one), (2, two), (4, four)):
        # + int32 units + uint32 seed + the job's 4 int32 value units
        assert estimate.arguments == weight_bytes + 4 * b + 4 + 4 * 4
        # float32 images, curves, final values, gradient norms, transparency, each final image's value for
        # the job's 4 units; + XLA's tuple of 7 pointers
        assert estimate.outputs == 4 * b * (size * size * 3 + steps + 1 + steps + size * size + 4) + 7 * 8
        assert estimate.total == estimate.arguments + estimate.outputs + estimate.temporaries - estimate.aliased
    # each unit's activations: the backward pass keeps at least conv2's output (32x32x16 float32)
    per_unit = two.total - one.total
    assert per_unit >= size * size * 16 * 4
    assert four.total - two.total == pytest.approx(2 * per_unit, rel=0.05)


def test_image_that_cannot_fit_under_ulimit_is_refused_before_compute_in_one_line(tmp_path):
    """An 8192x8192 image under `ulimit -v 3000000`: one line naming the estimate and the way out, no chunk."""
    out = tmp_path / "run"
    command = "ulimit -v 3000000 && exec " + shlex.join([sys.executable, "-m", "fvis", *FAST, "image_size=[8192,8192]",
                                                         "filters=0:1", f"hydra.run.dir={out}"])
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fvis:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("fvis: error: A chunk of 1 filters of channel(conv2) at 8192x8192 needs about ")
    needed = float(lines[0].split("needs about ")[1].split(" GiB")[0])
    # at least the image, its gradient and conv2's 16 channels at 8192x8192 in float32
    assert needed >= 8192 * 8192 * (3 + 3 + 16) * 4 / 2**30
    assert "(ulimit -v" in lines[0] and "smaller image_size" in lines[0]
    assert not (out / "chunks").exists() and not (out / "images.npz").exists()


def test_explicit_batch_size_over_the_budget_is_refused_before_any_chunk(tmp_path, tiny, monkeypatch):
    """batch_size=4 whose chunk needs more than the budget: OutOfMemoryError naming batch_size, no chunk written."""
    job = fvis.prepare(tiny, "conv2", "0:8", steps=3, batch_size=4)
    needed = chunk_estimate(job, 4).total
    with_budget(monkeypatch, needed - 1)
    with pytest.raises(OutOfMemoryError, match=r"A chunk of 4 filters .* Use a smaller batch_size .*"
                                               r"Received: batch_size=4, image_size=\[32, 32\]"):
        cli.run(composed(*FAST, "filters=0:8", "batch_size=4"), tmp_path)
    assert not (tmp_path / "chunks").exists() and not (tmp_path / "images.npz").exists()


def test_auto_batch_size_is_capped_by_the_estimate_and_equals_a_run_at_that_size(tiny, monkeypatch):
    """With auto at 8 per device but room for 2 filters, the job runs at 2 and gives a batch_size=2 run's images."""
    settings = dict(steps=3, loop="scan", progress=False)
    job = fvis.prepare(tiny, "conv2", "0:8", steps=3, batch_size=8, loop="scan")
    two, four = chunk_estimate(job, 2).total, chunk_estimate(job, 4).total
    monkeypatch.setitem(devices.AUTO["cpu"], "batch_size", 8)
    with_budget(monkeypatch, (two + four) // 2)
    capped = fvis.visualize(tiny, "conv2", "0:8", batch_size="auto", **settings)
    assert capped.batch_sizes == [2] and capped.memory["batch_size"] == 2
    assert capped.memory["estimate_bytes"] == two
    monkeypatch.undo()
    at_two = fvis.visualize(tiny, "conv2", "0:8", batch_size=2, **settings)
    np.testing.assert_array_equal(capped.images, at_two.images)


def failing_runs(batch_size, monkeypatch, error_at):
    """Chunks compiled for `batch_size` units raise `error_at(n)` on their n-th run (None: they run)."""
    real, calls = chunks.compile_chunk, []

    def compile_chunk(*args, units, **kwargs):
        chunk, estimate = real(*args, units=units, **kwargs)
        if len(units) != batch_size:
            return chunk, estimate

        def failing(weights, placed):
            calls.append(1)
            error = error_at(len(calls))
            if error is not None:
                raise error
            return chunk(weights, placed)

        return failing, estimate

    monkeypatch.setattr(chunks, "compile_chunk", compile_chunk)


def out_of_memory_from_second_call_at(batch_size, monkeypatch):
    """Chunks compiled for `batch_size` units run once, then raise XLA's out-of-memory error."""
    failing_runs(batch_size, monkeypatch, lambda n: jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory allocating 3225718144 bytes.") if n > 1 else None)


def stopped_at_call(batch_size, call, monkeypatch):
    """Chunks compiled for `batch_size` units raise on their `call`-th run, as a job killed there stops."""
    failing_runs(batch_size, monkeypatch, lambda n: RuntimeError("killed") if n == call else None)


def test_chunk_out_of_memory_is_retried_at_half_batch_and_resumes_at_it(tmp_path, monkeypatch, caplog):
    """Chunk 1 of 3 runs out at batch 4: chunks 1-2 are computed at 2 (a batch_size=2 run's images),
    results.json, run.json and the log say so, and a resume continues at 2, byte for byte. One chunk
    at a time: the injected failures count calls across chunks, which two chunks at once would race for."""
    settings = [*FAST, "filters=0:12", "workers=1"]
    reference = {b: tmp_path / f"at{b}" for b in (4, 2)}
    for b, folder in reference.items():
        cli.run(composed(*settings, f"batch_size={b}"), folder)
    out = tmp_path / "run"
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="fvis"):
        out_of_memory_from_second_call_at(4, patch)
        summary, record = cli.run(composed(*settings, "batch_size=4"), out)
    assert summary["batch_size"] == 4 and summary["chunk_batch_sizes"] == [4, 2, 2]
    assert record["memory"]["retries"] == [{"chunk": 1, "batch_size": 4, "retried_at": 2}]
    assert any("chunk 1 of channel(conv2) ran out of memory at batch size 4" in r.getMessage()
               for r in caplog.records)
    got = images(out)
    np.testing.assert_array_equal(got[:4], images(reference[4])[:4])
    np.testing.assert_array_equal(got[4:], images(reference[2])[4:])

    first = {name: (out / name).read_bytes() for name in ("images.npz", "grid.png")}
    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:  # the same run, killed in chunk 2 (its first half at batch size 2)
        out_of_memory_from_second_call_at(4, patch)
        stopped_at_call(2, 3, patch)
        with pytest.raises(RuntimeError, match="killed"):
            cli.run(composed(*settings, "batch_size=4"), killed)
    assert sorted(p.name for p in (killed / "chunks").iterdir()) == ["chunk_00000.npz", "chunk_00001.npz"]
    _, again = cli.run(composed(*settings, "batch_size=4"), killed)   # memory is fine now: no failure injected
    assert again["chunks"]["reused"] == 2 and again["memory"]["retries"] == []
    assert {name: (killed / name).read_bytes() for name in first} == first
    assert json.loads((killed / "results.json").read_text())["chunk_batch_sizes"] == [4, 2, 2]


def test_out_of_memory_at_the_smallest_batch_is_one_error_keeping_finished_chunks(tmp_path, monkeypatch):
    """Out of memory at batch size 1: OutOfMemoryError naming the chunk, chunk 0 kept on disk. One chunk
    at a time: with two at once, chunk 0's call could be the second counted."""
    out_of_memory_from_second_call_at(1, monkeypatch)
    with pytest.raises(OutOfMemoryError, match=r"Chunk 1 of channel\(conv2\) ran out of memory at batch size 1"):
        cli.run(composed(*FAST, "filters=0:3", "batch_size=1", "workers=1"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["chunk_00000.npz"]


def test_two_chunks_run_at_once_only_where_the_memory_holds_both(tiny, monkeypatch):
    """workers=2 needs two chunks' estimate; with room for one the job runs them one at a time,
    with the same images."""
    one = chunk_estimate(fvis.prepare(tiny, "conv2", "0:4", steps=2, batch_size=1), 1).total
    runs = {}
    for budget in (2 * one, 2 * one - 1):
        with_budget(monkeypatch, budget)
        job = fvis.prepare(tiny, "conv2", "0:4", steps=2, batch_size=1, workers=2)
        runs[budget] = job.run(progress=False), job.workers
    (both, workers_both), (single, workers_single) = runs[2 * one], runs[2 * one - 1]
    assert (workers_both, workers_single) == (2, 1)
    assert both.memory["estimate_bytes"] == single.memory["estimate_bytes"] == one
    np.testing.assert_array_equal(both.images, single.images)
