"""Picture quality, measured: how strongly, selectively and robustly each image drives its
unit, and how natural its spectrum is.

For a finished job's images (N units x D images each, flattened to N*D):

- activation: the objective on the image as is (`Result.final`: a job's finish program
  scores each final image on every unit, `Result.unit_values`; recomputed where absent);
- selectivity rank: z-score each requested unit's activation over the run's images,
  then rank the image's own unit among all requested units (1 = it drives its own
  unit more, relative to that unit's spread, than any other unit);
- robustness: the objective after a random jitter (+-8 px) and rescaling (+-10 %),
  as a fraction of the objective as is; the median over several draws. Images that
  only work pixel-exactly are adversarial patterns rather than pictures;
- spectral slope: the slope of the radially averaged power spectrum on log-log axes
  (photographs about -2 to -3, white noise 0; van der Schaaf & van Hateren 1996);
- natural ratio (with a folder of photos): the activation as a multiple of the best
  photo's activation for that unit, and each unit's top photos.

A failed image cannot flatter a summary: an image that never moved (a dead unit, see
`fvis.Result.dead`), and every image of a unit whose value is the same on all the
run's images (an all-zero column, which ties at the top of any ranking), counts as a
failure in every summary figure: not ranked first, robustness 0, spectral slope 0
(white noise). The figures over the live images alone stand beside them.

Everything runs in JAX: jitted, the model weights as arguments, images in fixed-size
batches of the backend's measured size (`fvis.devices.AUTO`), one compilation per
job: one model program serves the images and photos as they are (one forward per image
for every unit; none for a job's images that come with their `unit_values`) and the
robustness draws.
"""

import math
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from fvis import devices, transforms
from fvis.images import load_photo, photo_paths
from fvis.objectives import INPUT


def map_batches(fn, arrays, batch_size, *, workers=1):
    """Applies `fn(*batch)` to fixed-size slices of `arrays` along axis 0 and concatenates.

    The last slice is padded by repeating its last row, so `fn` (jit it) compiles once.
    With `workers` > 1 the slices after the first run on that many threads: a compiled
    call releases the GIL, so a CPU's cores the call leaves idle take the next slice
    (the first slice runs alone, so `fn` compiles once).
    """
    n = len(arrays[0])

    def run(start):
        part = [a[start: start + batch_size] for a in arrays]
        short = batch_size - len(part[0])
        part = [np.concatenate([p, np.repeat(p[-1:], short, axis=0)]) if short else p for p in part]
        return np.asarray(fn(*part))[: batch_size - short]

    starts = range(0, n, batch_size)
    outs = [run(start) for start in starts[:1]]
    if workers > 1 and len(starts) > 2:
        with ThreadPoolExecutor(workers) as pool:
            outs += pool.map(run, starts[1:])
    else:
        outs += [run(start) for start in starts[1:]]
    return np.concatenate(outs)


def default_batch_size(batch_size=None):
    """`batch_size`, or the backend's measured default (`fvis.devices.AUTO` "quality_batch_size")."""
    return devices.auto_setting("quality_batch_size") if batch_size is None else batch_size


def _values(forward, objective, weights, image, units):
    """The objective for each of `units` on ONE (H, W, C) image: (U,) float32."""
    acts = forward(weights, image)
    acts[INPUT] = image
    return jax.vmap(lambda unit: objective(acts, unit))(units)


