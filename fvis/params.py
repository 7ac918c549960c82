"""Parameterizations: how an image is represented while it is optimised.

A parameterization is an `(init, to_image)` pair of pure functions, for ONE image:

- `init(key, shape) -> params`: `shape` is the image's (H, W, C);
- `to_image(params) -> image`: (H, W, C) float32 in fvis' [-1, 1] space.

The optimiser updates `params`; the objective sees `to_image(params)`.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fvis.errors import InvalidValueError


class Parameterization(NamedTuple):
    """An image representation; see the module docstring."""

    init: Callable
    to_image: Callable


def pixel(*, init_scale=0.125):
    """Plain pixels, as in the reference: params are the image itself.

    Args:
        init_scale: the start is uniform noise in [-init_scale, init_scale) around gray;
            0.125 reproduces the reference's `(uniform[0, 1) - 0.5) * 0.25`.
    """
    if not init_scale >= 0:
        raise InvalidValueError(f"init_scale must be >= 0. Received: init_scale={init_scale}")

    def init(key, shape):
        return (jax.random.uniform(key, shape, jnp.float32) - 0.5) * (2.0 * init_scale)

    return Parameterization(init, lambda params: params)
