"""Long jobs lose nothing: killed jobs resume to the same bytes; bad chunk files are redone."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# A server that imports fvis once, then forks one child per job: the child runs `fvis.cli.run` on the
# composed overrides in a folder and, when asked, dies by SIGKILL at the k-th *event* of its run: a
# compilation, a chunk computed (not yet saved), a file written (killed before the write, half-way
# through it (a partial temporary file), or after it), a quality measurement, or the chunk folder's
# removal (after its first file). The hooks live here, not in the library. Requests and answers are
# JSON lines on stdin/stdout: {"overrides", "folder", "kill_at", "how", "trace"} ->
# {"killed": bool, "events": [...]}.
KILL_SERVER = r"""
import json, os, signal, sys
from pathlib import Path
from fvis import chunks, cli, images, outputs, quality, report, atlas
from fvis.visualize import Job

state = {"events": [], "kill_at": None, "kill_on": None, "how": "after", "folder": None}

def event(name, tmp=None, data=b""):
    state["events"].append(name)
    kind, nth = state["kill_on"] or (None, None)
    if (len(state["events"]) == state["kill_at"]
            or sum(e.split(" ")[0] == kind for e in state["events"]) == nth and name.split(" ")[0] == kind):
        if tmp is not None and state["how"] == "partial":
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data[: max(1, len(data) // 2)])
        os.kill(os.getpid(), signal.SIGKILL)

def relative(path):
    path = Path(path)
    try:
        return path.resolve().relative_to(state["folder"]).as_posix()
    except ValueError:
        return path.name

def writer(real, as_bytes):
    def write(path, data, *args, **kwargs):
        path, payload = Path(path), as_bytes(data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if state["how"] != "after":
            event("write " + relative(path), tmp, payload)
        real(path, data, *args, **kwargs)
        if state["how"] == "after":
            event("write " + relative(path))
    return write

def after(real, name):
    def call(*args, **kwargs):
        out = real(*args, **kwargs)
        event(name)
        return out
    return call

write_bytes = writer(outputs.atomic_write_bytes, bytes)
outputs.atomic_write_bytes = report.atomic_write_bytes = atlas.atomic_write_bytes = write_bytes
images.save_png = writer(images.save_png, lambda array: b"\x89PNG\r\n" + bytes(64))
Job.compile_sized = after(Job.compile_sized, "compile")
chunks.to_host = after(chunks.to_host, "chunk")
quality.unit_values = after(quality.unit_values, "quality")
quality.robustness = after(quality.robustness, "quality")
quality.spectral_slopes = after(quality.spectral_slopes, "quality")  # the job's images skip unit_values
clear = outputs.ChunkStore.clear
def clear_first_then_rest(self):
    for path in sorted(self.folder.glob("chunk_*.npz"))[:1]:
        path.unlink()
    event("clear")
    clear(self)
outputs.ChunkStore.clear = clear_first_then_rest

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        from hydra import compose, initialize_config_module
        state.update(kill_at=request["kill_at"], kill_on=request.get("kill_on"), how=request["how"],
                     folder=Path(request["folder"]).resolve())
        with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
            cfg = compose("config", overrides=request["overrides"])
        code = 0
        try:
            cli.run(cfg, request["folder"])
        except BaseException as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            code = 1
        if request.get("trace"):
            Path(request["trace"]).write_text(json.dumps(state["events"]))
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
                      "failed": os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0}), flush=True)
"""


class KillServer:
    """Runs jobs in forked children of one fvis process (see KILL_SERVER); use as a context manager."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", KILL_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def run(self, overrides, folder, *, kill_at=None, kill_on=None, how="after", trace=None):
        """Runs the job, killed at its `kill_at`-th event or at the n-th event of a kind (`kill_on=(kind, n)`,
        kind: compile, chunk, write, quality, clear); returns {"killed": bool, "failed": bool}."""
        request = {"overrides": list(overrides), "folder": str(folder), "kill_at": kill_at, "kill_on": kill_on,
                   "how": how, "trace": None if trace is None else str(trace)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def events(self, overrides, folder):
        """The events of an uninterrupted run of the job in `folder` (a new folder), in order."""
        trace = Path(folder).with_name(Path(folder).name + ".events.json")
        outcome = self.run(overrides, folder, trace=trace)
        assert not outcome["killed"] and not outcome["failed"], outcome
        return json.loads(trace.read_text())


def kill_and_resume(server, overrides, folder, kill_at, how):  # used by experiments/kill_loop.py
    """Kills the job in `folder` at event `kill_at`, resumes it, and returns what an uninterrupted run
    should match: (the killed run's outcome, the resumed folder's product, temporary files left,
    the statuses in run.json)."""
    killed = server.run(overrides, folder, kill_at=kill_at, how=how)
    resumed = server.run(overrides, folder)
    assert not resumed["killed"] and not resumed["failed"], resumed
    left = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or "chunks" in p.parts)
    return killed, product(folder), left, [a["status"] for a in attempts(folder)]


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
    assert [a["status"] for a in attempts(out)] == ["killed", "done"]


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


