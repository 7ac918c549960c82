"""Everything a job writes into its output folder, each file written atomically.

Layout of a run folder:
    grid.png               all tiles, the reference layout
    filters/filter_0007.png  one tile per unit (filter_0007_1.png ... for images_per_unit > 1)
    filters/filter_0007_alpha.png  with display.transparency: the tile with MaCo's transparency as alpha
    snapshots.png, .gif    with snapshots: one row per image, one column per snapshot; the grid animated
    images.npz             raw float images (N, D, H, W, C) in [-1, 1], units, curves, final values
                           (and each final image's value for every unit), gradient norms,
                           transparency maps, snapshots, and each unit's chunk (a finished job's
                           chunks)
    results.json           resolved config, per-filter curves and final values
    chunks/chunk_00000.npz finished chunks while the job runs, so a killed job resumes where it
                           stopped (deleted once images.npz holds them: the data is kept once)
    run.json               each attempt at the job: status, times, timings, host, versions
    error.json             why the last attempt failed (removed when one succeeds)
    .fvis.lock             held by the job writing the folder (see `fvis.runfolder`)

Every file but run.json depends only on the config (and the platform): running a
job again, or resuming it after a kill, rewrites them byte for byte, except the
`timings` entry of results.json (the seconds the finishing attempt took; run.json
keeps every attempt's).
"""

import contextlib
import datetime
import hashlib
import io
import json
import os
import platform
import shutil
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np

from fvis import images as images_lib, runfolder
from fvis.errors import InvalidValueError
from fvis.render import Rendered


def atomic_write_bytes(path, data):
    """Writes bytes to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def npz_bytes(**arrays):
    """An uncompressed .npz archive in memory (deterministic bytes for equal arrays)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def read_json(path):
    """The JSON object in `path`, or None if it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def fingerprint(config):
    """A short hash of a JSON-able config: chunks of another config are never reused."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ChunkStore:
    """Finished chunks of a run folder: `chunks/chunk_NNNNN.npz` while the job runs, and
    `images.npz` once it is done (its chunks are then deleted: the data is kept once).

    A chunk is reused only if its file reads back completely (zip CRCs checked), holds
    the expected units, and carries this job's config fingerprint; anything else (a
    partial file left by a kill, another config) is recomputed. A finished run's
    images.npz serves the chunks it holds under the same rules.
    """

    def __init__(self, folder, config_fingerprint):
        self.folder, self.fingerprint = Path(folder) / "chunks", config_fingerprint
        self.reused, self.rejected, self.saved = [], [], []
        self._finished = None  # images.npz's arrays, read once: {} when absent, None-valued when untrusted
        self.batch_sizes = {}  # index -> the batch size a loaded chunk was computed at, where not the job's

    def _path(self, index):
        return self.folder / f"chunk_{index:05d}.npz"

    def load(self, index, units):
        """The chunk's `Rendered` from its file or the finished images.npz, or None (then computed)."""
        rendered, seen = self._from_chunk_file(index, units)
        if rendered is None:
            rendered, seen_finished = self._from_finished(index, units)
            seen = seen or seen_finished
        if rendered is not None:
            self.reused.append(index)
        elif seen:
            self.rejected.append(index)
        return rendered

    def _from_chunk_file(self, index, units):
        """(Rendered or None, whether a file was there)."""
        path = self._path(index)
        if not path.exists():
            return None, False
        arrays = _read_npz(path)
        batch_size = None if arrays is None else arrays.pop("batch_size", None)
        ok = (arrays is not None and str(arrays.pop("fingerprint", "")) == self.fingerprint
              and np.array_equal(arrays.pop("units", None), units) and set(arrays) in _RENDERED_FIELDS)
        if ok and batch_size is not None:
            self.batch_sizes[index] = int(batch_size)
        return (Rendered(**arrays) if ok else None), True

    def _from_finished(self, index, units):
        """(Rendered or None, whether images.npz was there) for chunk `index` of a finished run."""
        if self._finished is None:
            path = self.folder.parent / "images.npz"
            arrays = _read_npz(path) if path.exists() else {}
            fields = {"fingerprint", "chunk", "chunk_batch_size", "units", *_RENDERED_FIELDS[-1]}
            trusted = arrays == {} or (arrays is not None and fields <= set(arrays)
                                       and str(arrays["fingerprint"]) == self.fingerprint)
            self._finished = arrays if trusted else {"untrusted": True}
        if not self._finished:
            return None, False
        if "untrusted" in self._finished:
            return None, True
        rows = self._finished["chunk"] == index
        if not np.array_equal(self._finished["units"][rows], units):
            return None, True
        self.batch_sizes[index] = int(self._finished["chunk_batch_size"][rows][0])
        held = [name for name in Rendered._fields if name in self._finished]
        return Rendered(**{name: self._finished[name][rows] for name in held}), False

    def save(self, index, units, rendered, batch_size=None):
        """Writes chunk `index`; `batch_size`, a smaller batch size it was computed at, is kept with it."""
        sizes = {} if batch_size is None else {"batch_size": np.int64(batch_size)}
        atomic_write_bytes(self._path(index), npz_bytes(
            fingerprint=np.array(self.fingerprint), units=units, **sizes, **_present(rendered._asdict())))
        self.saved.append(index)

    def stats(self):
        """JSON-able counts of this store's work: reused, saved and rejected chunk indices."""
        return {"reused": len(self.reused), "computed": len(self.saved), "recomputed_bad": self.rejected}

    def remove_temporaries(self):
        """Deletes temporary files a killed writer left in the chunks folder."""
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def clear(self):
        """Deletes the chunks folder: call it once images.npz holds every chunk."""
        shutil.rmtree(self.folder, ignore_errors=True)


