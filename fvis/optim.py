"""Optimisers for feature visualization, as optax gradient transformations.

The render loop minimises the negated objective with any
`optax.GradientTransformation`, vmapped so that each image has its own state.
The reference rule ("normalise the gradient to unit L2 norm, then step") is
`normalized_ascent`; `optax.adam(0.05)` and the rest plug into the same place.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fvis.errors import InvalidValueError


def scale_by_l2_norm(*, epsilon=1e-12):
    """Divides the update by its global L2 norm, as `tf.math.l2_normalize` does.

    `u * rsqrt(max(sum(u**2), epsilon))`: finite at exactly zero (a dead unit's
    zero gradient stays zero instead of becoming NaN).
    """

    def update(updates, state, params=None):
        squares = sum(jnp.sum(jnp.square(u)) for u in jax.tree_util.tree_leaves(updates))
        inv = jax.lax.rsqrt(jnp.maximum(squares, epsilon))
        return jax.tree_util.tree_map(lambda u: u * inv, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def normalized_ascent(learning_rate=10.0):
    """The reference rule: image += learning_rate * grad / ||grad||_2, per image.

    Written for the minimised (negated) objective, as optax expects.

    Args:
        learning_rate: step length in fvis' [-1, 1] image space, > 0: a number, or a float32
            scalar array held in the optimiser state (`learning_rate_in_state`).

    Raises:
        InvalidValueError: a learning rate that is not a number > 0 float32 holds
            (`check_learning_rate`).
    """
    if not isinstance(learning_rate, jax.core.Tracer):
        learning_rate = check_learning_rate(learning_rate)
    return optax.chain(scale_by_l2_norm(), optax.scale(-learning_rate))


def learning_rate_in_state(factory, **kwargs):
    """`factory(**kwargs)` with its learning rate held in the optimiser state, not compiled in.

    `optax.inject_hyperparams` keeps `learning_rate` as a float32 scalar in each image's state,
    set by the job's init program; every other argument stays a Python constant, as the
    factory alone would have it. The step program then does not depend on the learning rate,
    so the jobs of a learning-rate sweep share it (through JAX's compilation cache). For
    `normalized_ascent` and optax's `adam`, `nadam`, `adamw` and `sgd` the updates are the same
    bits as with the rate compiled in (it enters as one final multiplication;
    tests/test_optim.py); where a factory computes more with its rate, XLA may round that
    differently in the last bit (optax's `adafactor` and `fromage`: up to 5e-8 in an image).
    Where the factory has no `learning_rate` argument, the rate is not a number (a schedule),
    the factory takes `*args`/`**kwargs`, or its optimiser raises anything when traced with
    the rate as an array (checked on a small image-shaped probe, nothing compiled), this
    returns `factory(**kwargs)`.

    Args:
        factory: a function returning an `optax.GradientTransformation` (`optax.adam`,
            `fvis.optim.normalized_ascent`, ...).
        **kwargs: its arguments, `learning_rate` among them.

    Returns:
        An `optax.GradientTransformation` (`optax.GradientTransformationExtraArgs` when wrapped).
    """
    plain = factory(**kwargs)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return plain
    variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters.values())
    rate = kwargs.get("learning_rate")
    if variadic or isinstance(rate, bool) or not isinstance(rate, (int, float)):
        return plain  # absent, or a schedule: the factory keeps it
    static = set(parameters) - {"learning_rate"}
    wrapped = optax.inject_hyperparams(factory, static_args=static)(**{**kwargs, "learning_rate": float(rate)})
    probe = jax.ShapeDtypeStruct((2, 2, 3), jnp.float32)  # an image's axes; traced abstractly, nothing compiled
    try:
        jax.eval_shape(lambda p: wrapped.update(p, wrapped.init(p), p), probe)
    except Exception:  # noqa: BLE001 (whatever a factory raises with a traced rate: it keeps its own path)
        return plain
    return wrapped


def check_learning_rate(learning_rate, *, key="lr"):
    """The learning rate as a float; raises InvalidValueError (naming `key`) unless it is a
    number (not a string or bool) > 0 that float32 holds as a finite value (<= 3.4e38)."""
    try:
        ok = not isinstance(learning_rate, (str, bytes, bool, np.bool_)) and \
            0 < float(learning_rate) <= float(np.finfo(np.float32).max)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidValueError(f"{key} (learning rate) must be a finite number > 0 (at most 3.4e38, float32's "
                                f"largest). Received: {key}={learning_rate!r}")
    return float(learning_rate)
