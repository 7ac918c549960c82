"""Pooling and convolution forms that XLA's CPU backend differentiates fast, in plain JAX (for Keras
and Flax models), built from the strided slices of a window's taps.

Max pooling is the maximum of its window's strided slices, with its gradient written
out (`max_pool`). A depthwise convolution is a sum over its window's taps of a shifted, strided slice of
the input times that tap's per-channel weights. Its forward pass and its input
gradient (pads of the slices) are then elementwise work that XLA fuses, where XLA's
CPU backend runs the input gradient of a grouped convolution through a slow generic
path: on MobileNet 0.25 and EfficientNet-Lite0 a step with it took 3.4x and 4.8x the CPU
time of the same step with slices (experiments/results/README.md, "CPU model rewrites").
"""

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax


def window_slices(x, window, strides, dilation=None):
    """The strided slices of the (padded) channels-last `x`, one per tap of the window.

    Args:
        x: (N, *spatial, C); window, strides, dilation: one int per spatial dimension.

    Yields:
        (offsets, out, slice): the tap's offsets in the window, the output's spatial
        size, and the (N, *out, C) slice that tap reads.
    """
    dilation = dilation or (1,) * len(window)
    extent = [(w - 1) * d + 1 for w, d in zip(window, dilation)]
    out = [(n - e) // s + 1 for n, e, s in zip(x.shape[1:-1], extent, strides)]
    for offsets in itertools.product(*(range(w) for w in window)):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s) for o, d, m, s in zip(offsets, dilation, out, strides))
        yield offsets, out, x[(slice(None), *index, slice(None))]


def depthwise_conv(x, kernel, strides, pads, dilation):
    """A channels-last depthwise convolution as the sum of its taps' strided slices.

    Args:
        x: (N, *spatial, C) float array.
        kernel: (*window, C, multiplier) float array.
        strides, dilation: one int per spatial dimension.
        pads: one (low, high) pair per spatial dimension (zero padding).

    Returns:
        (N, *out_spatial, C * multiplier), channel i * multiplier + m: the value of
        `lax.conv_general_dilated` with `feature_group_count=C` to float rounding.
    """
    if any(lo or hi for lo, hi in pads):
        x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    multiplier, result = kernel.shape[-1], None
    for offsets, _, part in window_slices(x, kernel.shape[:-2], strides, dilation):
        tap = kernel[offsets]  # (C, multiplier)
        term = part * tap[:, 0] if multiplier == 1 else (part[..., None] * tap).reshape(*part.shape[:-1], -1)
        result = term if result is None else result + term
    return result


def _pad_input(x, pads):
    return jnp.pad(x, [(0, 0), *pads, (0, 0)], constant_values=-jnp.inf) if any(map(any, pads)) else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window, strides, pads):
    """Channels-last max pooling as the maximum of the window's strided slices.

    Args:
        x: (N, *spatial, C) float array.
        window, strides: tuples, one int per spatial dimension.
        pads: tuple of (low, high) pairs, one per spatial dimension (padding with -inf).

    Returns:
        (N, *out_spatial, C). Its gradient goes to each window's maximum; inputs that tie
        for it share it equally.
    """
    result = None
    for _, _, part in window_slices(_pad_input(x, pads), window, strides):
        result = part if result is None else jnp.maximum(result, part)
    return result


def _max_pool_fwd(x, window, strides, pads):
    result = max_pool(x, window, strides, pads)
    return result, (x, result)


def _max_pool_bwd(window, strides, pads, residuals, g):
    """Each slice's share of the gradient, scattered back with an interior-padded `lax.pad`.

    Written out rather than left to autodiff: the gradient of a chain of `jnp.maximum`
    makes XLA's CPU backend recompute the chain inside every slice's fused scatter
    (profiled on ResNet50V2's pool1: 12.6 ms of a 68 ms step, experiments/results).
    """
    x, result = residuals
    padded = _pad_input(x, pads)
    parts = list(window_slices(padded, window, strides))
    hits = [part == result for _, _, part in parts]
    share = g / sum(h.astype(g.dtype) for h in hits)
    grad = None
    for (offsets, out, _), hit in zip(parts, hits):
        config = [(0, 0, 0)] + [(o, n - o - (m - 1) * s - 1, s - 1)
                                for o, m, s, n in zip(offsets, out, strides, padded.shape[1:-1])] + [(0, 0, 0)]
        piece = lax.pad(jnp.where(hit, share, 0.0).astype(g.dtype), jnp.zeros((), g.dtype), config)
        grad = piece if grad is None else grad + piece
    index = tuple(slice(lo, n - hi) for (lo, hi), n in zip(pads, padded.shape[1:-1]))
    return (grad[(slice(None), *index, slice(None))],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
