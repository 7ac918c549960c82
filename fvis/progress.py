"""Progress for long phases: a bar in a terminal, log lines everywhere.

fvis logs the story of a job (model built, compiled, chunk i/n done, quality measured,
files written) with `logging`, on module loggers under "fvis"; it never configures
handlers (the `fvis` command lets Hydra write them to the run folder's cli.log and the
console). A phase without a count (building a model, measuring quality) shows its
elapsed time in a terminal while it runs:

    with progress.phase("building the model", log) as done:
        model = build()
        done("model %s built", model.name)      # "model x built in 9.1 s"
"""

import contextlib
import threading
import time

from tqdm.auto import tqdm

PROGRESS = "fvis_progress"  # set on log records a terminal shows as a bar instead (chunk i/n done)


def bar_shown(progress):
    """tqdm's `disable` argument for `progress` (True, False, or "auto": a bar when stderr is a terminal)."""
    return None if progress == "auto" else not progress


@contextlib.contextmanager
def phase(description, log, *, progress="auto", refresh_s=0.5):
    """A phase of unknown length: its elapsed time in a terminal, and a log line when it ends.

    Args:
        description: what is happening ("building the model").
        log: the `logging.Logger` for the closing line.
        progress: True, False, or "auto" (a display when stderr is a terminal).
        refresh_s: seconds between updates of the display.

    Yields:
        `done(message, *args)`: logs `message % args` + " in N s" at INFO when called;
        a phase left without calling it logs nothing.
    """
    start = time.perf_counter()
    bar = tqdm(total=None, desc=description, bar_format="{desc}: {elapsed}", disable=bar_shown(progress),
               leave=False)
    closing = []
    try:
        with ticking(bar, refresh_s=refresh_s):
            yield lambda message, *args: closing.append((message, args))
    finally:
        bar.close()
    for message, args in closing:
        log.info(message + " in %.1f s", *args, time.perf_counter() - start)


@contextlib.contextmanager
def ticking(bar, *, refresh_s=0.5):
    """Redraws a tqdm `bar` every `refresh_s` seconds while the block runs, so its elapsed time moves
    during a long call that updates nothing (compiling, building a model)."""
    if bar.disable:
        yield
        return
    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(bar, stop, refresh_s), daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()


def _tick(bar, stop, refresh_s):
    while not stop.wait(refresh_s):
        bar.refresh()
