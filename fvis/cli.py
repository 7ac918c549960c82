"""The `fvis` command: a thin Hydra layer over the library.

    fvis                                   # the reference job (ResNet50V2, ImageNet)
    fvis model=efficientnet_lite0          # offline ImageNet model
    fvis -m steps=10,30                    # a sweep, one folder per job

The library never imports Hydra; this module composes the config, instantiates
the `_target_` factories it names, and calls `fvis.prepare(...).run(...)`.
"""

import hashlib
import logging
import platform
import re
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import fvis
from fvis import optim, outputs, quality, report
from fvis.errors import FvisError
from fvis.models import _check_image_size
from fvis.visualize import check_positive_int

_MAX_DIR = 120


def run_dir_name(override_dirname):
    """A folder name for a run from its command-line overrides ("default" if none).

    The same command always gives the same folder, so running it again resumes.
    Unsafe characters become "_"; long names are cut and suffixed with a hash.
    """
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", override_dirname) or "default"
    if len(name) > _MAX_DIR:
        name = name[: _MAX_DIR - 13] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


OmegaConf.register_new_resolver("fvis_dir", run_dir_name, replace=True)
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices


def _check_scalars(cfg):
    """Checks the plain config values before anything is loaded or compiled."""
    check_positive_int("steps", cfg.steps)
    check_positive_int("images_per_unit", cfg.images_per_unit)
    if cfg.batch_size != "auto":
        check_positive_int("batch_size", cfg.batch_size)
    optim.check_learning_rate(cfg.lr)
    _check_image_size(cfg.image_size)


def _instantiate(node, **kwargs):
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, FvisError):
            raise cause
        raise


def run(cfg, out_dir):
    """Runs the job a composed config describes and writes its outputs to `out_dir`.

    Returns:
        The dict written to results.json.
    """
    start = time.perf_counter()
    _check_scalars(cfg)
    model = _instantiate(cfg.model, image_size=tuple(cfg.image_size))
    load_s = time.perf_counter() - start
    job = fvis.prepare(
        model, _instantiate(cfg.objective), OmegaConf.to_object(cfg.filters) if OmegaConf.is_config(cfg.filters)
        else cfg.filters, param=_instantiate(cfg.param), transform=_instantiate(cfg.transform),
        optimizer=_instantiate(cfg.optimizer), steps=cfg.steps, batch_size=cfg.batch_size,
        images_per_unit=cfg.images_per_unit, seed=cfg.seed)
    natural = _natural_photos(cfg, model)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    store = outputs.ChunkStore(out_dir, outputs.fingerprint(resolved))
    result = job.run(store=store)
    meta = {
        "model": model.name, "objective": job.objective.name, "image_size": list(model.image_size),
        "units": [int(u) for u in result.units], "batch_size": job.batch_size,
        "timings": {"load_model_s": load_s, "compile_s": result.compile_s, "optimize_s": result.optimize_s,
                    "total_s": time.perf_counter() - start},
        "chunks": {"total": len(job.chunks()), "reused": len(store.reused), "recomputed_bad": store.rejected},
        "dead_filters": [int(u) for u, dead in zip(result.units, result.dead.any(axis=1)) if dead],
        "versions": _versions(),
    }
    summary = outputs.write_run(out_dir, result, config=resolved, meta=meta, crop=cfg.display.crop,
                                mode=cfg.display.mode, margin=cfg.display.margin)
    return _write_quality(cfg, job, result, out_dir, summary, natural) if cfg.quality.enabled else summary


def _natural_photos(cfg, model):
    """The photos of `quality.natural_images` (loaded before any compute), or None."""
    folder = cfg.quality.natural_images if cfg.quality.enabled else None
    return quality.load_photos(folder, model.image_size, channels=model.channels) if folder else None


def _write_quality(cfg, job, result, out_dir, summary, natural):
    """Measures the images (see `fvis.quality`), adds the figures to results.json, writes report.html."""
    start = time.perf_counter()
    records, run_summary = quality.measure(job.forward, job.objective, result.units, result.images,
                                           natural=natural, draws=cfg.quality.draws, seed=cfg.seed)
    summary["timings"]["quality_s"] = time.perf_counter() - start
    return report.write(out_dir, summary, records, run_summary, natural=natural)


def _versions():
    import jax
    import keras
    return {"fvis": getattr(fvis, "__version__", "dev"), "jax": jax.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "device": str(jax.devices()[0].device_kind),
            "device_count": jax.device_count()}


@hydra.main(version_base="1.3", config_path="pkg://fvis.conf", config_name="config")
def main(cfg):
    """Hydra entry point; a bad input prints one line and exits with status 2."""
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg, out_dir)
    except FvisError as e:
        print(f"fvis: error: {e}", file=sys.stderr)
        sys.exit(2)
    t = summary["timings"]
    print(f"fvis: {len(summary['filters'])} images of {summary['objective']} -> {out_dir}/grid.png "
          f"(compile {t['compile_s']:.1f} s, optimise {t['optimize_s']:.1f} s)")
    if "quality" in summary:
        print(f"fvis: quality {_quality_line(summary['quality'])} -> {out_dir}/report.html")


def _quality_line(q):
    shown = [("rank-1 selectivity", q["rank1_fraction"], ".2f"), ("robustness", q["robustness_median"], ".2f"),
             ("spectral slope", q["spectral_slope_median"], ".2f")]
    return ", ".join(f"{name} {'n/a' if v is None else format(v, fmt)}" for name, v, fmt in shown)
