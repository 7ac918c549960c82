"""Convolution forms that XLA's CPU backend differentiates fast, in plain JAX (for Keras and Flax models).

A depthwise convolution is a sum over its window's taps of a shifted, strided slice of
the input times that tap's per-channel weights. Its forward pass and its input
gradient (pads of the slices) are then elementwise work that XLA fuses, where XLA's
CPU backend runs the input gradient of a grouped convolution through a slow generic
path: on MobileNet 0.25 and EfficientNet-Lite0 a step with it took 3.4x and 4.8x the CPU
time of the same step with slices (experiments/results/README.md, "CPU model rewrites").
"""

import itertools

import jax.numpy as jnp


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
    window = kernel.shape[:-2]
    extent = [(w - 1) * d + 1 for w, d in zip(window, dilation)]
    out = [(n - e) // s + 1 for n, e, s in zip(x.shape[1:-1], extent, strides)]
    multiplier, result = kernel.shape[-1], None
    for offsets in itertools.product(*(range(w) for w in window)):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s) for o, d, m, s in zip(offsets, dilation, out, strides))
        part = x[(slice(None), *index, slice(None))]
        tap = kernel[offsets]  # (C, multiplier)
        term = part * tap[:, 0] if multiplier == 1 else (part[..., None] * tap).reshape(*part.shape[:-1], -1)
        result = term if result is None else result + term
    return result
