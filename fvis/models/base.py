"""The model interface: everything the rest of fvis knows about a model.

fvis optimises images in one normalised space: RGB (or grayscale), channels last,
values around [-1, 1] (the seed's ResNet50V2 space). A `VisModel` says how that
space maps into the model's own input (`input_space`), which layer paths it has
and what each outputs, and gives a pure, inference-mode call
`(weights, image) -> {path: activation}` through `forward`. The weights are a
pytree handed to the compiled function as an argument, so one compilation serves
every chunk of a job.

A model source (Keras: `fvis.models.keras_models`) implements the abstract
methods; nothing outside its module touches the framework. Call-time rewrites of
a model (mixed precision, CPU-friendly ops, and later gradient overrides) are
chosen per job as a `Rewrites` value and applied by the implementation inside its
own call, leaving the user's model and global state as they were.
"""

import abc
import dataclasses

import jax.numpy as jnp
import numpy as np

from fvis.errors import InvalidValueError, UnknownNameError, did_you_mean, is_integer
from fvis.models import jax_rewrites

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], "float32")
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], "float32")
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], "float32")

# x in [-1, 1] RGB -> what the model's first layer receives.
INPUT_SPACES = {
    "tf": lambda x: x,  # [-1, 1]: ResNetV2, MobileNet(V2), Inception, Xception
    "unit": lambda x: (x + 1.0) * 0.5,  # [0, 1]
    "raw255": lambda x: (x + 1.0) * 127.5,  # [0, 255]; models that normalise inside
    "torch": lambda x: ((x + 1.0) * 0.5 - _IMAGENET_MEAN[: x.shape[-1]]) / _IMAGENET_STD[: x.shape[-1]],
    "caffe": lambda x: (x[..., ::-1] + 1.0) * 127.5 - _CAFFE_MEAN_BGR[: x.shape[-1]],  # BGR, mean-subtracted
}

PRECISIONS = ("float32", "bfloat16")


def check_precision(precision):
    """Returns `precision` if it is one of `PRECISIONS`, else raises UnknownNameError."""
    if precision not in PRECISIONS:
        raise UnknownNameError(did_you_mean(str(precision), PRECISIONS, kind="precision"))
    return precision


def check_input_space(input_space):
    """Returns `input_space` if it is a key of `INPUT_SPACES`, else raises UnknownNameError."""
    if input_space not in INPUT_SPACES:
        raise UnknownNameError(did_you_mean(input_space, INPUT_SPACES, kind="input_space"))
    return input_space


def check_image_size(image_size):
    """(H, W) from exactly two positive integers; a string, a float or a third value is refused.

    Raises:
        InvalidValueError: anything else, naming what was received.
    """
    try:
        values = None if isinstance(image_size, (str, bytes)) else list(image_size)
    except TypeError:
        values = None
    if values is None or len(values) != 2 or not all(is_integer(v) and v >= 1 for v in values):
        raise InvalidValueError(f"image_size must be two positive integers [height, width], e.g. [180, 180]. "
                                f"Received: image_size={image_size!r}")
    return int(values[0]), int(values[1])


CHANNELS_HINT = ("fvis takes channels-last images with 1 (grayscale) or 3 (RGB) channels: "
                 "an input of shape (batch, H, W, 1) or (batch, H, W, 3).")


def check_channels(channels):
    """Returns `channels` if it is 1 or 3, else raises InvalidValueError."""
    if channels not in (1, 3) or isinstance(channels, bool):
        raise InvalidValueError(f"{CHANNELS_HINT} Received: channels={channels!r}")
    return channels


@dataclasses.dataclass(frozen=True)
class Rewrites:
    """Call-time rewrites of a model, chosen per job; the values stay those of the model.

    A model implementation applies them inside its own call (at trace time) and
    leaves the user's model and every global setting as they were after the call.

    Attributes:
        precision: "float32", or "bfloat16" for mixed precision: the model's layers
            compute in bfloat16 (weights stay float32 and are cast per layer), while the
            image, the activations handed to the objective and the gradient stay float32
            (Micikevicius et al., ICLR 2018, "Mixed Precision Training",
            https://arxiv.org/abs/1710.03740).
        cpu_ops: trace max pooling as strided slices and stride-1 1x1 convolutions as
            dot products: the same values, gradients XLA's CPU backend runs faster
            (see `fvis.models.keras_ops`). Models without such ops ignore it.
        fold_batchnorm: a batch norm that follows a convolution (and nothing else reads
            that convolution's output) is folded into the convolution's kernel and bias
            (inference-mode batch norm is an affine map per channel): the same values to
            float rounding, one elementwise pass and its gradient fewer per pair (see
            `fvis.models.keras_ops.batchnorm_folds`). Only at precision="float32"; models
            without such pairs ignore it.
        winograd: stride-1 3x3 convolutions of the sizes where it pays on XLA's CPU backend
            (`fvis.models.winograd.worthwhile`) are computed by Winograd's F(2x2, 3x3), their
            input gradients too: the same values to float32 rounding (Lavin and Gray 2016,
            https://arxiv.org/abs/1509.09308; see `fvis.models.winograd`). Only at
            precision="float32"; models without such convolutions ignore it. Reverse-mode
            differentiation only (forward mode through the model raises).
        redirect_relu: every ReLU and ReLU6 the model computes through `jax.nn` (all
            Keras and Flax forms) passes gradient towards firing where it would pass
            none (Lucid's redirected ReLU): the same values; a unit dead on the start
            image can still be optimised (see `fvis.models.jax_rewrites`).
        logits: a read layer whose output is a softmax gives the softmax's input (the
            logits) instead, as tf-keras-vis does: probabilities saturate and depend on
            the other classes.
    """

    precision: str = "float32"
    cpu_ops: bool = False
    fold_batchnorm: bool = False
    winograd: bool = False
    redirect_relu: bool = False
    logits: bool = True

    def __post_init__(self):
        check_precision(self.precision)


