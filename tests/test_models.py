"""Models: real pretrained weights, offline conversion, input ranges, failures."""

import time
import urllib.error

import h5py
import jax
import keras
import numpy as np
import pytest

from fvis import images, models
from fvis.models import keras_layers as layers
from fvis.errors import MissingFileError, UnknownNameError, WeightsUnavailableError
from tests.conftest import shared_path


def top_classes(vis_model, photos, k=3):
    """The k most probable ImageNet classes of each photo: (orders (P, k), probabilities (P, k)).

    The photos go through the Keras model in one compiled call (op by op, each of the model's
    operations would compile on its own)."""
    model = vis_model.model
    batch = np.stack([vis_model.to_model_input(images.load_photo(p, vis_model.image_size)) for p in photos])
    call = jax.jit(lambda trainable, fixed, x: model.stateless_call(trainable, fixed, x, training=False)[0])
    logits = np.asarray(call([v.value for v in model.trainable_variables],
                             [v.value for v in model.non_trainable_variables], batch), np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1)[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def cat_and_espresso():
    return [shared_path("images", "chelsea.png"), shared_path("images", "coffee.png")]


def test_mobilenet_local_weights_classify_the_cat():
    weights = shared_path("weights", "mobilenet_0.25_224.weights.h5")
    model = models.keras_application("MobileNet", alpha=0.25, weights=str(weights), include_top=True,
                                     image_size=(224, 224))
    assert model.input_space == "tf"
    (cat, coffee), probs = top_classes(model, cat_and_espresso())
    assert cat[0] in (281, 282, 285)
    assert coffee[0] == 967 and probs[1, 0] > 0.8


@pytest.fixture(scope="module")
def lite0():
    return models.efficientnet_lite0(image_size=(224, 224))


def test_efficientnet_lite0_conversion_classifies(lite0):
    (cat, coffee), probs = top_classes(lite0, cat_and_espresso())
    assert cat[0] in (281, 282, 285)
    assert coffee[0] == 967 and probs[1, 0] > 0.8


def test_efficientnet_lite0_is_cached_and_resizable(lite0):
    start = time.perf_counter()
    small = models.efficientnet_lite0(image_size=(160, 120))  # converted weights come from the cache
    assert time.perf_counter() - start < 30
    for name in ("stem_conv", "block4c_expand_conv", "predictions"):
        for a, b in zip(small.model.get_layer(name).get_weights(), lite0.model.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert layers.feature_extractor(small.model, ["block4c_add"], (160, 120)).outputs[0].shape[1:3] == (10, 8)


def test_lite0_conversion_runs_no_initializer_and_writes_the_weights_the_cache_held(lite0, tmp_path, monkeypatch):
    """Converting the checkpoint (first use) builds the Keras model without running any random Keras
    initializer (each one a program compiled under JAX, 12 s of a cold first use on a CPU): every weight
    comes from the checkpoint. The file it writes holds the weights of the one already cached."""
    from keras.src import backend as keras_backend
    from keras.src.initializers.random_initializers import RandomInitializer
    from fvis.models import keras_init, keras_zoo
    ran = []

    def counted(real):
        def initialize(variable, initializer):
            if isinstance(initializer, RandomInitializer):
                ran.append(variable.path)
            return real(variable, initializer)
        return initialize

    cached = keras_zoo.efficientnet_lite0_weights()
    monkeypatch.setenv("FVIS_CACHE_DIR", str(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(keras_backend.Variable, "_initialize_with_initializer",
                      counted(keras_backend.Variable._initialize_with_initializer))
        patch.setattr(keras_init, "_ORIGINAL", counted(keras_init._ORIGINAL))
        converted = keras_zoo.efficientnet_lite0_weights()
        assert converted.parent == tmp_path and ran == []
        keras.layers.Conv2D(4, 3, name="control").build((None, 8, 8, 3))  # outside the conversion
    assert ran == ["control/kernel"]  # Keras' random initializers are counted
    weights = [_h5_arrays(path) for path in (cached, converted)]
    assert len(weights[1]) == 250 and weights[0].keys() == weights[1].keys()
    for name, array in weights[1].items():
        np.testing.assert_array_equal(array, weights[0][name], err_msg=name)


def _h5_arrays(path):
    """Every array a Keras `.weights.h5` file holds, by its path in the file."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return arrays


def _first_layer_input(vis_model, layer):
    extractor = layers.feature_extractor(vis_model.model, [layer], vis_model.image_size)
    ones = np.ones((2, *vis_model.image_size, 3), "float32") * np.array([-1, 1], "float32")[:, None, None, None]
    return np.asarray(extractor(vis_model.to_model_input(ones)))


@pytest.mark.parametrize("name, layer, low, high", [
    ("ResNet50V2", "conv1_pad", [-1, -1, -1], [1, 1, 1]),
    ("MobileNet", "conv1", None, None),  # checked below through the input layer
    ("VGG16", "block1_conv1", None, None),
    ("DenseNet121", "zero_padding2d", None, None),
])
def test_input_space_reaches_first_layer(name, layer, low, high):
    vis_model = models.keras_application(name, weights=None, image_size=(64, 64))
    # What Keras' own preprocessing for this application makes of black (0) and white (255) pixels.
    module = getattr(keras.applications, getattr(keras.applications, name).__module__.rsplit(".", 1)[-1])
    expected = np.asarray(module.preprocess_input(np.array([[[[0.0] * 3]], [[[255.0] * 3]]], "float32")))
    seen = np.asarray(vis_model.to_model_input(np.array([[[[-1.0] * 3]], [[[1.0] * 3]]], "float32")))
    np.testing.assert_allclose(seen, expected, rtol=1e-5, atol=1e-5)
    if low is not None:
        first = _first_layer_input(vis_model, layer)
        np.testing.assert_allclose(first[0, 5, 5], low, atol=1e-6)
        np.testing.assert_allclose(first[1, 5, 5], high, atol=1e-6)


def test_lite0_first_conv_sees_normalised_pixels(lite0):
    first = _first_layer_input(lite0, "stem_conv_pad")  # after the model's own Rescaling + Normalization
    np.testing.assert_allclose(first[0, 5, 5], [-127 / 128] * 3, atol=1e-5)
    np.testing.assert_allclose(first[1, 5, 5], [1.0] * 3, atol=1e-5)


def test_imagenet_download_failure_is_fast_and_names_the_ways_out(monkeypatch, tmp_path):
    from keras.src.utils import file_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    real_get_file = file_utils.get_file
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    monkeypatch.setattr(file_utils, "get_file", lambda *a, **k: real_get_file(*a, **{**k, "cache_dir": str(tmp_path)}))
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        models.keras_application("ResNet50V2", weights="imagenet", image_size=(64, 64))
    assert time.perf_counter() - start < 20
    message = str(info.value)
    assert "efficientnet_lite0" in message and "model.weights=" in message and "ResNet50V2" in message


def test_unknown_application_suggests_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'ResNet50V2'"):
        models.keras_application("ResNet50v2", weights=None)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(MissingFileError, match="nothere.h5"):
        models.keras_application("MobileNet", weights=str(tmp_path / "nothere.h5"))


def test_saved_keras_file_loads(tmp_path, tiny):
    path = tmp_path / "tiny.keras"
    tiny.model.save(path)
    loaded = models.saved_model(path, input_space="tf")
    assert loaded.image_size == (32, 32) and loaded.name == "tiny"
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.model(x), tiny.model(x), atol=1e-6)
