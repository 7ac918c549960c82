"""Parameterizations: how an image is represented while it is optimised.

A parameterization is an `(init, to_image)` pair of pure functions, for ONE image:

- `init(key, shape) -> params`: `shape` is the image's (H, W, C);
- `to_image(params) -> image`: (H, W, C) float32 in fvis' [-1, 1] space;
- `invert(image) -> params` (optional): params whose image is as close to `image` as the
  parameterization allows, so `start_from` can begin the optimisation at a photo.

The optimiser updates `params`; the objective sees `to_image(params)`. Spectral
parameterizations keep their coefficients on the full (H, W) frequency grid, so
`to_image` reads the image size from the parameters' shape (any H, W, odd or even).
"""

import functools
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fvis.errors import InvalidTypeError, InvalidValueError
from fvis.images import check_image_file, load_photo, photo_paths
from fvis.numerics import safe_std

# Square root of the colour covariance of ImageNet photos (from its SVD), the matrix of
# Lucid's decorrelated colour space (Olah et al., Distill 2017). Columns are scaled so
# the longest has norm 1; x_rgb = x_decorrelated @ _COLOR.T.
_COLOR_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], np.float32)
_COLOR = _COLOR_SQRT / np.max(np.linalg.norm(_COLOR_SQRT, axis=0))


class Parameterization(NamedTuple):
    """An image representation; see the module docstring."""

    init: Callable
    to_image: Callable
    invert: Optional[Callable] = None


def pixel(*, init_scale=0.125):
    """Plain pixels, as in the reference: params are the image itself.

    Args:
        init_scale: the start is uniform noise in [-init_scale, init_scale) around gray;
            0.125 reproduces the reference's `(uniform[0, 1) - 0.5) * 0.25`.
    """
    if not init_scale >= 0:
        raise InvalidValueError(f"init_scale must be >= 0. Received: init_scale={init_scale}")

    def init(key, shape):
        return (jax.random.uniform(key, shape, jnp.float32) - 0.5) * (2.0 * init_scale)

    return Parameterization(init, lambda params: params, lambda image: jnp.asarray(image, jnp.float32))


def decorrelated_to_rgb(x):
    """Maps colours from the decorrelated space to RGB (Olah et al., Distill 2017).

    Args:
        x: (..., C) float array. Only C = 3 has a colour space to decorrelate; any
            other C (1 for grayscale) is returned unchanged.

    Returns:
        (..., C) float array, the same dtype.
    """
    return x @ jnp.asarray(_COLOR.T, x.dtype) if x.shape[-1] == 3 else x


def rgb_to_decorrelated(x):
    """The inverse of `decorrelated_to_rgb`: (..., C) RGB -> (..., C) decorrelated colours."""
    return x @ jnp.asarray(np.linalg.inv(_COLOR.T), x.dtype) if x.shape[-1] == 3 else x


def frequencies(height, width):
    """Radial spatial frequency of each FFT bin, in cycles per pixel.

    Returns:
        (height, width) float32 numpy array in [0, sqrt(0.5)]; entry [ky, kx] is the
        frequency of `numpy.fft.fft2`'s bin [ky, kx].
    """
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    return np.sqrt(fy * fy + fx * fx).astype(np.float32)


def power_law(height, width, decay_power=1.0):
    """Amplitude 1 / f**decay_power per FFT bin, capped at the lowest frequency of the image.

    Returns:
        (height, width) float32 numpy array; the DC bin gets max(height, width)**decay_power.
    """
    return (1.0 / np.maximum(frequencies(height, width), 1.0 / max(height, width)) ** decay_power
            ).astype(np.float32)


def _to_range(x, decorrelate):
    """Unbounded (H, W, C) -> fvis' [-1, 1] space: optional colour correlation, then a sigmoid."""
    return 2.0 * jax.nn.sigmoid(decorrelated_to_rgb(x) if decorrelate else x) - 1.0


_EDGE = 1.0 / 255.0  # how far `_from_range` moves pixels at -1 or 1 inwards: half an 8-bit level


def _from_range(image, decorrelate):
    """The inverse of `_to_range`: (H, W, C) in [-1, 1] -> unbounded, pixels clipped to
    [-1 + 1/255, 1 - 1/255] first so the inverse sigmoid stays finite."""
    x = jnp.clip(jnp.asarray(image, jnp.float32), -1.0 + _EDGE, 1.0 - _EDGE)
    x = jnp.log1p(x) - jnp.log1p(-x)  # logit((x + 1) / 2)
    return rgb_to_decorrelated(x) if decorrelate else x


