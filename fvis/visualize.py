"""Run a feature-visualization job: check everything, compile once, optimise in chunks.

    import fvis
    model = fvis.models.efficientnet_lite0()
    result = fvis.visualize(model, "block4a_expand_activation", units="0:16")
    fvis.images.save_png("grid.png", fvis.images.grid(fvis.outputs.tiles(result)))

All input is checked before any compilation. Units are split into fixed chunks
of `batch_size`; every chunk runs through the same compiled function (the last
one padded), and each finished chunk can be handed to a store, so a killed job
loses at most the chunk in flight.
"""

import dataclasses
import logging
import time

import numpy as np
from tqdm.auto import tqdm

from fvis import chunks as chunks_lib, devices as devices_lib
from fvis import objectives as objectives_lib
from fvis import optim, params as params_lib, transforms as transforms_lib
from fvis.errors import InvalidTypeError, InvalidValueError, NonFiniteError
from fvis.models import Forward, Rewrites, as_vis_model
from fvis.progress import PROGRESS, bar_shown, ticking
from fvis.render import Rendered, make_renderer
from fvis.settings import Settings
from fvis.units import parse_units

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Result:
    """A job's images and measurements, in the order of `units`.

    Attributes:
        units: (N,) int32 unit indices.
        images: (N, D, H, W, C) float32 in fvis' [-1, 1] space (unclipped).
        curves: (N, D, steps) float32 objective before each update.
        final: (N, D) float32 objective of the final image (no transforms).
        grad_norms: (N, D, steps) float32 gradient norms.
        compile_s: seconds spent compiling (0 if every chunk came from the store).
        optimize_s: seconds spent running the compiled chunks.
    """

    units: np.ndarray
    images: np.ndarray
    curves: np.ndarray
    final: np.ndarray
    grad_norms: np.ndarray
    compile_s: float = 0.0
    optimize_s: float = 0.0

    @property
    def dead(self):
        """(N, D) bool: the gradient was exactly zero at every step (the image never moved)."""
        return np.all(self.grad_norms == 0, axis=-1)

    def _repr_png_(self):
        """The grid as PNG bytes, for notebooks (see `fvis.notebook`)."""
        from fvis import notebook
        return notebook.png_bytes(self)

    def _repr_html_(self):
        """The grid (an embedded PNG) and a table of each image's figures, for notebooks."""
        from fvis import notebook
        return notebook.result_html(self)


@dataclasses.dataclass
class Job:
    """A checked, ready-to-compile job (see `prepare`)."""

    forward: Forward
    objective: objectives_lib.Objective
    units: np.ndarray
    batch_size: int
    images_per_unit: int
    steps: int
    seed: int
    renderer: object
    image_shape: tuple
    loop: str
    mesh: object

    def chunks(self):
        """The fixed chunk schedule: list of (index, units) with len(units) <= batch_size."""
        b = self.batch_size
        return [(i, self.units[s: s + b]) for i, s in enumerate(range(0, len(self.units), b))]

    def _placed(self, chunk_units):
        """The chunk's units padded to batch_size (repeating the last), on the mesh."""
        padded = np.concatenate([chunk_units, np.repeat(chunk_units[-1:], self.batch_size - len(chunk_units))])
        return chunks_lib.put(padded.astype(np.int32), devices_lib.shardings(self.mesh)[1])

    def placed_weights(self):
        """The model weights, replicated on every device of the mesh."""
        return chunks_lib.put(self.forward.weights(), devices_lib.shardings(self.mesh)[0])

    def compile(self, weights):
        """Compiles the chunk function once; returns (chunk, seconds)."""
        start = time.perf_counter()
        chunk = chunks_lib.compile_chunk(
            self.renderer, steps=self.steps, loop=self.loop, mesh=self.mesh, seed=self.seed,
            images_per_unit=self.images_per_unit, weights=weights, units=self._placed(self.units[:1]))
        return chunk, time.perf_counter() - start

    def run(self, *, store=None, progress="auto"):
        """Optimises every chunk not already in `store`; returns a `Result`.

        Args:
            store: optional object with `load(index, units) -> Rendered | None` and
                `save(index, units, rendered)`; finished chunks are saved as they end.
            progress: True, False, or "auto" (a bar when stderr is a terminal): filters
                done, filters/s, time left, and optimisation steps per second. A bar
                opened inside another one (a whole-model job's) is removed when done.

        Raises:
            NonFiniteError: a chunk produced NaN or Inf; earlier chunks stay saved.
        """
        weights = self.placed_weights()
        compiled, compile_s, optimize_s, parts, computed = None, 0.0, 0.0, [], 0
        schedule = self.chunks()
        bar = tqdm(total=len(self.units), unit="filter", disable=bar_shown(progress), desc=self.objective.name,
                   leave=None)
        with bar:
            for index, chunk_units in schedule:
                rendered = store.load(index, chunk_units) if store is not None else None
                if rendered is None:
                    if compiled is None:
                        bar.set_postfix_str("compiling")
                        with ticking(bar):
                            compiled, compile_s = self.compile(weights)
                        log.info("%s: compiled in %.1f s (%d filters per chunk, %d steps)", self.objective.name,
                                 compile_s, self.batch_size, self.steps)
                    start = time.perf_counter()
                    out = chunks_lib.to_host(compiled(weights, self._placed(chunk_units)))
                    rendered = Rendered(*(a[: len(chunk_units)] for a in out))
                    seconds = time.perf_counter() - start
                    optimize_s += seconds
                    computed += 1
                    bar.set_postfix_str(f"{computed * self.steps / max(optimize_s, 1e-9):.1f} steps/s", refresh=False)
                    self._check_finite(rendered, chunk_units)
                    if store is not None:
                        store.save(index, chunk_units, rendered)
                    log.info("chunk %d/%d done: %d filters in %.1f s (%.2f filters/s)", index + 1, len(schedule),
                             len(chunk_units), seconds, len(chunk_units) / max(seconds, 1e-9), extra={PROGRESS: True})
                parts.append(rendered)
                bar.update(len(chunk_units))
        if computed < len(schedule):
            log.info("%d of %d chunks reused from earlier attempts", len(schedule) - computed, len(schedule))
        stacked = Rendered(*(np.concatenate(field) for field in zip(*parts)))
        return Result(self.units, *stacked, compile_s=compile_s, optimize_s=optimize_s)

    def _check_finite(self, rendered, chunk_units):
        for name in ("curves", "grad_norms", "images", "final"):
            bad = ~np.isfinite(getattr(rendered, name))
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                step_bad = ~np.isfinite(rendered.curves[row]) | ~np.isfinite(rendered.grad_norms[row])
                step = int(np.argwhere(step_bad.any(axis=0))[0][0]) if step_bad.any() else self.steps
                raise NonFiniteError(
                    f"Non-finite {name} for {self.objective.name}, filter {int(chunk_units[row])}, first at "
                    f"step {step} of {self.steps}. Finished chunks are kept. Try a smaller lr, another "
                    "optimizer, or a regularizer.")


