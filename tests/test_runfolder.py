"""The run folder owns its data: one writer at a time, dead writers marked killed, refused jobs leave
nothing behind (or, in a sweep, a "refused" record), and the summary tells each job's attempts."""

import csv
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import fvis
from fvis import cli, objectives, quality as quality_lib, runfolder, summary
from fvis.errors import NonFiniteError, UnknownNameError
from fvis.settings import Display, Quality, Settings
from tests.test_resume import FAST, attempts, composed, fvis_process, product


def iso(t):
    """A local ISO time stamp, to the second, as run.json writes them."""
    return datetime.datetime.fromtimestamp(int(t)).astimezone().isoformat(timespec="seconds")


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_second_process_on_a_folder_is_refused_naming_the_holder_and_a_killed_holder_is_marked(tmp_path):
    """Two real processes: the second is refused in one line naming host and pid; the first, killed,
    is marked "killed" by the next job to open the folder."""
    out = tmp_path / "run"
    endless = [*FAST, "steps=1000000"]  # runs until killed
    first = fvis_process(*endless, f"hydra.run.dir={out}")
    deadline = time.monotonic() + 120
    while not (out / "run.json").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, first.communicate()[1]
    second = fvis_process(*endless, f"hydra.run.dir={out}")
    _, err = second.communicate(timeout=120)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, err
    assert f"host {platform.node()}, pid {first.pid}" in lines[0] and "in use by another fvis job" in lines[0]
    assert [(a["status"], a["pid"]) for a in attempts(out)] == [("running", first.pid)]  # untouched by the second

    cli.run(composed(*FAST, "steps=1"), out)
    killed, done = attempts(out)
    assert (killed["status"], killed["pid"], done["status"]) == ("killed", first.pid, "done")
    assert 0 < killed["seconds"] < done["seconds"] + 120 and json.loads((out / "run.json").read_text())["status"] == "done"


def test_an_attempt_left_running_by_a_dead_process_is_marked_killed_with_its_seconds(tmp_path):
    started = int(time.time()) - 30
    record = {"status": "running", "started": iso(started), "host": platform.node(), "pid": dead_pid()}
    (tmp_path / "run.json").write_text(json.dumps({"status": "running", "attempts": [record]}))
    (tmp_path / "chunks").mkdir()
    (tmp_path / "chunks" / "chunk_00000.npz").write_bytes(b"x")
    (tmp_path / "chunks" / ".chunk_00001.npz.77.tmp").write_bytes(b"partial")      # killed mid-write
    (tmp_path / ".results.json.77.tmp").write_bytes(b"{")                          # (a file that stays)
    os.utime(tmp_path / ".results.json.77.tmp", (started + 1, started + 1))
    os.utime(tmp_path / "run.json", (started, started))
    os.utime(tmp_path / "chunks" / "chunk_00000.npz", (started + 5, started + 5))
    os.utime(tmp_path / "chunks" / ".chunk_00001.npz.77.tmp", (started + 12, started + 12))  # its last write

    row = summary.job_row(tmp_path, tmp_path)  # a reader judges it without the lock
    assert (row["status"], row["ended"]) == ("killed", "killed") and 11.0 <= row["lost_s"] <= 13.0
    cli.run(composed(*FAST, "steps=1"), tmp_path)
    killed, done = attempts(tmp_path)
    assert killed["status"] == "killed" and 11.0 <= killed["seconds"] <= 13.0 and done["status"] == "done"
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_running_attempt_of_a_live_process_is_shown_running(tmp_path):
    record = {"status": "running", "started": "2026-01-01T00:00:00+00:00", "host": platform.node(),
              "pid": os.getpid()}
    (tmp_path / "run.json").write_text(json.dumps({"status": "running", "attempts": [record]}))
    assert summary.job_row(tmp_path, tmp_path)["status"] == "running"


