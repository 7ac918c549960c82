"""Layers by name, nested sub-models, did-you-mean, non-feature-map outputs."""

import keras
import numpy as np
import pytest

import fvis
from fvis import models
from fvis.models import keras_layers as layers
from fvis.errors import InvalidTypeError, UnknownNameError


@pytest.fixture(scope="module")
def nested():
    backbone = models.tiny_convnet(image_size=(32, 32)).model
    x = keras.Input((32, 32, 3))
    y = backbone(x)
    y = keras.layers.Dense(4, name="head")(y)
    return models.wrap(keras.Model(x, y, name="outer"), image_size=(32, 32))


def test_nested_layer_by_path_equals_inner_model(nested):
    extractor = layers.feature_extractor(nested.model, ["tiny_convnet/conv3"], (32, 32))
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
    inner = nested.model.get_layer("tiny_convnet")
    expected = keras.Model(inner.inputs, inner.get_layer("conv3").output)(x)
    np.testing.assert_allclose(extractor(x), expected, atol=1e-6)
    result = fvis.visualize(nested, "tiny_convnet/conv3", [0, 1], steps=2, progress=False)
    assert result.images.shape == (2, 1, 32, 32, 3)


def test_unknown_layer_lists_nearest_names(nested):
    with pytest.raises(UnknownNameError, match="Did you mean 'tiny_convnet/conv3'"):
        layers.feature_extractor(nested.model, ["tiny_convnet/conv4"], (32, 32))
    with pytest.raises(UnknownNameError, match="Received: layer='conv3_blok'"):
        layers.get_layer(nested.model, "conv3_blok")


def test_paths_list_nested_layers(nested):
    paths = layers.layer_paths(nested.model)
    assert "tiny_convnet" in paths and "tiny_convnet/conv3" in paths and paths[-1] == "head"


def test_channel_objective_on_vector_layer_is_refused(tiny):
    with pytest.raises(InvalidTypeError, match=r"layer 'logits' outputs shape \(10,\).*neuron"):
        fvis.prepare(tiny, "logits", [0])


def test_sequential_without_input_is_built_from_image_size():
    seq = keras.Sequential([keras.layers.Conv2D(4, 3, name="c"), keras.layers.ReLU(name="r")])
    vis_model = models.wrap(seq, image_size=(20, 24), channels=1)
    result = fvis.visualize(vis_model, "r", "all", steps=2, progress=False)
    assert result.images.shape == (4, 1, 20, 24, 1)


def test_a_shared_layer_called_twice_is_refused_not_read_at_its_first_call():
    inputs = keras.Input((16, 16, 3))
    shared = keras.layers.Conv2D(3, 3, padding="same", name="shared")
    x = shared(keras.layers.Conv2D(3, 3, padding="same", name="first")(inputs))
    outputs = keras.layers.GlobalAveragePooling2D()(shared(x))
    model = keras.Model(inputs, outputs)
    with pytest.raises(InvalidTypeError, match="Layer 'shared' is called 2 times .* shared layer"):
        layers.feature_extractor(model, ["shared"], (16, 16))
    assert layers.feature_extractor(model, ["first"], (16, 16)).outputs[0].shape == (None, 16, 16, 3)
