"""The compiled optimisation: all requested units in one batch, all steps in one jit.

`make_renderer` returns the three pure pieces of a chunk's optimisation
(`init`, `step`, `finish`); `scan_chunk` joins them into
`run(weights, units, keys) -> Rendered` with the step loop as a `lax.scan`
(`fvis.chunks` compiles that, or the step alone in a Python loop).
The per-image pipeline (parameterization -> transform -> model -> objective) is
written for ONE image and vmapped twice, over the D images of a unit and over the
units of a chunk; model weights are arguments, so one compilation serves every
chunk of a job.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fvis.objectives import INPUT


class Rendered(NamedTuple):
    """Outputs of one chunk; leading axes (B units, D images per unit).

    images: (B, D, H, W, C) float32, fvis' [-1, 1] space (not clipped).
    curves: (B, D, steps) float32, the objective before each step's update.
    final: (B, D) float32, the objective of the final image, without transforms.
    grad_norms: (B, D, steps) float32, L2 norm of each step's objective gradient.
    transparency: (B, D, H, W) float32 in [0, 1], MaCo's transparency map (see `transparency`).
    snapshots: (B, D, S, H, W, C) float32, the image after each of the S requested
        numbers of steps (`snapshot_steps`; S = 0 when none were requested).
    unit_values: (B, D, U) float32, the objective of the final image, without transforms,
        for each of the U units the chunk was asked about (the job's units, in order; see
        `Renderer`): the quality report's activations and selectivity read them, rather
        than running every image through the model again. None where not computed (a chunk
        saved before they were kept).
    """

    images: jax.Array
    curves: jax.Array
    final: jax.Array
    grad_norms: jax.Array
    transparency: jax.Array
    snapshots: jax.Array
    unit_values: jax.Array = None


def image_keys(key, units, images_per_unit):
    """Per-image keys (B, D): derived from the seed key and the unit index alone.

    A unit's random start and transforms therefore do not depend on which chunk,
    batch size or position it lands in.
    """
    d = jnp.arange(images_per_unit)
    per_unit = jax.vmap(lambda u: jax.random.fold_in(key, u))(units)
    return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(d))(per_unit)


def _vmap2(fn, in_axes=0):
    """vmaps `fn` over the (B units, D images) leading axes."""
    return jax.vmap(jax.vmap(fn, in_axes), in_axes)


def transparency(grad_sum):
    """MaCo's transparency map from the summed gradient magnitudes of one image's steps.

    Fel et al., NeurIPS 2023 (https://arxiv.org/abs/2306.06805), Sec. 3: the magnitude of
    the objective's gradient with respect to the image, accumulated over the optimisation
    (so over its random crops), shows which parts of the image the unit depends on.

    Args:
        grad_sum: (H, W, C) float32, sum over steps of |d objective / d image| (the image
            before transforms).

    Returns:
        (H, W) float32 in [0, 1]: the channel mean divided by its maximum (all 0 when the
        gradient was 0 everywhere, as for a dead unit).
    """
    alpha = jnp.mean(grad_sum, axis=-1)
    peak = jnp.max(alpha)
    return jnp.where(peak > 0, alpha / jnp.where(peak > 0, peak, 1.0), 0.0)


class Renderer(NamedTuple):
    """The pure pieces of one chunk's optimisation.

    state = (params, opt_state, loop_keys, grad_sum (B, D, H, W, C), snapshots (B, D, S, H, W, C)).
    init(units, keys) -> state: `units` (B,) int32, `keys` (B, D) typed keys.
    step(weights, state, units, step) -> (state, (values, norms)), each (B, D) float32.
    finish(weights, state, units, value_units) -> (images (B, D, H, W, C), final (B, D),
        transparency (B, D, H, W), snapshots (B, D, S, H, W, C), unit_values (B, D, U)):
        `value_units` (U,) int32 are the units whose objective each final image is scored on
        (the same forward as `final`, which is the image's own unit's).
    """

    init: Callable
    step: Callable
    finish: Callable


def make_renderer(forward, objective, *, param, transform, optimizer, image_shape, snapshot_steps=()):
    """Builds the `Renderer` that optimises one chunk of units.

    Args:
        forward: an `fvis.models.Forward`: (weights, image) -> {path: activation}.
        objective: an `fvis.objectives.Objective` (maximised).
        param: an `fvis.params.Parameterization`.
        transform: `(key, image) -> image`, see `fvis.transforms`.
        optimizer: an `optax.GradientTransformation`, applied per image to the
            gradient of the negated objective.
        image_shape: (H, W, C) of the images.
        snapshot_steps: numbers of steps n after which to keep the image (0: the start), in
            increasing order; collected inside the compiled step, whatever the loop form.

    Returns:
        A `Renderer`; `scan_chunk(renderer, steps)` joins its pieces into one function.
    """

    snaps = np.asarray(snapshot_steps, np.int32)

    def image_value(image, unit, key, weights):
        acts = forward(weights, transform(key, image))
        acts[INPUT] = image
        return objective(acts, unit), acts

    def unit_loss(images, unit, keys, weights):  # images: (D, H, W, C) of one unit
        values, acts = jax.vmap(image_value, (0, None, 0, None))(images, unit, keys, weights)
        return -(jnp.sum(values) + objective.group(acts, unit)), values

    def unit_step(params, opt_state, unit, keys, weights):
        images, pullback = jax.vjp(jax.vmap(param.to_image), params)
        (_, values), image_grads = jax.value_and_grad(unit_loss, has_aux=True)(images, unit, keys, weights)
        (grads,) = pullback(image_grads)
        updates, opt_state = jax.vmap(optimizer.update)(grads, opt_state, params)
        norms = jax.vmap(optax.tree.norm)(grads)
        return optax.apply_updates(params, updates), opt_state, values, norms, jnp.abs(image_grads)

    def final_values(params, unit, value_units, weights):
        image = param.to_image(params)
        acts = forward(weights, image)
        acts[INPUT] = image
        values = jax.vmap(lambda u: objective(acts, u))(jnp.append(value_units, unit))  # one computation:
        return values[-1], values[:-1]  # final is bit for bit its unit's column where value_units hold it

    def keep(snapshots, params, n):
        """Writes the images of `params` into the snapshot slots of step count n."""
        if not len(snaps):
            return snapshots
        hit = (jnp.asarray(snaps) == n)[None, None, :, None, None, None]
        return jnp.where(hit, _vmap2(param.to_image)(params)[:, :, None], snapshots)

    def init(units, keys):
        init_keys, loop_keys = _vmap2(lambda k: tuple(jax.random.split(k)))(keys)
        params = _vmap2(lambda k: param.init(k, image_shape))(init_keys)
        lead = keys.shape
        snapshots = jnp.zeros((*lead, len(snaps), *image_shape), jnp.float32)
        return (params, _vmap2(optimizer.init)(params), loop_keys, jnp.zeros((*lead, *image_shape), jnp.float32),
                keep(snapshots, params, 0))

    def step(weights, state, units, step):
        params, opt_state, loop_keys, grad_sum, snapshots = state
        step_keys = _vmap2(lambda k: jax.random.fold_in(k, step))(loop_keys)
        params, opt_state, values, norms, magnitudes = jax.vmap(unit_step, (0, 0, 0, 0, None))(
            params, opt_state, units, step_keys, weights)
        state = (params, opt_state, loop_keys, grad_sum + magnitudes, keep(snapshots, params, step + 1))
        return state, (values, norms)

    def finish(weights, state, units, value_units):
        params, _, _, grad_sum, snapshots = state
        final, values = jax.vmap(jax.vmap(final_values, (0, None, None, None)), (0, 0, None, None))(
            params, units, value_units, weights)
        return _vmap2(param.to_image)(params), final, _vmap2(transparency)(grad_sum), snapshots, values

    return Renderer(init, step, finish)


def scan_chunk(renderer, steps):
    """`run(weights, units, keys, value_units) -> Rendered`: init, `steps` steps as a `lax.scan`,
    finish (`value_units`: (U,) int32, see `Renderer`)."""

    def run(weights, units, keys, value_units):
        body = lambda state, step: renderer.step(weights, state, units, step)
        state, (curves, norms) = jax.lax.scan(body, renderer.init(units, keys), jnp.arange(steps))
        images, final, alpha, snapshots, values = renderer.finish(weights, state, units, value_units)
        return Rendered(images, jnp.moveaxis(curves, 0, -1), final, jnp.moveaxis(norms, 0, -1), alpha, snapshots,
                        values)

    return run
