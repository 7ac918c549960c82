"""The quality report of a run: figures merged into results.json and an HTML page.

`report.html` sits next to `grid.png` and references the run's own files by
relative paths (grid, per-filter tiles, thumbnails of the top natural photos
under `natural/`), so it opens in any browser without a server, and keeps working
when the run folder is copied elsewhere.
"""

import html
from pathlib import Path
from urllib.parse import quote

import numpy as np

from fvis import images as images_lib
from fvis.outputs import atomic_write_bytes, atomic_write_json

_THUMB = 96  # pixels, the longer side of a natural-photo thumbnail

_SUMMARY_ROWS = [
    ("rank1_fraction", "images whose own unit ranks first (selectivity)", "{:.3f}"),
    ("robustness_median", "median robustness (activation after +-8 px, +-10 % / as is)", "{:.3f}"),
    ("spectral_slope_median", "median spectral slope (photos about -2 to -3, noise 0)", "{:.2f}"),
    ("activation_median", "median activation reached", "{:.4g}"),
    ("natural_ratio_median", "median activation / best natural photo's", "{:.3f}"),
    ("score", "score: images selective (rank 1) and robust, capped at 1, over all images", "{:.3f}"),
]


def merge(summary, records, quality_summary):
    """Adds the quality figures to a results.json dict, in place, and returns it.

    Each `summary["filters"][i]` gets `"quality": records[i]`; the run gets
    `summary["quality"] = quality_summary`.
    """
    for record, figures in zip(summary["filters"], records, strict=True):
        record["quality"] = figures
    summary["quality"] = quality_summary
    return summary


def write(folder, summary, records, quality_summary, *, natural=None):
    """Merges the figures into results.json, writes photo thumbnails and report.html.

    Args:
        folder: the run folder (holding grid.png and filters/).
        summary: the dict `fvis.outputs.write_run` returned.
        records, quality_summary: from `fvis.quality.measure`.
        natural: the (names, photos) that were measured, or None.

    Returns:
        The updated summary (also written to results.json).
    """
    folder = Path(folder)
    merge(summary, records, quality_summary)
    if natural is not None:
        _write_thumbnails(folder / "natural", *natural)
    atomic_write_json(folder / "results.json", summary)
    atomic_write_bytes(folder / "report.html", page(summary).encode())
    return summary


def _write_thumbnails(folder, names, photos):
    folder.mkdir(parents=True, exist_ok=True)
    for name, photo in zip(names, photos):
        tile = images_lib.deprocess(photo, crop=0, mode="clip")
        step = max(1, max(tile.shape[:2]) // _THUMB)
        images_lib.save_png(folder / f"{name}.png", tile[::step, ::step])


def _number(value, fmt="{:.3g}"):
    return "&ndash;" if value is None else fmt.format(value)


def _sparkline(curve, width=150, height=40):
    """An inline SVG of a curve (the objective per step) with its scale: the highest and lowest
    value at the left edge, the first and last step along the bottom."""
    y = np.asarray(curve, np.float64)
    if len(y) < 2 or not np.all(np.isfinite(y)):
        return ""
    left, top, plot_w, plot_h = 42, 6, width - 46, height - 18
    span = (y.max() - y.min()) or 1.0
    points = " ".join(f"{left + i * plot_w / (len(y) - 1):.1f},{top + plot_h - (v - y.min()) / span * plot_h:.1f}"
                      for i, v in enumerate(y))
    label = 'font-size="9" fill="#555"'
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<text x="{left - 3}" y="{top + 3}" text-anchor="end" {label}>{y.max():.3g}</text>'
            f'<text x="{left - 3}" y="{top + plot_h + 3}" text-anchor="end" {label}>{y.min():.3g}</text>'
            f'<text x="{left}" y="{height - 1}" {label}>0</text>'
            f'<text x="{left + plot_w}" y="{height - 1}" text-anchor="end" {label}>step {len(y) - 1}</text>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#bbb"/>'
            f'<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{points}"/></svg>')


def objective_curve(record):
    """A results.json filter record's objective per step ("objective_curve"; "loss_curve" in files
    written before fvis 0.2, which named the rising objective a loss)."""
    return record.get("objective_curve", record.get("loss_curve", []))


def _filter_row(record):
    q = record.get("quality", {})
    photos = "".join(
        f'<figure><img src="natural/{html.escape(quote(p["name"]))}.png" alt="{html.escape(p["name"])}">'
        f'<figcaption>{html.escape(p["name"])} {p["activation"]:.3g}</figcaption></figure>'
        for p in q.get("top_natural", []))
    alpha = record.get("alpha_png")
    alpha = (f'<img class="tile alpha" src="{html.escape(alpha)}" alt="unit {record["unit"]}, transparency" '
             f'title="MaCo transparency: opaque where the gradient was large">' if alpha else "")
    cells = [f'<img class="tile" src="{html.escape(record["png"])}" alt="unit {record["unit"]}">{alpha}',
             f'{record["unit"]}' + (f' ({record["image"]})' if record.get("image") else ""),
             _number(q.get("activation")), _number(q.get("selectivity_rank"), "{}"),
             _number(q.get("robustness"), "{:.3f}"), _number(q.get("spectral_slope"), "{:.2f}"),
             _number(q.get("natural_ratio"), "{:.3f}"), _sparkline(objective_curve(record)), photos]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