def test_a_folder_held_by_another_process_refuses_without_touching_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from fvis import runfolder\n"
        "with runfolder.locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runfolder.FolderBusyError, match="in use by another fvis job"):
            cli.run(composed(*FAST, "steps=1"), tmp_path)
        assert runfolder.lock_held(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [runfolder.LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    assert not runfolder.lock_held(tmp_path)


def test_a_refused_single_run_leaves_no_folder(tmp_path):
    with pytest.raises(UnknownNameError, match="conv9"):
        cli.run(composed(*FAST, "steps=1", "layer=conv9"), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_the_command_removes_what_hydra_made_for_a_refused_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)  # as Hydra leaves it before calling the job
    (out / ".hydra" / "overrides.yaml").write_text("- layer=conv9\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.run_command(composed(*FAST, "steps=1", "layer=conv9"), str(out))
    assert exit_info.value.code == 2 and "Unknown layer 'conv9'" in capsys.readouterr().err
    assert not out.exists()
    summary.write_summary(tmp_path)
    assert list(csv.DictReader((tmp_path / "summary.csv").open())) == []


def test_a_refused_run_in_a_used_folder_changes_nothing(tmp_path):
    cli.run(composed(*FAST, "steps=1"), tmp_path)
    before = {**product(tmp_path), "run.json": (tmp_path / "run.json").read_bytes()}
    with pytest.raises(UnknownNameError):
        cli.run(composed(*FAST, "steps=1", "layer=conv9"), tmp_path)
    assert {**product(tmp_path), "run.json": (tmp_path / "run.json").read_bytes()} == before


def test_a_refused_job_of_a_sweep_is_listed_as_refused_with_its_message(tmp_path):
    job = tmp_path / "layer=conv9"
    with pytest.raises(UnknownNameError):
        cli.run(composed(*FAST, "steps=1", "layer=conv9"), job, keep_refused=True)
    assert [a["status"] for a in attempts(job)] == ["refused"]
    (row,) = summary.write_summary(tmp_path)
    assert row["status"] == "refused" and "Unknown layer 'conv9'" in row["error"] and row["ended"] == "refused"


def _poisoned(layer="conv2", from_unit=2):
    """A channel objective that turns NaN for units >= from_unit: fails during compute."""
    channel = objectives.channel(layer)
    return objectives.Objective(lambda acts, unit: channel(acts, unit) * jnp.where(unit >= from_unit, jnp.nan, 1.0),
                                layers=[layer], checks=channel.checks, name=f"channel({layer})")


def test_a_failure_during_compute_is_failed_and_a_later_success_clears_it(tiny, tmp_path):
    settings, quality, display = Settings(steps=2, batch_size=2), Quality(enabled=False), Display(crop=2)
    with pytest.raises(NonFiniteError):
        fvis.run_job(tiny, _poisoned(), "0:4", tmp_path, settings=settings, quality=quality, display=display, progress=False)
    error = json.loads((tmp_path / "error.json").read_text())
    assert error["type"] == "NonFiniteError" and "filter 2" in error["message"] and "Traceback" in error["traceback"]
    assert attempts(tmp_path)[-1]["status"] == "failed" and attempts(tmp_path)[-1]["seconds"] > 0
    fvis.run_job(tiny, "conv2", "0:4", tmp_path, settings=settings, quality=quality, display=display, progress=False)
    assert not (tmp_path / "error.json").exists()
    assert [a["status"] for a in attempts(tmp_path)] == ["failed", "done"]


def test_summary_shows_each_jobs_attempts_and_the_seconds_lost(tmp_path):
    def job(name, *records):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"status": records[-1]["status"],
                                                              "attempts": list(records)}))
    now = int(time.time())
    dead = {"status": "running", "host": platform.node(), "pid": dead_pid(), "started": iso(now)}
    job("a", {"status": "killed", "seconds": 40.0}, {"status": "failed", "seconds": 2.5},
        {"status": "done", "seconds": 100.0})
    job("b", {"status": "refused", "seconds": 0.5})
    job("c", {"status": "done", "seconds": 7.0})
    job("d", {"status": "interrupted", "seconds": 3.0}, dead)
    os.utime(tmp_path / "d" / "run.json", (now, now))
    rows = {r["job"]: r for r in summary.write_summary(tmp_path)}
    assert {k: (r["status"], r["ended"], r["attempts"]) for k, r in rows.items()} == {
        "a": ("done", "killed, failed, done", 3), "b": ("refused", "refused", 1), "c": ("done", "done", 1),
        "d": ("killed", "interrupted, killed", 2)}
    assert rows["a"]["lost_s"] == 42.5 and rows["b"]["lost_s"] == 0.5 and rows["c"]["lost_s"] == 0.0
    assert rows["d"]["lost_s"] == 3.0  # the dead attempt's folder has no file newer than its start
    table = {r["job"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert table["a"]["ended"] == "killed, failed, done" and table["a"]["lost_s"] == "42.5"
    assert "5 attempts did not finish, 46.0 s of compute lost" in (tmp_path / "summary.html").read_text()


def npz_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.npz"))


def test_a_finished_run_keeps_its_images_once_and_resumes_from_them_to_the_same_bytes(tmp_path):
    _, record = cli.run(composed(*FAST, "steps=2"), tmp_path)
    assert record["chunks"]["computed"] == 3 and npz_files(tmp_path) == ["images.npz"]
    with np.load(tmp_path / "images.npz") as data:
        payload = sum(data[k].nbytes for k in data.files)
        images = data["images"].nbytes
    size = (tmp_path / "images.npz").stat().st_size
    assert images > 4096 and payload <= size <= payload + 4096  # each array once (npy headers and zip entries aside)
    before = product(tmp_path)
    _, again = cli.run(composed(*FAST, "steps=2"), tmp_path)
    assert again["chunks"] == {"total": 3, "reused": 3, "computed": 0, "recomputed_bad": []}
    assert product(tmp_path) == before


def test_a_finished_runs_images_are_not_trusted_for_another_computation(tmp_path):
    cli.run(composed(*FAST, "steps=2"), tmp_path)
    _, record = cli.run(composed(*FAST, "steps=3"), tmp_path)
    assert record["chunks"] == {"total": 3, "reused": 0, "computed": 3, "recomputed_bad": [0, 1, 2]}
    other = tmp_path.parent / "fresh"
    cli.run(composed(*FAST, "steps=3"), other)
    assert product(tmp_path) == product(other)


@pytest.fixture
def measured(monkeypatch):
    """Counts the calls of the quality measurement (the library's own function, wrapped)."""
    calls, real = [], quality_lib.measure

    def counted(*args, **kwargs):
        calls.append(kwargs.get("draws"))
        return real(*args, **kwargs)

    monkeypatch.setattr(quality_lib, "measure", counted)
    return calls


def test_a_fully_resumed_job_reuses_its_quality_figures_until_something_that_shapes_them_changes(tmp_path, measured):
    job = ["model=tiny", "filters=0:4", "batch_size=2", "steps=2", "quality.draws=2"]
    cli.run(composed(*job), tmp_path)
    before = product(tmp_path)
    assert measured == [2] and "quality" in json.loads((tmp_path / "results.json").read_text())
    cli.run(composed(*job), tmp_path)
    assert measured == [2] and product(tmp_path) == before          # reused, same bytes
    cli.run(composed(*job[:-1], "quality.draws=3"), tmp_path)
    assert measured == [2, 3]                                         # a quality setting changed
    cli.run(composed(*job[:-1], "quality.draws=3"), tmp_path)
    assert measured == [2, 3]
    cli.run(composed(*job[:-2], "steps=3", "quality.draws=3"), tmp_path)
    assert measured == [2, 3, 3]                                      # the images changed