def values_function(forward, objective, *, draws=8, jitter=8, scale=0.1, seed=0, compiler_options=None):
    """The quality report's one model program: the objective for a set of units on a
    batch of images, each as it is or after one robustness draw (one forward per image).

    Draw d >= 0 of image i is the transform (jitter +-`jitter` px, then rescaling by
    1 +- `scale`) keyed by `split(fold_in(key(seed), i), draws)[d]`; d < 0 keeps the
    image as it is. Build it once per job and pass it to `unit_values` and `robustness`:
    each call with the same shapes reuses its compilation (units, indices and draws are
    arguments, so the job's images, its photos and the draws share it; so is the seed, so
    the jobs of a seed sweep share it through the compilation cache). `compiler_options`:
    XLA's options to compile it with (`fvis.Job.compiler_options`); default the backend's
    (`fvis.devices.compiler_options`).

    Returns:
        `(weights, images (B, H, W, C) float32, units (U,) int32, index (B,) int32,
        draw (B,) int32) -> (B, U) float32`, the jitted program with `seed` bound (its
        `.program` takes the seed, a uint32 scalar, as a sixth argument).
    """
    move = transforms.compose([transforms.jitter(jitter), transforms.random_scale((1 - scale, 1 + scale))])

    def quality_values(w, image, units, index, draw, seed):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), index), draws)
        x = jnp.where(draw >= 0, move(keys[jnp.maximum(draw, 0)], image), image)
        return _values(forward, objective, w, x, units)

    options = devices.compiler_options() if compiler_options is None else compiler_options
    return _Seeded(jax.jit(jax.vmap(quality_values, (None, 0, None, 0, 0, None)), compiler_options=options), seed)


class _Seeded:
    """A quality program (jitted or compiled) called without its last argument, the seed: bound here
    as a uint32 (`key(uint32 s)` is `key(s)` for seeds in [0, 2**32))."""

    def __init__(self, program, seed):
        self.program, self.seed = program, np.uint32(seed)

    def __call__(self, weights, images, units, index, draw):
        return self.program(weights, images, units, index, draw, self.seed)


def compile_in_background(forward, objective, units, image_shape, *, draws=8, jitter=8, scale=0.1, seed=0,
                          batch_size=None, compiler_options=None):
    """Traces the quality report's model program (`values_function`) for a job's shapes now, and
    compiles it on a background thread.

    XLA compiles on one core, about a second for ResNet50V2, while it does not hold Python's
    GIL: started before the job compiles and optimises, the compilation is done by the time
    the images are ready. Trace in the thread that traces the job (the model rewrites swap
    functions while a model is traced), under the job's matmul precision.

    Args:
        forward, objective: the job's (`job.forward`, `job.objective`).
        units: (U,) int, the job's units (the program's unit axis).
        image_shape: (H, W, C) of the job's images.
        draws, jitter, scale, seed: the robustness settings `measure` will be called with.
        batch_size: images per compiled call; default the backend's (`default_batch_size`).
        compiler_options: XLA's options (`fvis.Job.compiler_options`); default the backend's.

    Returns:
        A `concurrent.futures.Future` of the compiled program: a callable with
        `values_function`'s signature for batches of `batch_size` images and U units. Pass it
        as `measure(..., program=...)` with the same settings.
    """
    function = values_function(forward, objective, draws=draws, jitter=jitter, scale=scale, seed=seed,
                               compiler_options=compiler_options)
    batch = default_batch_size(batch_size)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    weights = jax.tree.map(lambda w: spec(np.shape(w), np.asarray(w).dtype), forward.weights())
    lowered = function.program.lower(weights, spec((batch, *image_shape), jnp.float32), spec((len(units),), jnp.int32),
                                     spec((batch,), jnp.int32), spec((batch,), jnp.int32), spec((), jnp.uint32))
    pool = ThreadPoolExecutor(1, thread_name_prefix="fvis-quality-compile")
    try:
        return pool.submit(lambda: _Seeded(lowered.compile(), function.seed))
    finally:
        pool.shutdown(wait=False)


def _rows(function, weights, images, units, index, draw, batch_size):
    """`function` on the rows (images[index[r]], draw[r]) in batches, the images gathered per batch
    (a job's images times its draws would not fit in memory): (R, U) float32."""
    return map_batches(lambda i, d: function(weights, images[i], units, i, d), [index, draw], batch_size,
                       workers=devices.auto_setting("quality_workers"))


def unit_values(forward, objective, images, units, *, batch_size=None, function=None):
    """(M, H, W, C) images x (U,) units -> (M, U) float32 objective values.

    Args:
        batch_size: images per compiled call; default the backend's (`default_batch_size`).
        function: the job's `values_function` to reuse; default a new one.
    """
    function = function or values_function(forward, objective)
    index = np.arange(len(images), dtype=np.int32)
    return _rows(function, forward.weights(), np.asarray(images, np.float32), jnp.asarray(units, jnp.int32), index,
                 np.full_like(index, -1), default_batch_size(batch_size))


