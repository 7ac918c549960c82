"""report.html and the quality figures in results.json, from the library and from the command."""

import json
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import fvis
from fvis import outputs, quality, report


class Sources(HTMLParser):
    """Collects every img src of a page."""

    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def sources(path):
    parser = Sources()
    parser.feed(path.read_text())
    return parser.sources


def write_photos(folder, names=("cat <1>.png", "dog.jpg")):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_write_merges_figures_and_links_existing_files(tiny, tmp_path):
    result = fvis.visualize(tiny, "conv2", [0, 1, 2], steps=3, images_per_unit=2, progress=False)
    job = fvis.prepare(tiny, "conv2", [0, 1, 2])
    summary = outputs.write_run(tmp_path, result, config={"steps": 3}, meta={"model": "tiny", "objective": "x"},
                                crop=2)
    natural = quality.load_photos(write_photos(tmp_path / "photos"), (32, 32))
    records, run_summary = quality.measure(job.forward, job.objective, result.units, result.images, natural=natural,
                                           draws=2)
    report.write(tmp_path, summary, records, run_summary, natural=natural)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["quality"]["rank1_fraction"] == run_summary["rank1_fraction"]
    assert [f["quality"] for f in saved["filters"]] == json.loads(json.dumps(records))
    assert set(saved["filters"][0]["quality"]) >= {"activation", "selectivity_rank", "robustness", "spectral_slope",
                                                   "natural_ratio"}
    srcs = sources(tmp_path / "report.html")
    assert srcs[0] == "grid.png" and sum(s.startswith("filters/") for s in srcs) == 6
    assert sum(s.startswith("natural/") for s in srcs) == 6 * 2  # top 2 of 2 photos per image
    from urllib.parse import unquote
    assert all((tmp_path / unquote(s)).is_file() for s in srcs)  # every picture is there, relative to the page
    assert "cat &lt;1&gt;.png" in (tmp_path / "report.html").read_text()


def test_merge_needs_one_record_per_filter():
    with pytest.raises(ValueError):
        report.merge({"filters": [{}, {}]}, [{}], {})


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fvis", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_writes_the_quality_report_for_a_grayscale_non_square_lucid_run(tmp_path):
    photos = write_photos(tmp_path / "photos")
    proc = run_cli("model=tiny", "model.channels=1", "image_size=[40,56]", "experiment=lucid", "steps=3",
                   "filters=0:3", f"quality.natural_images={photos}", "quality.draws=2",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fvis: quality rank-1 selectivity" in proc.stdout
    with np.load(tmp_path / "run" / "images.npz") as data:
        assert data["images"].shape == (3, 1, 40, 56, 1)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["quality"]) >= {"rank1_fraction", "robustness_median", "spectral_slope_median",
                                       "natural_ratio_median"}
    assert all("natural_ratio" in f["quality"] for f in results["filters"]) and results["timings"]["quality_s"] > 0
    assert (tmp_path / "run" / "report.html").is_file() and len(list((tmp_path / "run" / "natural").iterdir())) == 2


def test_cli_checks_the_photo_folder_before_compute(tmp_path):
    proc = run_cli("model=tiny", "quality.natural_images=nowhere", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "No images" in proc.stderr
    assert not (tmp_path / "run" / "chunks").exists()


def test_objective_curve_is_read_under_its_old_name_too():
    """results.json names the rising curve `objective_curve`; files written before keep `loss_curve`."""
    new = {"unit": 0, "png": "filters/filter_0000.png", "objective_curve": [0.0, 1.0, 3.0]}
    old = {"unit": 0, "png": "filters/filter_0000.png", "loss_curve": [0.0, 1.0, 3.0]}
    assert report.objective_curve(new) == report.objective_curve(old) == [0.0, 1.0, 3.0]
    pages = [report.page({"model": "m", "objective": "o", "filters": [record]}) for record in (new, old)]
    assert pages[0] == pages[1] and "<polyline" in pages[0]
