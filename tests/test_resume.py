"""Long jobs lose nothing: killed jobs resume to the same bytes; bad chunk files are redone."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hydra import compose, initialize_config_module

import fvis
from fvis import cli, outputs, report

TINY = ["model=tiny", "filters=0:8", "batch_size=3"]  # 3 chunks: 3 + 3 + 2 (padded)
FAST = [*TINY, "quality.enabled=false"]  # where the quality report is beside the point (it costs compiles)


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _content(path):
    """A file's bytes; for results.json and report.html, their bytes with the attempt's measured seconds blanked."""
    if path.name == "report.html":
        text = path.read_text()
        start, end = text.index(report.TIMINGS_START), text.index(report.TIMINGS_END)
        return (text[:start] + text[end:]).encode()
    if path.name != "results.json":
        return path.read_bytes()
    summary = json.loads(path.read_text())
    assert set(summary.pop("timings", {})) <= {"compile_s", "optimize_s", "quality_s"}
    return json.dumps(summary, indent=2).encode()


def product(folder):
    """Every file a job wrote but run.json (its attempts) and Hydra's own files: path -> bytes
    (results.json's `timings`, the seconds this attempt took, are the one entry allowed to differ)."""
    return {p.relative_to(folder).as_posix(): _content(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.json" and ".hydra" not in p.parts and p.suffix != ".log"}


# The `fvis` command, killed by SIGKILL right after it saved `sys.argv[1]` chunks (the hook lives here,
# not in the library).
KILLED_AFTER_CHUNKS = """
import os, signal, sys
from fvis import outputs
from fvis.cli import main
limit, save = int(sys.argv.pop(1)), outputs.ChunkStore.save
def save_then_maybe_die(self, *args):
    save(self, *args)
    if len(self.saved) == limit:
        os.kill(os.getpid(), signal.SIGKILL)
outputs.ChunkStore.save = save_then_maybe_die
main()
"""


def fvis_process(*args, kill_after_chunks=None):
    program = ["-m", "fvis"] if kill_after_chunks is None else ["-c", KILLED_AFTER_CHUNKS, str(kill_after_chunks)]
    return subprocess.Popen([sys.executable, *program, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def attempts(folder):
    return json.loads((folder / "run.json").read_text())["attempts"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted job, run in this process."""
    folder = tmp_path_factory.mktemp("reference")
    cli.run(composed(*TINY, "steps=4"), folder)
    return product(folder)


@pytest.mark.slow
def test_job_killed_between_chunks_resumes_to_identical_files(tmp_path, reference):
    out = tmp_path / "run"
    proc = fvis_process(*TINY, "steps=4", f"hydra.run.dir={out}", kill_after_chunks=2)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["chunk_00000.npz", "chunk_00001.npz"]
    assert not (out / "results.json").exists() and attempts(out)[-1]["status"] == "running"

    _, record = cli.run(composed(*TINY, "steps=4"), out)
    assert record["chunks"] == {"total": 3, "reused": 2, "computed": 1, "recomputed_bad": []}
    assert product(out) == reference
    assert [a["status"] for a in attempts(out)] == ["running", "done"]


@pytest.mark.slow
def test_job_killed_mid_chunk_from_outside_resumes_to_identical_files(tmp_path):
    settings = [*TINY, "steps=1000"]  # ~0.5 s per chunk on a CPU core
    out = tmp_path / "run"
    proc = fvis_process(*settings, f"hydra.run.dir={out}")
    first = out / "chunks" / "chunk_00000.npz"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert first.exists() and not (out / "results.json").exists(), "the job ended before it could be killed"
    done_before = sorted(p.name for p in (out / "chunks").glob("chunk_*.npz"))
    assert len(done_before) < 3

    _, record = cli.run(composed(*settings), out)
    assert record["chunks"]["reused"] == len(done_before) and record["chunks"]["recomputed_bad"] == []
    whole = tmp_path / "whole"
    cli.run(composed(*settings), whole)
    assert product(out) == product(whole)


@pytest.fixture
def stored(tiny, tmp_path):
    """A finished 4-chunk job in a store, and its result."""
    job = fvis.prepare(tiny, "conv2", "0:8", steps=3, batch_size=2)
    store = outputs.ChunkStore(tmp_path, "config-a")
    return job, job.run(store=store, progress=False), tmp_path / "chunks"


def test_damaged_or_foreign_chunk_files_are_redone_never_trusted(stored, tmp_path):
    job, result, chunks = stored
    files = [chunks / f"chunk_{i:05d}.npz" for i in range(4)]
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])                      # truncated by a kill
    middle = bytearray(files[1].read_bytes())
    middle[len(middle) // 2] ^= 0xFF                                   # one flipped byte in the data
    files[1].write_bytes(bytes(middle))
    files[2].write_bytes(files[3].read_bytes())                        # another chunk's units
    (chunks / ".chunk_00003.npz.999.tmp").write_bytes(b"partial")      # a writer killed mid-write
    store = outputs.ChunkStore(tmp_path, "config-a")
    again = job.run(store=store, progress=False)
    assert store.rejected == [0, 1, 2] and store.reused == [3]
    for name in ("images", "curves", "final", "grad_norms"):
        np.testing.assert_array_equal(getattr(again, name), getattr(result, name))
    store.remove_temporaries()
    assert sorted(p.name for p in chunks.iterdir()) == [f.name for f in files]


def test_chunks_of_another_config_are_recomputed(stored, tmp_path):
    job, _, chunks = stored
    empty = chunks / "chunk_00001.npz"
    empty.write_bytes(b"")
    store = outputs.ChunkStore(tmp_path, "config-b")
    job.run(store=store, progress=False)
    assert store.reused == [] and store.rejected == [0, 1, 2, 3]
    assert outputs.ChunkStore(tmp_path, "config-b").load(1, job.units[2:4]) is not None


def test_display_settings_reuse_chunks_but_compute_settings_do_not(tmp_path):
    cli.run(composed(*FAST, "steps=2"), tmp_path)
    _, record = cli.run(composed(*FAST, "steps=2", "display.crop=4", "display.mode=clip"), tmp_path)
    assert record["chunks"]["reused"] == 3
    _, record = cli.run(composed(*FAST, "steps=2", "lr=5"), tmp_path)
    assert record["chunks"]["reused"] == 0 and record["chunks"]["recomputed_bad"] == [0, 1, 2]


def test_a_smaller_job_in_a_used_folder_leaves_no_stale_tiles_chunks_or_report(tmp_path):
    cli.run(composed(*TINY, "steps=2", "filters=0:6", "batch_size=2"), tmp_path)
    assert (tmp_path / "report.html").exists() and len(list((tmp_path / "filters").iterdir())) == 6
    summary, _ = cli.run(composed(*TINY, "steps=2", "filters=0:2", "batch_size=2", "quality.enabled=false"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "filters").iterdir()) == ["filter_0000.png", "filter_0001.png"]
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["chunk_00000.npz"]
    assert not (tmp_path / "report.html").exists() and len(summary["filters"]) == 2


def test_failed_attempt_is_recorded_and_cleared_by_a_later_success(tmp_path):
    with pytest.raises(fvis.errors.UnknownNameError):
        cli.run(composed(*TINY, "steps=2", "layer=conv9"), tmp_path)
    error = json.loads((tmp_path / "error.json").read_text())
    assert error["type"] == "UnknownNameError" and "conv9" in error["message"] and "Traceback" in error["traceback"]
    assert attempts(tmp_path)[-1]["status"] == "failed"
    cli.run(composed(*FAST, "steps=2"), tmp_path)
    assert not (tmp_path / "error.json").exists()
    assert [a["status"] for a in attempts(tmp_path)] == ["failed", "done"]


def by_unit(result):
    order = np.argsort(result.units)
    return {name: getattr(result, name)[order] for name in ("images", "curves", "final")}


def assert_identical(a, b):
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def wide():
    return fvis.models.tiny_convnet(image_size=(24, 24), width=16, seed=1)  # conv3: 64 channels


def test_a_filter_image_does_not_depend_on_its_chunk_or_neighbours(wide):
    units = np.arange(10)
    same = by_unit(fvis.visualize(wide, "conv3", units, steps=6, batch_size=3, progress=False))
    for order in (units[::-1], np.roll(units, 4)):  # other chunk positions and neighbours, other padding
        assert_identical(by_unit(fvis.visualize(wide, "conv3", order, steps=6, batch_size=3, progress=False)), same)


def test_across_batch_sizes_filters_agree_to_float_rounding(wide):
    """Not bit for bit: XLA:CPU picks kernels by operand size, so at 24 px batches of 1-2 and of
    3+ differ in the last bits (experiments/determinism.md). A resumed job never mixes them."""
    units = np.arange(10)
    base = by_unit(fvis.visualize(wide, "conv3", units, steps=6, batch_size=2, progress=False))
    for b in (1, 3, 10):
        other = by_unit(fvis.visualize(wide, "conv3", units, steps=6, batch_size=b, progress=False))
        np.testing.assert_allclose(other["images"], base["images"], atol=1e-5)
        np.testing.assert_allclose(other["final"], base["final"], rtol=1e-4, atol=1e-6)


def test_resuming_with_another_batch_size_recomputes_every_chunk(tmp_path):
    cli.run(composed(*FAST, "steps=2"), tmp_path)
    _, record = cli.run(composed(*FAST, "batch_size=4", "steps=2"), tmp_path)
    assert record["chunks"]["reused"] == 0 and record["chunks"]["recomputed_bad"] == [0, 1]
