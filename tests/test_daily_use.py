"""A researcher's daily use: the run's story in cli.log, --help, folder names, a report that explains
itself, results shown inline in notebooks, and the figure a searching sweeper receives."""

import base64
import hashlib
import io
import json
import logging
import re
import subprocess
import sys
import urllib.error
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

import fvis
from fvis import cli, outputs, progress, report
from fvis.cli import run_dir_name
from fvis.errors import WeightsUnavailableError

TINY = ["model=tiny", "filters=0:4", "steps=3", "display.crop=2", "quality.draws=2"]


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def hydra_main(monkeypatch, *argv):
    """Runs `fvis *argv` in this process through Hydra's own entry point, with Hydra's logging set-up
    off (reconfiguring logging would close the handlers pytest reports failures with)."""
    monkeypatch.setattr(sys, "argv", ["fvis", *argv, "hydra/job_logging=none", "hydra/hydra_logging=none"])
    return cli.main()


def png_array(data):
    return np.asarray(Image.open(io.BytesIO(data)))


def score_by_hand(results):
    """The search figure restated from results.json: each image adds min(robustness, 1) when its
    unit ranks first and it moved, else 0; the mean is over every image."""
    credit = []
    for record in results["filters"]:
        q = record["quality"]
        ok = q["selectivity_rank"] == 1 and not record["dead"] and q["robustness"] is not None
        credit.append(min(max(q["robustness"], 0.0), 1.0) if ok else 0.0)
    return sum(credit) / len(credit)


# -- logging ------------------------------------------------------------------------------------------------------

