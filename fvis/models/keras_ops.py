"""Two Keras ops rewritten so that XLA's CPU backend differentiates them fast.

Same values, same gradients (to float rounding); fvis swaps them in only while it
traces the model (`cpu_ops`), on the backends where `fvis.devices.AUTO` says it pays.

Max pooling as strided slices. XLA's CPU backend differentiates `reduce_window` max pooling through a generic
select-and-scatter expansion: an int32 iota per dimension, a 7-operand
reduce-window that tracks the arg-max, then a scatter. Profiled on ResNet50V2
(experiments/results), that was 29% of a feature-visualization step on 2 CPU
cores. The maximum of the k*k strided slices of the (padded) input is the same
forward value, and its gradient is elementwise selects and pads that XLA fuses.
At exact ties the gradient is shared between the tied inputs (jnp.maximum's
rule) instead of going to the first one: another valid subgradient.

1x1 convolutions as matrix products. A stride-1 1x1 convolution is a product of
the (N*H*W, C_in) pixels with the (C_in, C_out) kernel; XLA's CPU backend runs it
and its input gradient as dots, close to its matmul peak, while its convolution
path reached about half of that (ResNet50V2 step: 18% less time, the same
objective values to the last bit, experiments/results).
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


def _is_pointwise(inputs, kernel, strides, dilation_rate, data_format):
    """A stride-1, undilated, ungrouped 1x1 convolution on channels_last inputs."""
    ones = lambda v: all(x == 1 for x in _per_dim(v, kernel.ndim - 2))
    return (all(k == 1 for k in kernel.shape[:-2]) and ones(strides) and ones(dilation_rate)
            and keras_backend.standardize_data_format(data_format) == "channels_last"
            and inputs.shape[-1] == kernel.shape[-2])


def conv_pointwise_as_dot(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
    """`keras.ops.conv` (JAX backend), with stride-1 1x1 convolutions as a dot product.

    Args:
        inputs: (N, *spatial, C_in); kernel: (*ones, C_in, C_out) for the dot path.
        strides, padding, data_format, dilation_rate: as `keras.ops.conv`; any other
            convolution goes to Keras' own implementation unchanged.

    Returns:
        (N, *spatial, C_out), equal to Keras' result.
    """
    if not _is_pointwise(inputs, kernel, strides, dilation_rate, data_format):
        return _KERAS_CONV(inputs, kernel, strides, padding, data_format, dilation_rate)
    kernel = keras_backend.convert_to_tensor(kernel)  # a Keras Variable inside a layer call
    return jnp.tensordot(keras_backend.convert_to_tensor(inputs), kernel.reshape(kernel.shape[-2:]), axes=1)


_KERAS_CONV = keras_backend.nn.conv


@contextlib.contextmanager
def cpu_ops(enabled=True):
    """Inside the block, Keras layers on the JAX backend max-pool with `max_pool_by_slices`
    and run 1x1 convolutions with `conv_pointwise_as_dot`."""
    if not enabled:
        yield
        return
    nn = keras_backend.nn
    saved = nn.max_pool, nn.conv
    nn.max_pool, nn.conv = max_pool_by_slices, conv_pointwise_as_dot
    try:
        yield
    finally:
        nn.max_pool, nn.conv = saved
