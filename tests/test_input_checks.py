"""Bad input found by testing: each is refused before any compute with one clear message."""

import keras
import numpy as np
import pytest

from fvis import models
from fvis.errors import InvalidValueError


@pytest.mark.parametrize("channels", [2, 4])
def test_tiny_model_with_other_than_1_or_3_channels_is_refused(channels):
    with pytest.raises(InvalidValueError, match=r"channels-last images with 1 \(grayscale\) or 3 \(RGB\).*"
                                                rf"Received: channels={channels}"):
        models.tiny_convnet(image_size=(16, 16), channels=channels)


def test_wrapped_two_channel_model_is_refused_naming_its_input_shape():
    x = keras.Input((8, 8, 2))
    with pytest.raises(InvalidValueError, match=r"1 \(grayscale\) or 3 \(RGB\).*input_shape=\(None, 8, 8, 2\)"):
        models.wrap(keras.Model(x, keras.layers.Conv2D(3, 3)(x)))


def test_channels_first_model_is_refused_with_a_hint():
    x = keras.Input((3, 16, 16))
    y = keras.layers.Conv2D(4, 3, data_format="channels_first", name="c")(x)
    with pytest.raises(InvalidValueError, match=r"channels_first.*Received: input_shape=\(None, 3, 16, 16\)"):
        models.wrap(keras.Model(x, y))


def test_sequential_built_here_with_bad_channels_is_refused():
    seq = keras.Sequential([keras.layers.Conv2D(4, 3, name="c")])
    with pytest.raises(InvalidValueError, match="Received: channels=4"):
        models.wrap(seq, image_size=(16, 16), channels=4)


@pytest.mark.parametrize("size", ["99", "32,32", [32.7, 32], [32, 32, 3], [32], 32, [0, 32], [True, 32],
                                  None, (32, "32")])
def test_image_size_must_be_two_positive_integers(size):
    with pytest.raises(InvalidValueError, match=r"two positive integers \[height, width\].*Received: image_size="):
        models._check_image_size(size)


@pytest.mark.parametrize("size", [(32, 24), [32, 24], np.array([32, 24])])
def test_image_size_accepts_integer_pairs(size):
    assert models._check_image_size(size) == (32, 24)