def test_cli_log_and_a_pipe_hold_the_runs_story(tmp_path):
    """cli.log (and stdout in a pipe) tell: job settings, model built, compiled, each chunk, quality, files."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fvis", *TINY, "experiment=seed", "display.crop=2", "batch_size=2",
                           f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    log = (out / "cli.log").read_text()
    lines = [line.split(" - ", 1)[1] for line in log.splitlines() if " - " in line]
    results = json.loads((out / "results.json").read_text())
    expected = [
        f"job: model tiny_convnet, layer conv2, filters 0:4, 3 steps, lr 10.0, image 32x32, seed 0, preset seed -> {out}",
        "model tiny_convnet built (32x32) in ",
        f"channel(conv2): compiled in {results['timings']['compile_s']:.1f} s (2 filters per chunk, 3 steps; "
        f"float32 matmuls and convolutions in {results['matmul_precision']['effective']})",
        "chunk 1/2 done: 2 filters in ",
        "chunk 2/2 done: 2 filters in ",
        f"quality of 4 images measured (rank-1 selectivity {results['quality']['rank1_fraction']:.2f}",
        f"wrote 4 images to {out}: grid.png, filters/, images.npz, results.json, report.html",
        f"4 images of channel(conv2) -> {out}/grid.png",
    ]
    found = [next((i for i, line in enumerate(lines) if line.startswith(start)), None) for start in expected]
    assert None not in found and found == sorted(found), (found, lines)
    assert f"score {score_by_hand(results):.2f}" in lines[found[5]]
    assert re.search(r"\((\d+\.\d\d) filters/s\)", lines[found[3]])
    assert "fvis: chunk 2/2 done: 2 filters" in proc.stdout  # off a terminal the console gets every line


def test_console_leaves_chunk_lines_to_the_bar_on_a_terminal(monkeypatch):
    """A per-chunk record reaches the console only when stderr is not a terminal; others always do."""
    stream = io.StringIO()
    handler = cli.ConsoleHandler(stream)
    handler.setFormatter(cli.ConsoleFormatter())
    chunk = logging.LogRecord("fvis.visualize", logging.INFO, "", 0, "chunk %d/%d done", (1, 2), None)
    setattr(chunk, progress.PROGRESS, True)
    other = logging.LogRecord("jax", logging.WARNING, "", 0, "slow", (), None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    handler.handle(chunk)
    handler.handle(other)
    assert stream.getvalue() == "jax: warning: slow\n"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    handler.handle(chunk)
    assert stream.getvalue() == "jax: warning: slow\nfvis: chunk 1/2 done\n"


def test_a_phase_shows_its_elapsed_time_on_a_terminal_and_logs_its_end(caplog, capsys):
    """`progress.phase`: a display on stderr only when asked, and one closing log line with the seconds."""
    log = logging.getLogger("fvis.test_phase")
    with caplog.at_level(logging.INFO, logger="fvis.test_phase"):
        with progress.phase("building the model", log, progress=True, refresh_s=0.01) as done:
            done("model %s built", "m")
        with progress.phase("quiet", log, progress=False):
            pass
    assert "building the model: 00:00" in capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records][0].startswith("model m built in 0.")
    assert len(caplog.records) == 1  # a phase left without done() logs nothing


# -- --help and folder names --------------------------------------------------------------------------------------

def test_help_names_the_app_its_groups_and_most_used_keys(tmp_path):
    """`fvis --help` starts with what fvis is, lists every config group with its options and the main keys."""
    proc = subprocess.run([sys.executable, "-m", "fvis", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # Hydra's help closes streams pytest captures: a process of its own
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("fvis: feature visualization (activation maximization)")
    assert "powered by Hydra" not in text
    conf = resources.files("fvis.conf")
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_")):
        names = sorted(p.name[:-5] for p in conf.joinpath(group).iterdir() if p.name.endswith(".yaml"))
        assert f"{group}: {', '.join(names)}\n" in text, group
    for key in ("model=", "layer=", "filters=", "steps=", "lr=", "image_size=", "experiment=", "seed=",
                "quality.natural_images=FOLDER"):
        assert re.search(rf"^  (.* )?{re.escape(key)}", text.split("== Most used keys ==")[1], re.M), key


def short_hash(text):
    return hashlib.sha256(text.encode()).hexdigest()[:6]


@pytest.mark.parametrize("overrides, expected", [
    ("", "default"),
    ("model.weights=../shared/weights/mobilenet_0.25_224.weights.h5",
     "model.weights=mobilenet_0.25_224-" + short_hash("../shared/weights/mobilenet_0.25_224.weights.h5")),
    ("filters=0\\:8,quality.natural_images=/data/photos/,steps=5",
     "filters=0_8,quality.natural_images=photos-" + short_hash("/data/photos/") + ",steps=5"),
    ("layer=blocks/3/conv,model.checkpoint=ckpt/state", "layer=blocks_3_conv,model.checkpoint=ckpt_state"),
    ("filters=[0,1],model.path=my.keras", "filters=_0,1_,model.path=my.keras"),
])
def test_folder_names_from_overrides(overrides, expected):
    """Paths show as their name plus a hash of the whole path; nested layer names stay as they are."""
    assert run_dir_name(overrides) == expected


def test_the_same_file_name_in_two_folders_gives_two_run_folders():
    """Shortening a path keeps folders unique: the hash tells two files of the same name apart."""
    assert run_dir_name("model.weights=a/w.h5") != run_dir_name("model.weights=b/w.h5")


def test_the_readme_names_the_folder_fvis_uses_without_overrides():
    """The README documents outputs/default/, the folder a run without overrides goes to."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"outputs/{run_dir_name('')}/" in readme


def test_a_run_with_a_path_override_goes_to_a_readable_folder(monkeypatch, tmp_path):
    """Hydra's run folder, from a real command: outputs/<key>=<file stem>-<hash of the path>/."""
    monkeypatch.chdir(tmp_path)
    hydra_main(monkeypatch, "model=tiny", "filters=0:2", "steps=2", "display.crop=2", "quality.enabled=false",
               "+note=../w/mobilenet_0.25_224.weights.h5")
    folder = tmp_path / "outputs" / ("+note=mobilenet_0.25_224-" + short_hash("../w/mobilenet_0.25_224.weights.h5")
                                     + ",display.crop=2,filters=0_2,model=tiny,quality.enabled=false,steps=2")
    assert (folder / "grid.png").is_file()


# -- the figure a sweeper receives ----------------------------------------------------------------------------------

