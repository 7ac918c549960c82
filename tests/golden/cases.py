"""The golden cases: small jobs whose results are kept in tests/golden/<case>.npz.

Each case is one `fvis.prepare(...).run()` plus the quality report of its images
(`fvis.quality.measure`), with everything fixed: model, layer, units, preset, steps,
seed. `compute(case, model)` returns a case's results as a flat dict of numpy arrays, the
layout of the .npz files; `make_golden.py` writes them, `tests/test_golden.py`
compares a fresh computation with them.
"""

import dataclasses
import json
import platform
from importlib import metadata

import jax
import numpy as np
import optax

import fvis
from fvis import models, optim, params, quality, transforms
from tests.conftest import SHARED

MOBILENET_WEIGHTS = ("weights", "mobilenet_0.25_224.weights.h5")  # under ../shared

# The presets, as the experiment configs set them (conf/experiment/*.yaml), with fewer steps.
PRESETS = {
    "seed": lambda: dict(param=params.pixel(), transform=None, optimizer=optim.normalized_ascent(10.0)),
    "lucid": lambda: dict(param=params.fourier(decay_power=1.25), transform=transforms.standard(), optimizer=optax.adam(0.05),
                          redirect_relu=True),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One golden job: `model` is "tiny" (32x32) or "mobilenet" (0.25, real weights, 64x64)."""

    model: str
    layer: str
    units: tuple
    preset: str
    steps: int


CASES = {
    "tiny_seed": Case("tiny", "conv3", (0, 10, 20, 30), "seed", 10),
    "tiny_lucid": Case("tiny", "conv2", (0, 5, 10, 15), "lucid", 10),
    "mobilenet_seed": Case("mobilenet", "conv_pw_5_relu", (0, 1, 2), "seed", 8),
    "mobilenet_lucid": Case("mobilenet", "conv_pw_5_relu", (0, 1, 2), "lucid", 8),
}

QUALITY = dict(draws=8, seed=0)  # fvis' defaults (quality.draws, seed)

# Allowed |fresh - golden| per entry, as a fraction of the largest |golden| entry of that
# array in that case (so a dead unit's 0.0 or a near-zero start is held to the array's
# scale, not to itself). Measured (README.md) under loop, batch size, device count, thread
# count, cpu_ops off and XLA fast math, the largest differences were 5.6e-5 for images,
# 8.2e-6 for objective values and 8.3e-6 for the robustness and slope figures (all
# under fast math; 1.6e-5, 2.0e-6 and 2.2e-6 without it): margins of 12x to 120x.
TOLERANCES = {
    "images": 1e-3,
    "curves": 1e-4, "final": 1e-4, "grad_norms": 1e-4, "q_activation": 1e-4, "qs_activation_median": 1e-4,
    "q_robustness": 1e-3, "q_spectral_slope": 1e-3, "qs_robustness_median": 1e-3, "qs_spectral_slope_median": 1e-3,
}
EXACT = ("units", "dead", "q_selectivity_rank", "qs_rank1_fraction", "qs_settings")  # must be equal
RESULT_KEYS = ("units", "images", "curves", "final", "grad_norms", "dead")
QUALITY_KEYS = tuple(k for k in (*TOLERANCES, *EXACT) if k.startswith("q"))


def scaled_difference(golden, fresh):
    """max |fresh - golden| / max |golden| over finite entries; inf where shapes or NaN positions differ."""
    golden, fresh = np.asarray(golden, np.float64), np.asarray(fresh, np.float64)
    if golden.shape != fresh.shape or np.any(np.isnan(golden) != np.isnan(fresh)):
        return np.inf
    finite = ~np.isnan(golden)
    if not finite.any():
        return 0.0
    scale = np.abs(golden[finite]).max()
    worst = np.abs(fresh[finite] - golden[finite]).max()
    return worst / scale if scale > 0 else (np.inf if worst > 0 else 0.0)


def mismatches(golden, fresh, keys):
    """One line for each of `keys` where `fresh` differs from `golden` beyond `TOLERANCES` (or at all, for `EXACT`)."""
    lines = []
    for key in keys:
        g, f = golden[key], fresh[key]
        if key in EXACT:
            if np.shape(g) != np.shape(f) or not np.array_equal(g, f):
                lines.append(f"{key}: golden {np.asarray(g).tolist()} != now {np.asarray(f).tolist()}")
        elif np.shape(g) != np.shape(f):
            lines.append(f"{key}: shape {np.shape(g)} -> {np.shape(f)}")
        elif np.any(np.isnan(g) != np.isnan(f)):
            lines.append(f"{key}: NaN (None) where golden {np.isnan(g).tolist()} != now {np.isnan(f).tolist()}")
        elif (d := scaled_difference(g, f)) > TOLERANCES[key]:
            lines.append(f"{key}: max |difference| = {d:.3g} of max |golden| > {TOLERANCES[key]:g}")
    return lines


def build_model(name):
    """The case's `VisModel`; "mobilenet" needs ../shared (see tests/conftest.py)."""
    if name == "tiny":
        return models.tiny_convnet(image_size=(32, 32))
    return models.keras_application("MobileNet", alpha=0.25, weights=str(SHARED.joinpath(*MOBILENET_WEIGHTS)),
                                    include_top=True, image_size=(64, 64))


def compute(case, model, **settings):
    """Runs `case` on `model`; returns {name: numpy array}, the layout of a golden .npz.

    `settings` override `fvis.prepare`'s (e.g. loop="scan", batch_size=4): the golden
    files use the defaults, and tolerances were measured by varying these. The only
    place the golden tests reach into a job (`job.forward`, `job.objective`), as the
    `fvis` command does for its quality report.
    """
    job = fvis.prepare(model, case.layer, list(case.units), steps=case.steps, **PRESETS[case.preset](), **settings)
    result = job.run(progress=False)
    records, summary = quality.measure(job.forward, job.objective, result.units, result.images, dead=result.dead,
                                       **QUALITY)
    column = lambda key, dtype, missing=np.nan: np.array([missing if r[key] is None else r[key] for r in records],
                                                         dtype)
    return {
        "units": result.units, "images": result.images, "curves": result.curves, "final": result.final,
        "grad_norms": result.grad_norms, "dead": result.dead,
        "q_activation": column("activation", np.float64),
        "q_selectivity_rank": column("selectivity_rank", np.int64, missing=-1),
        "q_robustness": column("robustness", np.float64),
        "q_spectral_slope": column("spectral_slope", np.float64),
        **{f"qs_{k}": np.float64(np.nan if v is None else v) for k, v in summary.items()
           if not isinstance(v, (dict, list))},
        "qs_settings": np.array(json.dumps(summary["settings"], sort_keys=True)),
    }


def versions():
    """What the results were computed with, as a JSON string (stored in each .npz as "versions")."""
    names = ["jax", "jaxlib", "keras", "numpy", "optax"]
    return json.dumps({"python": platform.python_version(), "machine": platform.machine(),
                       **{n: metadata.version(n) for n in names}, "backend": jax.default_backend()}, sort_keys=True)
