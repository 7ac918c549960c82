"""Hostile inputs for the Winograd rewrite (`fvis.models.winograd`, `Rewrites.winograd`): convolutions it must
leave to the library, the edges of the sizes it picks, Flax padding forms, and whole jobs with it on and off."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fvis
from fvis.models import winograd
from tests.test_winograd import _relative


def _forward_with(forward, **rewrites):
    return dataclasses.replace(forward, rewrites=fvis.models.Rewrites(**rewrites))


def _dots(forward, weights, x, path):
    """Batched matrix products in the forward program: Winograd's (the library convolution has none)."""
    return jax.jit(lambda x: forward(weights, x)[path]).lower(x).as_text().count("stablehlo.dot_general")


@pytest.mark.parametrize("rewrites", [dict(winograd=True), dict(cpu_ops=True), dict(cpu_ops=True, winograd=True)])
@pytest.mark.parametrize("rank", [1, 3])
def test_flax_1d_and_3d_convolutions_pass_through_the_cpu_rewrites(rank, rewrites):
    """A 1-D or 3-D nnx.Conv in an image model: the CPU rewrites (on by default on CPU) leave it to lax,
    with the values of the model without them, rather than failing on NHWC dimension numbers."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(3, 32, (3, 3), padding="SAME", rngs=rngs)
            self.b = nnx.Conv(32, 32, (3,) * rank, padding="SAME", rngs=rngs)

        def __call__(self, x):
            y = nnx.relu(self.a(x))
            shape = (-1, 32) if rank == 1 else (20, 20, 1, 32)  # a sequence of 400 pixels, or a 20x20x1 volume
            return self.b(y.reshape(*y.shape[:-3], *shape))

    forward = fvis.models.from_nnx(Net(nnx.Rngs(0)), image_size=(20, 20)).forward(["b"])
    w = forward.weights()
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (20, 20, 3)), jnp.float32)
    ours, plain = _forward_with(forward, **rewrites), _forward_with(forward)
    expected = jax.jit(lambda x: plain(w, x)["b"])(x)
    assert _relative(jax.jit(lambda x: ours(w, x)["b"])(x), expected) < 1e-6


@pytest.mark.parametrize("x_shape, c_out, expected", [
    ((1, 16, 16, 32), 32, True),     # the smallest map and channels it takes
    ((1, 48, 48, 32), 32, True),     # the largest map
    ((1, 15, 40, 32), 32, False),    # one row too few
    ((1, 40, 49, 32), 32, False),    # one column too many
    ((1, 20, 20, 31), 32, False),    # one channel in too few
    ((1, 20, 20, 32), 31, False),    # one channel out too few
    ((1, 20, 20, 128), 128, True),   # C_in * C_out at its limit
    ((1, 20, 20, 128), 129, False),  # one past it
    ((1, 26, 26, 128), 128, True),   # H * W * C_in * C_out at its limit
    ((1, 27, 26, 128), 128, False),  # one row past it
    ((1, 48, 48, 64), 64, True),     # a 48x48 map below it
    ((1, 48, 48, 96), 96, False),    # and past it (C_in * C_out within its own limit)
])
def test_worthwhile_at_the_edges_of_its_range(x_shape, c_out, expected):
    """The documented range: 16..48 pixels each way, >= 32 channels in and out, C_in * C_out <= 128 * 128,
    H * W * C_in * C_out <= 26 * 26 * 128 * 128."""
    assert winograd.worthwhile(x_shape, (3, 3, x_shape[-1], c_out)) is expected


def _nnx_model(second, size):
    """An NNX model: a 3x3 'SAME' nnx.Conv 3 -> 32 (3 channels in: the library's), ReLU, then `second(rngs)`."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(3, 32, (3, 3), padding="SAME", rngs=rngs)
            self.b = second(rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    return fvis.models.from_nnx(Net(nnx.Rngs(0)), image_size=size)


def _flax_conv(**kwargs):
    from flax import nnx

    return lambda rngs: nnx.Conv(32, 32, **{"kernel_size": (3, 3), **kwargs}, rngs=rngs)


@pytest.mark.parametrize("conv, rewritten", [
    (_flax_conv(padding="CIRCULAR"), True),                   # Flax pads itself, then a VALID convolution
    (_flax_conv(padding="REFLECT"), True),
    (_flax_conv(padding=2), True),                            # an int: 2 on every side
    (_flax_conv(padding=((0, 3), (2, 1))), True),             # asymmetric, wider than "SAME"
    (_flax_conv(padding=((-1, 1), (1, 1))), False),           # a negative pad crops: the library's
    (_flax_conv(padding="SAME", kernel_dilation=2), False),   # dilated kernel
    (_flax_conv(padding=((1, 1), (1, 1)), input_dilation=2), False),  # dilated input (transposed-like)
    (_flax_conv(padding="SAME", strides=(1, 2)), False),
    (_flax_conv(padding="SAME", feature_group_count=2), False),
    (_flax_conv(padding="SAME", precision=lax.Precision.HIGHEST), False),  # asked for its own precision
], ids=["circular", "reflect", "int", "asymmetric", "negative", "kernel_dilation", "input_dilation", "strided",
        "grouped", "precision"])
def test_flax_padding_and_dilation_forms_keep_values_and_input_gradients(conv, rewritten):
    """Each form of nnx.Conv: the same values and input gradients with Winograd on as off (the library
    convolution), and Winograd's matrix products only where it computes such a convolution."""
    forward = _nnx_model(conv, (20, 18)).forward(["b"])
    w = forward.weights()
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (20, 18, 3)), jnp.float32)
    on, off = _forward_with(forward, winograd=True), _forward_with(forward)
    read = lambda fwd: jax.jit(lambda x: fwd(w, x)["b"])(x)
    assert _relative(read(on), read(off)) < 2e-6
    grad = lambda fwd: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(fwd(w, x)["b"]))))(x)
    assert _relative(grad(on), grad(off)) < 1e-5
    assert (_dots(on, w, x, "b") > 0) is rewritten


