"""The Hydra side of sweeps: where a sweep's folder is, and its summary at the end.

    fvis -m model=efficientnet_lite0 layer=block3b_add,block4c_add,block5c_add lr=5,10

`SweepCallback` (configured in conf/config.yaml under `hydra.callbacks`) puts a
sweep in `multirun/<the sweep's overrides>/<each job's overrides>/`: the same
command always gives the same folders, so running a sweep again resumes it, as
for single runs. Jobs that finished are rewritten from their saved chunks without
optimising again; a job that was killed continues from its last saved chunk.
Give `hydra.sweep.dir=...` on the command line to choose the folder yourself (for
instance to resume a sweep started with other sweep values).

After the last job it writes summary.csv and summary.html (see `fvis.summary`)
into the sweep folder; if any job did not end "done", it names them and exits with
status 1.

With the joblib launcher, a worker killed outright (SIGKILL: the OOM killer) makes
joblib stop its whole pool, the other jobs in flight with it, and raise. The sweep
then goes on (`surviving_launch`): jobs that ended keep their outcome, jobs that
never started run in a new pool, and each job that was in flight runs again alone;
one killed again alone is left "killed" (run.json, and the summary) and the others
finish. Only the joblib launcher is wrapped, in this process alone.
Like `fvis.cli`, this module belongs to the Hydra entry point; the library never
imports it.
"""

import sys
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import open_dict, read_write

from fvis import summary
from fvis.cli import run_dir_name
from fvis.outputs import read_json

_JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def sweep_dir(root, task_overrides):
    """`root/<overrides>`: the sweep's folder from its command-line overrides (sorted)."""
    return f"{root}/{run_dir_name(','.join(sorted(task_overrides)))}"


class SweepCallback(Callback):
    """Deterministic sweep folders, and a summary of every job when the sweep ends.

    Args:
        root: the folder that holds all sweeps (default "multirun").
    """

    def __init__(self, root="multirun"):
        self.root = root

    def on_multirun_start(self, config, **kwargs):
        hydra_cfg = config.hydra
        if hydra_cfg.launcher.get("_target_") == _JOBLIB:
            _survive_killed_workers()
        if any(o.split("=", 1)[0].lstrip("+~") == "hydra.sweep.dir" for o in hydra_cfg.overrides.hydra):
            return
        folder = sweep_dir(self.root, list(hydra_cfg.overrides.task))
        quoted = folder.replace("\\", "\\\\").replace("'", "\\'")
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.sweep.dir = folder
            # Each job's config is composed again from these overrides (locally or on a cluster).
            hydra_cfg.overrides.hydra.append(f"hydra.sweep.dir='{quoted}'")

    def on_multirun_end(self, config, **kwargs):
        folder = Path(config.hydra.sweep.dir).absolute()  # as absolute as the job lines' folders
        rows = summary.write_summary(folder)
        print(f"fvis: {len(rows)} jobs -> {folder / 'summary.html'}")
        bad = [row for row in rows if row["status"] != "done"]
        for row in bad:
            print(f"fvis: job {row['job']} {row['status']}: {row['error'] or 'see its folder'}", file=sys.stderr)
        if bad:
            sys.exit(1)


def _survive_killed_workers():
    """Wraps the joblib launcher's `launch` in `surviving_launch` (once per process)."""
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

    real = JoblibLauncher.launch
    if getattr(real, "fvis_surviving", False):
        return

    def launch(self, job_overrides, initial_job_idx):
        return surviving_launch(lambda batch, first: real(self, batch, first), self, job_overrides, initial_job_idx)

    launch.fvis_surviving = True
    JoblibLauncher.launch = launch


def surviving_launch(launch, launcher, job_overrides, initial_job_idx):
    """Runs `launch(overrides, first_index)` (a joblib launch) over every job, past killed workers.

    Args:
        launch: the launcher's own launch, as a function of (list of job overrides, first job index).
        launcher: the launcher (its config locates each job's folder).
        job_overrides, initial_job_idx: as given to `Launcher.launch`.

    Returns:
        One `JobReturn` per job, in order; a job whose worker was killed returns None (its folder says).
    """
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    folders = [_job_folder(launcher, overrides) for overrides in job_overrides]
    returns, pending = {}, list(range(len(job_overrides)))
    while pending:
        before = {i: _attempts(folders[i]) for i in pending}
        try:
            returns.update(zip(pending, launch([job_overrides[i] for i in pending], initial_job_idx + pending[0])))
            break
        except TerminatedWorkerError:
            started = [i for i in pending if len(_attempts(folders[i])) > len(before[i])]
            for i in started:
                if _attempts(folders[i])[-1].get("status") == "running":  # in flight when the pool went down
                    print(f"fvis: a worker was killed (out of memory?) while job {folders[i]} ran; running it "
                          f"again alone", file=sys.stderr)
                    try:
                        returns[i] = launch([job_overrides[i]], initial_job_idx + i)[0]
                        continue
                    except TerminatedWorkerError:
                        print(f"fvis: job {folders[i]} was killed again, alone: left as killed", file=sys.stderr)
                returns[i] = JobReturn(overrides=list(job_overrides[i]), working_dir=str(folders[i]),
                                       status=JobStatus.COMPLETED)
            pending = [i for i in pending if i not in started]
    return [returns[i] for i in range(len(job_overrides))]


def _job_folder(launcher, overrides):
    """The folder Hydra gives the job of `overrides` (hydra.sweep.dir / hydra.sweep.subdir)."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def _attempts(folder):
    attempts = (read_json(Path(folder) / "run.json") or {}).get("attempts")
    return [a for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else []
