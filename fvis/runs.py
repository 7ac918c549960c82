"""A whole run in a folder, from Python: what the `fvis` command writes, in one call.

    model = fvis.models.efficientnet_lite0(image_size=(160, 160))
    fvis.run_job(model, "block4c_add", "0:16", "out/lite0")              # grid, tiles, report.html
    fvis.run_job(model, fvis.objectives.channel, "0:8", "out/atlas",
                 layers=["block3b_add", "block4c_add"])                    # + atlas.png, index.html

A run folder holds the grid, one PNG per unit, the raw images, results.json, the
quality report and finished chunks (see `fvis.outputs`); a whole-model job puts
each layer in `layers/NNN_<layer>/` and adds the atlas (see `fvis.atlas`). Running
the same job in the same folder again resumes it.
"""

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from fvis import atlas, images as images_lib, objectives as objectives_lib, outputs, progress as progress_lib
from fvis import quality as quality_lib, report
from fvis.errors import InvalidTypeError
from fvis.models import as_vis_model
from fvis.settings import Display, Quality, Settings
from fvis.visualize import prepare

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """What `run_job` did.

    results: the dict written to the folder's results.json.
    attempt: this attempt's record in run.json (status, timings, chunk counts, ...).
    """

    results: dict
    attempt: dict


def run_job(model, objective, units, folder, *, layers=None, param=None, transform=None, optimizer=None,
            settings=None, display=Display(), quality=Quality(), config=None, devices=None, progress="auto",
            attempt=None):
    """Runs a job resumably in `folder` and writes what the `fvis` command writes.

    Args:
        model: an `fvis.models.VisModel` (or a Keras model, see `fvis.prepare`).
        objective: for one layer, an `Objective` or a layer path (= channel objective);
            with `layers`, a function layer path -> `Objective` (e.g. `fvis.objectives.channel`,
            or `functools.partial(fvis.objectives.neuron, position=(3, 3))`), None for channel.
        units: which units (see `fvis.units.parse_units`); with `layers`, read for the widest
            layer and cut to each ("0:64": the first 64, or all a layer has).
        folder: the run folder (created).
        layers: None for one layer, or a whole-model job's layers: "all", paths, glob
            patterns, or a list of them (see `fvis.atlas.select_layers`).
        param, transform, optimizer: the components (see `fvis.prepare`).
        settings: an `fvis.Settings`.
        display: an `fvis.Display` (tiles and grid).
        quality: an `fvis.Quality`; the photos of `natural_images` are read before any compute.
        config: a JSON-able dict that identifies the computation; it is recorded in
            results.json and finished chunks are reused only under an equal one. The
            command passes its resolved config. By default fvis describes the job itself,
            naming components by their repr: default components (None) resume in a later
            process, while components built in Python do so only within this process.
        devices: see `fvis.prepare`.
        progress: True, False, or "auto" (bars when stderr is a terminal).
        attempt: a run.json attempt record to fill (the command opens one around building
            the model too); by default `run_job` records its own attempt.

    Returns:
        An `Outcome`.

    Raises:
        The errors of `fvis.prepare`, `fvis.atlas.select_layers` and `fvis.quality.load_photos`,
        before any compute; NonFiniteError from the optimisation (finished chunks are kept).
    """
    if attempt is None:
        with outputs.attempt(folder) as record:
            return run_job(model, objective, units, folder, layers=layers, param=param, transform=transform,
                           optimizer=optimizer, settings=settings, display=display, quality=quality, config=config,
                           devices=devices, progress=progress, attempt=record)
    start = time.perf_counter()
    model, settings = as_vis_model(model), settings or Settings()
    components = dict(param=param, transform=transform, optimizer=optimizer, settings=settings, devices=devices)
    jobs = _prepare_jobs(model, objective, units, layers, components)
    finish = quality_step(quality, model, seed=settings.seed, progress=progress)
    if config is None:
        config = _describe(objective, units, layers, param, transform, optimizer, settings, display, quality)
    shown = dataclasses.asdict(display)
    for _, job in jobs:
        images_lib.check_display(job.image_shape[:2], **shown)
    outputs.compute_starts(attempt)  # an error before this line is a refusal (see fvis.outputs.attempt)
    if layers is None:
        job = jobs[0][1]
        summary, facts = outputs.run_and_write(job, folder, config=config, meta=_meta(model, job), display=shown,
                                               finish=finish, progress=progress)
        log.info("wrote %d images to %s: grid.png, filters/, images.npz, results.json%s", len(summary["filters"]),
                 folder, ", report.html" if "quality" in summary else "")
    else:
        summary, facts = _run_layers(jobs, folder, model, config, shown, finish, progress)
    attempt.setdefault("timings", {}).update(
        compile_s=facts["compile_s"], optimize_s=facts["optimize_s"], run_s=time.perf_counter() - start)
    attempt["chunks"] = facts["chunks"]
    attempt["memory"] = facts["memory"]
    return Outcome(summary, attempt)