def _keras_model(second, size=(20, 18)):
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((*size, 3))
    y = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="a")(x)
    return fvis.models.wrap(keras.Model(x, keras.layers.Activation("linear", name="out")(second(y))))


def _keras_conv(**kwargs):
    import keras

    return lambda y: keras.layers.Conv2D(**{"filters": 32, "kernel_size": 3, "padding": "same", **kwargs})(y)


@pytest.mark.parametrize("conv, rewritten", [
    (_keras_conv(dtype="mixed_bfloat16"), True),  # its policy is float32 at precision="float32"
    (_keras_conv(dilation_rate=2), False),
    (_keras_conv(dilation_rate=(1, 2)), False),
    (_keras_conv(strides=(1, 2)), False),
    (_keras_conv(groups=2), False),
    (_keras_conv(kernel_size=(3, 1)), False),
], ids=["mixed_bfloat16", "dilated", "dilated_1x2", "strided_1x2", "grouped", "3x1"])
def test_keras_conv2d_forms_keep_values_and_input_gradients(conv, rewritten):
    """Keras Conv2D layers around the 3x3 case: Keras' values and input gradients with Winograd on."""
    forward = _keras_model(conv).forward(["out"])
    w = forward.weights()
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (20, 18, 3)), jnp.float32)
    on, off = _forward_with(forward, winograd=True, cpu_ops=True), _forward_with(forward, cpu_ops=True)
    read = lambda fwd: jax.jit(lambda x: fwd(w, x)["out"])(x)
    assert _relative(read(on), read(off)) < 2e-6
    grad = lambda fwd: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(fwd(w, x)["out"]))))(x)
    assert _relative(grad(on), grad(off)) < 1e-5
    assert (_dots(on, w, x, "out") > 0) is rewritten


