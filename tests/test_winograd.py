"""Winograd's F(2x2, 3x3) convolution (`fvis.models.winograd`) and the rewrite that uses it: the values and
gradients of the library convolution to float32 rounding, only where it applies, in Keras and Flax models."""

import dataclasses

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from jax import lax

import fvis
from fvis.models import winograd
from fvis.models.keras_ops import conv_3x3_by_winograd, cpu_ops

NHWC = ("NHWC", "HWIO", "NHWC")


def _library(x, kernel, pads):
    return lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=NHWC,
                                    precision=lax.Precision.HIGHEST)


def _jit(conv):
    return jax.jit(conv, static_argnums=2)


def _relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("shape, c_out, pads", [
    ((2, 9, 8, 5), 7, ((1, 1), (1, 1))),    # "same", odd and even sizes, two images
    ((1, 7, 11, 3), 4, ((0, 0), (0, 0))),   # "valid"
    ((1, 3, 3, 2), 2, ((0, 0), (0, 0))),    # one output pixel
    ((1, 4, 5, 2), 3, ((0, 2), (1, 0))),    # uneven padding
    ((1, 12, 12, 32), 32, ((1, 1), (1, 1))),
])
def test_values_and_both_gradients_equal_the_library_convolution(shape, c_out, pads):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, shape[-1], c_out)), jnp.float32)
    ours, theirs = _jit(winograd.conv3x3)(x, kernel, pads), _jit(_library)(x, kernel, pads)
    assert ours.shape == theirs.shape
    assert _relative(ours, theirs) < 2e-6
    cotangent = jnp.asarray(rng.normal(size=theirs.shape), jnp.float32)  # a linear loss: the backward pass alone
    loss = lambda conv: lambda x, k: jnp.sum(conv(x, k, pads) * cotangent)
    for ours_grad, their_grad in zip(jax.jit(jax.grad(loss(winograd.conv3x3), (0, 1)))(x, kernel),
                                     jax.jit(jax.grad(loss(_library), (0, 1)))(x, kernel), strict=True):
        assert _relative(ours_grad, their_grad) < 2e-6


def test_a_known_value_by_hand():
    """An all-ones 4x4 image and kernel: each VALID output sums 9 ones; the input gradient of their sum
    counts the 3x3 windows that cover each pixel (1, 2, 2, 1 along each axis, multiplied)."""
    x, kernel = jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1))
    np.testing.assert_array_equal(jax.jit(winograd.conv3x3)(x, kernel)[0, :, :, 0], np.full((2, 2), 9.0))
    covered = np.outer([1, 2, 2, 1], [1, 2, 2, 1])
    gradient = jax.jit(jax.grad(lambda x: jnp.sum(winograd.conv3x3(x, kernel))))(x)
    np.testing.assert_array_equal(gradient[0, :, :, 0], covered)


def test_under_vmap_each_image_gets_its_own_result():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 1, 10, 10, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
    ours = jax.jit(jax.vmap(lambda x: winograd.conv3x3(x, kernel, ((1, 1), (1, 1)))))(x)
    for i in range(3):
        assert _relative(ours[i], _library(x[i], kernel, ((1, 1), (1, 1)))) < 2e-6


@pytest.mark.parametrize("x_shape, kernel_shape, strides, dilation, pads", [
    ((1, 8, 8, 4), (3, 3, 4, 4), (2, 2), (1, 1), ((1, 1), (1, 1))),   # strided
    ((1, 8, 8, 4), (3, 3, 4, 4), (1, 1), (2, 2), ((2, 2), (2, 2))),   # dilated
    ((1, 8, 8, 4), (3, 3, 2, 4), (1, 1), (1, 1), ((1, 1), (1, 1))),   # grouped (C_in / 2 per group)
    ((1, 8, 8, 4), (5, 5, 4, 4), (1, 1), (1, 1), ((2, 2), (2, 2))),   # 5x5
    ((1, 8, 8, 4), (3, 3, 4, 4), (1, 1), (1, 1), ((-1, 0), (0, 0))),  # negative padding (a crop)
    ((1, 2, 8, 4), (3, 3, 4, 4), (1, 1), (1, 1), ((0, 0), (0, 0))),   # no output row
    ((1, 8, 4), (3, 4, 4), (1,), (1,), ((1, 1),)),                   # 1-D
])
def test_applies_only_to_stride_1_undilated_ungrouped_2d_3x3(x_shape, kernel_shape, strides, dilation, pads):
    assert not winograd.applies(x_shape, kernel_shape, strides, dilation, pads)


def test_a_convolution_it_does_not_compute_is_refused_by_name():
    with pytest.raises(ValueError, match=r"Received: x \(1, 8, 8, 4\), kernel \(5, 5, 4, 4\)"):
        winograd.conv3x3(jnp.ones((1, 8, 8, 4)), jnp.ones((5, 5, 4, 4)), ((2, 2), (2, 2)))


