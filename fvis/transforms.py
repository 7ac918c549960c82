"""Transformation robustness: random, differentiable image transforms.

A transform is a pure function `(key, image) -> image` for ONE image (H, W, C)
float32; every transform here keeps the shape and dtype, since the model's input
size is fixed. `compose` chains them, splitting the key so each gets its own
stream. The render loop folds the step number into each image's key, so draws
differ per image and per step (Olah et al., Distill 2017, "Feature Visualization";
Mordvintsev et al., Distill 2018, "Differentiable Image Parameterizations").

Geometric transforms resample bilinearly (differentiable in the image) and fill
pixels that come from outside the image with `fill`, 0 by default: gray in fvis'
[-1, 1] space.
"""

import math
import numbers

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from fvis.errors import InvalidValueError


def identity():
    """The transform that returns the image unchanged (the reference's setting)."""
    return lambda key, image: image


def compose(transforms=()):
    """Chains transforms left to right, each with its own key.

    Args:
        transforms: sequence of `(key, image) -> image` functions.
    """
    transforms = tuple(transforms)
    if not transforms:
        return identity()

    def apply(key, image):
        for transform, subkey in zip(transforms, jax.random.split(key, len(transforms))):
            image = transform(subkey, image)
        return image

    return apply


def _check(name, value, low=0.0):
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low):
        raise InvalidValueError(f"{name} must be a number >= {low}. Received: {name}={value!r}")
    return value


def _check_fill(fill):
    """`fill` is a pixel value: any finite number (0 is gray in fvis' [-1, 1] space)."""
    if not (isinstance(fill, numbers.Real) and not isinstance(fill, bool) and math.isfinite(fill)):
        raise InvalidValueError(f"fill must be a number, the value of pixels from outside the image (0.0: gray, "
                                f"-1.0: black, 1.0: white). Received: fill={fill!r}")
    return float(fill)


def _check_range(name, value, low):
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        a = b = None
    if a is None or not low < a <= b:
        raise InvalidValueError(f"{name} must be [min, max] with {low} < min <= max. Received: {name}={value!r}")
    return a, b


def _warp(image, matrix, offset, fill):
    """Samples `image` at `matrix @ (p - centre) + centre + offset` for each output pixel p.

    Args:
        image: (H, W, C) float32.
        matrix: (2, 2) float32 acting on (y, x) pixel coordinates.
        offset: (2,) float32 shift in pixels (y, x).
        fill: value of samples from outside the image.
    """
    h, w = image.shape[:2]
    centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0], jnp.float32)
    grid = jnp.stack(jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                                  indexing="ij"))
    source = jnp.einsum("ij,jhw->ihw", matrix, grid - centre[:, None, None]) + (centre + offset)[:, None, None]
    sample = lambda channel: map_coordinates(channel, [source[0], source[1]], order=1, mode="constant", cval=fill)
    return jax.vmap(sample, in_axes=2, out_axes=2)(image).astype(image.dtype)


def jitter(pixels, *, fill=0.0):
    """Shifts the image by a whole number of pixels in [-pixels, pixels] along each axis."""
    d, fill = int(_check("jitter pixels", pixels)), _check_fill(fill)

    def apply(key, image):
        padded = jnp.pad(image, ((d, d), (d, d), (0, 0)), constant_values=fill)
        dy, dx = jax.random.randint(key, (2,), 0, 2 * d + 1)
        return jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)

    return apply


def pad(pixels, *, fill=0.0):
    """Shrinks the image into a frame of `pixels` of `fill` (Lucid's padding, at a fixed size).

    The model's input size is fixed, so instead of growing the canvas the image is
    resized to (H - 2*pixels, W - 2*pixels) and framed. Deterministic (the key is unused).
    """
    p, fill = int(_check("pad pixels", pixels)), _check_fill(fill)

    def apply(key, image):
        h, w, c = image.shape
        if 2 * p >= min(h, w):
            raise InvalidValueError(f"pad({p}) leaves no pixels of a {h}x{w} image; use pad < {min(h, w) // 2}.")
        inner = jax.image.resize(image, (h - 2 * p, w - 2 * p, c), "linear")
        return jnp.pad(inner, ((p, p), (p, p), (0, 0)), constant_values=fill).astype(image.dtype)

    return apply


def random_affine(*, scales=(1.0, 1.0), degrees=0.0, fill=0.0):
    """Zooms and rotates about the centre in one resampling: a factor drawn uniformly from
    [min, max] of `scales` (> 1 zooms in) and an angle from [-degrees, degrees]."""
    low, high = _check_range("scales", scales, 0.0)
    limit, fill = math.radians(_check("degrees", degrees)), _check_fill(fill)

    def apply(key, image):
        scale_key, angle_key = jax.random.split(key)
        s = jax.random.uniform(scale_key, (), jnp.float32, low, high)
        a = jax.random.uniform(angle_key, (), jnp.float32, -limit, limit)
        rotation = jnp.array([[jnp.cos(a), -jnp.sin(a)], [jnp.sin(a), jnp.cos(a)]])
        return _warp(image, rotation / s, jnp.zeros(2), fill)

    return apply


def random_scale(scales=(0.9, 1.1), *, fill=0.0):
    """Zooms about the centre by a factor drawn uniformly from [min, max] (> 1 zooms in)."""
    return random_affine(scales=scales, fill=fill)


def random_rotate(degrees=10.0, *, fill=0.0):
    """Rotates about the centre by an angle drawn uniformly from [-degrees, degrees]."""
    return random_affine(degrees=degrees, fill=fill)


def random_crop(size=(0.5, 1.0), *, center_std=0.15, fill=0.0):
    """Crops a random box and resizes it to the full image (MaCo's crops, Fel et al., NeurIPS 2023).

    Args:
        size: [min, max] side of the box as a fraction of the image's, drawn uniformly;
            the box keeps the image's aspect ratio.
        center_std: the box centre is drawn from N(image centre, center_std * side)
            per axis; parts of the box outside the image read `fill`.
    """
    low, high = _check_range("crop size", size, 0.0)
    center_std, fill = _check("center_std", center_std), _check_fill(fill)

    def apply(key, image):
        size_key, centre_key = jax.random.split(key)
        s = jax.random.uniform(size_key, (), jnp.float32, low, high)
        shift = center_std * jax.random.normal(centre_key, (2,)) * jnp.array(image.shape[:2], jnp.float32)
        return _warp(image, s * jnp.eye(2), shift, fill)

    return apply


def noise(std=0.08):
    """Adds Gaussian noise of `std` and uniform noise in [-std/2, std/2] (MaCo's, Fel et al., 2023)."""
    std = _check("noise std", std)

    def apply(key, image):
        normal_key, uniform_key = jax.random.split(key)
        return (image + std * jax.random.normal(normal_key, image.shape, image.dtype)
                + jax.random.uniform(uniform_key, image.shape, image.dtype, -std / 2, std / 2))

    return apply


def standard(*, fill=0.0):
    """Lucid's standard transforms (Olah et al., Distill 2017), at a fixed image size:
    pad 12, jitter 8, scale in [0.9, 1.1] and rotate within +-10 degrees (one
    resampling for both), jitter 4."""
    return compose([pad(12, fill=fill), jitter(8, fill=fill),
                    random_affine(scales=(0.9, 1.1), degrees=10.0, fill=fill), jitter(4, fill=fill)])