class _Called(Exception):
    """Raised by a stand-in for `winograd.conv3x3`: the rewrite reached it."""


def _job(model, on, monkeypatch, **settings):
    from fvis import devices

    monkeypatch.setitem(devices.AUTO["cpu"], "winograd", on)
    return fvis.visualize(model, "conv3", [0, 33], steps=3, progress=False, **settings)


def test_a_job_of_two_images_per_unit_in_batches_of_two_keeps_its_images(monkeypatch):
    """tiny_convnet at width 16: conv3 (32 -> 64 channels, 16x16) is rewritten; two units of two images each,
    both in one batch of the vmapped step: Winograd on gives the images and curves of Winograd off."""
    model = fvis.models.tiny_convnet(width=16)
    off = _job(model, False, monkeypatch, images_per_unit=2, batch_size=2)
    on = _job(model, True, monkeypatch, images_per_unit=2, batch_size=2)
    assert on.images.shape == off.images.shape == (2, 2, 32, 32, 3)
    assert np.max(np.abs(on.images - off.images)) < 1e-4
    np.testing.assert_allclose(on.curves, off.curves, rtol=1e-4, atol=1e-6)
    assert np.all(on.curves[..., -1] != on.curves[..., 0])


def test_turned_off_no_convolution_reaches_winograd(monkeypatch):
    """AUTO["cpu"]["winograd"] True: the job reaches Winograd (a stand-in that raises while the step is traced);
    then False: the job never calls it, and its images are bit-equal to those of the job before the stand-in
    (Keras' own convolution is back after the failed trace; cpu_ops off, so nothing else replaces it)."""
    from fvis import devices

    monkeypatch.setitem(devices.AUTO["cpu"], "cpu_ops", False)
    model = fvis.models.tiny_convnet(width=16)
    before = _job(model, False, monkeypatch)

    def called(*args, **kwargs):
        raise _Called

    monkeypatch.setattr(winograd, "conv3x3", called)
    with pytest.raises(_Called):
        _job(model, True, monkeypatch)
    np.testing.assert_array_equal(_job(model, False, monkeypatch).images, before.images)


def test_flax_at_bfloat16_keeps_the_library_convolution():
    """Rewrites.winograd applies only at precision="float32": a Flax model at bfloat16 has no Winograd products,
    and its values are those without the rewrite, bit for bit."""
    forward = _nnx_model(_flax_conv(padding="SAME"), (20, 18)).forward(["b"])
    w = forward.weights()
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (20, 18, 3)), jnp.float32)
    on = _forward_with(forward, winograd=True, precision="bfloat16")
    off = _forward_with(forward, precision="bfloat16")
    assert _dots(on, w, x, "b") == 0
    read = lambda fwd: jax.jit(lambda x: fwd(w, x)["b"])(x)
    np.testing.assert_array_equal(read(on), read(off))


def test_keras_layer_with_bfloat16_weights_keeps_keras_values_and_has_an_input_gradient():
    """A Conv2D built with dtype="bfloat16" keeps bfloat16 weights under fvis' float32 policy; Keras then
    convolves in its kernel's dtype. With Winograd on: Keras' values and input gradient (the rewrite takes
    float32 operands only), not a mixed-dtype Winograd that differs by bfloat16 rounding and whose
    backward pass raises."""
    forward = _keras_model(_keras_conv(dtype="bfloat16")).forward(["out"])
    w = forward.weights()
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (20, 18, 3)), jnp.float32)
    on, off = _forward_with(forward, winograd=True, cpu_ops=True), _forward_with(forward, cpu_ops=True)
    read = lambda fwd: jax.jit(lambda x: fwd(w, x)["out"])(x)
    np.testing.assert_array_equal(read(on), read(off))
    grad = lambda fwd: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(fwd(w, x)["out"]))))(x)
    np.testing.assert_array_equal(grad(on), grad(off))