def selectivity_ranks(values, own):
    """Rank of each image's own unit after z-scoring each unit over the images.

    Args:
        values: (M, U) activations of M images for U units.
        own: (M,) int, the column of each image's own unit.

    Returns:
        (M,) int32 in [1, U]; 1 when the own unit has the highest z-score.
    """
    # in numpy, not a jitted program: a fused program may round the own column's z-score differently
    # in its two uses, and rank an image below itself (and jax op by op compiles a program per op)
    values = np.asarray(values, np.float32)
    z = (values - values.mean(0)) / (values.std(0) + np.float32(1e-8))
    mine = np.take_along_axis(z, np.asarray(own)[:, None], axis=1)
    return (1 + np.sum(z > mine, axis=1)).astype(np.int32)


def robustness(forward, objective, images, units, *, draws=8, jitter=8, scale=0.1, seed=0, batch_size=None,
               base=None, function=None, unit_set=None):
    """Median over `draws` of objective(transformed image) / objective(image).

    Args:
        images: (M, H, W, C) float32 in fvis' [-1, 1] space.
        units: (M,) int, the unit of each image.
        jitter: shifts of up to +-jitter pixels; scale: rescaling by 1 +- scale.
        batch_size: forwards (image-draw pairs) per compiled call; default the backend's.
        base: optional (M,) float32, the objective of each image as is (e.g. from
            `unit_values`); computed here when None.
        function: a `values_function` built with the same draws, jitter, scale and
            seed, to reuse; unit_set: (U,) int, the units to pass it (default the distinct
            `units`; the job's units reuse the compilation of `unit_values`).

    Returns:
        (M,) float64; NaN where the objective as is is <= 0 (no meaningful fraction;
        its draws are not computed). Image i's draws come from `fold_in(key(seed), i)`.
    """
    function = function or values_function(forward, objective, draws=draws, jitter=jitter, scale=scale, seed=seed)
    weights, batch_size = forward.weights(), default_batch_size(batch_size)
    images, units = np.asarray(images, np.float32), np.asarray(units, np.int32)
    unit_set = np.unique(units) if unit_set is None else np.asarray(unit_set, np.int32)
    column = {int(u): c for c, u in enumerate(unit_set)}
    own = np.array([column[int(u)] for u in units], np.int64)
    index = np.arange(len(images), dtype=np.int32)
    if base is None:
        base = _rows(function, weights, images, unit_set, index, np.full_like(index, -1), batch_size)[index, own]
    base = np.asarray(base, np.float32)
    out = np.full(len(images), np.nan)
    live = index[base > 0]
    if len(live):
        rows = np.repeat(live, draws)
        moved = _rows(function, weights, images, unit_set, rows, np.tile(np.arange(draws, dtype=np.int32), len(live)),
                      batch_size)[np.arange(len(rows)), own[rows]]
        out[live] = np.median(moved.reshape(len(live), draws) / base[live, None], axis=1)
    return out


def spectral_slope(image):
    """Slope of the radially averaged power spectrum of ONE image, on log-log axes.

    The image is averaged over channels, its mean removed and a Hann window applied;
    power is averaged in rings one frequency step wide (1 / min(H, W) cycles per
    pixel) and a line is fitted to log power against log frequency from the lowest
    non-zero ring to the Nyquist frequency.

    Args:
        image: (H, W, C) float array, any range (the slope is scale-invariant).

    Returns:
        float32 scalar: about 0 for white noise, -2 for a 1/f amplitude spectrum.
    """
    h, w = image.shape[:2]
    x = jnp.mean(image, axis=-1)
    x = (x - jnp.mean(x)) * (jnp.hanning(h)[:, None] * jnp.hanning(w)[None, :])
    power = jnp.abs(jnp.fft.fft2(x)) ** 2
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    rings = np.rint(np.sqrt(fy ** 2 + fx ** 2) * min(h, w)).astype(np.int32).ravel()
    top = min(h, w) // 2
    sums = jax.ops.segment_sum(power.ravel(), rings, num_segments=top + 1)
    counts = np.bincount(rings, minlength=top + 1)[: top + 1]
    log_f = np.log(np.arange(1, top + 1, dtype=np.float64)).astype(np.float32)
    log_p = jnp.log(sums[1:] / counts[1:] + 1e-30)
    dx = log_f - log_f.mean()
    return jnp.sum(dx * (log_p - log_p.mean())) / jnp.sum(dx * dx)


