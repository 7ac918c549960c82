"""A run folder has one writer at a time, and knows what a dead writer left behind.

A job holds the folder's lock (`.fvis.lock`, an OS file lock through the
`filelock` library) from the moment it opens the folder until it ends. The OS
releases the lock when its process dies, however it dies, so:

- a second process that opens the same folder is refused at once with one line
  naming the holder (host, pid, start time), rather than waiting behind a job
  that may run for hours or overwriting its records;
- an attempt that run.json still calls "running" while nobody holds the lock was
  killed (SIGKILL, the OOM killer, a lost node): the next job to open the folder
  marks it "killed", with the seconds it ran up to the last file it wrote.

Readers that must not take the lock (`fvis.summary`) judge a "running" attempt by
its pid on this host, and by the lock for an attempt of another host.
"""

import contextlib
import datetime
import os
import platform
from pathlib import Path

from filelock import FileLock, Timeout

from fvis.errors import FvisError

LOCK_NAME = ".fvis.lock"


class FolderBusyError(FvisError, RuntimeError):
    """Another live process is writing the run folder."""


def _holder_text(folder):
    """'host H, pid P, since T' for the folder's running attempt, as far as run.json says."""
    from fvis.outputs import read_json  # fvis.outputs imports this module

    attempts = (read_json(Path(folder) / "run.json") or {}).get("attempts") or [{}]
    last = attempts[-1] if isinstance(attempts[-1], dict) else {}
    if last.get("status") != "running":
        return "a process that has not recorded itself yet"
    return f"host {last.get('host')}, pid {last.get('pid')}, since {last.get('started')}"


@contextlib.contextmanager
def locked(folder):
    """Holds `folder`'s lock (creating the folder) for the body of the `with`.

    Raises:
        FolderBusyError: another process holds it; the message names that process.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout as e:
        raise FolderBusyError(
            f"Run folder '{folder}' is in use by another fvis job ({_holder_text(folder)}). Wait for it to end, "
            f"or give this job another folder (hydra.run.dir=...). Received: folder='{folder}'") from e
    try:
        yield lock
    finally:
        lock.release()


def holder_alive(folder, record):
    """Whether the process of a "running" attempt `record` may still be writing `folder`.

    On this host: its pid exists. For another host's attempt: the folder's lock is held.
    """
    pid = record.get("pid")
    if record.get("host") == platform.node() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return lock_held(folder)


def lock_held(folder):
    """Whether some process holds `folder`'s lock now (probed without waiting)."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return False
    probe = FileLock(path, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def _timestamp(iso):
    try:
        return datetime.datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None


def last_sign_of_life(folder, record):
    """Seconds from `record`'s start to the newest file written in `folder` since then (>= 0),
    or None when the start is unknown: how long a killed attempt ran, at least."""
    start = _timestamp(record.get("started"))
    if start is None:
        return None
    newest = start
    for root, _, files in os.walk(folder):
        for name in files:
            if name != LOCK_NAME:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.stat(Path(root) / name).st_mtime)
    return round(newest - start, 3)


def mark_killed(folder, attempts):
    """Marks, in place, each "running" attempt of `attempts` "killed" (call it holding the lock:
    no live process then writes the folder). Returns True if any was marked."""
    changed = False
    for record in attempts:
        if isinstance(record, dict) and record.get("status") == "running":
            record.update(status="killed", seconds=last_sign_of_life(folder, record),
                          error="the process ended without recording an outcome (killed)")
            changed = True
    return changed


def remove_temporaries(folder):
    """Deletes the temporary files (`.NAME.PID.tmp`) killed writers left anywhere in `folder`."""
    for tmp in Path(folder).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def attempt_seconds(folder, record):
    """The seconds an attempt ran: its own "seconds", or for a dead "running" one the estimate of
    `last_sign_of_life`; None when unknown."""
    if isinstance(record.get("seconds"), (int, float)):
        return record["seconds"]
    if record.get("status") == "running" and not holder_alive(folder, record):
        return last_sign_of_life(folder, record)
    return None
