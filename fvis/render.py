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

import collections
import contextlib
import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fvis.errors import UnknownNameError, did_you_mean
from fvis.objectives import INPUT
from fvis.cpu_ops import cpu_ops

# Incremented each time the chunk step is traced (compiled); tests read it.
TRACE_COUNT = collections.Counter()

# precision -> Keras dtype policy of the model's layers while fvis calls them.
PRECISIONS = {"float32": None, "bfloat16": "mixed_bfloat16"}


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


def check_precision(precision):
    """Returns `precision` if it is a key of `PRECISIONS`, else raises UnknownNameError."""
    if precision not in PRECISIONS:
        raise UnknownNameError(did_you_mean(str(precision), PRECISIONS, kind="precision"))
    return precision


@contextlib.contextmanager
def _layer_policy(model, policy):
    """Sets every layer's Keras dtype policy to `policy` inside the block (at trace time)."""
    layers = list(model._flatten_layers(include_self=False)) if policy is not None else []
    saved = [layer.dtype_policy for layer in layers]
    try:
        for layer in layers:
            layer.dtype_policy = policy
        yield
    finally:
        for layer, old in zip(layers, saved):
            layer.dtype_policy = old


@dataclasses.dataclass(frozen=True)
class Forward:
    """One image through the model: `forward(weights, image) -> {layer path: activation}`.

    Attributes:
        extractor: the Functional feature extractor (see `fvis.layers`).
        paths: the layer paths, in the extractor's output order.
        to_model_input: maps fvis' [-1, 1] images into the model's input range.
        precision: "float32", or "bfloat16" for mixed precision: the layers compute in
            bfloat16 (Keras' "mixed_bfloat16" policy; weights stay float32 and are cast
            per layer, BatchNormalization statistics stay float32), while the image,
            the activations handed to the objective and the gradient stay float32
            (Micikevicius et al., ICLR 2018, "Mixed Precision Training").
        cpu_ops: trace max pooling as strided slices and 1x1 convolutions as dots
            (same values, faster gradients on CPU; see `fvis.cpu_ops`).
    """

    extractor: object
    paths: tuple
    to_model_input: object
    precision: str = "float32"
    cpu_ops: bool = False

    def weights(self):
        """The extractor's (trainable, non-trainable) variable values, a pytree of arrays."""
        e = self.extractor
        return ([v.value for v in e.trainable_variables], [v.value for v in e.non_trainable_variables])

    def shapes(self):
        """Output shape of each layer path, without the batch axis."""
        return {p: tuple(t.shape[1:]) for p, t in zip(self.paths, self.extractor.outputs)}

    def __call__(self, weights, image):
        """(H, W, C) float32 image -> {path: float32 activation without batch axis}; inference mode."""
        x = self.to_model_input(image)[None]
        with _layer_policy(self.extractor, PRECISIONS[self.precision]), cpu_ops(self.cpu_ops):
            outputs, _ = self.extractor.stateless_call(*weights, x, training=False)
        if not isinstance(outputs, (list, tuple)):  # Keras unwraps a one-output model
            outputs = [outputs]
        return {p: o[0].astype(jnp.float32) for p, o in zip(self.paths, outputs, strict=True)}


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


class Renderer(NamedTuple):
    """The pure pieces of one chunk's optimisation; state = (params, opt_state, loop_keys).

    init(units, keys) -> state: `units` (B,) int32, `keys` (B, D) typed keys.
    step(weights, state, units, step) -> (state, (values, norms)), each (B, D) float32.
    finish(weights, state, units) -> (images (B, D, H, W, C), final (B, D)).
    """

    init: Callable
    step: Callable
    finish: Callable


def make_renderer(forward, objective, *, param, transform, optimizer, image_shape):
    """Builds a `Renderer` (see `make_render_fn` for the arguments)."""

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

    def init(units, keys):
        init_keys, loop_keys = _vmap2(lambda k: tuple(jax.random.split(k)))(keys)
        params = _vmap2(lambda k: param.init(k, image_shape))(init_keys)
        return params, _vmap2(optimizer.init)(params), loop_keys

    def step(weights, state, units, step):
        TRACE_COUNT["render"] += 1
        params, opt_state, loop_keys = state
        step_keys = _vmap2(lambda k: jax.random.fold_in(k, step))(loop_keys)
        params, opt_state, values, norms = jax.vmap(unit_step, (0, 0, 0, 0, None))(
            params, opt_state, units, step_keys, weights)
        return (params, opt_state, loop_keys), (values, norms)

    def finish(weights, state, units):
        params = state[0]
        final = jax.vmap(jax.vmap(final_value, (0, None, None)), (0, 0, None))(params, units, weights)
        return _vmap2(param.to_image)(params), final

    return Renderer(init, step, finish)


def scan_chunk(renderer, steps):
    """`run(weights, units, keys) -> Rendered`: init, `steps` steps as a `lax.scan`, finish."""

    def run(weights, units, keys):
        body = lambda state, step: renderer.step(weights, state, units, step)
        state, (curves, norms) = jax.lax.scan(body, renderer.init(units, keys), jnp.arange(steps))
        images, final = renderer.finish(weights, state, units)
        return Rendered(images, jnp.moveaxis(curves, 0, -1), final, jnp.moveaxis(norms, 0, -1))

    return run


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
    renderer = make_renderer(forward, objective, param=param, transform=transform,
                             optimizer=optimizer, image_shape=image_shape)
    return scan_chunk(renderer, steps)
