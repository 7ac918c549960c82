"""Everything a job writes into its output folder, each file written atomically.

Layout of a run folder:
    grid.png               all tiles, the reference layout
    filters/filter_0007.png  one tile per unit (filter_0007_1.png ... for images_per_unit > 1)
    images.npz             raw float images (N, D, H, W, C) in [-1, 1], units, curves, final values
    results.json           resolved config, per-filter curves and final values
    chunks/chunk_00000.npz finished chunks, so a killed job resumes where it stopped
    run.json               each attempt at the job: status, times, timings, host, versions
    error.json             why the last attempt failed (removed when one succeeds)

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
import traceback
import zipfile
from pathlib import Path

import numpy as np

from fvis import images as images_lib
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
    """Finished chunks as `chunks/chunk_NNNNN.npz` files in a run folder.

    A chunk file is reused only if it reads back completely (zip CRCs checked),
    holds the expected units, and carries this job's config fingerprint; anything
    else (a partial file left by a kill, another config) is recomputed.
    """

    def __init__(self, folder, config_fingerprint):
        self.folder, self.fingerprint = Path(folder) / "chunks", config_fingerprint
        self.reused, self.rejected, self.saved = [], [], []
        self.batch_sizes = {}  # index -> the batch size a loaded chunk was computed at, where not the job's

    def _path(self, index):
        return self.folder / f"chunk_{index:05d}.npz"

    def load(self, index, units):
        path = self._path(index)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}  # reading checks every CRC
            ok = (str(arrays.pop("fingerprint")) == self.fingerprint
                  and np.array_equal(arrays.pop("units"), units))
            batch_size = arrays.pop("batch_size", None)
            rendered = Rendered(**arrays) if ok else None
            if rendered is not None and batch_size is not None:
                self.batch_sizes[index] = int(batch_size)
        except Exception:  # truncated, corrupt or foreign file: never trusted
            rendered = None
        (self.reused if rendered is not None else self.rejected).append(index)
        return rendered

    def save(self, index, units, rendered, batch_size=None):
        """Writes chunk `index`; `batch_size`, a smaller batch size it was computed at, is kept with it."""
        sizes = {} if batch_size is None else {"batch_size": np.int64(batch_size)}
        atomic_write_bytes(self._path(index), npz_bytes(
            fingerprint=np.array(self.fingerprint), units=units, **sizes, **rendered._asdict()))
        self.saved.append(index)

    def stats(self):
        """JSON-able counts of this store's work: reused, saved and rejected chunk indices."""
        return {"reused": len(self.reused), "computed": len(self.saved), "recomputed_bad": self.rejected}

    def remove_temporaries(self):
        """Deletes temporary files a killed writer left in the chunks folder."""
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def remove_beyond(self, count):
        """Deletes chunk files with an index >= count: left by an earlier job with more chunks."""
        for path in self.folder.glob("chunk_*.npz"):
            index = path.stem.removeprefix("chunk_")
            if index.isdigit() and int(index) >= count:
                path.unlink()


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