def fourier(*, decay_power=1.0, init_std=0.01, decorrelate=True):
    """The Fourier parameterization with 1/f scaling and decorrelated colour.

    The image is the real part of the inverse FFT of a complex spectrum whose
    coefficients are scaled by 1/f**decay_power, so the optimiser's steps have the
    1/f spectrum of photographs instead of being dominated by high frequencies; colours are
    decorrelated and squashed into range by a sigmoid (Olah et al., Distill 2017,
    "Feature Visualization"; Mordvintsev et al., Distill 2018, "Differentiable Image
    Parameterizations"). Images are in range by construction: display them with
    `mode="clip"` (see `fvis.images.deprocess`).

    Args:
        decay_power: exponent of the 1/f scaling; 0 gives white (unscaled) spectra.
        init_std: standard deviation of the real and imaginary parts of the initial
            spectrum (Lucid's 0.01: a near-gray start).
        decorrelate: optimise in the decorrelated colour space; only 3-channel images
            have one (grayscale images are left as they are).

    Params: (2, H, W, C) float32, real and imaginary parts on the full FFT grid.
    `invert` is exact up to float rounding, except that pixels at -1 or 1 come back
    1/255 inside (the sigmoid reaches neither).
    """
    if not init_std >= 0:
        raise InvalidValueError(f"init_std must be >= 0. Received: init_std={init_std}")

    def init(key, shape):
        return init_std * jax.random.normal(key, (2, *shape), jnp.float32)

    def invert(image):  # exact: the full complex spectrum holds any real image
        height, width = image.shape[:2]
        spectrum = jnp.fft.fft2(4.0 * _from_range(image, decorrelate), axes=(0, 1), norm="ortho")
        spectrum = spectrum / power_law(height, width, decay_power)[..., None]
        return jnp.stack([jnp.real(spectrum), jnp.imag(spectrum)]).astype(jnp.float32)

    return Parameterization(init, lambda params: _to_range(fourier_image(params, decay_power), decorrelate), invert)


def fourier_image(params, decay_power=1.0):
    """The unbounded image of a Fourier parameterization, before colour and sigmoid.

    Args:
        params: (2, H, W, C) float32, real and imaginary parts of the spectrum on the
            full FFT grid (entry [:, ky, kx] is `numpy.fft.fft2`'s bin [ky, kx]).
        decay_power: the spectrum is scaled by `power_law(H, W, decay_power)`.

    Returns:
        (H, W, C) float32: the real part of the orthonormal inverse FFT of the scaled
        spectrum, divided by 4 (Lucid's scale).
    """
    height, width = params.shape[1:3]
    spectrum = (params[0] + 1j * params[1]) * power_law(height, width, decay_power)[..., None]
    return (jnp.real(jnp.fft.ifft2(spectrum, axes=(0, 1), norm="ortho")) / 4.0).astype(jnp.float32)


def _mirror(x):
    """x[-ky mod H, -kx mod W]: each FFT bin's conjugate partner, for (H, W, ...) arrays."""
    return jnp.roll(jnp.flip(x, (0, 1)), (1, 1), axis=(0, 1))


def _standardize(x):
    return (x - jnp.mean(x)) / safe_std(x)


def natural_magnitude(paths, height, width, channels=3, *, decorrelate=True):
    """Mean Fourier magnitude of photos (MaCo's magnitude template).

    Args:
        paths: photo files; each is centre-cropped to a square and resized to (height, width).
        channels: 3 (RGB) or 1 (grayscale).
        decorrelate: measure 3-channel photos in the decorrelated colour space.

    Returns:
        (height, width, channels) float32 numpy array, |FFT| averaged over the photos.
    """
    total = np.zeros((height, width, channels), np.float64)
    for path in paths:
        photo = load_photo(path, (height, width), channels=channels)
        if decorrelate and channels == 3:  # numpy, not jnp: this runs while `to_image` is being traced
            photo = photo @ np.linalg.inv(_COLOR.T)
        total += np.abs(np.fft.fft2(photo - photo.mean(axis=(0, 1)), axes=(0, 1)))
    return (total / len(paths)).astype(np.float32)