@pytest.mark.parametrize("x_shape, c_out, expected", [
    ((1, 45, 45, 64), 64, True),     # ResNet50V2 conv2 at 180 pixels: measured win
    ((1, 23, 23, 128), 128, True),   # conv3 at 180
    ((1, 12, 12, 256), 256, False),  # conv4: measured loss
    ((1, 7, 7, 512), 512, False),
    ((1, 56, 56, 64), 64, False),    # conv2 at 224: neutral in the step, costs compile time
    ((1, 25, 25, 128), 128, True),   # conv3 at 180 as Keras pads it
    ((1, 28, 28, 128), 128, False),  # conv3 at 224: measured loss in the step
    ((1, 30, 30, 128), 128, False),  # and as Keras pads it
    ((1, 112, 112, 64), 64, False),  # large maps: measured loss
    ((1, 32, 32, 3), 16, False),     # few channels
])
def test_worthwhile_follows_the_measured_sizes(x_shape, c_out, expected):
    assert winograd.worthwhile(x_shape, (3, 3, x_shape[-1], c_out)) is expected


@pytest.mark.parametrize("shape, kernel, padding, data_format, rewritten", [
    ((1, 20, 18, 32), (3, 3, 32, 40), "same", "channels_last", True),
    ((2, 20, 18, 32), (3, 3, 32, 40), "valid", "channels_last", True),
    ((1, 20, 18, 8), (3, 3, 8, 40), "same", "channels_last", False),     # too few channels: Keras' own
    ((1, 32, 20, 18), (3, 3, 32, 40), "same", "channels_first", False),  # channels_first: Keras' own
])
def test_keras_conv_by_winograd_equals_keras(shape, kernel, padding, data_format, rewritten):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=kernel), jnp.float32)
    ours = lambda x: conv_3x3_by_winograd(x, k, 1, padding, data_format, 1)
    theirs = lambda x: keras.ops.conv(x, k, 1, padding, data_format, 1)
    assert _relative(jax.jit(ours)(x), jax.jit(theirs)(x)) < 2e-6
    grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(f(x)))))(x)
    assert _relative(grad(ours), grad(theirs)) < 5e-6
    batched_dots = "dot_general" in jax.jit(ours).lower(x).as_text()
    assert batched_dots is rewritten


def test_the_swap_is_undone_and_chains_to_the_dot_path():
    from keras.src import backend
    before = backend.nn.conv
    with cpu_ops(enabled=False, winograd=True):
        assert backend.nn.conv.func is conv_3x3_by_winograd and backend.nn.conv.keywords["otherwise"] is before
    with cpu_ops(enabled=True, winograd=True):
        assert backend.nn.conv.keywords["otherwise"].__name__ == "conv_pointwise_as_dot"
    assert backend.nn.conv is before


def _keras_model():
    keras.utils.set_random_seed(0)
    x = keras.Input((24, 24, 3))
    y = keras.layers.Conv2D(32, 3, strides=1, padding="same", activation="relu", name="a")(x)  # 3 in: library
    y = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="b")(y)  # rewritten
    y = keras.layers.BatchNormalization(name="b_bn")(y)
    y = keras.layers.ReLU(name="b_relu")(y)
    y = keras.layers.Conv2D(48, 3, padding="valid", name="c")(y)                # rewritten, 24 -> 22
    return fvis.models.wrap(keras.Model(x, y))


def test_keras_forward_with_winograd_equals_forward_without_and_uses_it_only_at_float32():
    forward = _keras_model().forward(["b_relu", "c"])
    plain = dataclasses.replace(forward, rewrites=fvis.models.Rewrites(winograd=False))
    rewritten = dataclasses.replace(forward, rewrites=fvis.models.Rewrites(winograd=True))
    mixed = dataclasses.replace(forward, rewrites=fvis.models.Rewrites(winograd=True, precision="bfloat16"))
    w = forward.weights()
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (24, 24, 3)), jnp.float32)
    for path in ("b_relu", "c"):
        read = lambda fwd: jax.jit(lambda x: fwd(w, x)[path])(x)
        assert _relative(read(rewritten), read(plain)) < 2e-6
        value = lambda fwd: lambda x: jnp.mean(fwd(w, x)[path] ** 2)
        assert _relative(jax.jit(jax.grad(value(rewritten)))(x), jax.jit(jax.grad(value(plain)))(x)) < 1e-5
    count = lambda fwd: jax.jit(lambda x: fwd(w, x)["c"]).lower(x).as_text().count("stablehlo.dot_general")
    assert (count(plain), count(rewritten), count(mixed)) == (0, 2, 0)  # layers b and c, float32 only


