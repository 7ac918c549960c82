"""Max pooling as strided slices equals Keras' max pooling, values and gradients."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import fvis
from fvis.pooling import max_pool_as_slices, max_pool_by_slices


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


def test_forward_with_slices_equals_forward_without(tiny):
    import dataclasses
    job = fvis.prepare(tiny, "conv3", [0])
    plain = dataclasses.replace(job.forward, pool_as_slices=False)
    sliced = dataclasses.replace(job.forward, pool_as_slices=True)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (32, 32, 3)).astype("float32"))
    w = job.forward.weights()
    value = lambda fwd: lambda x: jnp.mean(fwd(w, x)["conv3"] ** 2)
    np.testing.assert_allclose(value(sliced)(x), value(plain)(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(value(sliced))(x), jax.grad(value(plain))(x), rtol=1e-5, atol=1e-9)
    assert "reduce-window" not in jax.jit(jax.grad(value(sliced))).lower(x).compile().as_text()


def test_the_swap_is_undone():
    from keras.src import backend
    before = backend.nn.max_pool
    with max_pool_as_slices():
        assert backend.nn.max_pool is max_pool_by_slices
    assert backend.nn.max_pool is before
