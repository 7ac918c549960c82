"""One table of every job under a folder: summary.csv and a sortable summary.html.

    python -m fvis.summary multirun/lr=5,10     # or: fvis-summary outputs/

A job is a folder holding run.json, results.json, error.json or Hydra's
.hydra/overrides.yaml; every job is listed with its status: done, failed, refused
(bad input, stopped before compute), killed (its process died: run.json still says
"running" but the process is gone, see `fvis.runfolder`), running, interrupted,
incomplete (chunks but no record), or "unreadable" when its records are malformed.
Columns: the job's command-line overrides, its status, filter counts and mean final
objective, the timings of its last attempt, its attempts and how each ended
("killed, done"), the seconds lost to attempts that did not finish, every numeric
entry of results.json's "quality", and (HTML only) a thumbnail of its grid. The
page is self-contained: open it from disk and click a column header to sort.
"""

import argparse
import csv
import html
import io
import math
import os
import re
import sys
from pathlib import Path

import yaml

from fvis import runfolder
from fvis.outputs import atomic_write_bytes, read_json

_MARKERS = ("run.json", "results.json", "error.json", ".hydra/overrides.yaml")
_TIMINGS = ("load_model_s", "compile_s", "optimize_s", "total_s")


def find_jobs(folder):
    """Job folders under `folder` (itself included), sorted; a job's own subfolders are not searched."""
    jobs = []
    for root, dirs, _ in os.walk(folder):
        if any((Path(root) / marker).exists() for marker in _MARKERS):
            jobs.append(Path(root))
            dirs.clear()
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(jobs)


def _overrides(job):
    try:
        lines = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    pairs = (line.split("=", 1) if "=" in line else (line, "") for line in map(str, lines))
    return {key: re.sub(r"\\(.)", r"\1", value) for key, value in pairs}  # Hydra escapes : , = in sweeps


def _status(run, results, error, problems=(), ended=()):
    if problems:
        return "unreadable"
    status = (run or {}).get("status") or ("done" if results else "failed" if error else "incomplete")
    return ended[-1] if status == "running" and ended else status


def _ended(job, record):
    """How an attempt ended: its status, but "killed" for a "running" one whose process is gone."""
    status = record.get("status")
    return "killed" if status == "running" and not runfolder.holder_alive(job, record) else status


def _killed_note(ended):
    if ended and ended[-1] == "killed":
        return "its process was killed (SIGKILL: out of memory, a time limit, a lost node) without recording why"
    return None


def _lost_seconds(job, attempts, ended):
    """Seconds run by the attempts that did not finish (failed, killed, interrupted, refused)."""
    lost = [runfolder.attempt_seconds(job, a) for a, how in zip(attempts, ended) if how not in ("done", "running")]
    return round(sum(s for s in lost if s is not None), 1) if lost else 0.0


def _records(job):
    """([run, results, error], problems): each file's JSON object, None when absent or malformed,
    and a sentence for each file present that is not valid JSON or not the object fvis writes."""
    records, problems = [], []
    for name in ("run.json", "results.json", "error.json"):
        data = read_json(job / name)
        if (job / name).exists() and not _well_formed(name, data):
            kind = "not valid JSON" if data is None else f"a JSON {type(data).__name__}, not an fvis record"
            problems.append(f"{name} is unreadable ({kind})")
            data = None
        records.append(data)
    return records, problems


def _well_formed(name, data):
    if not isinstance(data, dict):
        return False
    if name != "run.json":
        return True  # results.json's figures are read defensively (`_counts`, `_numeric`)
    attempts = data.get("attempts", [])
    return (isinstance(data.get("status", ""), str) and isinstance(attempts, list)
            and all(isinstance(a, dict) and isinstance(a.get("timings") or {}, dict) for a in attempts))


def _counts(results):
    """(filters, dead filters, mean final objective) of a single-layer or whole-model job."""
    try:
        return _counts_of(results)
    except (KeyError, TypeError, ValueError):  # not an fvis results.json
        return None, None, None


