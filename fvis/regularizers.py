"""Regularizers: penalties on the image itself, as objectives on `INPUT`, to be subtracted.

Each reads ONE image (H, W, C) in fvis' [-1, 1] space, before transforms, and
returns a non-negative float32 scalar, a mean over pixels (so weights do not depend
on the image size)::

    objectives.channel("block4c_add") - 0.05 * regularizers.total_variation()

They take no unit: every unit gets the same penalty.
"""

import jax
import jax.numpy as jnp

from fvis.objectives import INPUT, Objective


def _input_penalty(fn, name):
    return Objective(lambda acts, unit: fn(acts[INPUT]), layers=[INPUT], checks=[lambda shapes: None], name=name)


def l1(*, constant=0.0):
    """Mean absolute difference of the image from `constant` (0: gray)."""
    return _input_penalty(lambda x: jnp.mean(jnp.abs(x - constant)), f"l1({constant:g})")


def l2(*, constant=0.0):
    """Root mean square difference of the image from `constant`."""
    return _input_penalty(lambda x: jnp.sqrt(jnp.mean(jnp.square(x - constant)) + 1e-12), f"l2({constant:g})")


def total_variation():
    """Mean absolute difference between neighbouring pixels, summed over the two axes
    (anisotropic total variation; Mahendran & Vedaldi, CVPR 2015)."""
    def tv(x):
        return jnp.mean(jnp.abs(jnp.diff(x, axis=0))) + jnp.mean(jnp.abs(jnp.diff(x, axis=1)))
    return _input_penalty(tv, "total_variation")


def _blur3(x):
    """(H, W, C) -> the same, blurred by the 3x3 binomial kernel, edges replicated."""
    padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def blur():
    """Half the mean squared distance of the image to its (fixed) 3x3-blurred self: its
    gradient step moves the image towards the blur (Lucid's `blur_input_each_step`;
    Nguyen et al. 2015 blur the image every few steps)."""
    return _input_penalty(lambda x: 0.5 * jnp.mean(jnp.square(x - jax.lax.stop_gradient(_blur3(x)))), "blur")
