"""Keras ops rewritten so that XLA's CPU backend differentiates them fast.

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

Stride-1 3x3 convolutions by Winograd's F(2x2, 3x3) (`fvis.models.winograd`), where
`winograd.worthwhile` says it pays: the same values to float32 rounding.
"""

import contextlib
import functools

import jax.numpy as jnp
import keras
from jax import lax
from keras.src import backend as keras_backend
from keras.src.layers import BatchNormalization
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv

from fvis.models import slices
from fvis.models import winograd as winograd_lib


def _per_dim(value, n):
    return (value,) * n if isinstance(value, int) else tuple(value)


def max_pool_by_slices(inputs, pool_size, strides=None, padding="valid", data_format=None):
    """`keras.ops.max_pool` (JAX backend) as the maximum over strided slices.

    Args:
        inputs: (N, *spatial, C) for channels_last, (N, C, *spatial) for channels_first.
        pool_size, strides, padding, data_format: as `keras.ops.max_pool`.

    Returns:
        The pooled array, equal to Keras' result. Its gradient (`fvis.models.slices.max_pool`'s
        custom VJP) goes to the window's maximum; at exact ties it is shared equally
        between the tied inputs (Keras gives it all to the first one: another valid
        subgradient).
    """
    channels_first = keras_backend.standardize_data_format(data_format) == "channels_first"
    x = jnp.moveaxis(inputs, 1, -1) if channels_first else inputs
    spatial = x.shape[1:-1]
    window = _per_dim(pool_size, len(spatial))
    strides = window if strides is None else _per_dim(strides, len(spatial))
    pads = (tuple(lax.padtype_to_pads(spatial, window, strides, "SAME")) if padding.lower() == "same"
            else ((0, 0),) * len(spatial))
    result = slices.max_pool(x, window, strides, tuple(tuple(p) for p in pads))
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


def conv_3x3_by_winograd(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1, *,
                         otherwise=_KERAS_CONV):
    """`keras.ops.conv` (JAX backend), with the stride-1 3x3 convolutions that `winograd.worthwhile` picks
    computed by `fvis.models.winograd.conv3x3`.

    Args:
        inputs: (N, H, W, C_in) channels_last for the Winograd path; kernel: (3, 3, C_in, C_out); both
            float32 (Keras convolves in the kernel's dtype: a layer's bfloat16 weights go to `otherwise`).
        strides, padding, data_format, dilation_rate: as `keras.ops.conv`; any other convolution
            goes to `otherwise` (Keras' own implementation, or `conv_pointwise_as_dot`).

    Returns:
        (N, H', W', C_out), Keras' result to float32 rounding.
    """
    kernel_shape, x_shape = tuple(kernel.shape), tuple(inputs.shape)
    float32 = all(keras_backend.standardize_dtype(a.dtype) == "float32" for a in (inputs, kernel))
    if (float32 and len(kernel_shape) == 4 and keras_backend.standardize_data_format(data_format) == "channels_last"
            and padding.lower() in ("same", "valid")):
        pads = ((1, 1), (1, 1)) if padding.lower() == "same" else ((0, 0), (0, 0))
        if winograd_lib.takes(x_shape, kernel_shape, _per_dim(strides, 2), _per_dim(dilation_rate, 2), pads):
            x, kernel = keras_backend.convert_to_tensor(inputs), keras_backend.convert_to_tensor(kernel)
            return winograd_lib.conv3x3(x, kernel, pads)
    return otherwise(inputs, kernel, strides, padding, data_format, dilation_rate)


def depthwise_conv_by_slices(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
    """`keras.ops.depthwise_conv` (JAX backend) as a sum of shifted, strided slices times the kernel's taps
    (`fvis.models.slices.depthwise_conv`).

    Args:
        inputs: (N, *spatial, C) for channels_last, (N, C, *spatial) for channels_first.
        kernel: (*window, C, multiplier).
        strides, padding, data_format, dilation_rate: as `keras.ops.depthwise_conv`.

    Returns:
        Keras' result to float rounding (the taps are summed in another order): channel
        i * multiplier + m.
    """
    channels_first = keras_backend.standardize_data_format(data_format) == "channels_first"
    x = keras_backend.convert_to_tensor(inputs)
    kernel = keras_backend.convert_to_tensor(kernel)
    x = jnp.moveaxis(x, 1, -1) if channels_first else x
    spatial, window = x.shape[1:-1], kernel.shape[:-2]
    strides, dilation = _per_dim(strides, len(spatial)), _per_dim(dilation_rate, len(spatial))
    extent = [(w - 1) * d + 1 for w, d in zip(window, dilation)]
    pads = (lax.padtype_to_pads(spatial, extent, strides, "SAME") if padding.lower() == "same"
            else [(0, 0)] * len(spatial))
    result = slices.depthwise_conv(x, kernel, strides, pads, dilation)
    return jnp.moveaxis(result, -1, 1) if channels_first else result


@contextlib.contextmanager
def cpu_ops(enabled=True, winograd=False):
    """Inside the block, Keras layers on the JAX backend max-pool with `max_pool_by_slices`,
    run 1x1 convolutions with `conv_pointwise_as_dot` and depthwise ones with
    `depthwise_conv_by_slices` (`enabled`), and 3x3 ones with `conv_3x3_by_winograd` (`winograd`)."""
    if not (enabled or winograd):
        yield
        return
    nn = keras_backend.nn
    saved = nn.max_pool, nn.conv, nn.depthwise_conv
    if enabled:
        nn.max_pool, nn.conv, nn.depthwise_conv = max_pool_by_slices, conv_pointwise_as_dot, depthwise_conv_by_slices
    if winograd:
        nn.conv = functools.partial(conv_3x3_by_winograd, otherwise=nn.conv)
    try:
        yield
    finally:
        nn.max_pool, nn.conv, nn.depthwise_conv = saved


def _all_layers(model, seen=None):
    """Every layer of a Functional/Sequential model, nested models' layers included, each once."""
    seen = set() if seen is None else seen
    for layer in model.layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer, seen)


