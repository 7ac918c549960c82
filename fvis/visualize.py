"""Run a feature-visualization job: check everything, compile once, optimise in chunks.

    import fvis
    model = fvis.models.efficientnet_lite0()
    result = fvis.visualize(model, "block4a_expand_activation", units="0:16")
    fvis.images.save_png("grid.png", fvis.images.grid(fvis.outputs.tiles(result)))

All input is checked before any compilation. Units are split into fixed chunks
of `batch_size`; every chunk runs through the same compiled function (the last
one padded), `workers` of them at once from their own threads, and each finished
chunk can be handed to a store, so a killed job loses at most the chunks in flight.
"""

import dataclasses
import logging
import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fvis import chunks as chunks_lib, devices as devices_lib, memory
from fvis import objectives as objectives_lib
from fvis import matmul_precision as matmul_lib, optim, params as params_lib, transforms as transforms_lib
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
        transparency: (N, D, H, W) float32 in [0, 1], MaCo's transparency map of each image
            (`fvis.render.transparency`).
        snapshots: (N, D, S, H, W, C) float32, the images after each of `snapshot_steps`.
        unit_values: (N, D, N) float32, the objective of each final image (no transforms) for
            every unit of `units`, in order (`final` is its own unit's column): the quality
            report's activations and selectivity. None when a chunk came from a store that
            did not keep them (the report then computes them).
        snapshot_steps: (S,) int32, the step counts of the snapshots (`Settings.snapshots`).
        compile_s: seconds spent compiling (0 if every chunk came from the store).
        optimize_s: seconds spent running the compiled chunks.
        batch_sizes: per chunk, the batch size it was computed at (the job's, or less
            after running out of memory).
        memory: JSON-able facts of this run: XLA's estimate for a chunk and the budget
            it was checked against (bytes), and the chunks retried at a smaller batch size.
        matmul_precision: what the job's float32 matmuls and convolutions ran in
            (`Job.matmul_precision`), with "in_program": the precision each dot and
            convolution of the compiled programs carried (`fvis.matmul_precision.in_program`),
            None when no chunk was compiled in this run.
    """

    units: np.ndarray
    images: np.ndarray
    curves: np.ndarray
    final: np.ndarray
    grad_norms: np.ndarray
    transparency: np.ndarray
    snapshots: np.ndarray
    unit_values: np.ndarray = None
    snapshot_steps: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    compile_s: float = 0.0
    optimize_s: float = 0.0
    batch_sizes: list = dataclasses.field(default_factory=list)
    memory: dict = dataclasses.field(default_factory=dict)
    matmul_precision: dict = dataclasses.field(default_factory=dict)

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
    facts: dict = dataclasses.field(default_factory=dict)
    snapshot_steps: tuple = ()
    auto_batch: bool = False  # batch_size was "auto": fitted to memory rather than refused
    matmul_precision: dict = dataclasses.field(default_factory=lambda: matmul_lib.describe("auto"))
    in_program: dict = None  # the compiled programs' dot and convolution precisions, once compiled
    workers: int = 1  # chunks optimised at once, each from its own thread (see `run`)
    compiler_options: dict = dataclasses.field(default_factory=dict)  # XLA's, for every program of the job

    def chunks(self):
        """The fixed chunk schedule: list of (index, units) with len(units) <= batch_size."""
        b = self.batch_size
        return [(i, self.units[s: s + b]) for i, s in enumerate(range(0, len(self.units), b))]

    def _placed(self, chunk_units, batch_size=None):
        """The chunk's units padded to `batch_size` (default the job's; repeating the last), on the mesh."""
        size = batch_size or self.batch_size
        padded = np.concatenate([chunk_units, np.repeat(chunk_units[-1:], size - len(chunk_units))])
        return chunks_lib.put(padded.astype(np.int32), devices_lib.shardings(self.mesh)[1])

    def placed_weights(self):
        """The model weights, replicated on every device of the mesh."""
        return chunks_lib.put(self.forward.weights(), devices_lib.shardings(self.mesh)[0])

    def compile(self, weights):
        """Compiles the chunk function once; returns (chunk, seconds)."""
        chunk, _, seconds = self.compile_sized(weights, self.batch_size)
        return chunk, seconds

    def compile_sized(self, weights, batch_size):
        """Compiles the chunk function for `batch_size` units, under the job's matmul precision.

        Returns:
            (chunk, its `fvis.memory.Estimate` per device or None, seconds).
        """
        start = time.perf_counter()
        with self.matmul_scope():
            chunk, estimate = chunks_lib.compile_chunk(
                self.renderer, steps=self.steps, loop=self.loop, mesh=self.mesh, seed=self.seed,
                images_per_unit=self.images_per_unit, weights=weights, units=self._placed(self.units[:1], batch_size),
                value_units=self.units, on_lowered=self._read_programs, compiler_options=self.compiler_options)
        return chunk, estimate, time.perf_counter() - start

    def matmul_scope(self):
        """The context under which the job's model is traced: float32 dots and convolutions at
        `matmul_precision["level"]` (`jax.default_matmul_precision`)."""
        return jax.default_matmul_precision(self.matmul_precision["level"])

    def _read_programs(self, lowered):
        self.in_program = matmul_lib.in_program(program.as_text() for program in lowered.values())

    def program_precisions(self):
        """The dot and convolution precisions of the job's programs (`fvis.matmul_precision.in_program`):
        those compiled in this process, else the programs lowered (traced, not compiled) now."""
        if self.in_program is None:
            with self.matmul_scope():
                self._read_programs(chunks_lib.lower_chunk(
                    self.renderer, steps=self.steps, loop=self.loop, mesh=self.mesh, seed=self.seed,
                    images_per_unit=self.images_per_unit, weights=self.placed_weights(),
                    units=self._placed(self.units[:1]), value_units=self.units,
                    compiler_options=self.compiler_options)[0])
        return self.in_program

    def smaller_batch(self, batch_size):
        """Half of `batch_size`, rounded up to a multiple of the device count; None if that is not smaller."""
        half = devices_lib.round_up(max(1, batch_size // 2), self.mesh.size)
        return half if half < batch_size else None

    def run(self, *, store=None, progress="auto"):
        """Optimises every chunk not already in `store`; returns a `Result`.

        Before the first chunk is optimised, its compiled program's memory estimate is
        checked against what the devices have (`fvis.memory`): with batch_size="auto" the
        batch is halved until it fits, an explicit batch_size that does not fit is refused.
        A chunk that still runs out of memory is computed again in parts of half the batch
        size (and half again), and so are the chunks after it; each chunk's batch size is
        in `Result.batch_sizes`, and saved with the chunk so a resumed job continues at it.

        The chunk programs compile first; then up to `workers` chunks run at once, each called
        from its own thread (a compiled call releases the GIL; on a CPU one small image's step
        leaves cores idle between its ops). Each chunk is the same compiled program on the
        same inputs, so the images do not depend on `workers`; chunks are checked and saved in
        this thread, in schedule order, so the error raised, and what is saved before it, do
        not depend on timing.

        Args:
            store: optional object with `load(index, units) -> Rendered | None` and
                `save(index, units, rendered)`; finished chunks are saved as they end. A chunk
                computed at a smaller batch size than the job's is saved with
                `batch_size=` that size, and the store's optional dict `batch_sizes`
                {index: batch size} gives it back for the chunks it loaded.
            progress: True, False, or "auto" (a bar when stderr is a terminal): filters
                done, filters/s, time left, and optimisation steps per second. A bar
                opened inside another one (a whole-model job's) is removed when done.

        Raises:
            NonFiniteError: a chunk produced NaN or Inf; earlier chunks, and chunks that were
                running beside it, stay saved.
            OutOfMemoryError: the job does not fit in memory (before anything is optimised),
                or a chunk ran out of memory at the smallest batch size.
        """
        runner = _ChunkRunner(self, self.placed_weights())
        schedule = self.chunks()
        parts, sizes, computed = [None] * len(schedule), [None] * len(schedule), 0
        workers = self.workers if jax.process_count() == 1 else 1  # hosts compute the same chunks in step
        bar = tqdm(total=len(self.units), unit="filter", disable=bar_shown(progress), desc=self.objective.name,
                   leave=None)

        def done(slot, index, chunk_units, rendered, size, seconds):
            self._check_finite(rendered, chunk_units)
            if store is not None:
                store.save(index, chunk_units, rendered, **({} if size == self.batch_size else {"batch_size": size}))
            log.info("chunk %d/%d done: %d filters in %.1f s (%.2f filters/s)", index + 1, len(schedule),
                     len(chunk_units), seconds, len(chunk_units) / max(seconds, 1e-9), extra={PROGRESS: True})
            parts[slot], sizes[slot] = rendered, size
            bar.set_postfix_str(f"{runner.steps_per_s():.1f} steps/s", refresh=False)
            bar.update(len(chunk_units))

        with bar, _Running(workers, done) as running:
            for slot, (index, chunk_units) in enumerate(schedule):
                rendered = store.load(index, chunk_units) if store is not None else None
                stored_size = getattr(store, "batch_sizes", {}).get(index, self.batch_size)
                if jax.process_count() > 1:
                    rendered, stored_size = self._as_process_zero(rendered, stored_size, len(chunk_units))
                if rendered is not None:
                    runner.continue_at(stored_size)
                    parts[slot], sizes[slot] = rendered, stored_size
                    bar.update(len(chunk_units))
                    continue
                computed += 1
                if not runner.compiled:
                    bar.set_postfix_str("compiling")
                    with ticking(bar):
                        size = runner.compile()
                    running.workers = min(running.workers, self.workers)  # the memory check may allow fewer
                    log.info("%s: compiled in %.1f s (%d filters per chunk, %d steps; float32 matmuls and "
                             "convolutions in %s)", self.objective.name, runner.compile_s, size, self.steps,
                             self.matmul_precision["effective"])
                running.submit((slot, index, chunk_units), runner.run, index, chunk_units)
        if computed < len(schedule):
            log.info("%d of %d chunks reused from earlier attempts", len(schedule) - computed, len(schedule))
        stacked = _concatenate(parts)
        return Result(self.units, *stacked, snapshot_steps=np.asarray(self.snapshot_steps, np.int32),
                      compile_s=runner.compile_s, optimize_s=runner.optimize_s, batch_sizes=sizes,
                      memory=runner.report(), matmul_precision={**self.matmul_precision, "in_program": self.in_program})

    def _as_process_zero(self, rendered, size, count):
        """Multi-host: process 0's stored chunk (or None) on every process, so that all of them
        compute the same chunks together; process 0 alone holds the run folder."""
        first = jax.process_index() == 0
        if not bool(multihost_utils.broadcast_one_to_all(np.int32(first and rendered is not None))):
            return None, size
        d, h, w, c = self.images_per_unit, *self.image_shape
        s = len(self.snapshot_steps)
        template = Rendered(np.zeros((count, d, h, w, c), np.float32), np.zeros((count, d, self.steps), np.float32),
                            np.zeros((count, d), np.float32), np.zeros((count, d, self.steps), np.float32),
                            np.zeros((count, d, h, w), np.float32), np.zeros((count, d, s, h, w, c), np.float32))
        # unit_values stay behind (the report computes them): chunks saved before they were kept have none
        sent = (rendered._replace(unit_values=None) if first else template, np.int32(size))
        received, size = multihost_utils.broadcast_one_to_all(sent)
        return Rendered(*(np.asarray(a) for a in received)), int(size)

    def _check_finite(self, rendered, chunk_units):
        """Raises NonFiniteError naming the first non-finite quantity: the step, the unit, and what."""
        per_step = {what: ~np.isfinite(getattr(rendered, name)) for name, what in _STEP_QUANTITIES.items()}
        at_all = {what: ~np.isfinite(getattr(rendered, name)) for name, what in _END_QUANTITIES.items()}
        bad = np.any([b.reshape(len(b), -1).any(1) for b in (*per_step.values(), *at_all.values())], axis=0)
        if not bad.any():
            return
        row = int(np.argmax(bad))
        steps_bad = [b[row].any(axis=0) for b in per_step.values()]
        if np.any(steps_bad):
            step = int(np.argmax(np.logical_or.reduce(steps_bad)))
            what = [w for w, b in zip(per_step, steps_bad) if b[step]]
            where = f"at step {step} of {self.steps}"
        else:
            what, where = [w for w, b in at_all.items() if b[row].any()], f"after step {self.steps - 1}"
        raise NonFiniteError(
            f"Non-finite {' and '.join(what)} {where}, for {self.objective.name}, filter {int(chunk_units[row])}. "
            "Finished chunks are kept. Try a smaller lr, another optimizer, or a regularizer.")


def _concatenate(parts):
    """One `Rendered` of `parts` (each a `Rendered` of numpy arrays) along the unit axis; its
    unit_values None unless every part has them."""
    return Rendered(*(None if any(a is None for a in field) else np.concatenate(field) for field in zip(*parts)))


# Rendered fields -> what they are, for messages.
_STEP_QUANTITIES = {"curves": "objective", "grad_norms": "gradient (its norm)"}
_END_QUANTITIES = {"images": "image pixels", "final": "objective of the final image"}


class _ChunkRunner:
    """Computes a job's chunks at its batch size, or in parts of a smaller one after running out
    of memory; compiles once per batch size and checks the first compilation's memory estimate.
    `run` may be called from several threads at once (see `Job.run`)."""

    def __init__(self, job, weights):
        self.job, self.weights, self.batch_size = job, weights, job.batch_size
        self.compiled, self.retries, self.checked = {}, [], None
        self.compile_s = 0.0
        self.computed_steps = 0
        self.spans = []  # (start, end) of each chunk's optimisation, perf_counter seconds
        self.lock = threading.Lock()

    @property
    def optimize_s(self):
        """Wall seconds during which at least one chunk was being optimised (chunks that ran
        at the same time count once)."""
        total, reach = 0.0, -math.inf
        for start, end in sorted(self.spans):
            total += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        return total

    def continue_at(self, batch_size):
        """A chunk loaded from the store was computed at `batch_size`: later chunks use no more."""
        with self.lock:
            self.batch_size = min(self.batch_size, batch_size)

    def compile(self):
        """Compiles the chunk program (checking its memory estimate first time); returns the batch size."""
        return self._function()[1]

    def _function(self):
        with self.lock:
            while self.batch_size not in self.compiled:
                chunk, estimate, seconds = self.job.compile_sized(self.weights, self.batch_size)
                self.compile_s += seconds
                if self.checked is None and not self._fits(estimate):
                    continue
                self.compiled[self.batch_size] = chunk
            return self.compiled[self.batch_size], self.batch_size

    def _fits(self, estimate):
        """Checks the first compiled batch size against the budget; halves an auto batch size that
        does not fit (False: compile again), refuses an explicit one. Chunks running at once
        (`Job.workers`) need memory each; when only one fits, they run one at a time."""
        budget, bound = memory.budget(list(self.job.mesh.devices.flat)) or (None, None)
        if jax.process_count() > 1:  # every host must take the same decision: the least budget of all
            budgets = multihost_utils.process_allgather(np.int64(-1 if budget is None else budget))
            budget = None if (budgets < 0).all() else int(budgets[budgets >= 0].min())
        if estimate is None or budget is None or estimate.total <= budget:
            if estimate is not None and budget is not None and estimate.total * self.job.workers > budget:
                log.info("%d chunks at once need about %s, more than the %s free (%s): running one at a time",
                         self.job.workers, memory.gib(estimate.total * self.job.workers), memory.gib(budget), bound)
                self.job.workers = 1
            self.checked = {"estimate_bytes": None if estimate is None else estimate.total, "budget_bytes": budget,
                            "budget_bound_by": bound, "batch_size": self.batch_size}
            return True
        smaller = self.job.smaller_batch(self.batch_size)
        if self.job.auto_batch and smaller is not None:
            log.info("batch_size=auto: %d filters need about %s, more than the %s free (%s); trying %d",
                     self.batch_size, memory.gib(estimate.total), memory.gib(budget), bound, smaller)
            self.batch_size = smaller
            return False
        raise memory.OutOfMemoryError(self._refusal(estimate.total, budget, bound))

    def _refusal(self, needed, budget, bound):
        job, size = self.job, "x".join(str(n) for n in self.job.image_shape[:2])
        images = f" ({self.batch_size * job.images_per_unit} images)" if job.images_per_unit > 1 else ""
        way_out = ("a smaller batch_size (batch_size=auto fits it to memory) or a smaller image_size"
                   if self.batch_size > job.mesh.size else "a smaller image_size, or a device with more memory")
        received = "auto" if job.auto_batch else self.batch_size
        return (f"A chunk of {self.batch_size} filters{images} of {job.objective.name} at {size} needs about "
                f"{memory.gib(needed)} per device (XLA's estimate), but {memory.gib(budget)} is free "
                f"({bound}). Use {way_out}. Received: batch_size={received}, image_size={list(job.image_shape[:2])}")

    def run(self, index, units):
        """(Rendered, the batch size used, seconds) for one chunk, halving the batch size on running
        out of memory; the seconds exclude compiling."""
        while True:
            chunk, size = self._function()
            start = time.perf_counter()
            try:
                parts = [chunks_lib.to_host(chunk(self.weights, self.job._placed(units[s: s + size], size)))
                         for s in range(0, len(units), size)]
            except Exception as e:
                if not memory.is_out_of_memory(e):
                    raise
                self._halve(index, size, e)
                continue
            end = time.perf_counter()
            with self.lock:
                self.spans.append((start, end))
                self.computed_steps += self.job.steps * len(parts)
            cut = [Rendered(*(a[: len(units[s: s + size])] for a in out))  # computed: every field is there
                   for s, out in zip(range(0, len(units), size), parts)]
            return _concatenate(cut), size, end - start

    def _halve(self, index, size, error):
        with self.lock:
            if self.batch_size < size:  # another chunk halved it already
                return
            smaller = self.job.smaller_batch(size)
            if smaller is None:
                raise memory.OutOfMemoryError(
                    f"Chunk {index} of {self.job.objective.name} ran out of memory at batch size {size}, the "
                    f"smallest possible here ({type(error).__name__}: {str(error).splitlines()[0]}). Use a smaller "
                    f"image_size or a device with more memory. Finished chunks are kept.") from error
            log.warning("chunk %d of %s ran out of memory at batch size %d; computing it and the chunks after it "
                        "at batch size %d (%s)", index, self.job.objective.name, size, smaller,
                        str(error).splitlines()[0])
            self.retries.append({"chunk": index, "batch_size": size, "retried_at": smaller})
            self.batch_size = smaller

    def steps_per_s(self):
        return self.computed_steps / max(self.optimize_s, 1e-9)

    def report(self):
        """JSON-able memory facts of this run (see `Result.memory`)."""
        return {**(self.checked or {}), "retries": self.retries}


class _Running:
    """Chunks in flight on up to `workers` threads (none with workers=1: `submit` then runs the
    chunk at once). `on_done(*tag, *result)` runs in the thread that submits, for the chunks in the
    order they were submitted (a chunk that ends early waits for the ones before it), so which
    error is raised, and what is saved before it, does not depend on timing. Leaving the block
    waits for every chunk; after an error (a chunk's, or the caller's, an interrupt included), the
    chunks still running are waited for and the ones that succeeded handed to `on_done` too, so
    finished work is saved, and the first error is raised."""

    def __init__(self, workers, on_done):
        self.workers, self.on_done, self.futures = workers, on_done, {}  # future -> tag, in submission order
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fvis-chunk") if workers > 1 else None

    def __enter__(self):
        return self

    def submit(self, tag, fn, *args):
        if self.pool is None:
            self.on_done(*tag, *fn(*args))
            return
        self.futures[self.pool.submit(fn, *args)] = tag
        while True:
            self._collect()
            running = [future for future in self.futures if not future.done()]
            if len(running) < self.workers:
                return
            wait(running, return_when=FIRST_COMPLETED)

    def _collect(self, quiet=False):
        """Hands the finished chunks at the front of the queue to `on_done`, in submission order."""
        while self.futures:
            future = next(iter(self.futures))
            if not future.done():
                return
            tag = self.futures.pop(future)
            try:
                self.on_done(*tag, *future.result())
            except Exception:
                if not quiet:
                    raise

    def __exit__(self, kind, error, traceback):
        if self.pool is None:
            return False
        try:
            if kind is None:
                wait(self.futures)
                self._collect()
        finally:
            wait(self.futures)
            self._collect(quiet=True)
            self.pool.shutdown()
        return False


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
            precision, matmul_precision, ...); or give those as keyword arguments instead.
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
    rewrites = Rewrites(precision=settings.precision, cpu_ops=devices_lib.auto_setting("cpu_ops"),
                        fold_batchnorm=devices_lib.auto_setting("fold_batchnorm"),
                        winograd=devices_lib.auto_setting("winograd"), redirect_relu=settings.redirect_relu)
    forward = model.forward(layers, rewrites)
    units = parse_units(units, objective.num_units(forward.shapes()))
    mesh = devices_lib.unit_mesh(devices)
    batch_size = settings.batch_size
    if batch_size == "auto":
        batch_size = devices_lib.auto_batch_size(len(units), mesh.size)
    batch_size = devices_lib.round_up(min(batch_size, len(units)), mesh.size)
    loop = devices_lib.auto_loop(model) if settings.loop == "auto" else settings.loop
    workers = devices_lib.auto_setting("workers") if settings.workers == "auto" else settings.workers
    image_shape = (*model.image_size, model.channels)
    matmul = matmul_lib.describe(settings.matmul_precision)  # the level resolved now, applied to every trace
    with jax.default_matmul_precision(matmul["level"]):
        objective = objective.bind(forward)  # a photo's activations, once (inversion, caricature)
    renderer = make_renderer(
        forward, objective, param=param or params_lib.pixel(), transform=transform or transforms_lib.identity(),
        optimizer=optimizer or optim.normalized_ascent(10.0), image_shape=image_shape,
        snapshot_steps=settings.snapshots)
    facts = forward.facts()
    _log_facts(facts, rewrites, matmul)
    return Job(forward, objective, units, batch_size, settings.images_per_unit, settings.steps, settings.seed,
               renderer, image_shape, loop, mesh, facts, settings.snapshots,
               auto_batch=settings.batch_size == "auto", matmul_precision=matmul, workers=workers,
               compiler_options=devices_lib.compiler_options(mesh.devices.flat[0].platform))


def _log_facts(facts, rewrites, matmul):
    """Says in the log what the model computes where it differs from what a user may assume."""
    if facts["read_as_logits"]:
        log.info("Reading %s as logits: the softmax at the end is left out (probabilities saturate and depend "
                 "on the other classes).", ", ".join(facts["read_as_logits"]))
    relus = facts["relus"]
    if rewrites.redirect_relu and (relus["unknown_form"] or relus["exact"]):
        log.warning("redirect_relu: %d ReLU(s) in a form the redirect does not reach keep their exact gradient "
                    "(%d written as max(x, 0), %d jax.nn functions imported by name into the model's module); "
                    "%d redirected.", relus["unknown_form"] + relus["exact"], relus["unknown_form"],
                    relus["exact"], relus["redirected"])
    if rewrites.precision == "float32" and set(facts["compute_dtypes"]) - {"float32"}:
        log.warning("precision=float32, but the model computes in %s where its layers fix their own dtype.",
                    ", ".join(facts["compute_dtypes"]))
    if matmul["effective"] != "float32":
        log.info("matmul_precision=%s: float32 matmuls and convolutions compute in %s on %s (level %s); "
                 "matmul_precision=highest for float32.", matmul["setting"], matmul["effective"], matmul["backend"],
                 matmul["level"])


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