# The Rendered fields a stored chunk may hold: all, or all but unit_values (kept since 2026-12-01;
# a chunk without them is still reused, and the quality report computes them).
_RENDERED_FIELDS = (set(Rendered._fields), set(Rendered._fields) - {"unit_values"})


def _present(arrays):
    """The entries of `arrays` that are not None."""
    return {name: a for name, a in arrays.items() if a is not None}


def _read_npz(path):
    """Every array of an .npz file (reading checks each CRC), or None if it is truncated, corrupt or foreign."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception:  # truncated, corrupt or foreign file: never trusted
        return None


def tiles(result, *, crop=25, mode="seed"):
    """Deprocessed uint8 tiles of a `Result`, unit-major: (N*D) tiles.

    A dead unit (zero gradient at every step: its image never left the random
    start) gets a plain gray tile in its cell rather than contrast-stretched noise.
    """
    flat = result.images.reshape(-1, *result.images.shape[2:])
    out = [images_lib.deprocess(image, crop=crop, mode=mode) for image in flat]
    for i in np.flatnonzero(result.dead.reshape(-1)):
        out[i] = np.full_like(out[i], 128)
    return out


def snapshot_frames(result, *, crop=25, mode="seed", margin=5):
    """The grid of every image at each snapshot: S uint8 grids laid out as grid.png."""
    s = result.snapshots.shape[2]
    flat = result.snapshots.reshape(-1, s, *result.snapshots.shape[3:])
    return [images_lib.grid([images_lib.deprocess(x, crop=crop, mode=mode) for x in flat[:, i]], margin=margin)
            for i in range(s)]


def snapshot_strip(result, *, crop=25, mode="seed", margin=5):
    """One row per image (unit-major), one column per snapshot step: a uint8 grid."""
    s = result.snapshots.shape[2]
    flat = result.snapshots.reshape(-1, *result.snapshots.shape[3:])
    return images_lib.grid([images_lib.deprocess(x, crop=crop, mode=mode) for x in flat], margin=margin, cols=s)


def show_snapshots(result, *, crop=25, mode="seed", margin=5, duration_ms=500):
    """The snapshots of a `Result` as an animated GIF that a notebook shows inline.

    Returns:
        an `IPython.display.Image` (the last expression of a cell is displayed).

    Raises:
        InvalidValueError: the job kept no snapshots (set `snapshots=[...]`).
    """
    from IPython.display import Image

    if result.snapshots.shape[2] == 0:
        raise InvalidValueError("This result has no snapshots; run with snapshots=[0, 10, 30] (step counts).")
    frames = snapshot_frames(result, crop=crop, mode=mode, margin=margin)
    return Image(data=images_lib.animation_bytes(frames, duration_ms=duration_ms), format="gif")


def _write_extras(folder, result, all_tiles, records, names, *, crop, mode, margin, transparency):
    """Transparency tiles (filters/*_alpha.png, named in each record) and the snapshot strip and GIF."""
    if transparency:
        h, w = result.transparency.shape[2:]
        alphas = result.transparency.reshape(-1, h, w)[:, crop: h - crop, crop: w - crop]
        for record, tile, alpha in zip(records, all_tiles, alphas):
            record["alpha_png"] = record["png"].removesuffix(".png") + "_alpha.png"
            images_lib.save_png(folder / record["alpha_png"], images_lib.with_alpha(tile, alpha))
            names.add(Path(record["alpha_png"]).name)
    if result.snapshots.shape[2] == 0:
        for name in ("snapshots.png", "snapshots.gif"):
            (folder / name).unlink(missing_ok=True)
        return {}
    shown = dict(crop=crop, mode=mode, margin=margin)
    images_lib.save_png(folder / "snapshots.png", snapshot_strip(result, **shown))
    atomic_write_bytes(folder / "snapshots.gif", images_lib.animation_bytes(snapshot_frames(result, **shown)))
    return {"snapshots": {"steps": [int(n) for n in result.snapshot_steps], "strip": "snapshots.png",
                          "animation": "snapshots.gif"}}


def write_run(folder, result, *, config, meta, crop=25, mode="seed", margin=5, transparency=False, chunks=None):
    """Writes grid, per-filter PNGs, raw images and results.json for a finished job.

    Args:
        folder: the run's output folder.
        result: an `fvis.Result`.
        config: the resolved config (JSON-able dict), recorded in results.json.
        meta: extra JSON-able facts (model, layer, units, this attempt's timings).
        crop, mode, margin: display settings (see `fvis.images`).
        transparency: also write each tile with MaCo's transparency as its alpha channel.
        chunks: None, or (config fingerprint, (N,) chunk index of each unit, (N,) the batch size
            its chunk was computed at): images.npz then also serves as the job's finished chunks
            (see `ChunkStore`).

    Returns:
        The dict written to results.json.
    """
    folder = Path(folder)
    (folder / "filters").mkdir(parents=True, exist_ok=True)
    all_tiles = tiles(result, crop=crop, mode=mode)
    images_lib.save_png(folder / "grid.png", images_lib.grid(all_tiles, margin=margin))
    n, d = result.final.shape
    records, names = [], set()
    for i, unit in enumerate(result.units):
        for j in range(d):
            name = f"filter_{unit:04d}.png" if d == 1 else f"filter_{unit:04d}_{j}.png"
            images_lib.save_png(folder / "filters" / name, all_tiles[i * d + j])
            names.add(name)
            records.append({
                "unit": int(unit), "image": j, "png": f"filters/{name}",
                "final": float(result.final[i, j]), "dead": bool(result.dead[i, j]),
                "objective_curve": [float(v) for v in result.curves[i, j]],
            })
    extras = _write_extras(folder, result, all_tiles, records, names, crop=crop, mode=mode, margin=margin,
                           transparency=transparency)
    resume = {} if chunks is None else {"fingerprint": np.array(chunks[0]), "chunk": np.asarray(chunks[1], np.int32),
                                        "chunk_batch_size": np.asarray(chunks[2], np.int32)}
    atomic_write_bytes(folder / "images.npz", npz_bytes(  # every Rendered field: it is the finished chunks too
        units=result.units, images=result.images, curves=result.curves, final=result.final,
        grad_norms=result.grad_norms, transparency=result.transparency, snapshots=result.snapshots,
        snapshot_steps=result.snapshot_steps, **_present({"unit_values": result.unit_values}), **resume))
    summary = {"config": config, **meta, **extras, "filters": records}
    atomic_write_json(folder / "results.json", summary)
    _remove_stale(folder, names)
    return summary


def _remove_stale(folder, names):
    """Removes what an earlier, different run left in the folder: tiles of other units, and
    report.html (it describes an older results.json; a quality step writes a new one)."""
    for path in (folder / "filters").glob("filter_*.png"):  # tiles and their _alpha.png
        if path.name not in names:
            path.unlink()
    (folder / "report.html").unlink(missing_ok=True)


_NOT_RESULTS = ("display", "compilation_cache", "quality", "distributed", "workers")  # config keys that change no optimised value


def run_and_write(job, folder, *, config, meta, display, progress="auto", finish=None):
    """Runs a prepared `fvis.visualize.Job` resumably in `folder` and writes its outputs.

    Each finished chunk is saved to `folder/chunks` as soon as it ends; chunks there, or in a
    finished run's images.npz, from the same computation (the config less its display and
    cache settings, `meta` and the resolved batch size) are reused, anything else is
    recomputed. Once images.npz is written with every chunk, `chunks/` is deleted.

    Args:
        job: from `fvis.prepare`.
        folder: the output folder.
        config: the resolved config (JSON-able dict) with a "display" entry or not.
        meta: JSON-able facts that identify the job (model, objective, layer, ...).
        display: dict of `write_run`'s crop, mode, margin (and transparency), checked before the job runs.
        progress: passed to `job.run`.
        finish: None, or a function (job, result, folder, summary, previous) -> summary run after
            the files are written that may add to them (the cli's quality report); `previous` is
            the folder's results.json as it was before this attempt (or None), to reuse figures.
            Its optional attribute `start(job)` is called before the job runs.

    Returns:
        (the results.json dict, this attempt's facts: timings and chunk counts).
    """
    images_lib.check_display(job.image_shape[:2], **display)  # before any compute
    key = {"config": {k: v for k, v in config.items() if k not in _NOT_RESULTS}, "meta": meta,
           "batch_size": job.batch_size}
    store = ChunkStore(folder, fingerprint(key))
    previous = read_json(Path(folder) / "results.json")
    if hasattr(finish, "start"):  # e.g. the quality report's program, compiled while the job runs
        finish.start(job)
    result = job.run(store=store, progress=progress)
    meta = {**meta, "matmul_precision": _matmul_record(job, result, previous),
            "units": [int(u) for u in result.units], "batch_size": job.batch_size, "workers": job.workers,
            "dead_filters": [int(u) for u, dead in zip(result.units, result.dead.any(axis=1)) if dead],
            "timings": {"compile_s": result.compile_s, "optimize_s": result.optimize_s}}
    sizes = np.concatenate([np.full(len(units), size) for (_, units), size in zip(job.chunks(), result.batch_sizes)])
    if any(size != job.batch_size for size in result.batch_sizes):  # chunks retried after running out of memory
        meta["chunk_batch_sizes"] = [int(size) for size in result.batch_sizes]
    chunk_of_unit = np.concatenate([np.full(len(units), index) for index, units in job.chunks()])
    summary = write_run(folder, result, config=config, meta=meta, **display,
                        chunks=(store.fingerprint, chunk_of_unit, sizes))
    if finish is not None:
        summary = finish(job, result, folder, summary, previous)
    store.clear()  # images.npz holds them now
    facts = {"compile_s": result.compile_s, "optimize_s": result.optimize_s,
             "chunks": {"total": len(job.chunks()), **store.stats()}, "memory": result.memory}
    return summary, facts


def _matmul_record(job, result, previous):
    """The job's matmul precision record (`fvis.Result.matmul_precision`) with its programs' dot and
    convolution precisions: those compiled in this attempt; when every chunk was reused, those of
    the results.json it resumes (same record), else the job's programs lowered anew."""
    record = dict(result.matmul_precision)
    if record.get("in_program") is None:
        before = (previous or {}).get("matmul_precision")
        same = isinstance(before, dict) and {k: v for k, v in before.items() if k != "in_program"} == \
            {k: v for k, v in record.items() if k != "in_program"}
        record["in_program"] = before["in_program"] if same and before.get("in_program") else job.program_precisions()
    return record


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_attempts(folder, attempts):
    atomic_write_json(Path(folder) / "run.json", {"status": attempts[-1]["status"], "attempts": attempts})


def compute_starts(record):
    """Notes in an attempt's record that compute begins: an error before this point is a refusal."""
    record["compute_started"] = _now()


@contextlib.contextmanager
def attempt(folder, *, keep_refused=False):
    """Holds `folder` (see `fvis.runfolder`) and records one attempt at a job in run.json.

    Opening the folder takes its lock (another live job there: `FolderBusyError`, and
    nothing is touched), marks attempts a dead process left "running" as "killed", and
    deletes temporary files killed writers left. run.json then says "running", and at
    the end "done", "failed" (and error.json says why), "interrupted" (Ctrl-C) or
    "refused": an error before `compute_starts(record)` (bad input, checked before any
    compute). A refusal leaves the folder as it found it (a new folder is removed)
    unless `keep_refused` (a sweep's job, listed by the summary with its message).
    Each finished attempt records its "seconds"; earlier attempts are kept in order.

    Yields:
        The attempt's dict; fill it with JSON-able facts (timings, chunk counts).
    """
    folder = Path(folder)
    new = not folder.exists()
    with runfolder.locked(folder):
        attempts = (read_json(folder / "run.json") or {}).get("attempts", [])
        attempts = attempts if isinstance(attempts, list) else []  # a malformed record is not kept
        if runfolder.mark_killed(folder, attempts):
            _write_attempts(folder, attempts)
        runfolder.remove_temporaries(folder)
        before = {name: (folder / name).read_bytes() if (folder / name).exists() else None
                  for name in ("run.json", "error.json")}
        start = time.perf_counter()
        record = {"status": "running", "started": _now(), "host": platform.node(), "pid": os.getpid()}
        attempts.append(record)
        _write_attempts(folder, attempts)
        try:
            yield record
        except BaseException as e:
            failed = isinstance(e, Exception)
            refused = failed and "compute_started" not in record
            if refused and not keep_refused:
                _restore(folder, before, remove_folder=new)
                raise
            record.update(status="refused" if refused else "failed" if failed else "interrupted",
                          finished=_now(), seconds=round(time.perf_counter() - start, 3),
                          error=f"{type(e).__name__}: {e}")
            if failed:
                atomic_write_json(folder / "error.json", {
                    "type": type(e).__name__, "message": str(e), "time": record["finished"],
                    "traceback": traceback.format_exc()})
            _write_attempts(folder, attempts)
            raise
        record.update(status="done", finished=_now(), seconds=round(time.perf_counter() - start, 3))
        (folder / "error.json").unlink(missing_ok=True)
        _write_attempts(folder, attempts)


def _restore(folder, before, *, remove_folder):
    """Puts run.json and error.json back as they were; a folder that held no run loses its lock
    file, and is removed when this attempt created it and it is empty."""
    for name, data in before.items():
        if data is None:
            (folder / name).unlink(missing_ok=True)
        else:
            atomic_write_bytes(folder / name, data)
    if before["run.json"] is None:
        (folder / runfolder.LOCK_NAME).unlink(missing_ok=True)
        if remove_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()
