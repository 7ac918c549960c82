"""Whole-model jobs: which layers to walk, which filters each gets, and the layer atlas.

A whole-model job visualizes the filters of many layers, one after another, each
layer in its own folder `layers/NNN_<layer>/` laid out like a single-layer run.
The atlas is what ties them together: `atlas.png` (one row of tiles per layer)
and `index.html` (each layer's grid, linked to its folder).

Layer specs: "all" (every layer whose output is a feature map (H, W, C)), a
layer path, a glob pattern over layer paths (`block*_add`, see `fnmatch`), or a
list of paths and patterns. Patterns expand in the model's layer order.
"""

import fnmatch
import html
import re
from pathlib import Path

import numpy as np

from PIL import Image

from fvis import images as images_lib
from fvis.errors import InvalidTypeError, InvalidValueError, UnknownNameError, did_you_mean
from fvis.outputs import atomic_write_bytes
from fvis.units import parse_units

_GLOB = re.compile(r"[*?\[]")


def select_layers(model, spec):
    """The layer paths a whole-model job walks.

    Args:
        model: an `fvis.models.VisModel`.
        spec: "all"; a layer path or glob pattern; or a list of them (see the module doc).

    Returns:
        list of str, without repeats: "all" and patterns in model order, lists in the order given.

    Raises:
        UnknownNameError: a path that does not exist, or a pattern that matches no feature map.
        InvalidValueError: an empty list.
        InvalidTypeError: a spec that is neither a string nor a list of strings.
    """
    entries = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else None
    if entries is None or not all(isinstance(e, str) for e in entries):
        raise InvalidTypeError(f"layers must be 'all', a layer name or pattern, or a list of them. "
                               f"Received: layers={spec!r}")
    if not entries:
        raise InvalidValueError("layers=[] selects no layer; use layers=all or name some layers.")
    maps = model.feature_map_paths()
    selected = []
    for entry in entries:
        if entry == "all":
            selected += list(maps)
        elif _GLOB.search(entry):
            matched = fnmatch.filter(maps, entry)
            if not matched:
                raise UnknownNameError(f"The pattern '{entry}' matches no feature-map layer of "
                                       f"'{model.name}'. " + did_you_mean(entry, maps, kind="layer"))
            selected += matched
        else:
            model.output_shapes([entry])  # raises with the nearest names
            selected.append(entry)
    return list(dict.fromkeys(selected))


def channels(model, path):
    """The channel count (last axis, channels-last) of the output of the layer at `path`."""
    return int(model.output_shapes([path])[path][-1])


def units_for_layer(spec, channels, widest, layer):
    """The filters of a whole-model job that a layer with `channels` channels has.

    `spec` is read as for one layer of `widest` channels (see `fvis.units.parse_units`),
    then cut to this layer: "0:64" means "the first 64, or all the layer has".

    Returns:
        (N,) int32 indices, all < channels.

    Raises:
        UnitIndexError, InvalidValueError: a spec invalid for every layer, or one that
            selects none of this layer's channels.
    """
    indices = parse_units(spec, widest)
    kept = indices[indices < channels]
    if not kept.size:
        raise InvalidValueError(f"filters={spec!r} selects none of the {channels} channels of layer "
                                f"'{layer}'. Use filters=all or a range that starts lower.")
    return kept


def layer_folder(index, path):
    """The folder of the index-th layer of a whole-model job, e.g. `layers/007_block4c_add`."""
    return f"layers/{index:03d}_{re.sub(r'[^A-Za-z0-9._-]', '_', path)}"


def layer_entry(index, layer, summary, channels):
    """A layer's line in the atlas (and in a whole-model job's results.json)."""
    finals = [f["final"] for f in summary["filters"]]
    return {"index": index, "layer": layer, "folder": layer_folder(index, layer), "channels": channels,
            "filters": len(summary["units"]), "dead": len(summary["dead_filters"]),
            "mean_final": float(np.mean(finals))}


def layer_row(folder, summary, *, tiles=8, size=64):
    """A layer's row of the atlas image: its first `tiles` filter PNGs, shrunk to `size` px."""
    pngs = [record["png"] for record in summary["filters"][:tiles]]
    return [thumbnail(images_lib.load_png(Path(folder) / png), size) for png in pngs]


def atlas_image(rows, *, margin=5):
    """Stacks each layer's tiles into one row: one image of the whole model.

    Args:
        rows: list (one per layer) of lists of uint8 tiles (h, w, C), all the same shape.
        margin: black pixels between tiles and between rows.

    Returns:
        uint8 (L*h + (L-1)*margin, K*w + (K-1)*margin, C), K the longest row; short rows
        end in black.
    """
    cols = max(len(row) for row in rows)
    return images_lib.grid([tile for row in rows for tile in _pad(row, cols)], margin=margin, cols=cols)


def thumbnail(tile, size=64):
    """A uint8 tile (h, w, C) shrunk so its longer side is at most `size` (Lanczos)."""
    h, w, c = tile.shape
    scale = min(1.0, size / max(h, w))
    if scale == 1.0:
        return tile
    image = Image.fromarray(tile[..., 0] if c == 1 else tile)
    small = np.asarray(image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS))
    return small.reshape(small.shape[0], small.shape[1], c)


def _pad(row, cols):
    return list(row) + [np.zeros_like(row[0])] * (cols - len(row))


def index_html(title, layers):
    """The atlas page: one section per layer with its grid, linked to its folder.

    Args:
        title: page title (the model and objective).
        layers: dicts with "layer", "folder", "channels", "filters" (count), "dead" (count)
            and "mean_final".

    Returns:
        str, a self-contained HTML page (images by relative path).
    """
    sections = "\n".join(
        f'<section id="{html.escape(e["folder"])}"><h2>{i}. {html.escape(e["layer"])}</h2>'
        f'<p>{e["filters"]} of {e["channels"]} filters &middot; dead {e["dead"]} &middot; '
        f'mean final objective {e["mean_final"]:.4g} &middot; '
        f'<a href="{html.escape(e["folder"])}/results.json">results.json</a></p>'
        f'<a href="{html.escape(e["folder"])}/grid.png"><img src="{html.escape(e["folder"])}/grid.png" '
        f'alt="{html.escape(e["layer"])}" loading="lazy"></a></section>'
        for i, e in enumerate(layers))
    toc = " &middot; ".join(f'<a href="#{html.escape(e["folder"])}">{html.escape(e["layer"])}</a>'
                            for e in layers)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:1em 2em}img{max-width:100%;image-rendering:pixelated}"
            "section{margin-bottom:2em}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{len(layers)} layers. <a href='atlas.png'>atlas.png</a> "
            f"(one row per layer)</p><nav>{toc}</nav>\n{sections}\n</body></html>\n")


def write_atlas(folder, title, layers, rows, *, margin=5):
    """Writes `atlas.png` and `index.html` of a whole-model job (see `atlas_image`, `index_html`)."""
    folder = Path(folder)
    images_lib.save_png(folder / "atlas.png", atlas_image(rows, margin=margin))
    atomic_write_bytes(folder / "index.html", index_html(title, layers).encode())
