"""Compiling one chunk's optimisation: the loop form and the placement on devices.

Two loop forms run the same `fvis.render.Renderer` and give the same numbers:

- "scan": init, every step (a `lax.scan`) and the final evaluation are ONE
  compiled call per chunk;
- "host": init, step and finish are compiled separately and Python calls the
  step `steps` times. The step donates the image and optimiser state, so XLA
  updates it in place; curves stay on the device until the chunk ends, so there
  is no host round-trip inside the loop.

Every input is placed on the unit mesh (`fvis.devices`): the unit axis sharded,
the weights replicated. A unit's random keys are derived inside the compiled
call from (seed, unit) alone, so each device, and each host of a multi-host
job, can build its own shard.
"""

from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fvis import devices, memory, render
from fvis.errors import UnknownNameError, did_you_mean

LOOPS = ("scan", "host")


def check_loop(loop):
    """Returns `loop` if it is one of `LOOPS`, else raises UnknownNameError."""
    if loop not in LOOPS:
        raise UnknownNameError(did_you_mean(str(loop), LOOPS, kind="loop"))
    return loop


def put(tree, sharding):
    """Places host values (numpy arrays, or device arrays read back) as global arrays on `sharding`."""
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(one, tree)


def to_host(tree):
    """Global arrays -> numpy on this host (gathered from every host of a multi-host job)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def lower_chunk(renderer, *, steps, loop, mesh, seed, images_per_unit, weights, units, value_units, each=None,
                compiler_options=None):
    """Traces and lowers the optimisation of one chunk of `len(units)` units, without compiling.

    Takes the arguments of `compile_chunk`. The seed is an argument of the programs, not a
    constant: jobs that differ only in their seed (a sweep) compile the same programs, so the
    compilation cache serves all but the first (key(uint32 s) == key(int s)). `each(name,
    lowered)`, when given, is called as each program is lowered, the largest first ("step"
    before "init" and "finish"), so its compilation can start while the others are traced.

    Returns:
        ({name: `jax.stages.Lowered`}: "scan" for loop="scan"; "init", "step" and "finish" for
        loop="host"; (the seed, the value units) placed on the devices, the programs' last arguments).
    """
    replicated, by_unit = devices.shardings(mesh)
    seed, value_units = put((np.uint32(seed), np.asarray(value_units, np.int32)), replicated)
    keys = lambda units, seed: render.image_keys(jax.random.key(seed), units, images_per_unit)
    jit = lambda fn, ins, **kw: jax.jit(fn, in_shardings=ins, out_shardings=by_unit,
                                        compiler_options=compiler_options, **kw)
    each = each or (lambda name, lowered: None)
    lowered = {}

    def lower(name, function, *args):
        lowered[name] = function.lower(*args)
        each(name, lowered[name])

    if check_loop(loop) == "scan":
        run = render.scan_chunk(renderer, steps)

        def scan(w, u, s, v):  # named: XLA's module and the compilation cache's entries read "jit_scan"
            return run(w, u, keys(u, s), v)

        lower("scan", jit(scan, (replicated, by_unit, replicated, replicated)), weights, units, seed, value_units)
        return lowered, (seed, value_units)

    def init(u, s):
        return renderer.init(u, keys(u, s))

    init = jit(init, (by_unit, replicated))
    state = jax.eval_shape(init, units, seed)
    lower("step", jit(renderer.step, (replicated, by_unit, by_unit, replicated), donate_argnums=1), weights, state,
          units, np.int32(0))
    lower("init", init, units, seed)
    lower("finish", jit(renderer.finish, (replicated, by_unit, by_unit, replicated)), weights, state, units,
          value_units)
    return lowered, (seed, value_units)


def compile_chunk(renderer, *, steps, loop, mesh, seed, images_per_unit, weights, units, value_units,
                  on_lowered=None, compiler_options=None):
    """Compiles the optimisation of one chunk of `len(units)` units.

    Args:
        renderer: an `fvis.render.Renderer`.
        steps: optimisation steps.
        loop: "scan" or "host" (see the module docstring).
        mesh: the unit mesh (`fvis.devices.unit_mesh`); len(units) must be a multiple
            of its size.
        seed: int, the job's seed.
        images_per_unit: D.
        weights, units: example arguments, as placed by `put` (shapes matter).
        value_units: (U,) int, the units each final image's objective is also given for
            (`fvis.render.Rendered.unit_values`; the job's units). An argument of the
            programs, not a constant: jobs of as many units share their compilation.
        on_lowered: None, or a function called with `lower_chunk`'s dict before compiling
            (to read the programs, e.g. `fvis.matmul_precision.in_program`).
        compiler_options: None (XLA's defaults), or a dict of XLA compiler options the
            programs are compiled with (`fvis.devices.compiler_options`).

    Returns:
        (`chunk(weights, units) -> fvis.render.Rendered` of global device arrays, its
        `fvis.memory.Estimate` per device or None where the backend reports none).
    """
    with ThreadPoolExecutor(3, thread_name_prefix="fvis-compile") as pool:  # XLA compiles without the GIL
        compiling = {}
        start = lambda name, program: compiling.update({name: pool.submit(program.compile)})
        lowered, (seed, value_units) = lower_chunk(
            renderer, steps=steps, loop=loop, mesh=mesh, seed=seed, images_per_unit=images_per_unit, weights=weights,
            units=units, value_units=value_units, each=start, compiler_options=compiler_options)
        if on_lowered is not None:
            on_lowered(lowered)
        programs = {name: future.result() for name, future in compiling.items()}
    if loop == "scan":
        compiled = programs["scan"]

        def scan_chunk(weights, units):
            return compiled(weights, units, seed, value_units)

        scan_chunk.compiled = compiled  # the one compiled program of the chunk
        return scan_chunk, memory.estimate(compiled)
    init, step, finish = (programs[name] for name in ("init", "step", "finish"))

    def chunk(weights, units):
        state, curves, norms = init(units, seed), [], []
        for i in range(steps):
            state, (values, grad_norms) = step(weights, state, units, np.int32(i))
            curves.append(values)
            norms.append(grad_norms)
        images, final, alpha, snapshots, values = finish(weights, state, units, value_units)
        return render.Rendered(images, jnp.stack(curves, -1), final, jnp.stack(norms, -1), alpha, snapshots, values)

    return chunk, memory.estimate(init, step, finish)
