"""Results in a notebook: a `Result` shows itself, and `show` draws a grid in one call.

    result = fvis.visualize(model, "block4c_add", "0:16")
    result                       # the grid and a table of the figures, inline (Jupyter)
    fvis.show(result)            # the grid as a PIL image (shown inline as the cell's value)
    fvis.show(result, unit=7)    # unit 7's images (several with images_per_unit > 1)

Nothing is written to disk: the grid is encoded in memory (an embedded PNG in the HTML).
"""

import base64
import html
import io

import numpy as np
from PIL import Image

from fvis import images as images_lib, outputs
from fvis.errors import InvalidValueError
from fvis.settings import Display

_TABLE_ROWS = 64  # rows of the figures table shown inline; the Result holds all


def inline_display(result):
    """The `Display` for inline views: the reference's 25 px crop where images are at least
    100 px on their shorter side (at most a quarter cut from each side), else no crop."""
    h, w = result.images.shape[2:4]
    return Display(crop=25 if min(h, w) >= 100 else 0)


def grid_array(result, unit=None, *, display=None):
    """The grid of a `Result` as uint8 (H, W, C), as grid.png shows it.

    Args:
        result: an `fvis.Result`.
        unit: None for every image; a unit index for that unit's images only (one row).
        display: an `fvis.Display`; default `inline_display(result)`.

    Raises:
        InvalidValueError: `unit` is not one of the result's units.
    """
    display = display or inline_display(result)
    tiles = outputs.tiles(result, crop=display.crop, mode=display.mode)
    cols = None
    if unit is not None:
        rows = np.flatnonzero(np.asarray(result.units) == unit)
        if not len(rows):
            raise InvalidValueError(f"Unit {unit} is not in this result; it has units "
                                    f"{[int(u) for u in result.units][:16]}. Received: unit={unit}")
        d = result.images.shape[1]
        tiles, cols = tiles[rows[0] * d: rows[0] * d + d], d
    return images_lib.grid(tiles, margin=display.margin, cols=cols)


def show(result, unit=None, *, display=None):
    """A `Result`'s grid (or one unit's images) as a `PIL.Image`; a notebook shows it inline.

    Args: as `grid_array`.
    """
    array = grid_array(result, unit, display=display)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def png_bytes(result, unit=None, *, display=None):
    """The grid as PNG bytes (what `Result._repr_png_` returns)."""
    buffer = io.BytesIO()
    show(result, unit, display=display).save(buffer, format="PNG")
    return buffer.getvalue()


def result_html(result):
    """HTML for a `Result`: its grid as an embedded PNG and a table of each image's figures."""
    n, d = result.final.shape
    encoded = base64.b64encode(png_bytes(result)).decode("ascii")
    head = "<tr><th>unit</th><th>image</th><th>objective at step 0</th><th>final objective</th><th>moved</th></tr>"
    rows = [f"<tr><td>{int(u)}</td><td>{j}</td><td>{result.curves[i, j, 0]:.4g}</td><td>{result.final[i, j]:.4g}"
            f"</td><td>{'no (dead)' if result.dead[i, j] else 'yes'}</td></tr>"
            for i, u in enumerate(result.units) for j in range(d)]
    more = f"<p>{len(rows) - _TABLE_ROWS} more rows in result.final</p>" if len(rows) > _TABLE_ROWS else ""
    steps = result.curves.shape[-1]
    caption = html.escape(f"fvis Result: {n} units x {d} images, {steps} steps, compile {result.compile_s:.1f} s, "
                          f"optimise {result.optimize_s:.1f} s")
    return (f'<div><p><b>{caption}</b></p><img src="data:image/png;base64,{encoded}" alt="grid of {n * d} images" '
            f'style="max-width:100%"><table>{head}{"".join(rows[:_TABLE_ROWS])}</table>{more}</div>')
