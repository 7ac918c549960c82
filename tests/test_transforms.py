"""Transforms: shape and dtype kept, deterministic per key, known cases, gradients, the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fvis
from fvis import models, params, transforms
from fvis.errors import InvalidValueError

ALL = {
    "jitter": transforms.jitter(3), "pad": transforms.pad(4), "scale": transforms.random_scale((0.8, 1.2)),
    "rotate": transforms.random_rotate(15.0), "affine": transforms.random_affine(scales=(0.9, 1.2), degrees=5.0),
    "crop": transforms.random_crop((0.5, 0.9)),
    "noise": transforms.noise(0.1), "standard": transforms.standard(),
}


def image(shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, -1, 1)


@pytest.mark.parametrize("shape", [(32, 32, 3), (48, 61, 3), (53, 40, 1)])
@pytest.mark.parametrize("name", sorted(ALL))
def test_shape_dtype_and_determinism_per_key(name, shape):
    t, x = jax.jit(ALL[name]), image(shape)  # compiled, as in a job (op by op, each operation compiles alone)
    a, b, c = t(jax.random.key(1), x), t(jax.random.key(1), x), t(jax.random.key(2), x)
    assert a.shape == shape and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    if name != "pad":  # pad is deterministic by design
        assert float(jnp.abs(a - c).max()) > 0
    grads = jax.grad(lambda v: jnp.sum(t(jax.random.key(1), v) ** 2))(x)
    assert grads.shape == shape and float(jnp.abs(grads).max()) > 0


def test_jitter_is_an_exact_shift_with_gray_fill():
    x = image((20, 20, 3))
    for seed in range(5):
        y = np.asarray(transforms.jitter(4)(jax.random.key(seed), x))
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if np.array_equal(y, np.asarray(jnp.pad(x, ((4, 4), (4, 4), (0, 0)))[4 - dy: 24 - dy, 4 - dx: 24 - dx]))]
        assert len(found) == 1


def test_identity_settings_leave_the_image_alone():
    x = image((24, 31, 3))
    for t in [transforms.random_scale((1.0, 1.0)), transforms.random_rotate(0.0), transforms.random_affine(),
              transforms.random_crop((1.0, 1.0), center_std=0.0), transforms.jitter(0), transforms.pad(0)]:
        np.testing.assert_allclose(t(jax.random.key(0), x), x, atol=1e-5)


def test_warp_by_a_right_angle_is_rot90_and_rotation_keeps_a_centred_disc():
    x = image((16, 16, 1))
    quarter = jnp.array([[0.0, -1.0], [1.0, 0.0]])
    y = np.asarray(transforms._warp(x, quarter, jnp.zeros(2), 0.0))
    assert min(np.abs(y - np.rot90(x, k)).max() for k in (1, 3)) < 1e-5
    yy, xx = np.mgrid[:31, :31] - 15.0
    disc = jnp.asarray(np.exp(-(yy ** 2 + xx ** 2) / 40.0)[..., None], jnp.float32)
    for seed in range(3):
        np.testing.assert_allclose(transforms.random_rotate(30.0)(jax.random.key(seed), disc), disc, atol=0.02)


def test_zoom_out_and_pad_fill_the_border_with_gray():
    x = jnp.ones((40, 40, 3))
    framed = transforms.pad(5)(jax.random.key(0), x)
    assert float(jnp.abs(framed[:5]).max()) == 0 and float(framed[20, 20, 0]) == pytest.approx(1.0)
    smaller = transforms.random_scale((0.5, 0.5))(jax.random.key(0), x)
    assert float(jnp.abs(smaller[:8]).max()) == 0 and float(smaller[20, 20, 0]) == pytest.approx(1.0)


def test_noise_has_the_requested_spread():
    y = transforms.noise(0.1)(jax.random.key(0), jnp.zeros((64, 64, 3)))
    expected = np.sqrt(0.1 ** 2 + 0.1 ** 2 / 12)  # normal(0.1) + uniform of width 0.1
    assert float(jnp.std(y)) == pytest.approx(expected, rel=0.05)


def test_compose_gives_each_transform_its_own_key():
    x = image((16, 16, 3))
    twice = transforms.compose([transforms.noise(0.1), transforms.noise(0.1)])(jax.random.key(0), x) - x
    once = transforms.noise(0.1)(jax.random.key(0), x) - x
    assert float(jnp.std(twice)) == pytest.approx(float(jnp.std(once)) * np.sqrt(2), rel=0.1)


def test_bad_settings_are_named():
    with pytest.raises(InvalidValueError, match="scales"):
        transforms.random_scale((1.2, 0.8))
    with pytest.raises(InvalidValueError, match="jitter pixels"):
        transforms.jitter(-1)
    with pytest.raises(InvalidValueError, match="leaves no pixels"):
        transforms.pad(10)(jax.random.key(0), jnp.zeros((16, 16, 3)))


def test_draws_differ_per_image_and_per_step_in_the_loop():
    model = models.tiny_convnet(image_size=(24, 30))
    replace = lambda key, x: x * 0 + jax.random.normal(key, x.shape)  # the model sees only the key's draw
    result = fvis.visualize(model, "conv2", [0, 1], images_per_unit=3, transform=replace, steps=5, progress=False)
    values = result.curves.ravel()  # (2 units, 3 images, 5 steps): each value comes from its own draw
    assert len(np.unique(values)) == values.size


def test_lucid_recipe_raises_the_objective_on_a_non_square_image():
    model = models.tiny_convnet(image_size=(40, 56))
    run = lambda: fvis.visualize(model, "conv2", [0, 1], images_per_unit=2, param=params.fourier(),
                                 transform=transforms.standard(), optimizer=optax.adam(0.05), steps=8, progress=False)
    a, b = run(), run()
    np.testing.assert_array_equal(a.images, b.images)  # random, but reproducible
    assert np.abs(a.images[0, 0] - a.images[0, 1]).max() > 0.01
    assert np.all(a.final > a.curves[:, :, 0])