_SETTINGS = [("model", "model"), ("layer", "layer"), ("objective", "objective"), ("steps", "steps"),
             ("lr", "learning rate"), ("image_size", "image size"), ("seed", "seed"), ("experiment", "preset")]
_TIMINGS = [("compile_s", "compile"), ("optimize_s", "optimise"), ("quality_s", "quality report")]
TIMINGS_START, TIMINGS_END = "<!-- timings -->", "<!-- /timings -->"  # this attempt's seconds: the one part
                                                                      # that differs when a job is run again


def settings_rows(summary):
    """[(label, text)] of the run's settings from a results.json dict (its config and facts)."""
    config, found = summary.get("config") or {}, []
    optimizer = config.get("optimizer")  # a config dict from the command; a description from Python
    rate = optimizer.get("learning_rate") if isinstance(optimizer, dict) else None  # the rate that ran wins over lr
    for key, label in _SETTINGS:
        value = summary.get(key, config.get(key))
        if key == "lr" and isinstance(rate, (int, float)):
            value = rate
        if key == "image_size" and value is not None:
            value = "x".join(str(v) for v in value)
        if key == "experiment":
            value = value or "none"  # presets are the command's (experiment=...); it records the one chosen
        if value is not None:
            found.append((label, str(value)))
    return found


def timings_text(summary):
    """This attempt's seconds, as "compile 3.8 s, optimise 0.2 s, quality report 5.2 s"."""
    t = summary.get("timings", {})
    return ", ".join(f"{label} {t[key]:.1f} s" for key, label in _TIMINGS if t.get(key) is not None)


def _natural_hint(q):
    if "natural_ratio_median" in q:
        return ""
    return ('<p class="hint">The columns &ldquo;/ best photo&rdquo; and &ldquo;top natural photos&rdquo; are empty: '
            'run the job again with <code>quality.natural_images=FOLDER</code> (a folder of photos) to compare '
            'each image with the photos that drive its unit most (finished chunks are reused).</p>')


def page(summary):
    """The HTML text of report.html for a results.json dict that holds quality figures.

    Its settings table comes from the run's config; the seconds this attempt took sit between
    `TIMINGS_START` and `TIMINGS_END`, the only part that differs when the job runs again.
    """
    q = summary.get("quality", {})
    title = html.escape(f'{summary.get("model", "")}: {summary.get("objective", "")}')
    live = q.get("live", {})
    facts = "<tr><th></th><th>all images (a failure counts as one)</th><th>live images only</th></tr>" if q else ""
    facts += "".join(f"<tr><th>{html.escape(label)}</th><td>{_number(q.get(key), fmt)}</td>"
                     f"<td>{_number(live.get(key), fmt)}</td></tr>" for key, label, fmt in _SUMMARY_ROWS if key in q)
    if "failed_images" in q:
        facts += (f"<tr><th>failed images (never moved, or their unit the same on every image)</th>"
                  f"<td>{q['failed_images']}</td><td></td></tr>")
    dead = summary.get("dead_filters", [])
    facts += f"<tr><th>dead units (never moved; gray tiles)</th><td>{len(dead)}</td><td></td></tr>" if dead else ""
    settings = "".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(text)}</td></tr>"
                       for label, text in settings_rows(summary))
    timings = html.escape(timings_text(summary))
    rows = "\n".join(_filter_row(r) for r in summary["filters"])
    snaps = summary.get("snapshots")
    snaps = (f'<h2>Snapshots after {", ".join(map(str, snaps["steps"]))} steps</h2>'
             f'<img class="grid" src="{snaps["strip"]}" alt="one row per image, one column per snapshot"> '
             f'<img class="grid" src="{snaps["animation"]}" alt="the grid, animated">' if snaps else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fvis report: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }}
img.grid {{ max-width: 100%; }} img.tile {{ width: 96px; }} figure {{ display: inline-block; margin: 0 4px; }}
figure img {{ width: 64px; }} figcaption {{ font-size: 70%; }} .side {{ display: inline-block; vertical-align: top;
margin-right: 3em; }} p.hint {{ background: #fff8dc; padding: 6px 10px; max-width: 60em; }}
img.alpha {{ margin-left: 4px; background: repeating-conic-gradient(#ccc 0 25%, #fff 0 50%) 0 0 / 12px 12px; }}
</style></head><body>
<h1>{title}</h1>
<div class="side"><h2>Quality</h2><table>{facts}</table></div>
<div class="side"><h2>Settings</h2><table>{settings}</table>
<p>Time: {TIMINGS_START}{timings}{TIMINGS_END}</p></div>
<h2>Grid</h2><img class="grid" src="grid.png" alt="grid of all images">
{snaps}
<h2>Per filter</h2>
{_natural_hint(q)}
<table><tr><th>image</th><th>unit</th><th>activation</th><th>selectivity rank</th><th>robustness</th>
<th>spectral slope</th><th>/ best photo</th><th>objective per step</th><th>top natural photos</th></tr>
{rows}
</table></body></html>
"""
