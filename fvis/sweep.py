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
into the sweep folder; if any job failed, it names them and exits with status 1.
Like `fvis.cli`, this module belongs to the Hydra entry point; the library never
imports it.
"""

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import open_dict, read_write

from fvis import summary
from fvis.cli import run_dir_name


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
