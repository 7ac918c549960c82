"""The compiled loop: the reference algorithm, batching, compilation, inference mode."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import fvis
from fvis import models, params, render


def reference_ascent(model, layer, unit, image, steps, lr=10.0):
    """The seed's algorithm restated with plain JAX on the Keras model itself."""
    sub = keras.Model(model.inputs, model.get_layer(layer).output)

    def loss(x):
        return jnp.mean(sub(x[None], training=False)[0, 2:-2, 2:-2, unit])

    x = jnp.asarray(image)
    for _ in range(steps):
        g = jax.grad(loss)(x)
        x = x + lr * g / jnp.sqrt(jnp.maximum(jnp.sum(g * g), 1e-12))
    return np.asarray(x), float(loss(x))


def start_image(seed, unit, shape):
    key = render.image_keys(jax.random.key(seed), jnp.array([unit]), 1)[0, 0]
    init_key, _ = jax.random.split(key)
    return params.pixel().init(init_key, shape)


def test_default_step_equals_reference_restatement(tiny):
    result = fvis.visualize(tiny, "conv2", [3, 7], steps=6, progress=False)
    for i, unit in enumerate([3, 7]):
        x0 = np.asarray(start_image(0, unit, (32, 32, 3)))
        assert x0.min() >= -0.125 and x0.max() < 0.125  # the reference's (U[0,1) - 0.5) * 0.25
        expected, final = reference_ascent(tiny.model, "conv2", unit, x0, steps=6)
        np.testing.assert_allclose(result.images[i, 0], expected, atol=2e-5)
        np.testing.assert_allclose(result.final[i, 0], final, rtol=1e-4)


def test_objective_sees_the_whole_feature_map(tiny):
    forward = fvis.prepare(tiny, "conv3", [0]).forward
    x = np.random.default_rng(0).uniform(-1, 1, (32, 32, 3)).astype("float32")
    acts = forward(forward.weights(), jnp.asarray(x))["conv3"]
    expected = keras.Model(tiny.model.inputs, tiny.model.get_layer("conv3").output)(x[None])[0]
    assert acts.shape == (16, 16, 32) == forward.shapes()["conv3"]
    np.testing.assert_allclose(acts, expected, atol=1e-5)


@pytest.fixture(scope="module")
def wide():
    return models.tiny_convnet(image_size=(24, 24), width=16, seed=1)  # conv3: 64 channels


def test_batch_sizes_agree_with_single_filter_runs(wide):
    runs = {b: fvis.visualize(wide, "conv3", "all", steps=4, batch_size=b, progress=False) for b in (1, 3, 64)}
    for b in (3, 64):
        np.testing.assert_allclose(runs[b].images, runs[1].images, atol=1e-5)
        np.testing.assert_allclose(runs[b].final, runs[1].final, rtol=1e-4, atol=1e-5)
    alone = fvis.visualize(wide, "conv3", [41], steps=4, batch_size=1, progress=False)
    np.testing.assert_allclose(runs[64].images[41], alone.images[0], atol=1e-5)


def test_step_compiles_once_for_all_chunks(tiny, step_traces):
    before = len(step_traces)
    result = fvis.visualize(tiny, "conv2", "0:11", steps=3, batch_size=3, progress=False)  # 4 chunks, last padded
    assert len(step_traces) - before == 1
    assert result.images.shape == (11, 1, 32, 32, 3)


def test_objective_rises_for_live_filters(tiny):
    # lr 1: on a 32x32 image the reference's lr 10 is a step of 0.18 per pixel, long
    # enough to overshoot on one unit of 32 of this random net.
    # batch_size=16 (the CPU default when this was written): on near-dead unit 21 the last
    # step overshoots slightly with batch_size=1, whose convolutions round differently.
    result = fvis.visualize(tiny, "conv3", "all", steps=10, optimizer=fvis.optim.normalized_ascent(1.0),
                            batch_size=16, progress=False)
    live = ~result.dead[:, 0]
    assert live.sum() >= 16
    assert np.all(np.diff(result.curves[live, 0], axis=-1) > 0)  # every step, every live unit
    # The last step too, where the unit fires: near-dead unit 21 (still negative after 10 steps) overshoots
    # its last step by 3e-4 with the CPU rewrites' rounding (batch norms folded).
    firing = live & (result.curves[:, 0, -1] > 0)
    assert firing.sum() >= 16
    assert np.all(result.final[firing, 0] > result.curves[firing, 0, -1])


def test_inference_mode_and_weights_untouched(tiny):
    before = [np.array(v.value) for v in tiny.model.variables]
    a = fvis.visualize(tiny, "relu2", "0:4", steps=3, progress=False)  # after BatchNorm and Dropout(0.5)
    b = fvis.visualize(tiny, "relu2", "0:4", steps=3, progress=False)
    np.testing.assert_array_equal(a.images, b.images)  # dropout would make runs differ
    for old, var in zip(before, tiny.model.variables):
        np.testing.assert_array_equal(old, np.asarray(var.value))


def test_seed_and_unit_fix_the_start(tiny):
    a = fvis.visualize(tiny, "conv2", [1, 2], steps=1, seed=0, progress=False)
    b = fvis.visualize(tiny, "conv2", [2, 1], steps=1, seed=0, progress=False)
    c = fvis.visualize(tiny, "conv2", [1, 2], steps=1, seed=1, progress=False)
    np.testing.assert_allclose(a.images[0], b.images[1], atol=1e-6)
    assert np.abs(a.images - c.images).max() > 0.01


def test_images_per_unit_gives_distinct_images(tiny):
    result = fvis.visualize(tiny, "conv2", [0, 1], steps=3, images_per_unit=3, progress=False)
    assert result.images.shape == (2, 3, 32, 32, 3) and result.curves.shape == (2, 3, 3)
    assert np.abs(result.images[0, 0] - result.images[0, 1]).max() > 0.01