class RecordReturns:
    """A Hydra callback that keeps each job's return value (what a sweeper receives)."""

    values = []

    def __init__(self, **kwargs):
        pass

    def __getattr__(self, name):  # Hydra calls every on_* hook; only on_job_end matters here
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_job_end(self, config, job_return, **kwargs):
        RecordReturns.values.append((job_return.hydra_cfg.hydra.runtime.output_dir, job_return.return_value))


def test_each_job_of_a_sweep_returns_its_quality_score_to_the_sweeper(monkeypatch, tmp_path, capsys):
    """Through Hydra's multirun (basic sweeper), each job returns results.json's score, restated by hand;
    the sweep's last line gives the summary's absolute path."""
    monkeypatch.chdir(tmp_path)
    RecordReturns.values = []
    hydra_main(monkeypatch, "-m", *TINY, "steps=2,4", "hydra.sweep.dir=sw",
               f"+hydra.callbacks.record._target_={__name__}.RecordReturns")
    assert len(RecordReturns.values) == 2
    for folder, value in RecordReturns.values:
        results = json.loads((Path(folder) / "results.json").read_text())
        assert isinstance(value, float) and value == pytest.approx(score_by_hand(results), abs=1e-12)
        assert results["quality"]["score"] == value
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"fvis: 2 jobs -> {tmp_path / 'sw' / 'summary.html'}"


def test_score_counts_dead_and_unselective_images_as_failures_and_caps_robustness():
    """Hand-worked: robustness 0.5 and 1.4 (capped to 1) count; rank 2, dead and undefined give 0."""
    records = [{"selectivity_rank": 1, "robustness": 0.5}, {"selectivity_rank": 1, "robustness": 1.4},
               {"selectivity_rank": 2, "robustness": 0.9}, {"selectivity_rank": 1, "robustness": 0.8},
               {"selectivity_rank": 1, "robustness": None}]
    assert fvis.quality.score(records, [False, False, False, True, False]) == pytest.approx(1.5 / 5)
    assert fvis.quality.score([{"selectivity_rank": None, "robustness": 1.0}], [False]) is None


# -- report.html --------------------------------------------------------------------------------------------------

class Cells(HTMLParser):
    """Rows of every table as lists of cell texts; the text of every svg <text>."""

    def __init__(self):
        super().__init__()
        self.rows, self.svg_texts, self._cell, self._in_text = [], [], None, False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        self._in_text = tag == "text"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None
        self._in_text = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_text:
            self.svg_texts.append(data)


def test_report_shows_settings_timings_chart_scales_and_how_to_add_photos(tmp_path):
    """report.html: the settings as configured, this attempt's seconds, each curve's max/min/steps, a photo hint."""
    out = tmp_path / "run"
    cli.run(composed(*TINY, "lr=2.5", "seed=3"), out)
    text = (out / "report.html").read_text()
    results = json.loads((out / "results.json").read_text())
    parsed = Cells()
    parsed.feed(text)
    pairs = {row[0]: row[1] for row in parsed.rows if len(row) == 2}
    assert {k: pairs[k] for k in ("model", "layer", "steps", "learning rate", "image size", "seed", "preset")} == {
        "model": "tiny_convnet", "layer": "conv2", "steps": "3", "learning rate": "2.5", "image size": "32x32",
        "seed": "3", "preset": "none"}
    t = results["timings"]
    timing = text[text.index(report.TIMINGS_START) + len(report.TIMINGS_START): text.index(report.TIMINGS_END)]
    assert timing == (f"compile {t['compile_s']:.1f} s, optimise {t['optimize_s']:.1f} s, "
                      f"quality report {t['quality_s']:.1f} s")
    labels = [parsed.svg_texts[i: i + 4] for i in range(0, len(parsed.svg_texts), 4)]
    assert labels == [[f"{max(r['objective_curve']):.3g}", f"{min(r['objective_curve']):.3g}", "0", "step 2"]
                      for r in results["filters"]]
    assert "quality.natural_images=FOLDER" in text
    with_photos = report.page({**results, "quality": {**results["quality"], "natural_ratio_median": 1.0}})
    assert "quality.natural_images=FOLDER" not in with_photos