def _without_unit_values(path):
    """Rewrites an .npz chunk file or images.npz as fvis wrote it before unit_values were kept."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files if name != "unit_values"}
    assert len(arrays) == len(data.files) - 1
    path.write_bytes(outputs.npz_bytes(**arrays))


def test_chunks_saved_before_unit_values_were_kept_are_reused_and_the_result_has_none(stored, tmp_path):
    job, result, chunks = stored
    assert result.unit_values.shape == (8, 1, 8)
    _without_unit_values(chunks / "chunk_00002.npz")
    store = outputs.ChunkStore(tmp_path, "config-a")
    again = job.run(store=store, progress=False)
    assert store.reused == [0, 1, 2, 3] and store.rejected == []
    assert again.unit_values is None  # one chunk lacks them: the quality report computes them all
    for name in ("images", "curves", "final", "grad_norms", "transparency"):
        np.testing.assert_array_equal(getattr(again, name), getattr(result, name))
    store.save(2, job.units[4:6], store.load(2, job.units[4:6])._replace(unit_values=result.unit_values[4:6]))
    np.testing.assert_array_equal(job.run(store=outputs.ChunkStore(tmp_path, "config-a"), progress=False).unit_values,
                                  result.unit_values)


def test_a_finished_run_from_before_unit_values_is_reused_and_its_quality_measured_again_the_same(tmp_path):
    cli.run(composed(*TINY, "steps=2", "quality.draws=2"), tmp_path)
    first = json.loads((tmp_path / "results.json").read_text())
    _without_unit_values(tmp_path / "images.npz")
    (tmp_path / "results.json").unlink()  # its figures would be reused as they are
    _, record = cli.run(composed(*TINY, "steps=2", "quality.draws=2"), tmp_path)
    assert record["chunks"]["reused"] == 3 and record["chunks"]["recomputed_bad"] == []
    again = json.loads((tmp_path / "results.json").read_text())
    figure = lambda summary, key: [np.nan if f["quality"][key] is None else f["quality"][key]
                                   for f in summary["filters"]]  # None: robustness of an image not live
    for key in ("activation", "robustness"):
        np.testing.assert_allclose(figure(again, key), figure(first, key), rtol=1e-5, atol=1e-6, err_msg=key)
    assert [f["quality"]["selectivity_rank"] for f in again["filters"]] == [
        f["quality"]["selectivity_rank"] for f in first["filters"]]
    with np.load(tmp_path / "images.npz") as data:
        assert "unit_values" not in data.files  # written as the chunks it was resumed from held them


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
    assert not (tmp_path / "chunks").exists()  # a finished job's chunks live in its images.npz
    assert not (tmp_path / "report.html").exists() and len(summary["filters"]) == 2


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


KILL_JOB = ["model=tiny", "filters=0:4", "batch_size=2", "steps=2", "quality.draws=1"]  # quality on: a kill moment


def test_killed_at_random_moments_each_job_resumes_to_the_uninterrupted_files(tmp_path):
    """One job killed four times in a row (SIGKILL: during compile, mid-chunk, half-way through a file
    write, in the quality report), each run resuming the last; the final resume gives every file of the
    uninterrupted run byte for byte (timings aside), leaves no temporary file or chunk, and run.json
    records the four kills. experiments/kill_loop.py does 20 kills at random moments."""
    rng = random.Random(0)
    with KillServer() as server:
        events = server.events(KILL_JOB, tmp_path / "reference")
        writes = sum(e.startswith("write ") for e in events)
        kills = [(("compile", 1), "after"), (("chunk", 2), "after"), (("write", rng.randint(3, writes - 2)), "partial"),
                 (("quality", rng.randint(1, 2)), "after")]
        folder = tmp_path / "killed"
        for kill_on, how in kills:
            assert server.run(KILL_JOB, folder, kill_on=kill_on, how=how)["killed"], kill_on
        resumed = server.run(KILL_JOB, folder)
        assert not resumed["killed"] and not resumed["failed"]
        assert product(folder) == product(tmp_path / "reference")
        assert [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == "chunks"] == []
        assert [a["status"] for a in attempts(folder)] == ["killed"] * 4 + ["done"]