SLOPE_BATCH = 64  # images per compiled call of `spectral_slopes`: bounds its memory, compiles once


def spectral_slopes(images):
    """(M, H, W, C) -> (M,) float64 spectral slopes (see `spectral_slope`)."""
    return map_batches(_slopes, [np.asarray(images, np.float32)], min(len(images), SLOPE_BATCH)).astype(np.float64)


_slopes = jax.jit(jax.vmap(spectral_slope))


def load_photos(folder, image_size, *, channels=3):
    """The photos of a folder, centre-cropped and resized, in fvis' [-1, 1] space.

    Returns:
        (names, images): sorted file names and (M, H, W, channels) float32.

    Raises:
        MissingFileError: no folder, or no image in it.
    """
    paths = photo_paths(folder, purpose="the natural-image comparison (quality.natural_images)")
    return [p.name for p in paths], np.stack([load_photo(p, image_size, channels=channels) for p in paths])


def _finite(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _median(values):
    values = np.asarray([v for v in values if v is not None], np.float64)
    return float(np.median(values)) if len(values) else None


def measure(forward, objective, units, images, *, dead=None, natural=None, draws=8, jitter=8, scale=0.1, seed=0,
            top_k=3, batch_size=None, program=None, values=None):
    """The quality report of a job's images.

    Each image goes once through the model for all units (activation, selectivity, the
    base of robustness, and likewise each photo; the job's images need not when `values`
    are given), and once per robustness draw, in one model program compiled once per call
    (`values_function`).

    Args:
        forward: the job's `fvis.models.Forward` (`job.forward`).
        objective: the job's `Objective`.
        units: (N,) int unit indices; images: (N, D, H, W, C) float32 in [-1, 1] space.
        dead: optional (N, D) bool, the images that never moved (`Result.dead`).
        natural: optional (names, photos (M, H, W, C)) from `load_photos`.
        draws, jitter, scale, seed: robustness settings (see `robustness`).
        top_k: photos listed per unit.
        batch_size: forwards per compiled call; default the backend's (`default_batch_size`).
        program: optional, `compile_in_background`'s future (or its result) for these units,
            settings and batch size: then nothing is traced or compiled here.
        values: optional (N, D, N) float32, the objective of each image as is for every unit
            (`fvis.Result.unit_values`, computed with the final images by the job): then the
            images go through the model only for the robustness draws.

    Raises:
        ValueError: `values` is not (N, D, N).

    Returns:
        (records, summary): N*D dicts in unit-major order with "activation",
        "selectivity_rank" (None for an objective without units), "robustness",
        "spectral_slope", "failed" and, with photos, "natural_ratio" and "top_natural";
        and the run's summary: "rank1_fraction", "robustness_median",
        "spectral_slope_median" over all images with failures counted as failures (see
        the module docstring), "activation_median", ["natural_ratio_median"], the same
        over the live images in "live", "failed_images", "failed_units" and the settings.
    """
    units, images = np.asarray(units), np.asarray(images, np.float32)
    n, d = images.shape[:2]
    if values is not None and np.shape(values) != (n, d, n):
        raise ValueError(f"measure's values must be (N, D, N) = {(n, d, n)} for {n} units of {d} images each "
                         f"(fvis.Result.unit_values). Received: shape {np.shape(values)}")
    flat, own = images.reshape(n * d, *images.shape[2:]), np.repeat(np.arange(n), d)
    if program is None:
        values_fn = values_function(forward, objective, draws=draws, jitter=jitter, scale=scale, seed=seed)
    else:
        values_fn = program.result() if hasattr(program, "result") else program
    if values is None:
        values = unit_values(forward, objective, flat, units, batch_size=batch_size, function=values_fn)
    else:
        values = np.asarray(values, np.float32).reshape(n * d, n)
    activation = values[np.arange(n * d), own]
    never_moved = np.zeros(n * d, bool) if dead is None else np.asarray(dead, bool).reshape(n * d)
    failed = never_moved | (np.ptp(values, axis=0) == 0)[own]
    takes_units = objective.num_units(forward.shapes()) is not None
    ranks = selectivity_ranks(values, own) if takes_units else [None] * (n * d)
    robust = robustness(forward, objective, flat, units[own], draws=draws, jitter=jitter, scale=scale, seed=seed,
                        batch_size=batch_size, base=activation, function=values_fn, unit_set=units)
    slopes = spectral_slopes(flat)
    records = [{"activation": _finite(a), "selectivity_rank": None if r is None else int(r),
                "robustness": _finite(b), "spectral_slope": _finite(s), "failed": bool(f)}
               for a, r, b, s, f in zip(activation, ranks, robust, slopes, failed)]
    live = ~failed
    summary = {
        **_figures(records, failed, takes_units, counted=np.ones(n * d, bool)),
        "live": _figures(records, failed, takes_units, counted=live),
        "failed_images": int(failed.sum()),
        "failed_units": [int(u) for u in units[np.unique(own[failed])]],
        "settings": {"draws": draws, "jitter_px": jitter, "scale": scale, "seed": seed},
    }
    if natural is not None:
        photo_values = unit_values(forward, objective, natural[1], units, batch_size=batch_size, function=values_fn)
        _add_natural(records, summary, natural[0], photo_values, own, activation, top_k)
    return records, summary


def _figures(records, failed, takes_units, counted):
    """The summary figures over the records where `counted`, a failed one scoring as a failure."""
    chosen = [(r, f) for r, f, c in zip(records, failed, counted) if c]
    worst = lambda key, bad: [bad if f else r[key] for r, f in chosen]
    return {
        "rank1_fraction": (float(np.mean([r["selectivity_rank"] == 1 and not f for r, f in chosen]))
                           if takes_units and chosen else None),
        "robustness_median": _median(worst("robustness", 0.0)),
        "spectral_slope_median": _median(worst("spectral_slope", 0.0)),
        "activation_median": _median(r["activation"] for r, _ in chosen),
    }


def _add_natural(records, summary, names, values, own, activation, top_k):
    """Adds the natural ratio and top photos to `records`; `values`: (M photos, N units)."""
    best = values.max(axis=0)
    order = np.argsort(-values, axis=0, kind="stable")[:top_k]
    for record, column, a in zip(records, own, activation):
        record["natural_ratio"] = _finite(a / best[column]) if best[column] > 0 else None
        record["top_natural"] = [{"name": names[m], "activation": float(values[m, column])} for m in order[:, column]]
    summary["natural_ratio_median"] = _median(r["natural_ratio"] for r in records)
    summary["live"]["natural_ratio_median"] = _median(r["natural_ratio"] for r in records if not r["failed"])
    summary["natural_images"] = len(names)


def score(records, dead):
    """The run's one quality figure for a search (a sweeper maximises it): in [0, 1].

    Each image counts its robustness, capped at 1, when its own unit ranks first
    (selectivity rank 1) and it moved; otherwise 0. The mean is over ALL images,
    so dead units (zero gradient at every step), images that drive another unit
    more, and pixel-exact patterns that fall apart after a small shift all pull it
    down, and no single unit can carry it (each image adds at most 1/N).

    Args:
        records: N*D per-image dicts from `measure` ("selectivity_rank", "robustness").
        dead: N*D bools in the same order, True where the image never moved.

    Returns:
        float, or None for an objective without units (no selectivity rank).
    """
    records, dead = list(records), list(dead)
    if len(records) != len(dead):
        raise ValueError(f"score needs one dead flag per image. Received: {len(records)} images, {len(dead)} flags")
    if not records or any(r["selectivity_rank"] is None for r in records):
        return None
    credit = [0.0 if d or r.get("failed") or r["selectivity_rank"] != 1 or r["robustness"] is None
              else min(max(r["robustness"], 0.0), 1.0) for r, d in zip(records, dead)]
    return float(np.mean(credit))