def prepare(model, objective, units="all", *, param=None, transform=None, optimizer=None, settings=None,
            devices=None, **kwargs):
    """Checks a job and builds everything it needs except the compilation.

    Args:
        model: an `fvis.models.VisModel`, or a Functional/Sequential `keras.Model` whose
            input range fvis knows (see `fvis.models.from_keras`; else wrap it).
        objective: an `fvis.objectives.Objective`, or a layer path (= `channel(layer)`).
        units: which units, see `fvis.units.parse_units` ("all", int, list, "0:64").
        param: parameterization; default `fvis.params.pixel()` (the reference).
        transform: `(key, image) -> image`; default none (the reference).
        optimizer: optax transformation; default `fvis.optim.normalized_ascent(10.0)`.
        settings: an `fvis.Settings` (steps, batch_size, images_per_unit, seed, loop,
            precision); or give those as keyword arguments instead.
        devices: the devices to shard units over; default all of `jax.devices()`.
        **kwargs: the fields of `fvis.Settings`, when `settings` is not given.

    Returns:
        A `Job`; call `job.run()`.

    Raises:
        InvalidValueError, InvalidTypeError, UnitIndexError, UnknownNameError: bad input,
            raised before any compilation or optimisation.
    """
    if settings is None:
        settings = _settings(kwargs)
    elif kwargs:
        raise InvalidTypeError(f"Give either settings= or its fields as keywords, not both. "
                               f"Received: {sorted(kwargs)}")
    model = as_vis_model(model)
    if isinstance(objective, str):
        objective = objectives_lib.channel(objective)
    if not isinstance(objective, objectives_lib.Objective):
        raise InvalidTypeError(f"objective must be an fvis Objective or a layer name. "
                               f"Received: {type(objective).__name__}")
    if objective.group_fn is not None and settings.images_per_unit < 2:
        raise InvalidValueError(f"{objective.name} has a group term (diversity) that compares a unit's images; "
                                f"it needs images_per_unit >= 2. Received: images_per_unit={settings.images_per_unit}")
    layers = [p for p in objective.layers if p != objectives_lib.INPUT] or [model.default_path]
    rewrites = Rewrites(precision=settings.precision, cpu_ops=devices_lib.auto_setting("cpu_ops"))
    forward = model.forward(layers, rewrites)
    units = parse_units(units, objective.num_units(forward.shapes()))
    mesh = devices_lib.unit_mesh(devices)
    batch_size = settings.batch_size
    if batch_size == "auto":
        batch_size = devices_lib.auto_batch_size(len(units), mesh.size)
    batch_size = devices_lib.round_up(min(batch_size, len(units)), mesh.size)
    loop = devices_lib.auto_loop(model) if settings.loop == "auto" else settings.loop
    image_shape = (*model.image_size, model.channels)
    renderer = make_renderer(
        forward, objective, param=param or params_lib.pixel(), transform=transform or transforms_lib.identity(),
        optimizer=optimizer or optim.normalized_ascent(10.0), image_shape=image_shape)
    return Job(forward, objective, units, batch_size, settings.images_per_unit, settings.steps, settings.seed,
               renderer, image_shape, loop, mesh)


def _settings(kwargs):
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise InvalidTypeError(f"Unknown setting(s) {unknown}; fvis.prepare takes {sorted(names)} (see fvis.Settings). "
                               f"The compilation cache is set by fvis.devices.use_compilation_cache(), before the "
                               f"model is built. Received: {unknown}")
    return Settings(**kwargs)


def visualize(model, objective, units="all", *, store=None, progress="auto", **settings):
    """Optimises one image per unit (or `images_per_unit`) to maximise `objective`.

    Shorthand for `prepare(model, objective, units, **settings).run(store=..., progress=...)`;
    see `prepare` for the arguments and errors.

    Returns:
        A `Result`.
    """
    return prepare(model, objective, units, **settings).run(store=store, progress=progress)