def _prepare_jobs(model, objective, units, layers, components):
    """[(layer or None, Job)], every one checked before anything is compiled."""
    if layers is None:
        return [(None, prepare(model, objective, units, **components))]
    per_layer = objectives_lib.channel if objective is None else objective
    if isinstance(per_layer, (objectives_lib.Objective, str)) or not callable(per_layer):
        raise InvalidTypeError(f"A whole-model job (layers=...) needs an objective per layer: a function "
                               f"layer -> Objective such as fvis.objectives.channel (from the command line: "
                               f"channel, neuron, deepdream). Received: objective={objective!r}")
    paths = atlas.select_layers(model, layers)
    channels = {layer: atlas.channels(model, layer) for layer in paths}
    widest = max(channels.values())
    return [(layer, prepare(model, per_layer(layer), atlas.units_for_layer(units, channels[layer], widest, layer),
                            **components))
            for layer in paths]


def quality_step(quality, model, *, seed=0, progress="auto"):
    """The quality report as a `fvis.outputs.run_and_write` finish step, or None when disabled.

    The photos of `quality.natural_images` are loaded here, before any compute, so a bad
    folder fails at start-up. The figures are measured once: a run whose results.json
    already holds figures for the same quality settings, photos, model weights, objective
    and images (the `quality_key` recorded beside them) reuses them. `finish.start(job)`, called
    before the job runs, compiles the report's model program on a background thread meanwhile
    (`fvis.quality.compile_in_background`). While it measures, a terminal shows the elapsed time
    (`progress`, see `fvis.progress.phase`); the log gets the headline figures.
    """
    if not quality.enabled:
        return None
    folder = quality.natural_images
    natural = quality_lib.load_photos(folder, model.image_size, channels=model.channels) if folder else None

    programs = {}

    def start(job):
        """Before `job` runs: its quality program traced, and compiled on a background thread."""
        with job.matmul_scope():
            programs[id(job)] = quality_lib.compile_in_background(
                job.forward, job.objective, job.units, job.image_shape, draws=quality.draws, seed=seed,
                compiler_options=job.compiler_options)

    def finish(job, result, folder, summary, previous=None):
        began = time.perf_counter()
        program = programs.pop(id(job), None)
        key = _quality_key(quality, natural, seed, job, result)
        figures = _previous_figures(previous, key, len(summary["filters"]))
        if figures is None:
            with progress_lib.phase("measuring quality", log, progress=progress) as done, job.matmul_scope():
                records, run_summary = quality_lib.measure(job.forward, job.objective, result.units, result.images,
                                                           dead=result.dead, natural=natural, draws=quality.draws,
                                                           seed=seed, program=program, values=result.unit_values)
                run_summary["score"] = quality_lib.score(records, result.dead.reshape(-1))
                done("quality of %d images measured (%s)", len(records), headline(run_summary))
            figures = records, run_summary
        summary["timings"]["quality_s"] = time.perf_counter() - began
        summary["quality_key"] = key
        return report.write(folder, summary, *figures, natural=natural)

    finish.start = start
    return finish


