"""The compiled optimisation: all requested units in one batch, all steps in one jit.

`make_render_fn` returns `run(weights, units, keys) -> Rendered`. Inside it, the
per-image pipeline (parameterization -> transform -> model -> objective) is
written for ONE image and vmapped twice, over the D images of a unit and over the
units of a chunk; the step loop is a `lax.scan`; model weights are arguments, so
one compilation serves every chunk of a job.
"""

import collections
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fvis.objectives import INPUT

# Incremented each time a render function is traced (compiled); tests read it.
TRACE_COUNT = collections.Counter()


class Rendered(NamedTuple):
    """Outputs of one chunk; leading axes (B units, D images per unit).

    images: (B, D, H, W, C) float32, fvis' [-1, 1] space (not clipped).
    curves: (B, D, steps) float32, the objective before each step's update.
    final: (B, D) float32, the objective of the final image, without transforms.
    grad_norms: (B, D, steps) float32, L2 norm of each step's objective gradient.
    """

    images: jax.Array
    curves: jax.Array
    final: jax.Array
    grad_norms: jax.Array


@dataclasses.dataclass(frozen=True)
class Forward:
    """One image through the model: `forward(weights, image) -> {layer path: activation}`.

    Attributes:
        extractor: the Functional feature extractor (see `fvis.layers`).
        paths: the layer paths, in the extractor's output order.
        to_model_input: maps fvis' [-1, 1] images into the model's input range.
    """

    extractor: object
    paths: tuple
    to_model_input: object

    def weights(self):
        """The extractor's (trainable, non-trainable) variable values, a pytree of arrays."""
        e = self.extractor
        return ([v.value for v in e.trainable_variables], [v.value for v in e.non_trainable_variables])

    def shapes(self):
        """Output shape of each layer path, without the batch axis."""
        return {p: tuple(t.shape[1:]) for p, t in zip(self.paths, self.extractor.outputs)}

    def __call__(self, weights, image):
        """(H, W, C) image -> {path: activation without batch axis}; inference mode."""
        x = self.to_model_input(image)[None]
        outputs, _ = self.extractor.stateless_call(*weights, x, training=False)
        if not isinstance(outputs, (list, tuple)):  # Keras unwraps a one-output model
            outputs = [outputs]
        return {p: o[0] for p, o in zip(self.paths, outputs, strict=True)}


def image_keys(key, units, images_per_unit):
    """Per-image keys (B, D): derived from the seed key and the unit index alone.

    A unit's random start and transforms therefore do not depend on which chunk,
    batch size or position it lands in.
    """
    d = jnp.arange(images_per_unit)
    per_unit = jax.vmap(lambda u: jax.random.fold_in(key, u))(units)
    return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(d))(per_unit)


def make_render_fn(forward, objective, *, param, transform, optimizer, steps, image_shape):
    """Builds the function that optimises one chunk of units.

    Args:
        forward: a `Forward`.
        objective: an `fvis.objectives.Objective` (maximised).
        param: an `fvis.params.Parameterization`.
        transform: `(key, image) -> image`, see `fvis.transforms`.
        optimizer: an `optax.GradientTransformation`, applied per image to the
            gradient of the negated objective.
        steps: number of optimisation steps, >= 1.
        image_shape: (H, W, C) of the images.

    Returns:
        `run(weights, units, keys) -> Rendered`, to be jitted: `units` (B,) int32,
        `keys` (B, D) typed PRNG keys from `image_keys`.
    """

    def image_value(params, unit, key, weights):
        image = param.to_image(params)
        acts = forward(weights, transform(key, image))
        acts[INPUT] = image
        return objective(acts, unit), acts

    def unit_loss(params, unit, keys, weights):  # params: (D, ...) of one unit
        values, acts = jax.vmap(image_value, (0, None, 0, None))(params, unit, keys, weights)
        return -(jnp.sum(values) + objective.group(acts, unit)), values

    def unit_step(params, opt_state, unit, keys, weights):
        grad_fn = jax.value_and_grad(unit_loss, has_aux=True)
        (_, values), grads = grad_fn(params, unit, keys, weights)
        updates, opt_state = jax.vmap(optimizer.update)(grads, opt_state, params)
        norms = jax.vmap(optax.tree.norm)(grads)
        return optax.apply_updates(params, updates), opt_state, values, norms

    def final_value(params, unit, weights):
        image = param.to_image(params)
        acts = forward(weights, image)
        acts[INPUT] = image
        return objective(acts, unit)

    def run(weights, units, keys):
        TRACE_COUNT["render"] += 1
        init_keys, loop_keys = jax.vmap(jax.vmap(lambda k: tuple(jax.random.split(k))))(keys)
        params = jax.vmap(jax.vmap(lambda k: param.init(k, image_shape)))(init_keys)
        opt_state = jax.vmap(jax.vmap(optimizer.init))(params)

        def body(carry, step):
            params, opt_state = carry
            step_keys = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, step)))(loop_keys)
            params, opt_state, values, norms = jax.vmap(unit_step, (0, 0, 0, 0, None))(
                params, opt_state, units, step_keys, weights)
            return (params, opt_state), (values, norms)

        (params, _), (curves, norms) = jax.lax.scan(body, (params, opt_state), jnp.arange(steps))
        final = jax.vmap(jax.vmap(final_value, (0, None, None)), (0, 0, None))(params, units, weights)
        images = jax.vmap(jax.vmap(param.to_image))(params)
        return Rendered(images, jnp.moveaxis(curves, 0, -1), final, jnp.moveaxis(norms, 0, -1))

    return run