def _counts_of(results):
    if results is None:
        return None, None, None
    if "layers" in results:
        layers = results["layers"]
        total = sum(e["filters"] for e in layers)
        mean = sum(e["mean_final"] * e["filters"] for e in layers) / total if total else None
        return total, sum(e["dead"] for e in layers), mean
    finals = [f["final"] for f in results["filters"]]
    return len(finals), len(results.get("dead_filters", [])), sum(finals) / len(finals) if finals else None


def _numeric(entries, prefix):
    """Numeric entries of a dict, nested dicts flattened as "prefix.key.subkey"."""
    flat = {}
    for key, value in (entries if isinstance(entries, dict) else {}).items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(_numeric(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def job_row(job, folder):
    """One job's row: a dict of column -> value (str, number or None).

    A job whose run.json, results.json or error.json is malformed (not JSON, or not the
    object fvis writes) gets the status "unreadable", and the error column says which.
    """
    (run, results, error), problems = _records(job)
    attempts = (run or {}).get("attempts") or []
    ended = [_ended(job, a) for a in attempts]
    last = (attempts or [{}])[-1]
    filters, dead, mean_final = _counts(results)
    image = next((p for p in ("grid.png", "atlas.png") if (job / p).exists()), None)
    link = "index.html" if (job / "index.html").exists() else image
    return {"job": job.relative_to(folder).as_posix() or ".", "status": _status(run, results, error, problems, ended),
            "overrides": _overrides(job), "n_filters": filters, "n_dead": dead, "final_mean": mean_final,
            **{t: (last.get("timings") or {}).get(t) for t in _TIMINGS},
            "attempts": len(attempts), "ended": ", ".join(map(str, ended)),
            "lost_s": _lost_seconds(job, attempts, ended),
            "chunks_done": len(list(job.glob("**/chunks/chunk_*.npz"))),
            "quality": _numeric((results or {}).get("quality"), "quality"),
            "error": "; ".join(problems) or (error or {}).get("message", last.get("error")) or _killed_note(ended),
            "image": image, "link": link}


def _columns(rows):
    overrides = sorted({k for r in rows for k in r["overrides"]})
    quality = sorted({k for r in rows for k in r["quality"]})
    columns = ["job", "status", *overrides, "n_filters", "n_dead", "final_mean", *_TIMINGS, "attempts",
               "ended", "lost_s", "chunks_done", *quality, "error"]
    return columns, set(overrides), set(quality)


def _value(row, column, overrides, quality):
    if column in overrides:
        return row["overrides"].get(column)
    if column in quality:
        return row["quality"].get(column)
    return row[column]


def to_csv(rows):
    """The summary as CSV text: one line per job, a column per override, timing and quality figure."""
    columns, overrides, quality = _columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns + ["image"])
    for row in rows:
        writer.writerow([_cell_text(_value(row, c, overrides, quality)) for c in columns] + [row["image"] or ""])
    return buffer.getvalue()


def _cell_text(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


_SORT_JS = """
document.querySelectorAll('th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const up = th.dataset.dir !== 'up'; th.dataset.dir = up ? 'up' : 'down';
  const key = r => r.cells[i].dataset.v;
  const cmp = (a, b) => {
    const x = key(a), y = key(b);
    if (x === '' || y === '') return (x === '') - (y === '');
    const nx = Number(x), ny = Number(y);
    const c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y, undefined, {numeric: true}) : nx - ny;
    return up ? c : -c;
  };
  [...body.rows].sort(cmp).forEach(r => body.appendChild(r));
}));
"""

_STYLE = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
          "th,td{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}"
          "th{background:#eee;cursor:pointer;position:sticky;top:0}td.n{text-align:right}"
          "img{max-width:160px;max-height:160px;image-rendering:pixelated}"
          "tr.failed,tr.unreadable,tr.killed{background:#fdd}tr.refused{background:#eee}"
          "tr.incomplete,tr.interrupted,tr.running{background:#ffe8c0}")


def _shared(rows, overrides):
    """Overrides with one value in every job: shown once above the table instead of as columns."""
    values = {k: {r["overrides"].get(k) for r in rows} for k in overrides}
    return {k: v.pop() for k, v in values.items() if len(rows) > 1 and len(v) == 1}


def _cell(row, column, overrides, quality, where):
    value = _value(row, column, overrides, quality)
    text = html.escape(_cell_text(value))
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    shown = f'<a href="{where}">{text}</a>' if column == "job" else text
    return f'<td data-v="{text}"{" class=n" if numeric else ""}>{shown}</td>'


def to_html(rows, title, base=""):
    """The summary as a self-contained HTML page.

    Args:
        rows: from `job_row`.
        title: the page's title.
        base: the jobs' folder relative to where the page is saved ("" = the same folder).
    """
    columns, overrides, quality = _columns(rows)
    shared = _shared(rows, overrides)
    columns = [c for c in columns if c not in shared]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["grid", *columns])
    body = []
    for row in rows:
        where = html.escape(f"{base}{row['job']}/")
        thumb = (f'<a href="{where}{html.escape(row["link"])}"><img src="{where}{html.escape(row["image"])}" '
                 f'loading="lazy" alt="grid"></a>' if row["image"] else "")
        cells = "".join(_cell(row, c, overrides, quality, where) for c in columns)
        body.append(f'<tr class="{html.escape(row["status"])}"><td data-v="">{thumb}</td>{cells}</tr>')
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    status = ", ".join(f"{n} {s}" for s, n in counts.items())
    unfinished = sum(how not in ("done", "running", "") for r in rows for how in r["ended"].split(", ") if how)
    lost = (f" {unfinished} attempt{'' if unfinished == 1 else 's'} did not finish, "
            f"{sum(r['lost_s'] for r in rows):.1f} s of compute lost." if unfinished else "")
    common = " ".join(f"{k}={v}" for k, v in shared.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{len(rows)} job{'' if len(rows) == 1 else 's'}: {html.escape(status)}.{lost}"
            + (f" Every job: <code>{html.escape(common)}</code>." if common else "") +
            " Click a column header to sort.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) +
            f"\n</tbody></table><script>{_SORT_JS}</script></body></html>\n")


