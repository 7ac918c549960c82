"""Sweeps: whole-model jobs and their atlas, sweep folders, the summary, launchers, progress."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fvis
from fvis import atlas, cli, summary
from fvis.errors import InvalidValueError, UnitIndexError, UnknownNameError
from fvis.sweep import sweep_dir
from tests.test_resume import composed, product

NO_QUALITY = ["quality.enabled=false"]  # the quality report has its own tests; it costs compiles per job
TWO_LAYERS = ["model=tiny", "layers=[conv1,relu3]", "filters=0:12", "steps=2", "batch_size=16", *NO_QUALITY]
TINY_MAPS = ["conv1", "bn1", "relu1", "conv2", "drop", "relu2", "pool", "conv3", "relu3"]


def test_layer_specs_select_feature_maps_in_model_order(tiny):
    assert atlas.select_layers(tiny, "all") == TINY_MAPS  # gap and logits are vectors
    assert atlas.select_layers(tiny, "relu*") == ["relu1", "relu2", "relu3"]
    assert atlas.select_layers(tiny, ["conv3", "relu*", "conv3"]) == ["conv3", "relu1", "relu2", "relu3"]
    with pytest.raises(UnknownNameError, match="Did you mean 'conv3'"):
        atlas.select_layers(tiny, ["conv3", "conv33"])
    with pytest.raises(UnknownNameError, match="matches no feature-map layer"):
        atlas.select_layers(tiny, "block*_add")
    with pytest.raises(InvalidValueError):
        atlas.select_layers(tiny, [])


def test_filters_are_cut_to_each_layer():
    assert atlas.units_for_layer("0:16", 8, 32, "conv1").tolist() == list(range(8))
    assert atlas.units_for_layer("all", 16, 32, "conv2").tolist() == list(range(16))
    assert atlas.units_for_layer([3, 20], 16, 32, "conv2").tolist() == [3]
    with pytest.raises(InvalidValueError, match="none of the 8 channels of layer 'conv1'"):
        atlas.units_for_layer("16:32", 8, 32, "conv1")
    with pytest.raises(UnitIndexError):
        atlas.units_for_layer([0, 40], 8, 32, "conv1")  # beyond every layer: a mistake, not a cut


@pytest.fixture(scope="module")
def whole_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("atlas")
    summary_, record = cli.run(composed(*TWO_LAYERS), folder)
    return folder, summary_, record


def test_whole_model_job_writes_a_folder_per_layer_and_an_atlas(whole_model):
    folder, results, _ = whole_model
    assert [(e["layer"], e["folder"], e["filters"], e["channels"]) for e in results["layers"]] == [
        ("conv1", "layers/000_conv1", 8, 8), ("relu3", "layers/001_relu3", 12, 32)]
    for entry in results["layers"]:
        layer = json.loads((folder / entry["folder"] / "results.json").read_text())
        assert layer["layer"] == entry["layer"] and layer["units"] == list(range(entry["filters"]))
        assert (folder / entry["folder"] / "grid.png").exists()
    page = (folder / "index.html").read_text()
    assert 'src="layers/000_conv1/grid.png"' in page and 'src="layers/001_relu3/grid.png"' in page
    tile = 32 - 2 * 2  # tiny's display crop is 2; tiles under 64 px are not shrunk
    assert np.asarray(Image.open(folder / "atlas.png")).shape == (2 * tile + 5, 8 * tile + 7 * 5, 3)


def test_whole_model_job_runs_again_from_its_chunks_to_the_same_files(whole_model):
    folder, _, _ = whole_model
    before = product(folder)
    _, record = cli.run(composed(*TWO_LAYERS), folder)
    assert record["chunks"]["reused"] == record["chunks"]["total"] == 2 and record["chunks"]["computed"] == 0
    assert product(folder) == before


def test_sweep_folder_is_named_by_the_sweep_overrides():
    assert sweep_dir("multirun", ["lr=5,10", "layer=a,b"]) == "multirun/layer=a,b,lr=5,10"
    assert sweep_dir("multirun", []) == "multirun/default"


def fake_job(folder, overrides, *, results=None, error=None, status=None, grid=True):
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    if error is not None:
        (folder / "error.json").write_text(json.dumps({"message": error}))
    if status is not None:
        timings = {"load_model_s": 1.0, "compile_s": 2.0, "optimize_s": 3.5, "total_s": 6.5}
        (folder / "run.json").write_text(json.dumps({"status": status, "attempts": [
            {"status": status, "timings": timings}]}))
    if grid:
        Image.new("RGB", (8, 8)).save(folder / "grid.png")


def test_summary_lists_done_failed_and_killed_jobs_with_their_figures(tmp_path):
    filters = [{"final": 1.0}, {"final": 3.0}]
    fake_job(tmp_path / "lr=1", ["lr=1", "filters=0\\:2"], status="done",
             results={"filters": filters, "dead_filters": [5], "quality": {"diversity": 0.25, "note": "x",
                                                                          "fid": {"inception": 12.5}}})
    fake_job(tmp_path / "lr=5", ["lr=5", "filters=0\\:2"], status="failed", error="Non-finite images", grid=False)
    fake_job(tmp_path / "lr=9", ["lr=9", "filters=0\\:2"], status="running", grid=False)
    (tmp_path / "lr=9" / "chunks").mkdir()
    (tmp_path / "lr=9" / "chunks" / "chunk_00000.npz").write_bytes(b"")
    (tmp_path / "lr=1" / "layers" / "000_x").mkdir(parents=True)  # a job's own subfolders are not jobs
    (tmp_path / "lr=1" / "layers" / "000_x" / "results.json").write_text("{}")

    rows = summary.write_summary(tmp_path)
    table = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["job"], r["status"], r["lr"], r["filters"]) for r in table] == [
        ("lr=1", "done", "1", "0:2"), ("lr=5", "failed", "5", "0:2"), ("lr=9", "killed", "9", "0:2")]
    assert table[0]["n_filters"] == "2" and table[0]["n_dead"] == "1" and table[0]["final_mean"] == "2"
    assert table[0]["optimize_s"] == "3.5" and table[0]["quality.diversity"] == "0.25"
    assert table[0]["quality.fid.inception"] == "12.5" and "quality.note" not in table[0]
    assert table[1]["error"] == "Non-finite images" and table[2]["chunks_done"] == "1"
    page = (tmp_path / "summary.html").read_text()
    assert '<img src="lr=1/grid.png"' in page and page.count("<tr class=") == len(rows) == 3
    assert "Non-finite images" in page and "<script>" in page
    assert "Every job: <code>filters=0:2</code>" in page and "<th>filters</th>" not in page  # shared, not a column


def test_summary_written_elsewhere_links_back_to_the_jobs(tmp_path):
    fake_job(tmp_path / "sweep" / "a=1", ["a=1"], status="done", results={"filters": [{"final": 0.5}]})
    assert summary.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")]) == 0
    assert '<img src="../sweep/a=1/grid.png"' in (tmp_path / "report" / "summary.html").read_text()
    assert summary.main([str(tmp_path / "missing")]) == 2


def run_fvis(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fvis", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_multirun_lists_every_job_keeps_going_past_a_failure_and_resumes(tmp_path):
    sweep = ["-m", "model=tiny", "steps=2", "filters=0:3", "layer=conv1,conv9,relu2", *NO_QUALITY]
    first = run_fvis(*sweep, cwd=tmp_path)
    assert first.returncode == 1 and "Unknown layer 'conv9'" in first.stderr
    (folder,) = (tmp_path / "multirun").iterdir()
    assert folder.name == "filters=0_3,layer=conv1,conv9,relu2,model=tiny,quality.enabled=false,steps=2"
    table = list(csv.DictReader((folder / "summary.csv").open()))
    assert [(r["layer"], r["status"]) for r in table] == [("conv1", "done"), ("conv9", "refused"), ("relu2", "done")]
    failed = folder / table[1]["job"]
    assert "conv9" in json.loads((failed / "error.json").read_text())["message"]
    done = [folder / r["job"] for r in table if r["status"] == "done"]
    before = {job: product(job) for job in done}

    second = run_fvis(*sweep, cwd=tmp_path)
    assert second.returncode == 1 and len(list((tmp_path / "multirun").iterdir())) == 1
    for job in done:
        last = json.loads((job / "run.json").read_text())["attempts"][-1]
        assert last["chunks"]["reused"] == last["chunks"]["total"] and last["chunks"]["computed"] == 0
        assert product(job) == before[job]


@pytest.mark.slow
def test_joblib_launcher_runs_an_eight_job_grid(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = run_fvis("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}/s",
                    "model=tiny", "steps=2", "filters=0:2", "layer=conv1,conv2", "lr=1,5", "seed=0,1", *NO_QUALITY,
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = list(csv.DictReader((tmp_path / "s" / "summary.csv").open()))
    assert len(table) == 8 and {r["status"] for r in table} == {"done"}
    assert len({(r["layer"], r["lr"], r["seed"]) for r in table}) == 8
    assert all((tmp_path / "s" / r["job"] / "grid.png").exists() for r in table)


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=1"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.hydra.callbacks.sweep._target_ == "fvis.sweep.SweepCallback"


def test_progress_bar_shows_filters_and_steps_per_second_and_is_quiet_off_a_terminal(tiny, capsys):
    job = fvis.prepare(tiny, "conv2", "0:6", steps=3, batch_size=2)
    job.run(progress=True)
    shown = capsys.readouterr().err
    assert "6/6" in shown and "steps/s" in shown and "filter/s" in shown
    job.run(progress="auto")  # pytest's captured stderr is not a terminal
    assert capsys.readouterr().err == ""


def _kill_every_attempt(folder_glob, stop, killed):
    """SIGKILLs each running attempt (by the pid its run.json records) in folders matching `folder_glob`,
    as the OOM killer would a job too big for the machine, until `stop` is set."""
    import glob
    import os
    import signal
    import time

    while not stop.is_set():
        for run in glob.glob(folder_glob + "/run.json"):
            try:
                last = json.loads(open(run).read())["attempts"][-1]
            except (OSError, ValueError, KeyError, IndexError):
                continue
            if last.get("status") == "running" and last["pid"] not in killed:
                killed.append(last["pid"])
                os.kill(last["pid"], signal.SIGKILL)
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_joblib_worker_leaves_its_job_killed_and_the_others_done(tmp_path):
    """A worker killed by SIGKILL (every time its job runs) does not abort the sweep: the summary lists that
    job as killed (two attempts, both killed: in the pool, then alone) and the others as done."""
    import threading

    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_every_attempt, args=(f"{tmp_path}/s/*steps=100000*", stop, killed))
    killer.start()
    try:
        proc = run_fvis("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}/s",
                        "model=tiny", "filters=0:2", "steps=2,3,100000", *NO_QUALITY, cwd=tmp_path)
    finally:
        stop.set()
        killer.join()
    assert proc.returncode == 1 and "killed again, alone: left as killed" in proc.stderr, proc.stderr
    table = {r["steps"]: r for r in csv.DictReader((tmp_path / "s" / "summary.csv").open())}
    assert {k: r["status"] for k, r in table.items()} == {"2": "done", "3": "done", "100000": "killed"}
    assert table["100000"]["ended"] == "killed, killed" and len(killed) == 2
    assert "was killed" in table["100000"]["error"]
    assert all(r["ended"] in ("done", "killed, done") for k, r in table.items() if k != "100000")
