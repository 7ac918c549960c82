"""`fvis.run_job` gives from Python what the `fvis` command gives."""

import json

import numpy as np
from hydra import compose, initialize_config_module
from PIL import Image

import fvis
from fvis import cli, report


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _report_less_settings(path):
    """report.html's bytes without its settings table (from the config) and this attempt's seconds."""
    text = path.read_text()
    start, end = text.index("<h2>Settings</h2>"), text.index(report.TIMINGS_END)
    return (text[:start] + text[end:]).encode()


def files(folder):
    """{relative path: bytes} of every file a run wrote, less the attempt record, the timings, the
    config (results.json's, and report.html's settings) and the fingerprint of the config that made
    the chunks (in images.npz, each array's bytes instead)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "run.json" and path.parent.name != "chunks":
            data = json.loads(path.read_text()) if path.name == "results.json" else path.read_bytes()
            if path.name == "images.npz":
                with np.load(path) as arrays:
                    data = {k: arrays[k].tobytes() for k in arrays.files if k != "fingerprint"}
            if path.name == "report.html":
                data = _report_less_settings(path)
            if isinstance(data, dict):
                data.pop("config", None)
                for part in [data, *data.get("layers", [])]:
                    part.pop("timings", None)
            out[str(path.relative_to(folder))] = data
    return out


def test_whole_model_job_with_atlas_and_report_from_python_equals_the_command(tmp_path, tiny):
    settings, display = fvis.Settings(steps=2, seed=3), fvis.Display(crop=2)
    outcome = fvis.run_job(tiny, fvis.objectives.channel, "0:3", tmp_path / "py", layers=["conv1", "conv2"],
                           settings=settings, display=display, quality=fvis.Quality(draws=2))
    assert outcome.attempt["status"] == "done" and outcome.attempt["chunks"]["computed"] == 6
    for name in ("atlas.png", "index.html", "layers/000_conv1/report.html", "layers/001_conv2/grid.png"):
        assert (tmp_path / "py" / name).is_file(), name
    report = json.loads((tmp_path / "py" / "layers/001_conv2/results.json").read_text())
    assert report["quality"]["settings"]["draws"] == 2 and len(report["filters"]) == 3
    cfg = composed("model=tiny", "layers=[conv1,conv2]", "filters=0:3", "steps=2", "seed=3", "quality.draws=2")
    cli.run(cfg, tmp_path / "cli")
    py, command = files(tmp_path / "py"), files(tmp_path / "cli")
    assert py.keys() == command.keys()
    for name in py:
        assert py[name] == command[name], name


def test_run_job_resumes_in_a_later_call(tmp_path, tiny):
    kwargs = dict(settings=fvis.Settings(steps=2), display=fvis.Display(crop=2), quality=fvis.Quality(enabled=False))
    first = fvis.run_job(tiny, "conv2", [0, 1], tmp_path, **kwargs)
    again = fvis.run_job(tiny, "conv2", [0, 1], tmp_path, **kwargs)
    assert first.attempt["chunks"]["computed"] == 2 and again.attempt["chunks"]["reused"] == 2
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (28, 2 * 28 + 5, 3)
    runs = json.loads((tmp_path / "run.json").read_text())["attempts"]
    assert [a["status"] for a in runs] == ["done", "done"]
