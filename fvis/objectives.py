"""Objectives: what to maximise, written for ONE image and combined with + - *.

An `Objective` maps one image's activations to a scalar. It is called as
`objective(acts, unit)`: `acts` maps each layer path the objective names to that
image's activation, (h, w, c) for a feature map or (c,) for a vector, and
`INPUT` to the image itself (H, W, C) in fvis' [-1, 1] space; `unit` is an
int32 scalar (traced under jit) selecting the channel, class or direction being
visualised. The render loop vmaps objectives over images and units, so an
objective never sees a batch axis (no norms or means taken across the batch).

Objectives combine like numbers (lucid's convention, Olah et al., Distill 2017)::

    channel("mixed4a") - 0.05 * regularizers.total_variation()

Regularizers (`fvis.regularizers`) are penalties on `INPUT`, to be subtracted;
`diversity` is a quantity to add.

Terms that compare several images of the same unit (diversity) are "group"
terms: they receive the stacked activations (D, ...) of the D images of a unit.

Terms that compare with a photo (inversion, caricature) name it in `photos`;
`Objective.bind(forward)` computes each photo's activations once, before the job
compiles, and hands them to the terms as `acts[key]` ({layer: activation}).
"""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fvis.errors import InvalidTypeError, InvalidValueError, MissingFileError, check_positive_int, is_integer
from fvis.images import check_image_file, load_photo
from fvis.numerics import safe_norm

INPUT = ":input"  # acts[INPUT] is the image being optimised, before transforms


class Objective:
    """A scalar to maximise.

    Args:
        image_fn: (acts, unit) -> float32 scalar, for one image; or None.
        group_fn: (stacked_acts, unit) -> float32 scalar over a unit's D images, with
            each activation stacked on a leading axis of size D; or None.
        layers: layer paths whose activations the objective reads.
        checks: callables (shapes) -> number of units the objective can index, or None
            when it takes no unit; `shapes` maps layer paths to output shapes without
            the batch axis. They raise for a layer the objective cannot apply to.
        photos: {key: photo} the per-image terms compare with; a photo is an (H, W, C)
            array in fvis' [-1, 1] space or a path (see `bind`).
        name: a readable description.
    """

    def __init__(self, image_fn=None, group_fn=None, *, layers=(), checks=(), photos=None, name="objective"):
        self.image_fn, self.group_fn = image_fn, group_fn
        self.layers, self.checks, self.name = tuple(dict.fromkeys(layers)), tuple(checks), name
        self.photos = dict(photos or {})

    def bind(self, forward):
        """This objective with its photos' activations computed, ready to compile.

        Each photo goes once through `forward` (an `fvis.models.Forward`, the job's), a path
        loaded at the model's image size; the terms then read its activations as `acts[key]`.
        An objective without photos is returned as it is.

        Raises:
            InvalidValueError: a photo array whose shape is not the model's (H, W, C).
        """
        if not self.photos:
            return self
        model, weights = forward.model, forward.weights()
        shape = (*model.image_size, model.channels)
        call = jax.jit(forward)  # compiled: 1.8 s against 13 s op by op for EfficientNet-Lite0
        targets = {key: call(weights, _photo_array(photo, shape)) for key, photo in self.photos.items()}
        image_fn = self.image_fn
        return Objective(lambda acts, unit: image_fn({**acts, **targets}, unit), self.group_fn, layers=self.layers,
                         checks=self.checks, name=self.name)

    def __call__(self, acts, unit):
        """The per-image value: acts of one image -> float32 scalar (0 if only group terms)."""
        return self.image_fn(acts, unit) if self.image_fn else jnp.float32(0.0)

    def group(self, stacked_acts, unit):
        """The group value over a unit's D images (0 if there is no group term)."""
        return self.group_fn(stacked_acts, unit) if self.group_fn else jnp.float32(0.0)

    def num_units(self, shapes):
        """How many units the objective can be asked for, given the layers' output shapes.

        Returns:
            int, or None when no term takes a unit (any unit index gives the same image).

        Raises:
            InvalidTypeError: a term cannot apply to its layer's output.
        """
        counts = [n for n in (check(shapes) for check in self.checks) if n is not None]
        return min(counts) if counts else None

    def _combine(self, other, op, symbol):
        if not isinstance(other, Objective):
            raise TypeError(f"Objectives combine with objectives; received {type(other).__name__}")
        join = lambda f, g: (None if f is None and g is None else
                             lambda a, u: op(f(a, u) if f else 0.0, g(a, u) if g else 0.0))
        return Objective(join(self.image_fn, other.image_fn), join(self.group_fn, other.group_fn),
                         layers=self.layers + other.layers, checks=self.checks + other.checks,
                         photos={**self.photos, **other.photos}, name=f"({self.name} {symbol} {other.name})")

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b, "+")

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b, "-")

    def __mul__(self, scale):
        if isinstance(scale, Objective):
            return self._combine(scale, lambda a, b: a * b, "*")
        scale = float(scale)
        times = lambda f: None if f is None else (lambda a, u: scale * f(a, u))
        return Objective(times(self.image_fn), times(self.group_fn), layers=self.layers,
                         checks=self.checks, photos=self.photos, name=f"{scale:g} * {self.name}")

    __rmul__ = __mul__

    def __neg__(self):
        return -1.0 * self

    def __truediv__(self, scale):
        return self * (1.0 / float(scale))

    def __repr__(self):
        return f"Objective({self.name})"