# -- notebooks ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def result(tiny):
    return fvis.visualize(tiny, "conv2", [1, 4, 6], steps=3, images_per_unit=2, progress=False)


def test_result_shows_its_grid_inline_as_grid_png_does(result, tmp_path):
    """_repr_png_ and the PNG embedded in _repr_html_ decode to the grid.png a run writes (crop 0 under 100 px)."""
    outputs.write_run(tmp_path, result, config={}, meta={}, crop=0)
    written = np.asarray(Image.open(tmp_path / "grid.png"))
    assert np.array_equal(png_array(result._repr_png_()), written)
    page = result._repr_html_()
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert np.array_equal(png_array(base64.b64decode(embedded)), written)
    parsed = Cells()
    parsed.feed(page)
    body = [row for row in parsed.rows if row and row[0] != "unit"]
    assert [(int(r[0]), int(r[1]), float(r[3])) for r in body] == (
        [(u, j, float(f"{result.final[i, j]:.4g}")) for i, u in enumerate([1, 4, 6]) for j in range(2)])


def test_show_draws_the_grid_or_one_units_images_without_files(result, tmp_path):
    """fvis.show(result, unit=4) is unit 4's two tiles side by side, as the run's filter PNGs show them."""
    outputs.write_run(tmp_path, result, config={}, meta={}, crop=0)
    shown = np.asarray(fvis.show(result, unit=4))
    tiles = [np.asarray(Image.open(tmp_path / "filters" / f"filter_0004_{j}.png")) for j in range(2)]
    margin = np.zeros((32, 5, 3), np.uint8)
    assert np.array_equal(shown, np.concatenate([tiles[0], margin, tiles[1]], axis=1))
    assert np.array_equal(np.asarray(fvis.show(result)), np.asarray(Image.open(tmp_path / "grid.png")))
    with pytest.raises(fvis.errors.InvalidValueError, match="Unit 5 is not in this result"):
        fvis.show(result, unit=5)


# -- offline weights ----------------------------------------------------------------------------------------------

def test_offline_imagenet_weights_print_only_fvis_line(monkeypatch, tmp_path, capsys):
    """No Keras "Downloading data from" line and no resolver errno: fvis' message names the file and ways out."""
    from keras.src.utils import file_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    real_get_file = file_utils.get_file
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    monkeypatch.setattr(file_utils, "get_file", lambda *a, **k: real_get_file(*a, **{**k, "cache_dir": str(tmp_path)}))
    with pytest.raises(WeightsUnavailableError) as info:
        fvis.models.keras_application("MobileNet", weights="imagenet", image_size=(128, 128))
    assert capsys.readouterr().out == ""
    message = str(info.value)
    assert "Errno" not in message and "/mobilenet_1_0_128_tf_no_top.h5: this machine" in message


def test_a_learning_rate_set_on_the_optimizer_is_the_one_the_header_and_report_show():
    """optimizer.learning_rate=0.25 runs at 0.25 whatever `lr` says, so the job line and the report's settings
    show 0.25 (they showed `lr`, 10.0); through `lr` (or a schedule) they show `lr`."""
    direct = composed("model=tiny", "optimizer=adam", "optimizer.learning_rate=0.25")
    assert ", lr 0.25, " in cli._job_line(direct, None)
    assert ", lr 0.3, " in cli._job_line(composed("model=tiny", "optimizer=adam", "lr=0.3"), None)
    rows = dict(report.settings_rows({"config": {"lr": 10.0, "optimizer": {"learning_rate": 0.25}}}))
    assert rows["learning rate"] == "0.25"
    schedule = {"_target_": "optax.constant_schedule", "value": 0.1}
    assert dict(report.settings_rows({"config": {"lr": 10.0, "optimizer": {"learning_rate": schedule}}}))[
        "learning rate"] == "10.0"
    python_job = {"config": {"optimizer": "GradientTransformation(init=..., update=...)"}}  # fvis.runs' description
    assert "learning rate" not in dict(report.settings_rows(python_job))
