"""Several hosts from the command line: two processes on one machine as two hosts on CPU."""

import json
import socket
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from fvis import cli
from fvis.errors import InvalidValueError
from tests.conftest import cpu_devices_env

JOB = ["model=tiny", "filters=0:4", "batch_size=2", "steps=3"]


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def files(folder):
    """{relative path: bytes} of a run folder's outputs; results.json less its timings and distributed keys."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if name.startswith(".hydra") or name in ("run.json", "cli.log", "report.html"):
            continue
        data = path.read_bytes()
        if name == "results.json":
            summary = json.loads(data)
            summary.pop("timings")
            summary["config"].pop("distributed")
            data = json.dumps(summary, sort_keys=True).encode()
        out[name] = data
    return out


@pytest.mark.slow
def test_two_processes_as_two_hosts_write_what_one_process_writes(tmp_path):
    """Process 0 writes, byte for byte, what one process with two devices writes (images.npz, which holds the
    chunks, and the quality report figures included); process 1 writes nothing and says so last."""
    port = free_port()
    folders = [tmp_path / f"process{i}" for i in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "fvis", *JOB, f"distributed.coordinator=localhost:{port}",
                               "distributed.num_processes=2", f"distributed.process_id={i}",
                               f"hydra.run.dir={folders[i]}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in (0, 1)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    logged = [line for line in outs[1][0].splitlines() if line.startswith("fvis:")]
    assert logged[-1] == "fvis: this process computed its share of 4 images; process 0 writes the run folder"
    run = json.loads((folders[0] / "run.json").read_text())["attempts"][-1]
    assert run["status"] == "done" and run["versions"]["device_count"] == 2
    assert not folders[1].exists() or [p for p in folders[1].rglob("*") if p.is_file()] == []

    single = tmp_path / "single"   # one process with two CPU devices: the same mesh, so the same rounding
    env = cpu_devices_env(2)
    proc = subprocess.run([sys.executable, "-m", "fvis", *JOB, f"hydra.run.dir={single}"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written, expected = files(folders[0]), files(single)
    assert sorted(written) == sorted(expected) and "images.npz" in written
    assert written == expected


@pytest.mark.parametrize("overrides, message", [
    (["distributed.coordinator=localhost:1234"], "Missing: distributed.num_processes, distributed.process_id"),
    (["distributed.coordinator=localhost", "distributed.num_processes=2", "distributed.process_id=0"],
     "distributed.coordinator must be host:port"),
    (["distributed.coordinator=h:1", "distributed.num_processes=2", "distributed.process_id=2"],
     r"distributed.process_id must be 0 .. 1 for 2 processes"),
    (["distributed.auto=true", "distributed.process_id=0"], "leave distributed.process_id unset"),
])
def test_incomplete_distributed_keys_are_refused_before_a_run_folder(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(InvalidValueError, match=message):
        cli.run(composed(*JOB, *overrides), out)
    assert not out.exists()


def test_every_process_of_a_multi_host_run_names_the_same_folder():
    """The distributed keys are left out of the run folder's name, so all hosts resume the same folder."""
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "distributed.process_id=1"], return_hydra_config=True)
    assert set(cfg.hydra.job.config.override_dirname.exclude_keys) == {
        "distributed.coordinator", "distributed.num_processes", "distributed.process_id", "distributed.auto"}