def write_run(folder, result, *, config, meta, crop=25, mode="seed", margin=5):
    """Writes grid, per-filter PNGs, raw images and results.json for a finished job.

    Args:
        folder: the run's output folder.
        result: an `fvis.Result`.
        config: the resolved config (JSON-able dict), recorded in results.json.
        meta: extra JSON-able facts (model, layer, units, this attempt's timings).
        crop, mode, margin: display settings (see `fvis.images`).

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
    atomic_write_bytes(folder / "images.npz", npz_bytes(
        units=result.units, images=result.images, curves=result.curves, final=result.final))
    summary = {"config": config, **meta, "filters": records}
    atomic_write_json(folder / "results.json", summary)
    _remove_stale(folder, names)
    return summary


def _remove_stale(folder, names):
    """Removes what an earlier, different run left in the folder: tiles of other units, and
    report.html (it describes an older results.json; a quality step writes a new one)."""
    for path in (folder / "filters").glob("filter_*.png"):
        if path.name not in names:
            path.unlink()
    (folder / "report.html").unlink(missing_ok=True)


_NOT_RESULTS = ("display", "compilation_cache", "quality", "distributed")  # config keys that change no optimised value


def run_and_write(job, folder, *, config, meta, display, progress="auto", finish=None):
    """Runs a prepared `fvis.visualize.Job` resumably in `folder` and writes its outputs.

    Each finished chunk is saved to `folder/chunks` as soon as it ends; chunks there
    from the same computation (the config less its display and cache settings, `meta` and
    the resolved batch size) are reused, anything else is recomputed.

    Args:
        job: from `fvis.prepare`.
        folder: the output folder.
        config: the resolved config (JSON-able dict) with a "display" entry or not.
        meta: JSON-able facts that identify the job (model, objective, layer, ...).
        display: dict of `write_run`'s crop, mode and margin, checked before the job runs.
        progress: passed to `job.run`.
        finish: None, or a function (job, result, folder, summary) -> summary run after the
            files are written that may add to them (the cli's quality report).

    Returns:
        (the results.json dict, this attempt's facts: timings and chunk counts).
    """
    images_lib.check_display(job.image_shape[:2], **display)  # before any compute
    key = {"config": {k: v for k, v in config.items() if k not in _NOT_RESULTS}, "meta": meta,
           "batch_size": job.batch_size}
    store = ChunkStore(folder, fingerprint(key))
    result = job.run(store=store, progress=progress)
    meta = {**meta, "units": [int(u) for u in result.units], "batch_size": job.batch_size,
            "dead_filters": [int(u) for u, dead in zip(result.units, result.dead.any(axis=1)) if dead],
            "timings": {"compile_s": result.compile_s, "optimize_s": result.optimize_s}}
    if any(size != job.batch_size for size in result.batch_sizes):  # chunks retried after running out of memory
        meta["chunk_batch_sizes"] = [int(size) for size in result.batch_sizes]
    summary = write_run(folder, result, config=config, meta=meta, **display)
    if finish is not None:
        summary = finish(job, result, folder, summary)
    store.remove_temporaries()
    store.remove_beyond(len(job.chunks()))
    facts = {"compile_s": result.compile_s, "optimize_s": result.optimize_s,
             "chunks": {"total": len(job.chunks()), **store.stats()}, "memory": result.memory}
    return summary, facts


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_attempts(folder, attempts):
    atomic_write_json(Path(folder) / "run.json", {"status": attempts[-1]["status"], "attempts": attempts})


@contextlib.contextmanager
def attempt(folder):
    """Records one attempt at a job in `folder/run.json`, and a failure in `error.json`.

    run.json says "running" from the start, then "done", "failed" or "interrupted"
    (Ctrl-C); a job killed outright stays "running" (the summary shows it as
    incomplete). Earlier attempts (a resumed job's) are kept in order.

    Yields:
        The attempt's dict; fill it with JSON-able facts (timings, chunk counts).
    """
    folder = Path(folder)
    attempts = (read_json(folder / "run.json") or {}).get("attempts", [])
    record = {"status": "running", "started": _now(), "host": platform.node(), "pid": os.getpid()}
    attempts.append(record)
    _write_attempts(folder, attempts)
    try:
        yield record
    except BaseException as e:
        failed = isinstance(e, Exception)
        record.update(status="failed" if failed else "interrupted", finished=_now(),
                      error=f"{type(e).__name__}: {e}")
        if failed:
            atomic_write_json(folder / "error.json", {
                "type": type(e).__name__, "message": str(e), "time": record["finished"],
                "traceback": traceback.format_exc()})
        _write_attempts(folder, attempts)
        raise
    record.update(status="done", finished=_now())
    (folder / "error.json").unlink(missing_ok=True)
    _write_attempts(folder, attempts)
