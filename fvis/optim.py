"""Optimisers for feature visualization, as optax gradient transformations.

The render loop minimises the negated objective with any
`optax.GradientTransformation`, vmapped so that each image has its own state.
The reference rule ("normalise the gradient to unit L2 norm, then step") is
`normalized_ascent`; `optax.adam(0.05)` and the rest plug into the same place.
"""

import jax
import jax.numpy as jnp
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
        learning_rate: step length in fvis' [-1, 1] image space, > 0.
    """
    check_learning_rate(learning_rate)
    return optax.chain(scale_by_l2_norm(), optax.scale(-float(learning_rate)))


def check_learning_rate(learning_rate):
    """Raises InvalidValueError unless learning_rate is a finite number > 0."""
    try:
        ok = float(learning_rate) > 0 and jnp.isfinite(float(learning_rate))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidValueError(f"lr (learning rate) must be a finite number > 0. "
                                f"Received: lr={learning_rate!r}")
    return float(learning_rate)
