"""A real cluster launcher: a sweep through Hydra's submitit launcher in its local mode (separate processes),
one job SIGKILLed mid-run and finished by submitting the same sweep again."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_module

from fvis import cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

JOB = ["model=tiny", "filters=0:12", "batch_size=1", "steps=30", "quality.enabled=false"]  # 12 chunks


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def attempts(folder):
    return json.loads((folder / "run.json").read_text())["attempts"]


def kill_after_first_chunk(sweep, job, timeout=300):
    """SIGKILLs the process of the sweep job whose folder name contains `job` once it saved its first
    chunk, as a cluster's OOM killer or preemption would; returns the pid and how many chunks it had."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        found = list(sweep.glob(f"*{job}*/chunks/chunk_00000.npz"))
        if found:
            folder = found[0].parents[1]
            pid = attempts(folder)[-1]["pid"]
            os.kill(pid, signal.SIGKILL)
            return pid, folder
        time.sleep(0.02)
    raise AssertionError(f"job {job} saved no chunk within {timeout} s")


@pytest.mark.slow
def test_submitit_local_sweep_with_a_killed_job_finishes_when_submitted_again(tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "fvis", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
               *JOB, "lr=1,5", f"hydra.sweep.dir={sweep}"]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, victim = kill_after_first_chunk(sweep, "lr=5")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode != 0 and "UncompletedJobError" in stderr   # submitit reports the lost job
    other = next(f for f in sweep.iterdir() if "lr=1," in f.name)
    assert (other / "results.json").exists() and not (victim / "results.json").exists()
    assert attempts(victim)[-1]["status"] == "running" and attempts(victim)[-1]["pid"] == killed
    job_pids = {attempts(victim)[-1]["pid"], attempts(other)[-1]["pid"]}
    assert len(job_pids) == 2 and not job_pids & {os.getpid(), first.pid}   # each job in its own process
    saved_before = len(list((victim / "chunks").glob("chunk_*.npz")))
    assert 1 <= saved_before < 12

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    resumed, rewritten = attempts(victim)[-1], attempts(other)[-1]
    assert resumed["status"] == "done" and resumed["chunks"]["reused"] >= saved_before
    assert resumed["chunks"]["reused"] + resumed["chunks"]["computed"] == 12
    assert rewritten["status"] == "done" and rewritten["chunks"]["reused"] == 12
    with open(sweep / "summary.csv") as f:
        assert sorted((row["lr"], row["status"]) for row in csv.DictReader(f)) == [("1", "done"), ("5", "done")]

    reference = tmp_path / "uninterrupted"
    cli.run(composed(*JOB, "lr=5"), reference)
    for name in ("images.npz", "grid.png"):
        assert (victim / name).read_bytes() == (reference / name).read_bytes()