def write_summary(folder, out=None):
    """Writes summary.csv and summary.html for every job under `folder`.

    Args:
        folder: a sweep folder, `outputs/`, or any folder holding job folders.
        out: where to write the two files; default `folder`.

    Returns:
        The rows (one dict per job, see `job_row`).
    """
    folder = Path(folder)
    out = Path(out) if out is not None else folder
    rows = [job_row(job, folder) for job in find_jobs(folder)]
    atomic_write_bytes(out / "summary.csv", to_csv(rows).encode())
    base = Path(os.path.relpath(folder, out)).as_posix() + "/"
    page = to_html(rows, f"fvis: {folder.resolve().name}", "" if base == "./" else base)
    atomic_write_bytes(out / "summary.html", page.encode())
    return rows


def main(argv=None):
    """`fvis-summary FOLDER [--out DIR]`: writes summary.csv and summary.html."""
    parser = argparse.ArgumentParser(prog="fvis-summary", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a sweep folder, outputs/, or any folder of fvis runs")
    parser.add_argument("--out", help="where to write summary.csv and summary.html (default: FOLDER)")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        print(f"fvis-summary: error: no folder '{args.folder}'. Give a sweep folder such as "
              f"multirun/<sweep> or outputs/.", file=sys.stderr)
        return 2
    rows = write_summary(args.folder, args.out)
    jobs = f"{len(rows)} job{'' if len(rows) == 1 else 's'}"
    print(f"fvis-summary: {jobs} -> {Path(args.out or args.folder) / 'summary.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
