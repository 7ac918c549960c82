"""Max pooling written as strided slices, for a cheap gradient on CPU.

XLA's CPU backend differentiates `reduce_window` max pooling through a generic
select-and-scatter expansion: an int32 iota per dimension, a 7-operand
reduce-window that tracks the arg-max, then a scatter. Profiled on ResNet50V2
(experiments/results), that was 29% of a feature-visualization step on 2 CPU
cores. The maximum of the k*k strided slices of the (padded) input is the same
forward value, and its gradient is elementwise selects and pads that XLA fuses.
At exact ties the gradient is shared between the tied inputs (jnp.maximum's
rule) instead of going to the first one: another valid subgradient.

fvis swaps Keras' JAX `max_pool` for this one only while it traces the model
(`max_pool_as_slices`), on the backends where `fvis.devices.AUTO` says it pays.
"""

import contextlib
import itertools

import jax.numpy as jnp
from jax import lax
from keras.src import backend as keras_backend


def _per_dim(value, n):
    return (value,) * n if isinstance(value, int) else tuple(value)


def max_pool_by_slices(inputs, pool_size, strides=None, padding="valid", data_format=None):
    """`keras.ops.max_pool` (JAX backend) as the maximum over strided slices.

    Args:
        inputs: (N, *spatial, C) for channels_last, (N, C, *spatial) for channels_first.
        pool_size, strides, padding, data_format: as `keras.ops.max_pool`.

    Returns:
        The pooled array, equal to Keras' result.
    """
    channels_first = keras_backend.standardize_data_format(data_format) == "channels_first"
    x = jnp.moveaxis(inputs, 1, -1) if channels_first else inputs
    spatial = x.shape[1:-1]
    window = _per_dim(pool_size, len(spatial))
    strides = window if strides is None else _per_dim(strides, len(spatial))
    if padding.lower() == "same":
        pads = lax.padtype_to_pads(spatial, window, strides, "SAME")
        x = jnp.pad(x, [(0, 0), *pads, (0, 0)], constant_values=-jnp.inf)
    out = [(n - w) // s + 1 for n, w, s in zip(x.shape[1:-1], window, strides)]
    result = None
    for offsets in itertools.product(*(range(w) for w in window)):
        index = tuple(slice(o, o + (m - 1) * s + 1, s) for o, m, s in zip(offsets, out, strides))
        part = x[(slice(None), *index, slice(None))]
        result = part if result is None else jnp.maximum(result, part)
    return jnp.moveaxis(result, -1, 1) if channels_first else result


@contextlib.contextmanager
def max_pool_as_slices(enabled=True):
    """Inside the block, Keras layers on the JAX backend max-pool with `max_pool_by_slices`."""
    if not enabled:
        yield
        return
    nn = keras_backend.nn
    original, nn.max_pool = nn.max_pool, max_pool_by_slices
    try:
        yield
    finally:
        nn.max_pool = original
