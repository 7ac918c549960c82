"""The CPU rewrites (max pooling, 1x1 and depthwise convolutions) and the batch-norm fold equal Keras' ops, values and gradients."""

import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import fvis
from fvis.models.keras_ops import (batchnorm_folds, conv_pointwise_as_dot, cpu_ops, depthwise_conv_by_slices,
                                  max_pool_by_slices)
from tests.conftest import value_and_input_gradient


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
    ours = value_and_input_gradient(lambda x: max_pool_by_slices(x, pool, strides, padding, data_format), x)
    theirs = value_and_input_gradient(lambda x: keras.ops.max_pool(x, pool, strides, padding, data_format), x)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-7)


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
    ours, theirs = (jax.jit(jax.value_and_grad(value(fwd)))(x) for fwd in (sliced, plain))
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-9)
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
    args = (strides, padding, "channels_last", dilation)
    ours = value_and_input_gradient(lambda x: conv_pointwise_as_dot(x, k, *args), x)
    theirs = value_and_input_gradient(lambda x: keras.ops.conv(x, k, *args), x)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_swap_is_undone():
    from keras.src import backend
    before = backend.nn.max_pool, backend.nn.conv
    with cpu_ops():
        assert backend.nn.max_pool is max_pool_by_slices and backend.nn.conv is conv_pointwise_as_dot
    assert (backend.nn.max_pool, backend.nn.conv) == before


def test_tied_maxima_share_the_gradient_equally():
    """Where k inputs of a window tie for the maximum, each receives 1/k of the gradient; none is lost."""
    x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(1.0)  # window (0,0): one maximum; the others: 4 ties
    grad = jax.grad(lambda x: jnp.sum(max_pool_by_slices(x, (2, 2), (2, 2), "valid") * jnp.arange(1.0, 5.0)
                                      .reshape(1, 2, 2, 1)))(x)
    expected = np.zeros((4, 4))
    expected[0, 0] = 1.0                  # the only maximum of window (0, 0), weight 1
    expected[0:2, 2:4] = 2.0 / 4          # window (0, 1): 4 tied zeros share its weight 2
    expected[2:4, 0:2] = 3.0 / 4
    expected[2:4, 2:4] = 4.0 / 4
    np.testing.assert_allclose(grad[0, :, :, 0], expected, rtol=1e-6)


def test_overlapping_windows_gradient_matches_a_plain_restatement():
    """3x3 stride-2 'same' pooling (ResNet's pool1) on random values: each window's gradient goes to its
    arg-max; a pixel in several windows collects from each (written out with numpy)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 7, 6, 2)).astype("float32")
    g = rng.normal(size=(1, 4, 3, 2)).astype("float32")
    _, vjp = jax.vjp(lambda x: max_pool_by_slices(x, (3, 3), (2, 2), "same"), jnp.asarray(x))
    padded = np.pad(x, [(0, 0), (1, 1), (0, 1), (0, 0)], constant_values=-np.inf)  # SAME: 7 -> 9, 6 -> 7
    expected = np.zeros_like(padded)
    for i in range(4):
        for j in range(3):
            for c in range(2):
                window = padded[0, 2 * i: 2 * i + 3, 2 * j: 2 * j + 3, c]
                a, b = np.unravel_index(np.argmax(window), window.shape)
                expected[0, 2 * i + a, 2 * j + b, c] += g[0, i, j, c]
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], expected[:, 1:8, 0:6], rtol=1e-6)


@pytest.mark.parametrize("shape, kernel, strides, padding, dilation, data_format", [
    ((2, 13, 12, 4), (3, 3, 4, 1), 1, "same", 1, "channels_last"),   # MobileNet's depthwise 3x3
    ((1, 13, 12, 4), (3, 3, 4, 2), 2, "same", 1, "channels_last"),   # strided, multiplier 2
    ((1, 13, 12, 4), (5, 5, 4, 1), 2, "valid", 1, "channels_last"),  # EfficientNet's 5x5
    ((1, 13, 12, 4), (3, 3, 4, 1), 1, "same", 2, "channels_last"),   # dilated
    ((1, 4, 13, 12), (3, 3, 4, 2), 2, "same", 1, "channels_first"),
    ((2, 11, 3), (3, 3, 1), 2, "same", 1, "channels_last"),          # 1-D
])
def test_depthwise_conv_by_slices_equals_keras(shape, kernel, strides, padding, dilation, data_format):
    """The depthwise convolution as shifted slices: Keras' values and input gradients, to float rounding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape).astype("float32"))
    k = jnp.asarray(rng.normal(size=kernel).astype("float32"))
    args = (strides, padding, data_format, dilation)
    ours = value_and_input_gradient(lambda x: depthwise_conv_by_slices(x, k, *args), x)
    theirs = value_and_input_gradient(lambda x: keras.ops.depthwise_conv(x, k, *args), x)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _conv_bn_model():
    """Every foldable form (Conv2D with and without bias, grouped, DepthwiseConv2D with multiplier 2,
    batch norms without centre or scale) and every form that must stay: a convolution with an activation,
    one read by two layers, a batch norm over another axis."""
    x = keras.Input((12, 12, 3))
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    y = keras.layers.BatchNormalization(name="b1")(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="same", name="d2")(y)
    y = keras.layers.BatchNormalization(center=False, name="b2")(y)
    y = keras.layers.Conv2D(8, 1, groups=4, name="g3")(y)
    y = keras.layers.BatchNormalization(scale=False, name="b3")(y)
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="act4")(y)
    a = keras.layers.BatchNormalization(name="b4")(a)                    # after an activation: stays
    s = keras.layers.Conv2D(8, 1, name="shared5")(a)
    b = keras.layers.BatchNormalization(name="b5")(s)                    # its conv also feeds the add: stays
    y = keras.layers.Add()([s, b])
    y = keras.layers.Conv2D(8, 1, name="c6")(y)
    y = keras.layers.BatchNormalization(axis=1, name="b6")(y)            # over rows, not channels: stays
    y = keras.layers.Conv2D(4, 1, name="c7")(y)
    y = keras.layers.BatchNormalization(name="b7")(y)
    model = keras.Model(x, y)
    rng = np.random.default_rng(2)
    for layer in model.layers:   # statistics far from the initial (0, 1) so a wrong fold shows
        if isinstance(layer, keras.layers.BatchNormalization):
            for v in layer.weights:
                v.assign(rng.uniform(0.5, 2.0, v.shape) if "variance" in v.path or "gamma" in v.path
                         else rng.normal(size=v.shape))
    return model