def _feature_map_check(layer, kind, border=0):
    def check(shapes):
        shape = tuple(shapes[layer])
        if len(shape) != 3:
            raise InvalidTypeError(
                f"The {kind} objective needs a feature map (H, W, C), but layer '{layer}' outputs "
                f"shape {shape}. For a vector output use objective=neuron or objective=class_logit.")
        if shape[0] <= 2 * border or shape[1] <= 2 * border:
            raise InvalidValueError(
                f"Layer '{layer}' outputs a {shape[0]}x{shape[1]} map at this image size, too small "
                f"for a {border}-pixel border. Use a larger image_size or border=0.")
        return shape[-1]
    return check


def _interior(act, border):
    return act[border: act.shape[0] - border, border: act.shape[1] - border] if border else act


def channel(layer, *, border=2):
    """Mean activation of one channel: the reference objective.

    Args:
        layer: layer path; its output must be a feature map (h, w, c).
        border: pixels of the activation map excluded on each side (the reference
            uses 2 to avoid border effects).

    Unit: the channel index, in [0, c).

    Raises:
        InvalidValueError: border is not an integer >= 0.
    """
    border = check_positive_int("border", border, minimum=0)
    return Objective(lambda acts, unit: jnp.mean(_interior(acts[layer], border)[..., unit]),
                     layers=[layer], checks=[_feature_map_check(layer, "channel", border)],
                     name=f"channel({layer})")


