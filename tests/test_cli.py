"""Configs compose and instantiate; the `fvis` command writes every file."""

import json
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from PIL import Image

import fvis
import fvis.cli  # noqa: F401  (registers the run-folder resolver)
from tests.conftest import SHARED


def options(group):
    return sorted(p.name[:-5] for p in resources.files("fvis.conf").joinpath(group).iterdir()
                  if p.name.endswith(".yaml"))


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def model_overrides(name, tmp_path, tiny):
    """Overrides that let each model config instantiate offline and quickly."""
    if name == "saved":
        tiny.model.save(tmp_path / "m.keras")
        return [f"model.path={tmp_path / 'm.keras'}", "layer=conv3", "image_size=[32,32]"]
    if name == "mobilenet":
        weights = SHARED / "weights" / "mobilenet_0.25_224.weights.h5"
        return [f"model.weights={weights if weights.exists() else 'null'}"]
    if name == "flax":
        return ["model.factory=tests.test_flax_models:make_cnn", "layer=conv3"]
    if name in ("resnet50v2", "vgg16", "efficientnet_b0"):
        return ["model.weights=null"]
    return []


@pytest.mark.parametrize("name", options("model"))
def test_every_model_config_instantiates_with_its_default_layer(name, tmp_path, tiny):
    cfg = composed(f"model={name}", *model_overrides(name, tmp_path, tiny))
    size = (96, 96) if name not in ("tiny", "saved") else tuple(cfg.image_size)
    vis_model = instantiate(cfg.model, image_size=size)
    job = fvis.prepare(vis_model, instantiate(cfg.objective), [0, 1], steps=1)
    assert job.units.tolist() == [0, 1] and len(job.forward.shapes()[cfg.layer]) == 3


def needed_values(name, tmp_path):
    """The overrides a component config leaves to the user (a photo, direction vectors, a second layer)."""
    if name in ("inversion", "caricature"):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "photo.png")
        return [f"image={tmp_path / 'photo.png'}"]
    return {"direction": ["objective.vectors=[[1,0]]"], "combined": ["objective.terms.1.layer=conv2"]}.get(name, [])


@pytest.mark.parametrize("group", ["objective", "param", "transform", "optimizer"])
def test_every_component_config_instantiates(group, tmp_path):
    for name in options(group):
        cfg = composed("model=tiny", f"{group}={name}", *needed_values(name, tmp_path))
        assert instantiate(cfg[group]) is not None, (group, name)


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_preset_composes(name):
    cfg = composed("model=tiny", f"experiment={name}")
    assert cfg.steps >= 1 and instantiate(cfg.optimizer) is not None and instantiate(cfg.param) is not None


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fvis", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_end_to_end_writes_every_file(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("model=tiny", "steps=5", "filters=0:6", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 28 + 5, 3 * 28 + 2 * 5, 3) and grid.dtype == np.uint8  # 6 tiles: 3 x 2
    assert sorted(p.name for p in (out / "filters").iterdir()) == [f"filter_{i:04d}.png" for i in range(6)]
    with np.load(out / "images.npz") as data:
        assert data["images"].shape == (6, 1, 32, 32, 3) and data["units"].tolist() == list(range(6))
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["steps"] == 5 and results["config"]["layer"] == "conv2"
    assert [f["unit"] for f in results["filters"]] == list(range(6))
    assert all(len(f["objective_curve"]) == 5 and np.isfinite(f["final"]) for f in results["filters"])
    attempt = json.loads((out / "run.json").read_text())["attempts"][-1]
    assert attempt["status"] == "done" and attempt["timings"]["compile_s"] > 0 and attempt["timings"]["optimize_s"] > 0
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written == {"run"}  # nothing outside the run folder


def test_cli_bad_input_prints_one_line_without_traceback(tmp_path):
    proc = run_cli("model=tiny", "filters=[3,99]", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Filter index 99 is out of range" in proc.stderr and "0..15" in proc.stderr
    assert not (tmp_path / "bad").exists()  # a refused run leaves no folder, not even Hydra's files


def test_multirun_writes_one_folder_per_job(tmp_path):
    proc = run_cli("-m", "model=tiny", "steps=2,3", "filters=0:2", "quality.enabled=false",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folders = sorted(p.parent for p in (tmp_path / "sweep").rglob("results.json"))
    assert len(folders) == 2
    steps = sorted(json.loads((f / "results.json").read_text())["config"]["steps"] for f in folders)
    assert steps == [2, 3]


def test_every_config_group_is_packaged():
    """A non-editable install only ships the config folders pyproject.toml lists."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    groups = {f"fvis.conf.{p.name}" for p in (root / "conf").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert groups <= set(setuptools["packages"])
    assert all(setuptools["package-data"].get(g) == ["*.yaml"] for g in groups)


def test_a_flax_model_without_the_flax_extra_is_one_line(tmp_path, capsys, monkeypatch):
    """Without `fvis[flax]`, the Flax configs say how to install it, in one line (exit 2)."""
    import builtins

    real_import = builtins.__import__

    def no_flax(name, *args, **kwargs):
        if name == "flax" or name.startswith(("flax.", "orbax")):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flax)
    cfg = composed("model=efficientnet_lite0_flax", "filters=0:1", "steps=1")
    with pytest.raises(SystemExit) as exit_info:
        fvis.cli.run_command(cfg, str(tmp_path / "run"))
    errors = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1
    assert "pip install 'fvis[flax]'" in errors[0]
