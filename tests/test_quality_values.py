"""The quality measures pinned down by value: hand-worked cases and Keras' own forward pass."""

import keras
import numpy as np
import pytest

import fvis
from fvis import models, objectives, quality

INPUT = objectives.INPUT


def measured(model, objective, units):
    """The forward pass and objective a job of `objective` measures with (the one internal access)."""
    job = fvis.prepare(model, objective, units)
    return job.forward, job.objective


def input_objective(read):
    """An objective that reads the image itself: `read((H, W, C) image) -> scalar`; it takes no unit."""
    return objectives.Objective(lambda acts, unit: read(acts[INPUT]), layers=[INPUT], checks=[lambda shapes: None],
                                name="input")


# ---------------------------------------------------------------------------------------------- selectivity


def test_selectivity_divides_each_unit_by_its_own_spread():
    """Ranks come from z-scores, (value - mean) / std per unit, not from centred raw values."""
    # Unit 0 spreads widely (std sqrt(248/3) = 9.09), unit 1 narrowly (std sqrt(2/3) = 0.816); both have mean 0.
    values = np.array([[2.0, 1.0], [10.0, 0.0], [-12.0, -1.0]])
    # z-scores: unit 0: [0.220, 1.100, -1.320]; unit 1: [1.225, 0.0, -1.225].
    # image 0 (own unit 1): 1.225 > 0.220 -> rank 1 (centred raw values would say 1 < 2 -> rank 2);
    # image 1 (own unit 0): 1.100 > 0.0 -> rank 1; image 2 (own unit 0): -1.320 < -1.225 -> rank 2.
    ranks = quality.selectivity_ranks(values, np.array([1, 0, 0]))
    np.testing.assert_array_equal(ranks, [1, 1, 2], err_msg="ranks must use z-scores (divide by each unit's std)")


def test_selectivity_rank_counts_the_units_above_the_own_one():
    """Rank = 1 + the number of units whose z-score beats the own unit's (here rank 3 of 3)."""
    # Each column is a permutation of (-1, 0, 1) * scale: mean 0, so z = column / (scale * sqrt(2/3)).
    values = np.array([[-1.0, 0.0, 100.0], [0.0, 1.0, -100.0], [1.0, -1.0, 0.0]])
    # z-scores (in units of 1/sqrt(2/3)): image 0: [-1, 0, 1]; image 1: [0, 1, -1]; image 2: [1, -1, 0].
    ranks = quality.selectivity_ranks(values, np.array([0, 1, 2]))
    np.testing.assert_array_equal(ranks, [3, 1, 2])


# ----------------------------------------------------------------------------------------------- robustness
# The moves (fvis/transforms.py): jitter by a whole shift in [-8, 8] per axis (pad with 0 = gray, then crop),
# then a zoom about the centre (15.5, 15.5 for 32x32) by s in [0.9, 1.1], bilinear, gray outside.


def test_robustness_of_a_single_bright_dot_is_about_zero(tiny):
    """The objective reads one pixel; the moves shift the one bright dot off it in almost every draw."""
    forward, objective = measured(tiny, input_objective(lambda x: x[16, 16, 0]), [0])
    dots = np.zeros((4, 32, 32, 3), np.float32)
    dots[:, 16, 16] = 1.0  # the objective as is: 1
    # After the moves, pixel 16 reads the jittered image at 15.5 + 0.5 / s in [15.95, 16.06]: the dot must land
    # within one pixel per axis, a shift of 0 or +-1 (3 of 17 per axis, 9 / 289 = 3 % of draws). The median of
    # 8 draws is non-zero only if 4 of them hit: robustness about 0 (it would be 1.0 for an unmoved image).
    robust = quality.robustness(forward, objective, dots, [0, 0, 0, 0], draws=8)
    assert robust.shape == (4,)
    assert np.all(robust < 0.05), f"a dot the moves shift away kept {robust} of its value"


def test_robustness_of_a_plateau_the_moves_keep_inside_is_one(tiny):
    """A constant plateau read in a central window: every move keeps the window inside it, exactly 1.0."""
    forward, objective = measured(tiny, input_objective(lambda x: x[14:18, 14:18].mean()), [0])
    plateau = np.zeros((3, 32, 32, 3), np.float32)
    plateau[:, 4:28, 4:28] = [[[0.7, -0.3, 0.2]]]
    # The window's pixels 14..17 read the jittered image at 13.9..18.1 (the zoom), i.e. pixels 13..18, which
    # the jitter (+-8) takes from pixels 5..26 of the image: inside the plateau 4..27.
    robust = quality.robustness(forward, objective, plateau, [0, 0, 0], draws=8)
    np.testing.assert_allclose(robust, 1.0, rtol=2e-6)


def test_robustness_of_a_whole_image_read_whole_lies_in_the_jitter_bounds(tiny):
    """Read whole, a uniform image keeps (32 - |dy|)(32 - |dx|) / 32**2 of itself after a shift."""
    forward, objective = measured(tiny, input_objective(lambda x: x.mean()), [0])
    ones = np.ones((3, 32, 32, 3), np.float32)
    robust = quality.robustness(forward, objective, ones, [0, 0, 0], draws=8, scale=0.0)  # shifts only
    # shifts up to 8 px: each draw keeps between 24 * 24 / 1024 = 0.5625 and 1 of the image
    assert np.all((robust >= 0.5625) & (robust < 1.0)), robust
    assert np.all(robust < 0.97)  # the median of 8 draws loses more than a 1-px shift on one axis (31 / 32)