def maco(*, magnitude=None, decay_power=1.0, decorrelate=True):
    """MaCo: a fixed Fourier magnitude, only the phase is optimised (Fel et al., NeurIPS 2023,
    "Unlocking Feature Visualization for Deeper Networks with MAgnitude Constrained Optimization").

    The image is the inverse FFT of |M| * exp(i * phase), standardised to zero mean and
    unit variance, colour-correlated and squashed into range by a sigmoid. Fixing the
    magnitude fixes the image's power spectrum (natural by construction); the mean
    colour bin (DC) is zero, so images average to gray. Display with `mode="clip"`.

    Args:
        magnitude: a folder of natural images whose mean magnitude spectrum (in
            decorrelated colour) is used, or None for the law 1/f**decay_power.
        decay_power: exponent of the default magnitude law (1: power falls as 1/f**2,
            as in photographs).
        decorrelate: as in `fourier`; only 3-channel images have a colour space.

    Params: (H, W, C) float32; the phase of bin k is p[k] - p[-k], which keeps the
    spectrum Hermitian (a real image) with exactly the magnitude |M|, and is uniform on
    the circle when p starts uniform.

    `invert` is approximate by design: the magnitude is fixed, so only the photo's phase
    (taken after the inverse sigmoid and colour decorrelation) is kept. The result is the
    photo's phase-only reconstruction on MaCo's magnitude: its edges and layout (which the
    phase carries; Oppenheim & Lim 1981) but MaCo's contrast, a gray mean and no sign on
    the bins that are their own mirror (DC, Nyquist).

    Raises:
        MissingFileError: `magnitude` names no folder with images in it.
    """
    paths = photo_paths(magnitude, purpose="MaCo's magnitude spectrum (or magnitude=null: the 1/f law)") \
        if magnitude is not None else None

    @functools.lru_cache(maxsize=4)
    def template(height, width, channels):
        if paths is None:
            law = np.broadcast_to(power_law(height, width, decay_power)[..., None], (height, width, channels))
        else:
            law = natural_magnitude(paths, height, width, channels, decorrelate=decorrelate)
        law = np.array(law)
        law[0, 0] = 0.0  # no mean colour: images average to gray
        return law

    def init(key, shape):
        return jax.random.uniform(key, shape, jnp.float32, -np.pi, np.pi)

    def to_image(params):
        return _to_range(maco_image(params, template(*params.shape)), decorrelate)

    def invert(image):
        phase = jnp.angle(jnp.fft.fft2(_from_range(image, decorrelate), axes=(0, 1)))
        return (phase / 2.0).astype(jnp.float32)  # p[k] - p[-k] = phase[k], as phase[-k] = -phase[k]

    return Parameterization(init, to_image, invert)


def maco_image(params, magnitude):
    """The standardised image of MaCo phases, before colour and sigmoid.

    Args:
        params: (H, W, C) float32; the phase of FFT bin k is params[k] - params[-k].
        magnitude: (H, W, C) non-negative magnitude spectrum, symmetric under k -> -k.

    Returns:
        (H, W, C) float32 with mean 0 and standard deviation 1, whose FFT magnitude is
        `magnitude` up to one overall scale factor.
    """
    spectrum = magnitude * jnp.exp(1j * (params - _mirror(params)))
    return _standardize(jnp.real(jnp.fft.ifft2(spectrum, axes=(0, 1))).astype(jnp.float32))


def start_from(param, image):
    """`param`, starting from `image` instead of its random start (Mahendran & Vedaldi 2015,
    https://arxiv.org/abs/1412.0035; Lucid's caricatures).

    Every unit and image starts from `param.invert(image)`; the key is not used. How
    exactly the start reproduces the photo depends on the parameterization (see its
    docstring): pixel and Fourier to float rounding, MaCo only in phase.

    Args:
        param: a `Parameterization` with `invert` (pixel, fourier, maco).
        image: (H, W, C) float array in fvis' [-1, 1] space, at the job's image size; or
            the path of a photo, centre-cropped and resized to the job's size (as
            `fvis.images.load_photo`) when the job's images are initialised.

    Raises:
        InvalidTypeError: `param` has no `invert`.
        MissingFileError: `image` is a path that cannot be read as an image (checked here).
        InvalidValueError: an array whose shape is not the job's image shape (when traced).
    """
    if getattr(param, "invert", None) is None:
        raise InvalidTypeError(f"start_from needs a parameterization with an inverse (fvis.params.pixel, fourier, "
                               f"maco). Received: {param!r}")
    source = check_image_file(image, purpose="the starting image") if _is_path(image) else np.asarray(image, np.float32)

    def init(key, shape):
        photo = load_photo(source, shape[:2], channels=shape[2]) if _is_path(source) else source
        if photo.shape != tuple(shape):
            raise InvalidValueError(f"The starting image has shape {photo.shape}, but the job's images are "
                                    f"{tuple(shape)}. Received: image of shape {photo.shape}")
        return param.invert(photo)

    return param._replace(init=init)


def _is_path(value):
    return isinstance(value, (str, Path))
