"""Norms and standard deviations that stay finite, with finite gradients, at exactly zero.

`jnp.linalg.norm` and `jnp.std` take a square root, whose derivative at 0 is infinite:
their gradient at an all-zero (or constant) input is NaN in JAX, and one NaN poisons a
whole image. A dead unit gives exactly such inputs. These versions clamp the sum of
squares at `epsilon` before the root, so the value is >= sqrt(epsilon) and the
gradient at zero is 0.
"""

import jax.numpy as jnp


def safe_norm(x, *, axis=None, keepdims=False, epsilon=1e-12):
    """L2 norm sqrt(max(sum(x**2), epsilon)) over `axis`.

    Args:
        x: float array, any shape.
        axis, keepdims: as in `jnp.sum`.
        epsilon: floor of the sum of squares (> 0).

    Returns:
        float array of `x`'s dtype, >= sqrt(epsilon); its gradient is finite everywhere
        and 0 where x is all zero.
    """
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims), epsilon))


def safe_std(x, *, axis=None, keepdims=False, epsilon=1e-12):
    """Standard deviation sqrt(max(var(x), epsilon)) over `axis`; finite gradient for constant x.

    Args and Returns: as `safe_norm`, with the variance in place of the sum of squares.
    """
    return jnp.sqrt(jnp.maximum(jnp.var(x, axis=axis, keepdims=keepdims), epsilon))
