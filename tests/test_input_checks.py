"""Bad input found by testing: each is refused before any compute with one clear message."""

import io

import keras
import numpy as np
import pytest
from PIL import Image

from fvis import images, models, params, quality
from fvis.errors import InvalidValueError, MissingFileError


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


def _photo_folder(tmp_path, bad_name="broken.png", bad_bytes=b"not an image"):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((20, 20, 3), 100, np.uint8)).save(folder / "good.png")
    (folder / bad_name).write_bytes(bad_bytes)
    return folder


def _truncated_png():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[:120]


@pytest.mark.parametrize("bad_bytes", [b"not an image", _truncated_png()], ids=["garbage", "truncated"])
def test_corrupt_file_in_natural_images_folder_is_named(tmp_path, bad_bytes):
    folder = _photo_folder(tmp_path, bad_bytes=bad_bytes)
    with pytest.raises(MissingFileError, match=r"Cannot read '.*broken\.png' as an image, needed for the "
                                               r"natural-image comparison"):
        quality.load_photos(folder, (16, 16))


def test_corrupt_file_in_maco_magnitude_folder_is_refused_when_the_param_is_built(tmp_path):
    folder = _photo_folder(tmp_path, bad_name="broken.jpg")
    with pytest.raises(MissingFileError, match=r"broken\.jpg' as an image, needed for MaCo's magnitude"):
        params.maco(magnitude=str(folder))


def test_corrupt_photo_is_named_when_loaded(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_truncated_png())
    with pytest.raises(MissingFileError, match=r"x\.png' as an image"):
        images.load_photo(path, (8, 8))


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path, channels):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(tmp_path / "flat.png")
    deep, flat = (images.load_photo(tmp_path / f"{n}.png", (16, 16), channels=channels) for n in ("deep", "flat"))
    np.testing.assert_allclose(deep, flat, atol=1.5 / 127.5)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "gray.png")
    assert abs(float(images.load_photo(tmp_path / "gray.png", (8, 8), channels=1).mean())) < 0.01  # was 1.0
    np.testing.assert_array_equal(images.load_png(tmp_path / "deep.png"), images.load_png(tmp_path / "flat.png"))
