"""From optimised float images to PNG tiles and grids (the reference's display).

Tiles and grids are uint8 arrays (H, W, C) with C = 3 (RGB) or 1 (grayscale);
PNG files round-trip them exactly.
"""

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fvis.errors import InvalidValueError, MissingFileError, check_positive_int

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def deprocess(image, *, crop=25, mode="seed"):
    """Turns one optimised image into a displayable uint8 tile.

    Args:
        image: (H, W, C) float array in fvis' [-1, 1] space.
        crop: pixels removed on each side (the reference: 25), >= 0.
        mode: "seed": the reference's contrast normalisation (centre on the mean,
            divide by std + 1e-5, times 0.15, + 0.5, clip to [0, 1]);
            "clip": map [-1, 1] to [0, 1] and clip, for parameterizations whose
            images already live in range (Fourier, MaCo).

    Returns:
        (H - 2*crop, W - 2*crop, C) uint8.

    Raises:
        InvalidValueError: an unknown mode, or a crop that leaves no pixels.
    """
    x = np.asarray(image, np.float64)
    h, w = x.shape[:2]
    check_display((h, w), crop=crop, mode=mode)
    if mode == "seed":
        x = (x - x.mean()) / (x.std() + 1e-5) * 0.15
    else:
        x = (x + 1.0) * 0.5 - 0.5
    x = x[crop: h - crop, crop: w - crop] + 0.5
    return (np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


DISPLAY_MODES = ("seed", "clip")


def check_display(image_size, *, crop=25, mode="seed", margin=5, transparency=False):
    """Checks display settings against the image size, so a job can refuse them before it computes.

    Args:
        image_size: (H, W) of the optimised images.
        crop, mode, margin: as in `deprocess` and `grid`.
        transparency: whether tiles with MaCo's transparency as alpha are written (a bool).

    Raises:
        InvalidValueError: naming the setting, the value received and what is allowed:
            crop and margin must be integers, 0 <= crop < min(H, W) / 2, margin >= 0,
            mode one of DISPLAY_MODES, transparency true or false.
    """
    if not isinstance(transparency, bool):
        raise InvalidValueError(f"display.transparency must be true or false. Received: {transparency!r}")
    h, w = image_size
    check_positive_int("display.crop", crop, minimum=0)
    check_positive_int("display.margin", margin, minimum=0)
    if 2 * crop >= min(h, w):
        raise InvalidValueError(f"crop={crop} leaves no pixels of a {h}x{w} image; use 0 <= crop < "
                                f"{(min(h, w) + 1) // 2} (display.crop). Received: crop={crop}")
    if mode not in DISPLAY_MODES:
        raise InvalidValueError(f"Unknown display mode '{mode}'; use 'seed' or 'clip' (display.mode). "
                                f"Received: mode='{mode}'")


def grid(tiles, *, margin=5, cols=None):
    """Stitches tiles row by row into one image with black margins (the reference layout).

    Args:
        tiles: sequence of N uint8 tiles (h, w, C), all the same shape.
        margin: black pixels between tiles.
        cols: tiles per row; default ceil(sqrt(N)) (8 for 64, as in the reference).

    Returns:
        (rows*h + (rows-1)*margin, cols*w + (cols-1)*margin, C) uint8,
        rows = ceil(N / cols); tile i sits at row i // cols, column i % cols.
    """
    tiles = [np.asarray(t) for t in tiles]
    if not tiles:
        raise InvalidValueError("grid needs at least one tile.")
    h, w, c = tiles[0].shape
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    out = np.zeros((rows * h + (rows - 1) * margin, cols * w + (cols - 1) * margin, c), np.uint8)
    for i, tile in enumerate(tiles):
        y, x = (i // cols) * (h + margin), (i % cols) * (w + margin)
        out[y: y + h, x: x + w] = tile
    return out


def with_alpha(tile, alpha):
    """An RGBA tile: a uint8 (h, w, 1|3) tile with `alpha` (h, w) in [0, 1] as its opacity.

    Returns:
        (h, w, 4) uint8; a grayscale tile is repeated into RGB.
    """
    rgb = np.repeat(tile, 3, axis=-1) if tile.shape[-1] == 1 else tile
    return np.concatenate([rgb, np.round(np.clip(alpha, 0.0, 1.0) * 255.0).astype(np.uint8)[..., None]], axis=-1)


def animation_bytes(frames, *, duration_ms=500, format="GIF"):
    """An animated GIF (or WebP, `format="WEBP"`) of uint8 (H, W, 1|3) frames, looping forever."""
    pictures = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f).convert("RGB") for f in frames]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format=format, save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)
    return buffer.getvalue()