def test_batchnorm_folds_only_where_the_values_stay():
    """The pairs found: exactly the conv -> batch norm pairs whose convolution output nothing else uses,
    has no activation and is not read; a read convolution is left alone."""
    model = _conv_bn_model()
    names = lambda pairs: [(c.name, b.name) for c, b in pairs]
    assert names(batchnorm_folds(model)) == [("c1", "b1"), ("d2", "b2"), ("g3", "b3"), ("c7", "b7")]
    assert names(batchnorm_folds(model, read=[model.get_layer("c7")])) == [("c1", "b1"), ("d2", "b2"), ("g3", "b3")]


@pytest.mark.parametrize("read", [["b7"], ["b3", "c7"], ["b1"]])
def test_folded_forward_equals_keras(read):
    """With fold_batchnorm the read activations and their input gradients are Keras' own to float rounding,
    whichever layers are read (a read convolution keeps its own output)."""
    import dataclasses
    model = fvis.models.wrap(_conv_bn_model())
    forward = model.forward(read)
    plain = dataclasses.replace(forward, rewrites=fvis.models.Rewrites(fold_batchnorm=False))
    folded = dataclasses.replace(forward, rewrites=fvis.models.Rewrites(fold_batchnorm=True))
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (12, 12, 3)).astype("float32"))
    w = forward.weights()
    for path in read:
        ours, theirs = (value_and_input_gradient(lambda x: fwd(w, x)[path], x) for fwd in (folded, plain))
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4, atol=1e-5)
    # A batch norm computes x * scale on the feature map; folded, that multiply is gone from the program.
    feature_map_multiplies = lambda fwd: len(re.findall(r"stablehlo.multiply [^\n]*: tensor<1x(?:12x12|6x6)x",
                                                        jax.jit(lambda x: fwd(w, x)[read[0]]).lower(x).as_text()))
    assert feature_map_multiplies(folded) < feature_map_multiplies(plain)
    assert all("call" not in vars(layer) for layer in model.model.layers)  # the swap is undone


def test_flax_depthwise_convolutions_as_slices_keep_values_and_gradients():
    """A Flax NNX model's depthwise convolutions (multiplier 1 and 2, strided, 'SAME' and explicit padding)
    run as slices under cpu_ops: the same activations and input gradients as lax's grouped convolution."""
    import dataclasses
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(3, 6, (3, 3), strides=2, padding="SAME", feature_group_count=3, rngs=rngs)
            self.b = nnx.Conv(6, 6, (5, 5), padding=((2, 1), (1, 2)), feature_group_count=6, rngs=rngs)
            self.c = nnx.Conv(6, 4, (1, 1), rngs=rngs)

        def __call__(self, x):
            return self.c(nnx.relu(self.b(nnx.relu(self.a(x)))))

    model = fvis.models.from_nnx(Net(nnx.Rngs(0)), image_size=(13, 12))
    forward = model.forward(["b", "c"])
    plain = dataclasses.replace(forward, rewrites=fvis.models.Rewrites(cpu_ops=False))
    sliced = dataclasses.replace(forward, rewrites=fvis.models.Rewrites(cpu_ops=True))
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (13, 12, 3)).astype("float32"))
    w = forward.weights()
    for path in ("b", "c"):
        ours, theirs = (value_and_input_gradient(lambda x: fwd(w, x)[path], x) for fwd in (sliced, plain))
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, atol=1e-5)
    text = jax.jit(lambda x: sliced(w, x)["c"]).lower(x).as_text()
    assert "feature_group_count = 3" not in text and "feature_group_count = 6" not in text


def test_a_job_with_every_cpu_rewrite_gives_the_images_of_a_job_without(monkeypatch):
    """End to end: 3 steps of the reference method on a model with every rewritten form (max pooling,
    1x1, depthwise and strided convolutions, foldable batch norms): the images with all CPU rewrites on
    equal those with all off, within float tolerance."""
    from fvis import devices
    keras.utils.set_random_seed(0)  # the same weights whatever ran before in this process
    x = keras.Input((24, 24, 3))
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU(6.0)(y)
    y = keras.layers.MaxPooling2D(3, 2, padding="same")(y)
    y = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU(6.0)(y)
    y = keras.layers.Conv2D(16, 1, use_bias=False)(y)
    y = keras.layers.BatchNormalization(name="last")(y)
    model = fvis.models.wrap(keras.Model(x, y))
    results = {}
    for on in (False, True):
        monkeypatch.setitem(devices.AUTO["cpu"], "cpu_ops", on)
        monkeypatch.setitem(devices.AUTO["cpu"], "fold_batchnorm", on)
        results[on] = fvis.visualize(model, "last", [0, 5, 9], steps=3, progress=False)
    assert np.max(np.abs(results[True].images - results[False].images)) < 1e-4
    np.testing.assert_allclose(results[True].curves, results[False].curves, rtol=1e-4, atol=1e-6)
    assert np.all(results[True].curves[..., -1] != results[True].curves[..., 0])  # the images moved
