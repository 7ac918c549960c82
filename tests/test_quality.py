"""Quality metrics on constructed cases, and the report of a tiny run."""

import keras
import numpy as np
import pytest

import fvis
from fvis import models, objectives, params, quality, regularizers
from fvis.errors import MissingFileError


def power_law_image(shape, decay_power, seed=0):
    """A random-phase image whose amplitude spectrum falls as 1/f**decay_power."""
    h, w = shape
    phase = np.random.default_rng(seed).uniform(-np.pi, np.pi, (h, w))
    return np.real(np.fft.ifft2(params.power_law(h, w, decay_power) * np.exp(1j * phase)))[..., None]


@pytest.mark.parametrize("shape", [(128, 128), (96, 150)])
def test_spectral_slope_of_known_spectra(shape):
    noise = np.random.default_rng(0).normal(size=(3, *shape, 3))
    assert np.all(np.abs(quality.spectral_slopes(noise)) < 0.2)  # white noise: flat
    for decay, slope in [(1.0, -2.0), (1.5, -3.0)]:  # power = amplitude**2 ~ f**(-2 * decay)
        measured = quality.spectral_slopes(power_law_image(shape, decay)[None])[0]
        assert measured == pytest.approx(slope, abs=0.2)
    image = power_law_image(shape, 1.0)
    assert float(quality.spectral_slope(5 * image + 2)) == pytest.approx(float(quality.spectral_slope(image)), abs=1e-4)


def test_selectivity_ranks_use_z_scores():
    # Unit 0 responds on a larger scale: raw values would call image 1 a unit-0 image.
    values = np.array([[10.0, 1.0], [9.0, 2.0], [9.2, 1.9]])
    np.testing.assert_array_equal(quality.selectivity_ranks(values, np.array([0, 1, 0])), [1, 1, 2])
    assert quality.selectivity_ranks(values, np.array([0, 1, 0])).dtype == np.int32


def test_map_batches_pads_and_trims():
    x = np.arange(7.0)[:, None]
    calls = []
    fn = lambda a: (calls.append(a.shape), a * 2)[1]
    np.testing.assert_array_equal(quality.map_batches(fn, [x], 3), x * 2)
    assert calls == [(3, 1)] * 3


@pytest.fixture(scope="module")
def run():
    model = models.tiny_convnet(image_size=(32, 40))
    result = fvis.visualize(model, "conv2", "0:5", steps=8, images_per_unit=2, progress=False)
    return model, fvis.prepare(model, "conv2", "0:5"), result


def keras_channel_means(model, layer, images):
    """(M, H, W, C) images -> (M, channels): the channel objective (border 2) in inference mode, by Keras."""
    sub = keras.Model(model.model.inputs, model.model.get_layer(layer).output)
    return np.asarray(sub(np.asarray(images, np.float32), training=False))[:, 2:-2, 2:-2].mean(axis=(1, 2))


def test_unit_values_match_the_forward_pass(run):
    model, job, result = run
    flat = result.images.reshape(-1, 32, 40, 3)
    values = quality.unit_values(job.forward, job.objective, flat, result.units, batch_size=3)  # 10 = 3 + 3 + 3 + 1
    np.testing.assert_allclose(values, keras_channel_means(model, "conv2", flat)[:, :5], rtol=1e-4, atol=1e-6)


def test_measure_reports_every_image(run, tmp_path):
    model, job, result = run
    photos = ["a.png", "b.png", "c.png"], result.images[[0, 2, 4], 0]  # "photos" that drive units 0, 2, 4
    records, summary = quality.measure(job.forward, job.objective, result.units, result.images, natural=photos,
                                       draws=4, top_k=2)
    assert len(records) == 10
    np.testing.assert_allclose([r["activation"] for r in records], result.final.ravel(), rtol=1e-4, atol=1e-5)
    ranks = np.array([r["selectivity_rank"] for r in records])
    assert ranks.min() >= 1 and ranks.max() <= 5 and summary["rank1_fraction"] == np.mean(ranks == 1)
    photo_values = keras_channel_means(model, "conv2", photos[1])[:, :5]
    for i, r in enumerate(records):
        unit_column = i // 2
        best = photo_values[:, unit_column].max()
        if unit_column in (0, 2, 4):  # their own images are among the photos
            assert best > 0
        assert r["natural_ratio"] == (pytest.approx(r["activation"] / best, rel=1e-4) if best > 0 else None)
        tops = [t["activation"] for t in r["top_natural"]]
        assert len(tops) == 2 and tops[0] >= tops[1]
        assert tops[0] == pytest.approx(photo_values[:, unit_column].max(), rel=1e-4)
        assert np.isfinite(r["spectral_slope"]) and (r["robustness"] is None or r["robustness"] > 0)
    assert summary["natural_images"] == 3 and summary["settings"]["draws"] == 4


def test_robustness_of_an_image_the_moves_cannot_change(tiny):
    gray = np.zeros((2, 32, 32, 3), np.float32)  # jitter and zoom fill with gray: nothing changes
    job = fvis.prepare(tiny, regularizers.l1(constant=-1.0) + objectives.channel("conv2"), [0])
    value = quality.unit_values(job.forward, job.objective, gray, [0])[0, 0]
    assert value > 0
    np.testing.assert_allclose(quality.robustness(job.forward, job.objective, gray, [0, 0], draws=4), 1.0, rtol=1e-6)
    negative = fvis.prepare(tiny, objectives.channel("conv2") - 10.0 * regularizers.l1(constant=-1.0), [0])
    assert np.isnan(quality.robustness(negative.forward, negative.objective, gray, [0, 0], draws=2)).all()


def test_objective_without_units_has_no_selectivity(tiny):
    job = fvis.prepare(tiny, objectives.deepdream("conv2"), [0, 1])
    images = np.random.default_rng(0).uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32)
    records, summary = quality.measure(job.forward, job.objective, job.units, images, draws=2)
    assert [r["selectivity_rank"] for r in records] == [None, None] and summary["rank1_fraction"] is None


def test_photo_folder_errors_before_compute(tmp_path):
    with pytest.raises(MissingFileError, match="Received: '.*nowhere'"):
        quality.load_photos(tmp_path / "nowhere", (32, 32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="No images"):
        quality.load_photos(tmp_path / "empty", (32, 32))


def test_photos_of_the_shared_folder_have_natural_slopes():
    from tests.conftest import shared_path

    names, photos = quality.load_photos(shared_path("images"), (224, 224))
    assert names == ["chelsea.png", "coffee.png"] and photos.shape == (2, 224, 224, 3)
    assert np.all((quality.spectral_slopes(photos) < -2.5) & (quality.spectral_slopes(photos) > -3.5))