def save_png(path, array):
    """Writes a uint8 (H, W, 1|3|4) array (gray, RGB, RGBA) as PNG, atomically (temp file + rename).

    Raises:
        InvalidValueError: not uint8, or not 1, 3 or 4 channels.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InvalidValueError(f"save_png needs a uint8 (H, W, 1|3|4) array. Received: dtype={array.dtype}, "
                                f"shape={array.shape}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path):
    """Reads a PNG as uint8 (H, W, C), C = 1 for grayscale, 3 for colour (16-bit files scaled to 8 bits)."""
    image = _open(path)
    array = np.asarray(_convert(image, "L" if image.mode == "L" or image.mode.startswith("I") else "RGB"))
    return array[..., None] if array.ndim == 2 else array


def load_photo(path, image_size, *, channels=3):
    """Loads a photo, centre-cropped to a square, resized to (H, W), in fvis' [-1, 1] space.

    Values are scaled by the file's bit depth: 8-bit and 16-bit (PNG) files of the same
    picture give the same array.

    Returns:
        (H, W, channels) float32 in [-1, 1].

    Raises:
        MissingFileError: the file cannot be read as an image; the message names it.
    """
    image = _convert(_open(path), "L" if channels == 1 else "RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
    array = np.asarray(image, np.float32).reshape(image_size[0], image_size[1], channels)
    return array / 127.5 - 1.0


def _open(path, *, check_only=False, purpose=None):
    """The decoded image in `path`, or MissingFileError naming the file (and `purpose`).

    With `check_only`, only the header and (PNG) checksums are read and None is returned.
    """
    try:
        image = Image.open(path)
        if check_only:
            image.verify()
            image.close()
            return None
        image.load()
        return image
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        needed = f", needed for {purpose}" if purpose else ""
        raise MissingFileError(f"Cannot read '{path}' as an image{needed} ({type(e).__name__}: {e}). Remove it "
                               f"from its folder or replace it with a readable {'/'.join(PHOTO_SUFFIXES)} file. "
                               f"Received: '{path}'") from e


def check_image_file(path, *, purpose):
    """Returns `path` if it is a readable image file (header and PNG checksums checked), else
    raises MissingFileError naming it and what it is for (`purpose`)."""
    if not Path(path).expanduser().is_file():
        raise MissingFileError(f"No image file at '{path}', needed for {purpose}. Pass the path of a "
                               f"{'/'.join(PHOTO_SUFFIXES)} file. Received: '{path}'")
    _open(Path(path).expanduser(), check_only=True, purpose=purpose)
    return Path(path).expanduser()


def _convert(image, mode):
    """`image` in `mode` ("L" or "RGB"); integer modes ("I;16" PNGs, "I") are scaled from 16 bits, not clipped."""
    if image.mode.startswith("I"):
        scaled = np.asarray(image, np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))
    return image.convert(mode)


def photo_paths(folder, *, purpose="natural images"):
    """The image files (PHOTO_SUFFIXES) directly in `folder`, sorted by name.

    Every file is opened and checked (header, PNG checksums), so a corrupt one is
    reported here, before any compute, rather than when it is decoded.

    Raises:
        MissingFileError: `folder` is not a folder, holds no image file, or holds a file
            that is not a readable image; the message says what the photos are for (`purpose`).
    """
    folder = Path(folder).expanduser()
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES) if folder.is_dir() else []
    if not paths:
        raise MissingFileError(f"No images ({', '.join(PHOTO_SUFFIXES)}) found in '{folder}', needed for "
                               f"{purpose}. Pass a folder of photos. Received: '{folder}'")
    for path in paths:
        _open(path, check_only=True, purpose=purpose)
    return paths