def test_robustness_is_nan_where_the_objective_is_not_positive(tiny):
    """No fraction is meaningful for an objective <= 0 as is."""
    forward, objective = measured(tiny, input_objective(lambda x: x[16, 16, 0]), [0])
    images = np.zeros((2, 32, 32, 3), np.float32)
    images[0, 16, 16], images[1, 16, 16] = -1.0, 0.0
    assert np.isnan(quality.robustness(forward, objective, images, [0, 0], draws=2)).all()


# ------------------------------------------------------------------------------------------ spectral slope


def one_over_f_image(h, w, exponent, seed=0):
    """A random-phase image whose amplitude falls as 1 / f**exponent (numpy only), (h, w, 1)."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    f = np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
    phase = np.random.default_rng(seed).uniform(-np.pi, np.pi, (h, w))
    return np.real(np.fft.ifft2(f ** -exponent * np.exp(1j * phase)))[..., None]


def test_spectral_slope_has_the_sign_and_size_of_the_power_law():
    """Power ~ f**(-2 * exponent): slope -2 for a 1/f amplitude, -1 for 1/sqrt(f), about 0 for noise."""
    slopes = quality.spectral_slopes(np.stack([one_over_f_image(96, 96, e) for e in (1.0, 0.5)]))
    np.testing.assert_allclose(slopes, [-2.0, -1.0], atol=0.2)
    white = one_over_f_image(96, 96, 0.0)  # flat power
    assert abs(float(quality.spectral_slope(white))) < 0.2


# --------------------------------------------------------------------------------- measure, against Keras


def keras_channel_means(model, layer, images):
    """(M, H, W, C) images in [-1, 1] ("tf" space) -> (M, channels): the channel objective (border 2), in
    inference mode, computed by Keras itself."""
    sub = keras.Model(model.inputs, model.get_layer(layer).output)
    acts = np.asarray(sub(np.asarray(images, np.float32), training=False))
    return acts[:, 2:-2, 2:-2].mean(axis=(1, 2))


@pytest.fixture(scope="module")
def measured_run():
    model = models.tiny_convnet(image_size=(32, 32))
    rng = np.random.default_rng(0)
    units = np.array([1, 3, 15])  # units the "photos" drive positively, photo 2 best for unit 1, photo 3 for 3, 15
    images = rng.uniform(-1, 1, (3, 2, 32, 32, 3)).astype(np.float32)  # 3 units x 2 images
    contrast = np.array([0.25, 0.5, 0.75, 1.0], np.float32)[:, None, None, None]
    photos = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32) * contrast
    names = ["p0.png", "p1.png", "p2.png", "p3.png"]
    forward, objective = measured(model, objectives.channel("conv2"), units)
    records, summary = quality.measure(forward, objective, units, images, natural=(names, photos), draws=2, top_k=2)
    return model, units, images, photos, names, records, summary


def test_measure_activations_and_ranks_match_keras(measured_run):
    """activation = Keras' value of the image's own unit; ranks = z-score ranks of Keras' values."""
    model, units, images, _, _, records, summary = measured_run
    flat = images.reshape(6, 32, 32, 3)
    values = keras_channel_means(model.model, "conv2", flat)[:, units]  # (6 images, 3 units)
    own = np.repeat(np.arange(3), 2)
    np.testing.assert_allclose([r["activation"] for r in records], values[np.arange(6), own], rtol=1e-4, atol=1e-6)
    z = (values - values.mean(0)) / values.std(0)
    ranks = 1 + (z > z[np.arange(6), own][:, None]).sum(axis=1)
    assert [r["selectivity_rank"] for r in records] == ranks.tolist()
    assert summary["rank1_fraction"] == pytest.approx(np.mean(ranks == 1))
    assert summary["activation_median"] == pytest.approx(float(np.median(values[np.arange(6), own])), rel=1e-4)


def test_measure_natural_ratio_is_over_the_best_photo(measured_run):
    """natural_ratio = activation / the best photo's activation for the unit; top photos best first."""
    model, units, images, photos, names, records, summary = measured_run
    activation = keras_channel_means(model.model, "conv2", images.reshape(6, 32, 32, 3))[:, units]
    photo_values = keras_channel_means(model.model, "conv2", photos)[:, units]  # (4 photos, 3 units)
    assert np.all(photo_values.max(axis=0) > 0) and np.ptp(photo_values, axis=0).min() > 1e-3  # a clear best
    for i, record in enumerate(records):
        column = i // 2
        best = photo_values[:, column].max()
        assert record["natural_ratio"] == pytest.approx(activation[i, column] / best, rel=1e-4), i
        order = np.argsort(-photo_values[:, column])[:2]
        assert [t["name"] for t in record["top_natural"]] == [names[m] for m in order]
        np.testing.assert_allclose([t["activation"] for t in record["top_natural"]], photo_values[order, column],
                                   rtol=1e-4)
    ratios = [r["natural_ratio"] for r in records]
    assert summary["natural_ratio_median"] == pytest.approx(float(np.median(ratios)))