def neuron(layer, *, position=None):
    """Activation of one neuron: one channel at one spatial position, or one vector entry.

    Args:
        layer: layer path; a feature map (h, w, c) or a vector (c,).
        position: (y, x) in the activation map, 0 <= y < h and 0 <= x < w; the centre
            (h // 2, w // 2) by default. Only for feature maps.

    Unit: the channel index, in [0, c).

    Raises:
        InvalidValueError: position is not two integers, or (when the layer's shape is
            checked, before any compute) lies outside the map or is given for a vector.
    """
    if position is not None:
        try:
            ok = len(position) == 2 and all(is_integer(v) for v in position)
        except TypeError:
            ok = False
        if not ok:
            raise InvalidValueError(f"position must be two integers [y, x] in the activation map. "
                                    f"Received: position={position!r}")
        position = tuple(int(v) for v in position)

    def check(shapes):
        shape = tuple(shapes[layer])
        if position is not None and len(shape) != 3:
            raise InvalidValueError(f"position applies to feature maps; layer '{layer}' outputs shape {shape}. "
                                    f"Leave position unset (null) for a vector.")
        if position is not None and not (0 <= position[0] < shape[0] and 0 <= position[1] < shape[1]):
            raise InvalidValueError(f"position {list(position)} lies outside layer '{layer}''s {shape[0]}x{shape[1]} "
                                    f"map; use 0 <= y < {shape[0]}, 0 <= x < {shape[1]}. "
                                    f"Received: position={list(position)}")
        return shape[-1]

    def fn(acts, unit):
        act = acts[layer]
        if act.ndim == 1:
            return act[unit]
        y, x = position if position is not None else (act.shape[0] // 2, act.shape[1] // 2)
        return act[y, x, unit]
    return Objective(fn, layers=[layer], checks=[check], name=f"neuron({layer})")


def class_logit(layer):
    """A class logit (pre-softmax): for models built with their classifier.

    Args:
        layer: the classifier's layer path (its output (num_classes,) must be logits;
            fvis builds keras.applications heads without softmax).

    Unit: the class index.
    """
    def check(shapes):
        if len(tuple(shapes[layer])) != 1:
            raise InvalidTypeError(f"class_logit needs a vector of logits, but layer '{layer}' outputs "
                                   f"shape {tuple(shapes[layer])}. Use objective=channel for feature maps.")
        return shapes[layer][-1]
    return Objective(lambda acts, unit: acts[layer][unit], layers=[layer], checks=[check],
                     name=f"class_logit({layer})")


def deepdream(layer, *, border=0):
    """Mean squared activation of a whole layer (Mordvintsev et al., 2015: DeepDream).

    Takes no unit: every requested unit gives an image of the same objective
    (from its own random start).

    Raises:
        InvalidValueError: border is not an integer >= 0.
    """
    border = check_positive_int("border", border, minimum=0)
    return Objective(lambda acts, unit: jnp.mean(jnp.square(_interior(acts[layer], border))),
                     layers=[layer], checks=[lambda shapes: None], name=f"deepdream({layer})")


def direction(layer, vectors, *, border=2):
    """Mean projection of the activations onto a direction in channel space.

    Args:
        layer: layer path; a feature map (h, w, c).
        vectors: (K, c) float array of directions (not normalised here), or the path of a
            .npy file holding one. A one-hot vector e_i gives exactly `channel(layer)` for unit i.
        border: as in `channel`.

    Unit: the row of `vectors`, in [0, K).

    Raises:
        MissingFileError: a path that holds no readable .npy array.
        InvalidValueError: vectors that are not (K, c).
    """
    border = check_positive_int("border", border, minimum=0)
    if isinstance(vectors, (str, Path)):
        try:
            vectors = np.load(Path(vectors).expanduser(), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise MissingFileError(f"Cannot read direction vectors from '{vectors}' ({type(e).__name__}: {e}); "
                                   f"save a (K, channels) array with numpy.save. Received: vectors='{vectors}'") from e
    vectors = jnp.asarray(np.asarray(vectors, np.float32))
    if vectors.ndim != 2:
        raise InvalidValueError(f"direction vectors must be a (K, channels) array. "
                                f"Received: shape {vectors.shape}")
    feature_map = _feature_map_check(layer, "direction", border)

    def check(shapes):
        channels = feature_map(shapes)
        if vectors.shape[1] != channels:
            raise InvalidValueError(f"direction vectors have {vectors.shape[1]} entries, layer '{layer}' "
                                    f"has {channels} channels.")
        return vectors.shape[0]
    return Objective(lambda acts, unit: jnp.mean(_interior(acts[layer], border) @ vectors[unit]),
                     layers=[layer], checks=[check], name=f"direction({layer})")


def weighted_sum(terms, weights=None):
    """The sum of `weights[i] * terms[i]`: objective algebra for config files.

    Args:
        terms: a non-empty sequence of `Objective`s.
        weights: numbers, one per term; all 1 by default.
    """
    terms = list(terms)
    weights = [1.0] * len(terms) if weights is None else [float(w) for w in weights]
    if not terms or len(weights) != len(terms):
        raise InvalidValueError(f"weighted_sum needs one weight per term and at least one term. "
                                f"Received: {len(terms)} terms, {len(weights)} weights")
    total = weights[0] * terms[0]
    for weight, term in zip(weights[1:], terms[1:]):
        total = total + weight * term
    return total


def _gram(act):
    """(h, w, c) or (c,) activation -> (c, c) Gram matrix of its spatial positions."""
    flat = act.reshape(-1, act.shape[-1])
    return flat.T @ flat


def diversity(layer):
    """Dissimilarity of the D images of a unit (Olah et al., Distill 2017, "Feature Visualization").

    A group term, for `images_per_unit` > 1: the negated cosine similarity of the
    Gram matrices (style, as in Gatys et al. 2016) of `layer`'s activations, summed
    over ordered pairs of distinct images and divided by D, so it lies in
    [-(D - 1), 0] for non-negative activations. Add it: `channel(l) + 100 * diversity(l)`
    (Lucid's weight; on EfficientNet-Lite0 block4c_add, 4 images per unit, weight 100 cut the
    mean Gram similarity from 0.91-0.98 to 0.13 at 15-25 % less activation, weight 10 to
    0.59-0.82 at none: experiments/results/quality_diversity.json).

    Args:
        layer: layer path (a feature map or a vector), or `INPUT` for the pixels.
    """
    def group_fn(stacked, unit):
        grams = jax.vmap(_gram)(stacked[layer])
        grams = grams.reshape(grams.shape[0], -1)
        grams = grams / safe_norm(grams, axis=1, keepdims=True)
        similarity = grams @ grams.T
        d = grams.shape[0]
        return -(jnp.sum(similarity) - jnp.trace(similarity)) / d

    return Objective(group_fn=group_fn, layers=[layer], checks=[lambda shapes: None],
                     name=f"diversity({layer})")


def _photo_source(image):
    """(key, photo) for a photo given as a path (checked now) or an (H, W, C) array in [-1, 1]."""
    if isinstance(image, (str, Path)):
        path = check_image_file(image, purpose="the photo of an inversion or caricature objective")
        return f":photo:{path}", path
    array = None if image is None else np.asarray(image, np.float32)
    if array is None or array.ndim != 3:
        received = "None" if array is None else f"shape {array.shape}"
        raise InvalidValueError(f"Inversion and caricature need a photo: a path (image=path.png on the command line) "
                                f"or an (H, W, C) array in [-1, 1]. Received: {received}")
    return f":photo:{hashlib.sha256(array.tobytes()).hexdigest()[:16]}", array


def _photo_array(photo, shape):
    if not isinstance(photo, np.ndarray):
        return load_photo(photo, shape[:2], channels=shape[2])
    if photo.shape != shape:
        raise InvalidValueError(f"The photo has shape {photo.shape}, but the model takes images of shape {shape}. "
                                f"Received: shape {photo.shape}")
    return photo


def _photo_objective(layer, image, fn, name):
    key, photo = _photo_source(image)
    return Objective(lambda acts, unit: fn(acts[layer], acts[key][layer]), layers=[layer],
                     checks=[lambda shapes: None], photos={key: photo}, name=f"{name}({layer})")


def inversion(layer, image):
    """Feature inversion: how close the image's activations are to a photo's (Mahendran &
    Vedaldi, CVPR 2015, "Understanding Deep Image Representations by Inverting Them",
    https://arxiv.org/abs/1412.0035).

    The value is -||a - a0||^2 / ||a0||^2, their normalised squared L2 distance negated for
    ascent: at most 0, reached where the activations equal the photo's (a zero gradient
    there). Started from noise, the optimisation shows what the layer keeps of the photo.
    Add a regularizer (e.g. `- 0.05 * regularizers.total_variation()`) for natural images.

    Args:
        layer: layer path; any output shape.
        image: the photo, a path or an (H, W, C) float array in fvis' [-1, 1] space at the
            model's image size (see `Objective.bind`).

    Takes no unit: every requested unit is a start from another random draw.

    Raises:
        MissingFileError: `image` is a path that cannot be read as an image.
    """
    def value(act, target):
        return -jnp.sum(jnp.square(act - target)) / jnp.maximum(jnp.sum(jnp.square(target)), 1e-12)
    return _photo_objective(layer, image, value, "inversion")


def caricature(layer, image, *, cossim_pow=1.0):
    """Caricature: amplify what a layer sees in a photo (Lucid's caricature notebook).

    The value is dot(a, a0) * max(cos(a, a0), 0.1)**cossim_pow: the image's activations
    projected on the photo's, weighted by their cosine similarity to a power so that the
    optimisation grows the photo's pattern rather than only the largest activations
    (the 0.1 floor, as in Lucid, keeps the weight positive). Start from the photo
    (`fvis.params.start_from`) to exaggerate it.

    Args:
        layer: layer path; any output shape.
        image: the photo, as in `inversion`.
        cossim_pow: the power, >= 0; 0 gives the plain dot product.

    Takes no unit, like `inversion`.

    Raises:
        MissingFileError: `image` is a path that cannot be read as an image.
        InvalidValueError: cossim_pow is negative.
    """
    if not float(cossim_pow) >= 0:
        raise InvalidValueError(f"cossim_pow must be a number >= 0. Received: cossim_pow={cossim_pow!r}")

    def value(act, target):
        dot = jnp.sum(act * target)
        cosine = dot / (safe_norm(act) * safe_norm(target))
        return dot * jnp.maximum(cosine, 0.1) ** float(cossim_pow)
    return _photo_objective(layer, image, value, "caricature")