def _linear(activation):
    return activation is None or activation is keras.activations.linear


def _foldable_conv(layer):
    """A channels-last convolution with Keras' base call (Conv2D, Conv3D; Conv1D has its own) or a
    DepthwiseConv2D, without activation."""
    plain = (type(layer).call is BaseConv.call and type(layer).convolution_op is BaseConv.convolution_op
             or type(layer).call is BaseDepthwiseConv.call)
    return (isinstance(layer, (BaseConv, BaseDepthwiseConv)) and plain and "call" not in vars(layer)
            and _linear(layer.activation) and layer.data_format == "channels_last")


def batchnorm_folds(model, read=()):
    """The (convolution, BatchNormalization) pairs of `model` whose batch norm folds into the convolution.

    A pair folds when the batch norm is Keras' own, normalises the last (channel) axis,
    and is called once, on the output of a channels-last convolution (Conv2D or Conv3D,
    grouped or not, or DepthwiseConv2D) that has no activation, is called once, feeds
    nothing else, and is not itself read (a layer in `read`).

    Args:
        model: a built Functional or Sequential `keras.Model`.
        read: the layers whose outputs are read (their output must not change).

    Returns:
        list of (conv layer, batch-norm layer).
    """
    read, pairs = {id(layer) for layer in read}, []
    for bn in _all_layers(model):
        if not (type(bn).call is BatchNormalization.call and "call" not in vars(bn) and len(bn._inbound_nodes) == 1):
            continue
        inputs = bn._inbound_nodes[0].input_tensors
        axis = list(bn.axis) if isinstance(bn.axis, (list, tuple)) else [bn.axis]
        if len(inputs) != 1 or axis not in ([-1], [len(inputs[0].shape) - 1]):
            continue
        conv = inputs[0]._keras_history.operation
        if (_foldable_conv(conv) and id(conv) not in read and len(conv._inbound_nodes) == 1
                and len(conv._outbound_nodes) == 1):
            pairs.append((conv, bn))
    return pairs


def _folded_call(conv, bn):
    """`conv`'s call with `bn`'s inference affine map folded into its kernel and bias (Jacob et al. 2018,
    "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
    https://arxiv.org/abs/1712.05877, section 3.2)."""

    def call(inputs):
        value = lambda v: keras_backend.convert_to_tensor(v).astype(jnp.float32)
        scale = lax.rsqrt(value(bn.moving_variance) + bn.epsilon)
        if bn.scale:
            scale = scale * value(bn.gamma)
        bias = ((value(conv.bias) if conv.use_bias else 0.0) - value(bn.moving_mean)) * scale
        if bn.center:
            bias = bias + value(bn.beta)
        kernel = value(conv.kernel)
        if isinstance(conv, BaseDepthwiseConv):  # (*window, in, multiplier): output channel i * multiplier + m
            kernel = kernel * scale.reshape(kernel.shape[-2:])
            out = keras.ops.depthwise_conv(inputs, kernel, strides=conv.strides, padding=conv.padding,
                                           dilation_rate=conv.dilation_rate, data_format=conv.data_format)
        else:
            out = conv.convolution_op(inputs, kernel * scale)
        return out + bias

    return call


def _identity(inputs, training=None, mask=None):
    return inputs


@contextlib.contextmanager
def folded_batchnorm(pairs):
    """Inside the block, each (conv, bn) pair of `batchnorm_folds` computes the convolution with the
    batch norm folded into its weights, and the batch norm passes its input through: the same
    values to float rounding, one affine map (and its gradient) fewer per pair. Inference only."""
    for conv, bn in pairs:
        conv.call, bn.call = _folded_call(conv, bn), _identity
    try:
        yield
    finally:
        for conv, bn in pairs:
            del conv.call, bn.call