def test_flax_nnx_3x3_convolutions_by_winograd_keep_values_and_gradients():
    """'SAME', explicit and 'VALID' padding are rewritten; a strided one stays lax's convolution."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(3, 32, (3, 3), strides=2, padding="SAME", rngs=rngs)      # strided: lax
            self.b = nnx.Conv(32, 32, (3, 3), padding="SAME", rngs=rngs)
            self.c = nnx.Conv(32, 40, (3, 3), padding=((2, 0), (1, 1)), rngs=rngs)
            self.d = nnx.Conv(40, 32, (3, 3), padding="VALID", rngs=rngs)

        def __call__(self, x):
            return self.d(nnx.relu(self.c(nnx.relu(self.b(nnx.relu(self.a(x)))))))

    forward = fvis.models.from_nnx(Net(nnx.Rngs(0)), image_size=(40, 36)).forward(["b", "d"])
    plain = dataclasses.replace(forward, rewrites=fvis.models.Rewrites(winograd=False))
    rewritten = dataclasses.replace(forward, rewrites=fvis.models.Rewrites(winograd=True))
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (40, 36, 3)), jnp.float32)
    w = forward.weights()
    for path in ("b", "d"):
        read = lambda fwd: jax.jit(lambda x: fwd(w, x)[path])(x)
        assert _relative(read(rewritten), read(plain)) < 2e-6
        value = lambda fwd: lambda x: jnp.sum(jnp.sin(fwd(w, x)[path]))
        assert _relative(jax.jit(jax.grad(value(rewritten)))(x), jax.jit(jax.grad(value(plain)))(x)) < 1e-5
    text = jax.jit(lambda x: rewritten(w, x)["d"]).lower(x).as_text()
    assert text.count("stablehlo.convolution") == 1 and text.count("stablehlo.dot_general") == 3


def test_a_job_with_winograd_gives_the_images_of_a_job_without(monkeypatch):
    """End to end: 5 steps of the reference method with the CPU defaults, Winograd on and off: the same
    images and objective curves within float tolerance, and the images moved."""
    from fvis import devices
    model = _keras_model()
    results = {}
    for on in (False, True):
        monkeypatch.setitem(devices.AUTO["cpu"], "winograd", on)
        results[on] = fvis.visualize(model, "c", [0, 7, 40], steps=5, progress=False)
    assert np.max(np.abs(results[True].images - results[False].images)) < 1e-4
    np.testing.assert_allclose(results[True].curves, results[False].curves, rtol=1e-4, atol=1e-6)
    assert np.all(results[True].curves[..., -1] != results[True].curves[..., 0])


def test_mobilenet_has_no_convolution_winograd_takes(monkeypatch):
    """MobileNet's 3x3 convolutions are depthwise or strided: with the CPU defaults its trace reaches
    the Winograd hook but never `conv3x3` (its speed is unchanged); a ResNet-like 3x3 block does."""
    from fvis.models import keras_ops
    calls, real = [], winograd.conv3x3
    monkeypatch.setattr(keras_ops.winograd_lib, "conv3x3", lambda *a: calls.append(a) or real(*a))
    mobilenet = fvis.models.keras_application("MobileNet", alpha=0.25, weights=None, image_size=(96, 96))
    forward = mobilenet.forward(["conv_pw_5_relu"], fvis.models.Rewrites(cpu_ops=True, winograd=True))
    jax.jit(lambda x: forward(forward.weights(), x)).lower(jnp.zeros((96, 96, 3)))  # maps of 48, 24 and 12 px
    assert calls == []
    block = _keras_model().forward(["c"], fvis.models.Rewrites(winograd=True))
    jax.jit(lambda x: block(block.weights(), x)).lower(jnp.zeros((24, 24, 3)))
    assert len(calls) == 2


@pytest.mark.parametrize("size, expected", [
    (180, [(1, 25, 25, 128)] * 3 + [(1, 47, 47, 64)] * 2),  # conv3_block1..3 and conv2_block1..2 (Keras pads)
    (224, []),  # 30x30 and 58x58: measured no faster (experiments/results/README.md, "Winograd")
])
def test_resnet50v2_to_conv3_block4_takes_the_measured_convolutions(size, expected, monkeypatch):
    """The reference job's model under the CPU defaults: the maps that reach `conv3x3` (the stride-1 3x3
    convolutions of the second and third stages at 180 px, none at 224 px)."""
    from fvis.models import keras_ops
    calls, real = [], winograd.conv3x3
    monkeypatch.setattr(keras_ops.winograd_lib, "conv3x3", lambda *a: calls.append(a) or real(*a))
    model = fvis.models.keras_application("ResNet50V2", weights=None, image_size=(size, size))
    forward = model.forward(["conv3_block4_out"], fvis.models.Rewrites(cpu_ops=True, fold_batchnorm=True,
                                                                       winograd=True))
    jax.eval_shape(lambda x: forward(forward.weights(), x), jnp.zeros((size, size, 3)))
    assert sorted(tuple(x.shape) for x, *_ in calls) == sorted(expected)
