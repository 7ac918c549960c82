"""Parameterizations: shapes, ranges, gradients, known spectra, colour round trip, the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import fvis
from fvis import models, params, quality
from fvis.errors import InvalidValueError, MissingFileError

SHAPES = [(32, 32, 3), (24, 37, 3), (31, 20, 1)]  # square, non-square with odd width, grayscale


def all_params():
    return {"pixel": params.pixel(), "fourier": params.fourier(), "fourier_rgb": params.fourier(decorrelate=False),
            "maco": params.maco()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["pixel", "fourier", "fourier_rgb", "maco"])
def test_shapes_ranges_and_gradients(name, shape):
    p = all_params()[name]
    init = jax.jit(p.init, static_argnums=1)  # compiled, as in a job (op by op, each operation compiles alone)
    theta = init(jax.random.key(0), shape)
    target = jax.random.normal(jax.random.key(1), shape)
    image, grads = jax.jit(lambda t: (p.to_image(t), jax.grad(lambda t: jnp.sum(p.to_image(t) * target))(t)))(theta)
    assert image.shape == shape and image.dtype == jnp.float32
    assert float(image.min()) >= -1 and float(image.max()) <= 1
    assert grads.shape == theta.shape and bool(jnp.all(jnp.isfinite(grads)))
    assert float(jnp.abs(grads).max()) > 0
    np.testing.assert_array_equal(init(jax.random.key(0), shape), theta)  # deterministic per key


def test_decorrelated_colour_round_trip_is_identity():
    x = jax.random.normal(jax.random.key(0), (5, 7, 3))
    np.testing.assert_allclose(params.rgb_to_decorrelated(params.decorrelated_to_rgb(x)), x, atol=1e-5)
    np.testing.assert_allclose(params.decorrelated_to_rgb(params.rgb_to_decorrelated(x)), x, atol=1e-5)
    assert float(jnp.abs(params.decorrelated_to_rgb(x) - x).max()) > 0.1  # it is not the identity itself


def test_grayscale_has_no_colour_space():
    x = jax.random.normal(jax.random.key(0), (5, 7, 1))
    np.testing.assert_array_equal(params.decorrelated_to_rgb(x), x)
    theta = params.fourier().init(jax.random.key(0), (8, 8, 1))
    np.testing.assert_array_equal(params.fourier().to_image(theta), params.fourier(decorrelate=False).to_image(theta))


def test_fourier_coefficient_gives_its_scaled_cosine():
    h, w, (ky, kx) = 16, 24, (2, 3)
    theta = np.zeros((2, h, w, 1), np.float32)
    theta[0, ky, kx, 0] = 1.0  # one real coefficient
    image = np.asarray(params.fourier_image(jnp.asarray(theta), decay_power=1.0))[..., 0]
    f = np.hypot(ky / h, kx / w)
    y, x = np.mgrid[:h, :w]
    expected = np.cos(2 * np.pi * (ky * y / h + kx * x / w)) / f / np.sqrt(h * w) / 4
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_fourier_random_spectrum_follows_the_power_law():
    theta = params.fourier().init(jax.random.key(0), (128, 128, 1))
    slope_of = jax.jit(lambda theta, decay: quality.spectral_slope(params.fourier_image(theta, decay)),
                       static_argnums=1)
    for decay, slope in [(0.0, 0.0), (1.0, -2.0)]:
        measured = slope_of(theta, decay)
        assert abs(float(measured) - slope) < 0.25, (decay, measured)


def test_maco_image_keeps_the_magnitude_for_any_phase():
    h, w = 20, 27
    magnitude = np.broadcast_to(params.power_law(h, w)[..., None], (h, w, 3)).copy()
    magnitude[0, 0] = 0
    for seed in range(2):
        phases = params.maco().init(jax.random.key(seed), (h, w, 3))
        image = np.asarray(params.maco_image(phases, magnitude))
        assert abs(image.mean()) < 1e-5 and abs(image.std() - 1) < 1e-3
        measured = np.abs(np.fft.fft2(image, axes=(0, 1)))
        ratio = measured[magnitude > 0] / magnitude[magnitude > 0]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)  # one overall scale


def test_maco_phase_starts_uniform_not_coherent():
    image = params.maco().to_image(params.maco().init(jax.random.key(0), (64, 64, 3)))
    assert float(jnp.abs(image).max()) < 0.99  # a coherent start piles all bins up at pixel (0, 0)


def write_photos(folder, count=2, size=(40, 50)):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_maco_magnitude_from_a_folder(tmp_path):
    folder = write_photos(tmp_path / "photos", size=(16, 16))  # the image size: no crop, no resize
    p = params.maco(magnitude=str(folder))
    theta = p.init(jax.random.key(0), (16, 16, 3))
    image = np.asarray(p.to_image(theta), np.float64)
    assert image.shape == (16, 16, 3)
    # The template, restated in numpy: the mean |FFT| of the photos in decorrelated colour, each photo's mean
    # colour removed, and the mean-colour bin dropped.
    photos = [np.asarray(Image.open(f), np.float64) / 127.5 - 1.0 for f in sorted(folder.iterdir())]
    decorrelated = [np.asarray(params.rgb_to_decorrelated(jnp.asarray(x, jnp.float32)), np.float64) for x in photos]
    template = np.mean([np.abs(np.fft.fft2(x - x.mean(axis=(0, 1)), axes=(0, 1))) for x in decorrelated], axis=0)
    np.testing.assert_allclose(params.natural_magnitude(sorted(folder.iterdir()), 16, 16, 3), template,
                               rtol=1e-4, atol=1e-4)
    template[0, 0] = 0.0
    # Undo the sigmoid and the colour mixing: what is left has the template's magnitude, up to one scale.
    inner = np.log((1 + image) / (1 - image))  # logit((image + 1) / 2)
    inner = np.asarray(params.rgb_to_decorrelated(jnp.asarray(inner, jnp.float32)), np.float64)
    assert abs(inner.mean()) < 1e-4 and inner.std() == pytest.approx(1.0, rel=1e-3)  # standardised
    spectrum = np.abs(np.fft.fft2(inner, axes=(0, 1)))
    assert spectrum[0, 0].max() < 1e-3 * spectrum.max()
    ratio = spectrum[template > 0] / template[template > 0]
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=2e-3)


@pytest.mark.parametrize("channels", [3, 1])
def test_maco_magnitude_from_a_folder_works_inside_jit(tmp_path, channels):
    p = params.maco(magnitude=str(write_photos(tmp_path / "photos")))  # the render loop traces to_image
    theta = p.init(jax.random.key(0), (16, 12, channels))
    traced = jax.jit(p.to_image)(theta)
    assert traced.shape == (16, 12, channels)
    np.testing.assert_allclose(traced, p.to_image(theta), atol=1e-5)


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(MissingFileError, match="magnitude=null"):
        params.maco(magnitude=str(tmp_path / "nowhere"))
    with pytest.raises(InvalidValueError, match="init_std=-1"):
        params.fourier(init_std=-1)


@pytest.mark.parametrize("channels,size", [(3, (28, 36)), (1, (33, 24))])
def test_spectral_params_in_the_loop(channels, size):
    model = models.tiny_convnet(image_size=size, channels=channels)
    for p, optimizer in [(params.fourier(), optax.adam(0.05)), (params.maco(), optax.adam(0.1))]:
        result = fvis.visualize(model, "conv2", [0, 3], param=p, optimizer=optimizer, steps=12, progress=False)
        assert result.images.shape == (2, 1, *size, channels)
        assert np.all(np.abs(result.images) <= 1)
        assert np.all(result.final[:, 0] > result.curves[:, 0, 0])  # the objective rose
