"""EfficientNet-Lite0 written in Flax NNX against the Keras Lite0 (same checkpoint), at a small size.

The full-size comparison, the grids and the speed are in experiments/flax_vs_keras.py.
"""

import jax
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("flax")

import fvis  # noqa: E402
from fvis import models  # noqa: E402
from tests.conftest import shared_path  # noqa: E402

SIZE = (96, 96)


@pytest.fixture(scope="module")
def lite0_pair():
    return models.efficientnet_lite0(image_size=SIZE), models.efficientnet_lite0_flax(image_size=SIZE)


def photo(name):
    """A shared photo resized to SIZE, in fvis' [-1, 1] space."""
    image = Image.open(shared_path("images", name)).convert("RGB").resize(SIZE[::-1], Image.BILINEAR)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def activations(vis_model, paths, images):
    """The one place this file reads activations directly (the model interface's Forward), for a
    (N, H, W, C) batch of images in one compiled program."""
    forward = vis_model.forward(paths)
    return jax.jit(jax.vmap(forward, (None, 0)))(forward.weights(), images)


def test_lite0_flax_activations_and_classes_equal_keras(lite0_pair):
    """block4c_add (stages/3/2) within 1e-4 on chelsea; the same top class on chelsea and coffee."""
    keras_model, flax_model = lite0_pair
    images = np.stack([photo("chelsea.png"), photo("coffee.png")])
    k = activations(keras_model, ["block4c_add", "predictions"], images)
    f = activations(flax_model, ["stages/3/2", "classifier"], images)
    assert float(np.max(np.abs(k["block4c_add"][0] - f["stages/3/2"][0]))) < 1e-4
    np.testing.assert_array_equal(np.argmax(f["classifier"], axis=-1), np.argmax(k["predictions"], axis=-1))


def test_lite0_flax_objective_curves_equal_keras(lite0_pair, monkeypatch):
    """From identical starting images, the first 4 steps' objective agrees to 1e-3 relative, with the same
    CPU rewrites on both sides (the batch-norm fold is Keras-only, so it is off here; test_cpu_ops checks it
    keeps values and gradients). Later steps drift apart: each L2-normalised step of length 10 amplifies
    the two implementations' different float rounding, about 10x per 2 steps here, most where a ReLU6 is
    at a kink, as experiments/results/flax_vs_keras.md shows."""
    from fvis import devices
    monkeypatch.setitem(devices.AUTO["cpu"], "fold_batchnorm", False)
    keras_model, flax_model = lite0_pair
    k = fvis.visualize(keras_model, "block4c_add", "0:3", steps=4, progress=False)
    f = fvis.visualize(flax_model, "stages/3/2", "0:3", steps=4, progress=False)
    np.testing.assert_allclose(f.curves, k.curves, rtol=1e-3, atol=1e-4)


def test_lite0_flax_layers_mirror_keras(lite0_pair):
    """Paths, shapes and the depthwise flag (which picks the CPU loop) match the Keras model's."""
    keras_model, flax_model = lite0_pair
    pairs = {"stem": "stem_activation", "stages/1/0/expand": "block2a_expand_activation",
             "stages/3/2": "block4c_add", "stages/5/3/project": "block6d_project_bn", "head": "top_activation",
             "classifier": "predictions"}
    assert list(flax_model.output_shapes(pairs).values()) == list(keras_model.output_shapes(pairs.values()).values())
    assert flax_model.has_grouped_convolutions and flax_model.input_space == "raw255"
    assert len([p for p in flax_model.feature_map_paths() if p.count("/") == 2 and p.startswith("stages")]) == 16