class VisModel(abc.ABC):
    """A model as fvis uses it; subclass it for a new model source.

    Attributes:
        input_space: a key of `INPUT_SPACES`: how fvis' [-1, 1] images map into the
            model's input range.
        image_size: (H, W) of the optimised images, in pixels.
        channels: image channels, 1 (grayscale) or 3 (RGB).
        name: a label for outputs.

    Layer paths name the activations a model exposes ("conv3_block4_out", or
    "outer/inner" for a layer in a sub-model). Every activation fvis hands to an
    objective is channels-last, without the batch axis: (h, w, c) for a feature map,
    (c,) for a vector; an implementation moves its layers' channel axes there.
    """

    def __init__(self, *, input_space, image_size, channels, name):
        self.input_space = check_input_space(input_space)
        self.image_size = check_image_size(image_size)
        self.channels = check_channels(channels)
        self.name = name

    @abc.abstractmethod
    def layer_paths(self):
        """Every layer path, in the model's order: list of str."""

    @abc.abstractmethod
    def output_shapes(self, paths):
        """{path: channels-last output shape without the batch axis} at `image_size`.

        Raises:
            UnknownNameError: a path the model does not have (with the nearest names).
            InvalidValueError, InvalidTypeError: a layer fvis cannot read at this size.
        """

    @abc.abstractmethod
    def feature_map_paths(self):
        """The paths whose output is a feature map (h, w, c), in layer order (for `layers=all`)."""

    @abc.abstractmethod
    def weights(self, paths):
        """The weights the call to `paths` needs: a pytree of arrays, passed to the compiled call."""

    @abc.abstractmethod
    def call(self, paths, rewrites):
        """A pure function `(weights, x) -> [activation per path]`, in inference mode.

        Args:
            paths: layer paths.
            rewrites: a `Rewrites`, applied inside the call.

        Returns:
            `fn(weights, x)` with x (N, H, W, C) float32 in the model's own input range;
            each activation (N, ...) channels-last. It writes no state back.
        """

    @property
    @abc.abstractmethod
    def default_path(self):
        """The path read when an objective names no layer (the model's last layer)."""

    @property
    def has_grouped_convolutions(self):
        """Whether the model has depthwise, separable or grouped convolutions (see `fvis.devices.auto_loop`)."""
        return False

    def to_model_input(self, x):
        """Maps (..., H, W, C) images from fvis' [-1, 1] space into the model's input range."""
        return INPUT_SPACES[self.input_space](x)

    def forward(self, paths, rewrites=Rewrites()):
        """The bound call of this model for `paths`: a `Forward`."""
        self.output_shapes(paths)  # unknown or unreadable paths fail here, before any tracing
        return Forward(self, tuple(paths), rewrites)


@dataclasses.dataclass(frozen=True, eq=False)
class Forward:
    """One image through a model: `forward(weights, image) -> {layer path: activation}`.

    Attributes:
        model: the `VisModel`.
        paths: the layer paths read.
        rewrites: the `Rewrites` applied inside the model's call.
    """

    model: VisModel
    paths: tuple
    rewrites: Rewrites = Rewrites()

    def weights(self):
        """The weights the call needs, a pytree of arrays (pass them to `__call__`)."""
        return self.model.weights(self.paths)

    def shapes(self):
        """Output shape of each layer path, channels-last, without the batch axis."""
        return self.model.output_shapes(self.paths)

    def __call__(self, weights, image):
        """(H, W, C) float32 image in [-1, 1] space -> {path: float32 activation without batch axis}."""
        return self._call(weights, image, set())

    def _call(self, weights, image, read_as_logits):
        r = self.rewrites
        with jax_rewrites.applied(redirect_relu=r.redirect_relu, logits=r.logits) as softmaxes:
            outputs = self.model.call(self.paths, r)(weights, self.model.to_model_input(image)[None])
        outputs = jax_rewrites.read_logits(outputs, self.paths, softmaxes, read_as_logits)
        return {p: o[0].astype(jnp.float32) for p, o in zip(self.paths, outputs, strict=True)}

    def facts(self, weights=None):
        """What the call computes, read from one trace (nothing runs): a dict with
        "compute_dtypes", "read_as_logits" (paths whose softmax was replaced by its
        logits) and "relus" (redirected, exact, and "unknown_form": `max(x, 0)`
        written out, which the redirect cannot reach); see `jax_rewrites.trace_facts`.
        """
        weights = self.weights() if weights is None else weights
        image = jnp.zeros((*self.model.image_size, self.model.channels), jnp.float32)
        read_as_logits = set()
        found = jax_rewrites.trace_facts(lambda w, x: self._call(w, x, read_as_logits), weights, image)
        return {"compute_dtypes": found["compute_dtypes"], "read_as_logits": sorted(read_as_logits),
                "relus": {"redirected": found["redirected_relus"], "exact": found["jax_nn_relus"],
                          "unknown_form": found["bare_relus"]}}
