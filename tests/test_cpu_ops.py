"""The CPU rewrites of max pooling and 1x1 convolutions equal Keras' ops, values and gradients."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import fvis
from fvis.models.keras_ops import conv_pointwise_as_dot, cpu_ops, max_pool_by_slices


@pytest.mark.parametrize("shape, pool, strides, padding, data_format", [
    ((2, 12, 13, 5), (3, 3), (2, 2), "same", "channels_last"),     # ResNet's pool1
    ((2, 12, 13, 5), (3, 3), (2, 2), "valid", "channels_last"),
    ((1, 9, 9, 4), (1, 1), (2, 2), "valid", "channels_last"),      # ResNetV2's strided shortcut
    ((1, 11, 11, 3), (2, 3), (1, 2), "same", "channels_last"),
    ((1, 3, 11, 12), (2, 3), (1, 2), "same", "channels_first"),
    ((2, 11, 3), (3,), (2,), "same", "channels_last"),             # 1-D
])
def test_values_and_gradients_equal_keras(shape, pool, strides, padding, data_format):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype("float32"))
    ours = lambda x: max_pool_by_slices(x, pool, strides, padding, data_format)
    keras_pool = lambda x: keras.ops.max_pool(x, pool, strides, padding, data_format)
    np.testing.assert_array_equal(ours(x), keras_pool(x))
    grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
    np.testing.assert_allclose(grad(ours), grad(keras_pool), atol=1e-7)


def test_forward_with_cpu_ops_equals_forward_without():
    import dataclasses
    x = keras.Input((32, 32, 3))
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(x)
    y = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool")(y)
    y = keras.layers.Conv2D(16, 1, name="pointwise")(y)
    y = keras.layers.Conv2D(16, 1, groups=4, name="grouped")(y)  # grouped 1x1: Keras' own path
    y = keras.layers.Conv2D(32, 3, padding="same", name="conv3")(y)
    job = fvis.prepare(fvis.models.wrap(keras.Model(x, y)), "conv3", [0])
    plain = dataclasses.replace(job.forward, rewrites=fvis.models.Rewrites(cpu_ops=False))
    sliced = dataclasses.replace(job.forward, rewrites=fvis.models.Rewrites(cpu_ops=True))
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (32, 32, 3)).astype("float32"))
    w = job.forward.weights()
    value = lambda fwd: lambda x: jnp.mean(fwd(w, x)["conv3"] ** 2)
    np.testing.assert_allclose(value(sliced)(x), value(plain)(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(value(sliced))(x), jax.grad(value(plain))(x), rtol=1e-5, atol=1e-9)
    assert "reduce-window" not in jax.jit(jax.grad(value(sliced))).lower(x).compile().as_text()


@pytest.mark.parametrize("kernel, strides, dilation, padding", [
    ((1, 1, 6, 4), 1, 1, "valid"),   # the dot path
    ((1, 1, 6, 4), 1, 1, "same"),
    ((1, 1, 6, 4), 2, 1, "valid"),   # strided: Keras' own path
    ((3, 3, 6, 4), 1, 1, "same"),
    ((3, 3, 6, 4), 1, 2, "same"),
])
def test_pointwise_conv_equals_keras(kernel, strides, dilation, padding):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 9, 7, 6)).astype("float32"))
    k = jnp.asarray(rng.normal(size=kernel).astype("float32"))
    ours = lambda x: conv_pointwise_as_dot(x, k, strides, padding, "channels_last", dilation)
    keras_conv = lambda x: keras.ops.conv(x, k, strides, padding, "channels_last", dilation)
    np.testing.assert_allclose(ours(x), keras_conv(x), rtol=1e-5, atol=1e-5)
    grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
    np.testing.assert_allclose(grad(ours), grad(keras_conv), rtol=1e-5, atol=1e-5)


def test_the_swap_is_undone():
    from keras.src import backend
    before = backend.nn.max_pool, backend.nn.conv
    with cpu_ops():
        assert backend.nn.max_pool is max_pool_by_slices and backend.nn.conv is conv_pointwise_as_dot
    assert (backend.nn.max_pool, backend.nn.conv) == before