def _digest(*arrays):
    hasher = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        hasher.update(f"{array.dtype}{array.shape}".encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()[:16]


def _quality_key(quality, natural, seed, job, result):
    """A hash of everything that shapes the quality figures: settings, photos, weights, objective, images."""
    photos = None if natural is None else [list(natural[0]), _digest(np.asarray(natural[1]))]
    return outputs.fingerprint({
        "quality": dataclasses.asdict(quality), "photos": photos, "seed": seed, "objective": job.objective.name,
        "weights": _digest(*jax.tree.leaves(job.forward.weights())), "images": _digest(result.units, result.images)})


def _previous_figures(previous, key, count):
    """(records, run summary) from an earlier results.json measured under `key`, else None."""
    try:
        if previous["quality_key"] == key and len(previous["filters"]) == count:
            return [f["quality"] for f in previous["filters"]], previous["quality"]
    except (KeyError, TypeError):
        pass
    return None


def headline(quality_summary):
    """The run's quality in words: "rank-1 selectivity 0.91, robustness 0.70, spectral slope -0.18, score 0.6"."""
    shown = [("rank-1 selectivity", "rank1_fraction"), ("robustness", "robustness_median"),
             ("spectral slope", "spectral_slope_median"), ("score", "score")]
    line = ", ".join(f"{name} {'n/a' if quality_summary.get(key) is None else format(quality_summary[key], '.2f')}"
                     for name, key in shown)
    if quality_summary.get("failed_images"):  # the figures above count them as failures; the live ones beside
        live = quality_summary["live"]["rank1_fraction"]
        line += (f"; {quality_summary['failed_images']} failed images (dead or flat units; live rank-1 "
                 f"{'n/a' if live is None else format(live, '.2f')})")
    return line


def _describe(objective, units, layers, param, transform, optimizer, settings, display, quality):
    """The default `config` of a job run from Python (see `run_job`)."""
    name = getattr(objective, "name", None) or getattr(objective, "__name__", None) or repr(objective)
    return {"objective": name, "filters": repr(units), "layers": layers, "param": repr(param),
            "transform": repr(transform), "optimizer": repr(optimizer), **dataclasses.asdict(settings),
            "display": dataclasses.asdict(display), "quality": dataclasses.asdict(quality)}


def _meta(model, job, layer=None):
    layer = {} if layer is None else {"layer": layer}
    return {"model": model.name, "objective": job.objective.name, **layer, "image_size": list(model.image_size),
            "loop": job.loop, "precision": job.forward.rewrites.precision, "matmul_precision": job.matmul_precision,
            "redirect_relu": job.forward.rewrites.redirect_relu, "compiler_options": job.compiler_options,
            "model_facts": job.facts}


def _run_layers(jobs, out_dir, model, config, display, finish, progress):
    """Runs a whole-model job layer by layer, then writes the atlas and the top results.json."""
    entries, rows, parts = [], [], []
    overall = tqdm(total=sum(len(job.units) for _, job in jobs), unit="filter", desc="all layers",
                   disable=None if progress == "auto" else not progress)
    with overall:
        for index, (layer, job) in enumerate(jobs):
            overall.set_postfix_str(layer)
            folder = Path(out_dir) / atlas.layer_folder(index, layer)
            summary, done = outputs.run_and_write(job, folder, config=config, meta=_meta(model, job, layer),
                                                  display=display, finish=finish, progress=progress)
            overall.update(len(job.units))
            log.info("layer %d/%d (%s) done: %d images -> %s", index + 1, len(jobs), layer, len(job.units), folder)
            parts.append((layer, done))
            entries.append(atlas.layer_entry(index, layer, summary, job.forward.shapes()[layer][-1]))
            rows.append(atlas.layer_row(folder, summary))
    title = f"{model.name}: {jobs[0][1].objective.name.split('(')[0]} over {len(jobs)} layers"
    atlas.write_atlas(out_dir, title, entries, rows, margin=display["margin"])
    summary = {"config": config, "model": model.name, "image_size": list(model.image_size), "layers": entries}
    outputs.atomic_write_json(Path(out_dir) / "results.json", summary)
    log.info("wrote the atlas of %d layers to %s: atlas.png, index.html, results.json", len(jobs), out_dir)
    return summary, _merge_facts(parts)


def _merge_facts(parts):
    """One attempt's facts from each layer's: seconds and chunk counts summed."""
    chunks = {key: sum(done["chunks"][key] for _, done in parts) for key in ("total", "reused", "computed")}
    chunks["recomputed_bad"] = [f"{layer}:{i}" for layer, done in parts for i in done["chunks"]["recomputed_bad"]]
    memory = {layer: done["memory"] for layer, done in parts if done["memory"].get("retries")}
    return {"compile_s": sum(done["compile_s"] for _, done in parts),
            "optimize_s": sum(done["optimize_s"] for _, done in parts), "chunks": chunks,
            "memory": {"retries": memory}}
