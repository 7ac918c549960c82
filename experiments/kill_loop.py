"""Kill a job by SIGKILL at 20 random moments and resume each: are the files those of an uninterrupted run?

    python experiments/kill_loop.py               # ~5 min on 2 CPU cores; writes results/kill_loop.md
    python experiments/kill_loop.py --kills 50 --seed 1

One uninterrupted run of a small job (the tiny model, 8 filters in 3 chunks, quality report on) records
the sequence of its events: compilations, chunks computed, files written, quality measurements, and the
removal of the chunk folder once images.npz holds the chunks. Each trial then runs the job in a fresh
folder and kills it (SIGKILL, as the OOM killer does) at an event drawn uniformly from that sequence; a
file write is killed before it, half-way through it (a partial temporary file left behind) or after
it, drawn at random. Every second trial kills the resumed run too, at a second random moment. The
last resume must give every file of the uninterrupted run byte for byte (results.json's `timings`, the
seconds each attempt took, and run.json, the attempts, aside), leave no temporary file and no chunk, and
run.json must record each kill. The machinery (a process that imports fvis once and forks a child per
run, killed by hooks that live in the test, not the library) is `tests/test_resume.py`'s `KillServer`.
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FVIS_CACHE_DIR", str(Path(tempfile.gettempdir()) / "fvis_kill_loop_cache"))

from tests.test_resume import KillServer, attempts, product  # noqa: E402

JOB = ["model=tiny", "filters=0:8", "batch_size=3", "steps=4", "quality.draws=2"]


def differences(files, reference):
    """The relative paths whose bytes differ, or that only one side has."""
    return sorted(name for name in set(files) | set(reference) if files.get(name) != reference.get(name))


def leftovers(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or p.name == "chunks")


def trial(server, folder, events, rng, kills):
    """Kills the job in `folder` `kills` times at random events, resumes it; returns the trial's row."""
    moments = []
    for _ in range(kills):
        kill_at = rng.randint(1, len(events))
        how = rng.choice(["before", "partial", "after"]) if events[kill_at - 1].startswith("write ") else "after"
        outcome = server.run(JOB, folder, kill_at=kill_at, how=how)
        moments.append((kill_at, events[kill_at - 1], how, outcome["killed"]))
    resumed = server.run(JOB, folder)
    return moments, resumed, [a["status"] for a in attempts(folder)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="trials, one random kill each (every second: two)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "kill_loop.md"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fvis_kill_loop_"))
    start = time.perf_counter()
    rows, totals = [], {"kills": 0, "killed": 0, "resumes": 0, "files": 0, "differences": 0, "leftovers": 0}
    try:
        with KillServer() as server:
            events = server.events(JOB, work / "reference")
            reference = product(work / "reference")
            for t in range(args.kills):
                folder = work / f"trial{t:02d}"
                moments, resumed, statuses = trial(server, folder, events, rng, 2 if t % 2 else 1)
                files = product(folder)
                diff, left = differences(files, reference), leftovers(folder)
                totals["kills"] += len(moments)
                totals["killed"] += sum(m[3] for m in moments)
                totals["resumes"] += 1
                totals["files"] += len(files)
                totals["differences"] += len(diff)
                totals["leftovers"] += len(left)
                rows.append((t, moments, resumed, statuses, len(files), diff, left))
                print(f"trial {t}: {'; '.join(f'{m[1]} ({m[2]})' for m in moments)} -> "
                      f"{len(files)} files, {len(diff)} differ, {len(left)} left over", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(report(rows, totals, events, reference, args, time.perf_counter() - start))
    print(f"{totals} -> {args.out}")
    return 1 if totals["differences"] or totals["leftovers"] or totals["killed"] != totals["kills"] else 0


def report(rows, totals, events, reference, args, seconds):
    kinds = {}
    for e in events:
        kinds[e.split(" ")[0]] = kinds.get(e.split(" ")[0], 0) + 1
    lines = [
        "# Kill and resume: 20 random SIGKILLs", "",
        f"`python experiments/kill_loop.py --kills {args.kills} --seed {args.seed}` ({seconds / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores). Job: `fvis {' '.join(JOB)}`.", "",
        f"The uninterrupted run has {len(events)} events ({', '.join(f'{n} {k}' for k, n in kinds.items())}) "
        f"and writes {len(reference)} files (run.json aside). Each trial kills a fresh run at a random event "
        "(every second trial kills the resumed run a second time), then resumes it to the end.", "",
        f"**{totals['kills']} kills** ({totals['killed']} took effect), **{totals['resumes']} final resumes**, "
        f"**{totals['files']} files compared** byte for byte with the uninterrupted run (results.json less its "
        f"`timings`): **{totals['differences']} differences**, **{totals['leftovers']} temporary files or chunk "
        "folders left**.", "",
        "| trial | killed at (event: what, how) | run.json attempts | files | differ | left over |",
        "|---|---|---|---|---|---|"]
    for t, moments, resumed, statuses, n, diff, left in rows:
        at = "<br>".join(f"{m[0]}: `{m[1]}` ({m[2]}){'' if m[3] else ' NOT KILLED'}" for m in moments)
        lines.append(f"| {t} | {at} | {', '.join(statuses)} | {n} | {', '.join(diff) or 0} | {', '.join(left) or 0} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
