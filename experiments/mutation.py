"""Mutation testing of fvis' core modules: a seeded sample of cosmic-ray mutants, each run
against the few test files that cover its module.

A developer's tool, not part of `.ci/run`. Install it with `pip install -e ".[test,mutation]"`, then:

    python experiments/mutation.py --sample 120 --seed 0                # the sampled run (~1 h on 2 cores)
    python experiments/mutation.py --plan --sample 120                  # baseline test times + estimate only
    python experiments/mutation.py --modules quality,optim --sample 8   # a trial on two modules
    python experiments/mutation.py --report-only --sample 120 --seed 0  # rewrite the report from the sessions

How it works:
Why cosmic-ray: it mutates the file on disk and runs each mutant's tests in a fresh process with a
timeout. mutmut 3 instead forks one process per mutant from a parent that has already imported the
tests, and so JAX (JAX warns that fork after its threads start can deadlock), and leaves decorated
functions unmutated.

- Mutants come from cosmic-ray (`cosmic_ray.commands.init`, its `core/*` operators), minus the
  binary-operator swaps to bitwise/shift/matmul operators (on floats and arrays those only raise a
  TypeError: killed by any test that reaches the line, so they would inflate the score), the
  SyntaxErrors cosmic-ray 8.7 makes of `def f(*, x)` and `f(**kw)` (`KEYWORD_ONLY_STAR`), and lines
  marked `# pragma: no mutate`. `SCOPE` can restrict a module to some of its top-level names.
- Each module's mutants form its pool; `--sample N` takes N mutants over the chosen modules, at
  least `--min-per-module` each (optim.py, chunks.py and render.py have small pools), the rest in
  proportion to each module's pool (a stratified sample), drawn with `--seed`.
- Everything runs in throwaway clones of the repository at `--rev` (HEAD by default: commit first;
  uncommitted changes are not seen) under `--work`; a mutant is written into a clone's file, its
  module's tests run there (`python -m pytest -x -q -p no:cacheprovider <tests>`), and the file is
  put back. Killed: the tests fail or run past the module's timeout.
- The test runs share one FVIS_CACHE_DIR under `--work` (JAX's compilation cache: a mutant that
  changes a computation changes its key, the others reuse the baseline's compilations).
- Results go to one cosmic-ray session per module (`<work>/runs/<key>/<module>.sqlite`, readable
  with `cr-report`), written after every mutant: running the same command again continues where an
  interrupted run stopped. Other sources or tests, seed, sample or modules give another key: a
  fresh run.
- The report (`--out`, experiments/results/mutation.md) lists per module: tests, baseline seconds,
  pool, tried, killed, survived, timed out; then every survivor with an empty "why harmless / now
  caught" column. Notes written there are kept when the report is rewritten. A JSON file with
  every sampled mutant lies beside it.
"""

import argparse
import ast
import concurrent.futures
import dataclasses
import datetime
import difflib
import hashlib
import inspect
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

from cosmic_ray.commands.init import init as cr_init
from cosmic_ray.mutating import mutate_code
from cosmic_ray.plugins import get_operator
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

REPO = Path(__file__).resolve().parents[1]

# Module -> the tests that cover it: whole files where the file is about the module, file::test ids
# where a file is mostly about something else or slow (whole-model conversions, subprocess kills).
# tests/test_<module>.py is added when it exists and is not named here already. Keep each module's
# selection to well under a minute on 2 cores: every sampled mutant of the module runs it once.
_BAD = "tests/test_bad_inputs.py::"
_CHECKS = "tests/test_input_checks.py::"
_RESUME = "tests/test_resume.py::"
_CONFIG = "tests/test_config_flow.py::"
_VALUES = "tests/test_model_values.py::"
TESTS = {
    "optim": ["tests/test_render.py::test_default_step_equals_reference_restatement",
              "tests/test_render.py::test_objective_rises_for_live_filters",
              _BAD + "test_gradient_normalisation_is_finite_at_zero",
              _BAD + "test_bad_config_values_print_one_line_before_compute",  # lr=0
              _CONFIG + "test_lr_reaches_the_reference_optimiser"],
    "render": ["tests/test_render.py",
               "tests/test_perf.py::test_bfloat16_computes_the_model_in_bfloat16_and_changes_images_little",
               "tests/test_perf.py::test_steady_state_step_is_the_render_step",
               _VALUES + "test_each_image_of_a_unit_takes_its_own_normalised_step",
               _VALUES + "test_the_first_image_of_a_unit_is_the_single_image_runs",
               "tests/test_output_values.py"],
    "objectives": ["tests/test_objectives.py",
                   _BAD + "test_objective_settings_out_of_range_are_refused_before_compute",
                   _BAD + "test_neuron_position_picks_that_position",
                   _BAD + "test_neuron_objective_works_on_vector_layers",
                   _BAD + "test_flatten_output_takes_a_neuron_objective"],
    "params": ["tests/test_params.py"],
    "transforms": ["tests/test_transforms.py"],
    "quality": ["tests/test_quality.py", "tests/test_quality_values.py",
                "tests/test_report.py::test_write_merges_figures_and_links_existing_files"],
    "models.base": ["tests/test_model_values.py", "tests/test_keras_models.py",
                    _BAD + "test_preprocessing_inside_the_model_receives_its_own_range"],
    "regularizers": ["tests/test_objectives.py", _BAD + "test_every_traced_norm_and_std_has_a_finite_gradient_at_zero"],
    "cli": ["tests/test_input_checks.py", "tests/test_config_flow.py",
            _BAD + "test_bad_config_values_print_one_line_before_compute",
            "tests/test_cli.py::test_every_component_config_instantiates",
            "tests/test_cli.py::test_every_experiment_preset_composes",
            "tests/test_cli.py::test_cli_end_to_end_writes_every_file",
            _RESUME + "test_display_settings_reuse_chunks_but_compute_settings_do_not",
            _RESUME + "test_a_smaller_job_in_a_used_folder_leaves_no_stale_tiles_chunks_or_report",
            _RESUME + "test_failed_attempt_is_recorded_and_cleared_by_a_later_success"],
    "settings": ["tests/test_input_checks.py", _BAD + "test_bad_config_values_print_one_line_before_compute",
                 _CONFIG + "test_seed_reaches_the_job", _CONFIG + "test_steps_reach_the_loop",
                 _CONFIG + "test_images_per_unit_reaches_the_job", _CONFIG + "test_precision_bfloat16_reaches_the_model"],
    "runs": ["tests/test_runs.py", "tests/test_output_values.py", _VALUES + "test_report_counts_the_dead_units",
             _RESUME + "test_job_killed_between_chunks_resumes_to_identical_files"],
    "chunks": ["tests/test_perf.py::test_host_loop_equals_scan_loop",
               "tests/test_perf.py::test_no_device_to_host_transfer_inside_a_chunk",
               "tests/test_perf.py::test_bad_loop_and_precision_are_refused_before_compiling",
               "tests/test_render.py::test_step_compiles_once_for_all_chunks",
               _RESUME + "test_a_filter_image_does_not_depend_on_its_chunk_or_neighbours"],
    "outputs": [_RESUME + "test_job_killed_between_chunks_resumes_to_identical_files",
                _RESUME + "test_damaged_or_foreign_chunk_files_are_redone_never_trusted",
                _RESUME + "test_chunks_of_another_config_are_recomputed",
                _RESUME + "test_display_settings_reuse_chunks_but_compute_settings_do_not",
                _RESUME + "test_a_smaller_job_in_a_used_folder_leaves_no_stale_tiles_chunks_or_report",
                _RESUME + "test_failed_attempt_is_recorded_and_cleared_by_a_later_success",
                _RESUME + "test_resuming_with_another_batch_size_recomputes_every_chunk",
                "tests/test_report.py::test_write_merges_figures_and_links_existing_files",
                _BAD + "test_dead_unit_gets_a_gray_tile_in_its_own_cell_and_a_flag",
                _VALUES + "test_dead_filters_are_exactly_the_dead_channels",
                "tests/test_output_values.py::test_images_npz_and_results_json_hold_the_results_values"],
    "units": ["tests/test_units.py", _BAD + "test_filters_all_gives_exactly_every_channel"],
    "images": ["tests/test_images.py", "tests/test_output_values.py::test_clip_display_of_known_pixel_values",
               _CHECKS + "test_16_bit_png_is_scaled_by_its_bit_depth",
               _CHECKS + "test_corrupt_photo_is_named_when_loaded",
               _CHECKS + "test_corrupt_file_in_natural_images_folder_is_named",
               _BAD + "test_display_settings_are_refused_before_compute",
               "tests/test_params.py::test_maco_magnitude_from_a_folder"],
}

# Top-level names whose code is mutated; modules not listed are mutated whole.
SCOPE = {}

# Swaps to these operators only raise TypeError on floats and arrays (see the docstring).
EXCLUDED_OPERATORS = re.compile(r"^core/ReplaceBinaryOperator_\w+_(LShift|RShift|BitOr|BitAnd|BitXor|MatMult)$")
PRAGMA = "# pragma: no mutate"
# cosmic-ray 8.7 takes the `*` that marks keyword-only parameters and the `**` of `f(**kw)` and
# `{**d}` for binary operators (`def f(*, x)` -> `def f(%, x)`): SyntaxErrors that any test run would
# count as killed. They are left out of the pool (and `draw` compiles each sampled mutant).
KEYWORD_ONLY_STAR = re.compile(r"\*\s*[,)]")

SKIP_NOT_SAMPLED = "skipped: not in the sample"
SKIP_INVALID = "skipped: not valid Python"
OUTPUT_TAIL_LINES = 40


@dataclasses.dataclass
class Module:
    """One core module: its tests, its cosmic-ray session, its baseline."""
    name: str
    tests: list
    session: Path
    pool: int = 0
    sample: int = 0
    baseline_s: float = 0.0
    timeout_s: float = 0.0

    @property
    def path(self):
        return f"fvis/{self.name.replace('.', '/')}.py"  # "models.base" -> fvis/models/base.py


def git(*args, cwd=REPO):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def tests_for(name, root=REPO):
    """The module's test selection: TESTS[name] plus tests/test_<name>.py where it exists."""
    tests = list(TESTS[name])
    own = f"tests/test_{name}.py"
    if (root / own).exists() and not any(t.split("::")[0] == own for t in tests):
        tests.append(own)
    return tests


def test_command(tests):
    return [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *tests]  # serial: one mutant


# --- clones --------------------------------------------------------------------------------------

def prepare_clone(clone, commit, work):
    """A clean checkout of `commit` at `clone`, importable as `fvis` from its root."""
    if not (clone / ".git").exists():
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(clone)], check=True)
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=clone, capture_output=True).returncode:
        git("fetch", "-q", str(REPO), commit, cwd=clone)
    git("checkout", "-q", "-f", "--detach", commit, cwd=clone)
    git("clean", "-q", "-f", "-d", "-x", cwd=clone)  # a mutant left by a killed run, stale bytecode
    # The editable install maps fvis.conf to the source tree's conf/; a link makes the clone's own
    # conf/ win (the clone's root comes first on sys.path).
    (clone / "fvis" / "conf").symlink_to("../conf")
    shared = REPO.parent / "shared"  # tests/conftest.py looks for ../shared next to the checkout
    if shared.is_dir() and not (work / "shared").exists():
        (work / "shared").symlink_to(shared)


def test_env(clone, cache):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", FVIS_CACHE_DIR=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(clone), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def check_imports(clone, cache):
    """Fails unless the test processes import fvis (and fvis.conf) from the clone."""
    code = "import fvis, fvis.conf; print(fvis.__file__); print(fvis.conf.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=clone, env=test_env(clone, cache),
                         check=True, capture_output=True, text=True).stdout.split()
    outside = [p for p in out if not Path(p).resolve().is_relative_to(clone.resolve())]
    if outside:
        sys.exit(f"The tests would import {outside} instead of the clone {clone}; check PYTHONPATH.")


# --- running tests -------------------------------------------------------------------------------

_RUNNING = set()
_RUNNING_LOCK = threading.Lock()
_STOP = threading.Event()  # set on Ctrl-C: no new test process starts


def run_tests(tests, clone, cache, timeout):
    """(return code or None on timeout, seconds, output tail) of the tests in `clone`."""
    start = time.perf_counter()
    with _RUNNING_LOCK:
        if _STOP.is_set():
            raise KeyboardInterrupt
        proc = subprocess.Popen(test_command(tests), cwd=clone, env=test_env(clone, cache), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        _RUNNING.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    tail = "\n".join(out.splitlines()[-OUTPUT_TAIL_LINES:])
    return code, time.perf_counter() - start, tail


def kill_running():
    with _RUNNING_LOCK:
        _STOP.set()
        for proc in _RUNNING:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_mutant(item, module, clone, cache):
    """Applies one mutant in `clone`, runs the module's tests, restores the file; a WorkResult."""
    spec = item.mutations[0]
    path = clone / spec.module_path
    original = path.read_text(encoding="utf-8")
    mutated = mutant_source(item, original)
    if mutated is None:
        return WorkResult(worker_outcome=WorkerOutcome.NO_TEST, output="no mutation at this occurrence")
    diff = "\n".join(difflib.unified_diff(original.split("\n"), mutated.split("\n"), f"a/{spec.module_path}",
                                          f"b/{spec.module_path}", n=0, lineterm=""))
    try:
        path.write_text(mutated, encoding="utf-8")
        code, seconds, tail = run_tests(module.tests, clone, cache, module.timeout_s)
    finally:
        path.write_text(original, encoding="utf-8")
    head = f"seconds={seconds:.1f} returncode={code} timeout={code is None}"
    outcome = TestOutcome.SURVIVED if code == 0 else TestOutcome.KILLED
    return WorkResult(worker_outcome=WorkerOutcome.NORMAL, test_outcome=outcome, output=f"{head}\n{tail}", diff=diff)


# --- sessions and the sample ---------------------------------------------------------------------

def scope_lines(source, names):
    """Line numbers of the top-level definitions/assignments called `names`."""
    lines = set()
    for node in ast.parse(source).body:
        targets = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                   [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)])
        if set(targets) & set(names):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def skip_reason(spec, source_lines, scope):
    """Why a mutant is left out of the pool, or None."""
    line = spec.start_pos[0]
    if EXCLUDED_OPERATORS.match(spec.operator_name):
        return "skipped: operator excluded (bitwise/shift/matmul swap)"
    if spec.operator_name.startswith(("core/ReplaceBinaryOperator_Mul_", "core/ReplaceBinaryOperator_Pow_")):
        text, col = source_lines[line - 1], spec.start_pos[1]
        before = text[:col].rstrip() or next((t.rstrip() for t in reversed(source_lines[:line - 1]) if t.strip()), "")
        if KEYWORD_ONLY_STAR.match(text, col) or before.endswith(("(", "[", "{", ",")):
            return SKIP_INVALID  # no left operand: not a binary operator
    if scope is not None and line not in scope:
        return "skipped: outside the module's scope"
    if PRAGMA in source_lines[line - 1]:
        return f"skipped: {PRAGMA}"
    return None


def position(item):
    spec = item.mutations[0]
    return (tuple(spec.start_pos), spec.operator_name, spec.occurrence)


def enumerate_mutants(module, clone, session):
    """Writes every mutant of the module into a new cosmic-ray session; (pool items, out-of-pool reasons)."""
    source = (clone / module.path).read_text(encoding="utf-8")
    scope = scope_lines(source, SCOPE[module.name]) if module.name in SCOPE else None
    missing = [n for n in SCOPE.get(module.name, ()) if not scope_lines(source, [n])]
    if missing:
        print(f"warning: {module.path} has no top-level {sorted(missing)} (SCOPE is out of date)", file=sys.stderr)
    cwd = os.getcwd()
    os.chdir(clone)  # cosmic-ray stores the module path as given; keep it relative to the repository
    try:
        with use_db(str(session), WorkDB.Mode.create) as db:
            cr_init([Path(module.path)], db, {})
            items = sorted(db.work_items, key=position)
    finally:
        os.chdir(cwd)
    source_lines = source.split("\n")
    reasons = {item.job_id: skip_reason(item.mutations[0], source_lines, scope) for item in items}
    return [i for i in items if reasons[i.job_id] is None], {j: r for j, r in reasons.items() if r}


def allocate(pools, total, floor=0):
    """`total` mutants over the modules: `floor` each (capped by the pool and by total // modules), the
    rest in proportion to the pools (largest remainders); never more than a module's pool."""
    floor = min(floor, total // max(1, len(pools)))
    counts = {name: min(floor, n) for name, n in pools.items()}
    rest = {name: n - counts[name] for name, n in pools.items()}
    left = min(total, sum(pools.values())) - sum(counts.values())
    size = sum(rest.values())
    if size == 0 or left <= 0:
        return counts
    exact = {name: left * n / size for name, n in rest.items()}
    for name in pools:
        counts[name] += int(exact[name])
    for name in sorted(pools, key=lambda n: exact[n] - int(exact[n]), reverse=True):
        if sum(counts.values()) >= min(total, sum(pools.values())):
            break
        if counts[name] < pools[name]:
            counts[name] += 1
    return counts


def mutant_source(item, source):
    """The module's source with the mutant applied, or None where cosmic-ray finds no such mutation."""
    spec = item.mutations[0]
    return mutate_code(source, get_operator(spec.operator_name)(**spec.operator_args), spec.occurrence)


def is_valid(item, source):
    """Whether the mutant compiles (a SyntaxError would count as killed; see KEYWORD_ONLY_STAR)."""
    mutated = mutant_source(item, source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning: `x is not 0` and the like
            return mutated is not None and bool(compile(mutated, "<mutant>", "exec", dont_inherit=True))
    except SyntaxError:
        return False


def draw(pool, count, seed, path):
    """`count` valid mutants of `pool` in a seeded random order: (chosen ids, invalid ids met on the way,
    which the next in that order replaces)."""
    order = sorted(pool, key=position)
    random.Random(seed).shuffle(order)
    source = path.read_text(encoding="utf-8")
    chosen, invalid = set(), set()
    for item in order:
        if len(chosen) == count:
            break
        (chosen if is_valid(item, source) else invalid).add(item.job_id)
    return chosen, invalid


def create_sessions(modules, clone, total, seed, state, floor):
    """Creates the sessions that do not exist yet: every mutant, all but the sample marked skipped."""
    pools, reasons = {}, {}
    tmp = {m.name: state / f"{m.name}.sqlite.tmp" for m in modules}
    for m in modules:
        tmp[m.name].unlink(missing_ok=True)
        pools[m.name], reasons[m.name] = enumerate_mutants(m, clone, tmp[m.name])
    counts = allocate({name: len(items) for name, items in pools.items()}, total, floor)
    for m in modules:
        m.pool, m.sample = len(pools[m.name]), counts[m.name]
        if m.session.exists():
            tmp[m.name].unlink()
            continue
        chosen, invalid = draw(pools[m.name], counts[m.name], f"{seed}/{m.name}", clone / m.path)
        with use_db(str(tmp[m.name]), WorkDB.Mode.open) as db:
            by_reason = {SKIP_INVALID: sorted(invalid)} if invalid else {}
            for item in pools[m.name]:
                if item.job_id not in chosen and item.job_id not in invalid:
                    by_reason.setdefault(SKIP_NOT_SAMPLED, []).append(item.job_id)
            for job_id, reason in reasons[m.name].items():
                by_reason.setdefault(reason, []).append(job_id)
            for reason, job_ids in by_reason.items():
                db.set_multiple_results(job_ids, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=reason))
        tmp[m.name].rename(m.session)


# --- baseline ------------------------------------------------------------------------------------

def measure_baselines(modules, clone, cache, state, factor, min_timeout, *, run=True):
    """Runs each module's tests unmutated (they must pass) and sets its timeout; cached per run key."""
    path = state / "baseline.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    for m in modules:
        if m.name not in known and not run:
            continue
        if m.name not in known:
            print(f"baseline {m.name}: {' '.join(m.tests)}", flush=True)
            code, seconds, tail = run_tests(m.tests, clone, cache, timeout=3600)
            if code != 0:
                sys.exit(f"The tests of {m.name} fail without a mutant (exit {code}); fix them first:\n{tail}")
            known[m.name] = round(seconds, 1)
            path.write_text(json.dumps(known, indent=1))
            print(f"baseline {m.name}: {seconds:.1f} s", flush=True)
        m.baseline_s = known[m.name]
        m.timeout_s = max(min_timeout, factor * m.baseline_s)


# --- the run -------------------------------------------------------------------------------------

def describe(module, item):
    spec = item.mutations[0]
    return f"{module.path}:{spec.start_pos[0]} {spec.operator_name} #{spec.occurrence}"


def execute(modules, clones, cache):
    """Runs every pending sampled mutant, one per clone at a time; each result is saved as it comes."""
    work = []
    for m in modules:
        with use_db(str(m.session), WorkDB.Mode.open) as db:
            work += [(m, item) for item in sorted(db.pending_work_items, key=position)]
    if not work:
        return
    free = list(clones)
    lock = threading.Lock()

    def task(m, item):
        with lock:
            clone = free.pop()
        try:
            return run_mutant(item, m, clone, cache)
        except Exception as e:  # recorded, not fatal: the run goes on
            return WorkResult(worker_outcome=WorkerOutcome.EXCEPTION, test_outcome=TestOutcome.INCOMPETENT,
                              output=f"{type(e).__name__}: {e}")
        finally:
            with lock:
                free.append(clone)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(clones)) as pool:
        futures = {pool.submit(task, m, item): (m, item) for m, item in work}
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                m, item = futures[future]
                result = future.result()
                with use_db(str(m.session), WorkDB.Mode.open) as db:
                    db.set_result(item.job_id, result)
                row = mutant_row(m, item, result)
                left = (time.perf_counter() - start) / done * (len(work) - done)
                print(f"[{done}/{len(work)}] {describe(m, item)}: {row['outcome']} in {row['seconds']} s"
                      f"{' by ' + row['killed_by'] if row['killed_by'] else ''} (~{left / 60:.0f} min left)",
                      flush=True)
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            kill_running()
            raise


# --- the report ----------------------------------------------------------------------------------

def mutant_row(module, item, result):
    spec = item.mutations[0]
    head = (result.output or "").split("\n", 1)[0]
    fields = dict(kv.split("=", 1) for kv in head.split() if "=" in kv)
    timed_out = fields.get("timeout") == "True"
    if result.worker_outcome != WorkerOutcome.NORMAL:
        outcome = "error"
    else:
        outcome = "survived" if result.test_outcome == TestOutcome.SURVIVED else "timeout" if timed_out else "killed"
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", result.output or "", re.M)
    return {"module": module.path, "line": spec.start_pos[0], "column": spec.start_pos[1],
            "operator": spec.operator_name, "occurrence": spec.occurrence, "outcome": outcome,
            "seconds": float(fields["seconds"]) if "seconds" in fields else None,
            "killed_by": failed[0] if failed and outcome == "killed" else None, "diff": result.diff,
            "output": None if outcome in ("killed", "survived") else result.output}


def collect(modules):
    """Per-module counts and every sampled mutant that has a result."""
    rows, summary = [], {}
    for m in modules:
        with use_db(str(m.session), WorkDB.Mode.open) as db:
            done = [(i, r) for i, r in db.completed_work_items if r.worker_outcome != WorkerOutcome.SKIPPED]
            pending = len(db.pending_work_items)
        mine = sorted((mutant_row(m, i, r) for i, r in done), key=lambda r: (r["line"], r["operator"], r["occurrence"]))
        rows += mine
        count = lambda o: sum(r["outcome"] == o for r in mine)  # noqa: E731
        seconds = [r["seconds"] for r in mine if r["seconds"] is not None]
        summary[m.name] = {"tests": m.tests, "baseline_s": m.baseline_s, "timeout_s": m.timeout_s, "pool": m.pool,
                           "sample": m.sample, "tried": len(mine), "killed": count("killed"),
                           "survived": count("survived"), "timed_out": count("timeout"), "errors": count("error"),
                           "pending": pending, "seconds": round(sum(seconds), 1)}
    return summary, rows


def cell(text):
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def change(diff):
    lines = [ln for ln in (diff or "").split("\n") if ln[:1] in "-+" and not ln.startswith(("---", "+++"))]
    old = " ⏎ ".join(ln[1:].strip() for ln in lines if ln.startswith("-"))
    new = " ⏎ ".join(ln[1:].strip() for ln in lines if ln.startswith("+"))
    return f"{cell(old)} → {cell(new)}"


def survivor_key(module, line, operator):
    return f"{module.strip()}|{line.strip()}|{operator.strip()}"


def old_notes(path):
    """'why harmless / now caught' notes of an existing report, by survivor."""
    notes = {}
    if not path.exists():
        return notes
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 5 and cells[0].startswith("`fvis/") and cells[4]:
            notes[survivor_key(*cells[:3])] = cells[4]
    return notes


def write_report(out, modules, settings):
    summary, rows = collect(modules)
    notes = old_notes(out)
    total = {k: sum(s[k] for s in summary.values()) for k in
             ("pool", "sample", "tried", "killed", "survived", "timed_out", "errors", "pending", "seconds")}
    decided = total["killed"] + total["timed_out"] + total["survived"]
    score = f"{(total['killed'] + total['timed_out']) / decided:.0%}" if decided else "-"
    command = f"python experiments/mutation.py --sample {settings['sample']} --seed {settings['seed']}"
    if settings["min_per_module"] != 3:
        command += f" --min-per-module {settings['min_per_module']}"
    if settings["modules_given"] is not None:
        command += f" --modules {settings['modules_given']}"
    lines = [
        "# Mutation testing",
        "",
        "A seeded sample of cosmic-ray mutants of fvis' core modules, each run against the tests that",
        "cover its module (`experiments/mutation.py`, whose docstring says how; a developer's tool, not",
        "part of `.ci/run`). Re-run it after the tests change (`--plan` first: baselines and the estimate):",
        "",
        "    pip install -e \".[test,mutation]\"",
        f"    {command}",
        "",
        "An interrupted run continues when the same command is run again. Killed: the module's tests",
        "fail, or run past its timeout (the larger of --min-timeout and --timeout-factor x baseline).",
        "Swaps of binary operators to bitwise, shift and matmul ones are left out (on floats they only",
        "raise TypeError).",
        "",
    ]
    if settings.get("note"):
        lines += [textwrap.fill(f"Note: {settings['note']}", 100), ""]
    lines += [
        f"Commit `{settings['commit'][:12]}`, {settings['date']}, seed {settings['seed']}, "
        f"{settings['jobs']} job(s) at a time, cosmic-ray {settings['cosmic_ray']}, "
        f"{total['seconds'] / 60:.1f} min of test runs.",
        f"Tried {total['tried']} of {total['sample']} sampled mutants (pool {total['pool']}): "
        f"killed {total['killed']}, timed out {total['timed_out']}, survived {total['survived']}, "
        f"errors {total['errors']}; mutation score {score}.",
        "",
        "| module | tests | baseline s | timeout s | pool | tried | killed | survived | timed out | errors | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        tests = "<br>".join(t.removeprefix("tests/") for t in s["tests"])
        lines.append(f"| `fvis/{name}.py` | {tests} | {s['baseline_s']:.1f} | {s['timeout_s']:.0f} | {s['pool']} | "
                     f"{s['tried']}/{s['sample']} | {s['killed']} | {s['survived']} | {s['timed_out']} | "
                     f"{s['errors']} | {s['seconds']:.0f} |")
    survivors = [r for r in rows if r["outcome"] == "survived"]
    lines += ["", f"## Survivors ({len(survivors)})", "",
              "Each one: a gap in the tests (then a test that now catches it) or an equivalent mutant "
              "(then why it is harmless).", "",
              "| module | line | operator | change | why harmless / now caught |", "|---|---:|---|---|---|"]
    for r in survivors:
        key = (f"`{r['module']}`", str(r["line"]), f"{r['operator']} #{r['occurrence']}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {change(r['diff'])} | "
                     f"{notes.get(survivor_key(*key), '')} |")
    errors = [r for r in rows if r["outcome"] == "error"]
    if errors:
        lines += ["", "## Errors", ""] + [f"- `{r['module']}:{r['line']}` {r['operator']}: {r['output']}"
                                          for r in errors]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "modules": summary, "mutants": rows},
                                                   indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')}: tried {total['tried']}, killed {total['killed']}, "
          f"timed out {total['timed_out']}, survived {total['survived']}, errors {total['errors']}")


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sample", type=int, default=120, help="mutants in all, split over the modules (default 120)")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    p.add_argument("--modules", help=f"comma-separated subset of: {','.join(TESTS)} (default all)")
    p.add_argument("--min-per-module", type=int, default=3,
                   help="each module gets at least this many (default 3; small core modules would get 1-2)")
    p.add_argument("--jobs", type=int, default=1, help="mutants tested at once, one clone each (default 1)")
    p.add_argument("--rev", default="HEAD", help="the commit to mutate (default HEAD)")
    p.add_argument("--work", type=Path, default=Path("/tmp/fvis-mutation") / REPO.name,
                   help="clones, sessions and caches (default /tmp/fvis-mutation/<repo folder>)")
    p.add_argument("--out", type=Path, default=REPO / "experiments/results/mutation.md", help="the report")
    p.add_argument("--timeout-factor", type=float, default=3.0, help="timeout = factor x baseline (default 3)")
    p.add_argument("--min-timeout", type=float, default=60.0, help="the least timeout in seconds (default 60)")
    p.add_argument("--note", help="a line for the report's header (e.g. that this is a trial)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="measure the baselines and estimate the time; no mutants")
    mode.add_argument("--report-only", action="store_true", help="rewrite the report from the sessions")
    return p.parse_args(argv)


def run_key(commit, args, names, tests):
    """The run's identity: what is mutated and tested (the trees of fvis/, tests/, conf/ and
    pyproject.toml, not the commit: a commit that only touches experiments/ or the README continues a
    run), the sample, and the code that draws it."""
    trees = [git("rev-parse", f"{commit}:{p}") for p in ("fvis", "tests", "conf", "pyproject.toml")]
    drawing = [inspect.getsource(f) for f in (enumerate_mutants, skip_reason, allocate, draw, is_valid)]
    key = json.dumps([trees, args.seed, args.sample, args.min_per_module, names, tests, SCOPE,
                      EXCLUDED_OPERATORS.pattern, KEYWORD_ONLY_STAR.pattern, PRAGMA, drawing, _cosmic_ray_version()])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def module_names(modules):
    names = list(TESTS) if modules is None else [n.strip().removesuffix(".py") for n in modules.split(",")]
    unknown = [n for n in names if n not in TESTS]
    if unknown:
        sys.exit(f"Unknown module(s) {unknown}; choose from {','.join(TESTS)}")
    return names


def print_plan(modules):
    for m in modules:
        print(f"{m.name:13s} pool {m.pool:4d}  sample {m.sample:3d}  tests {m.baseline_s:6.1f} s  "
              f"-> <= {m.sample * m.baseline_s / 60:5.1f} min  ({len(m.tests)} test files/ids)")
    print(f"estimate: <= {sum(m.sample * m.baseline_s for m in modules) / 60:.0f} min for "
          f"{sum(m.sample for m in modules)} mutants at one job (each costing a full passing run; "
          "killed ones stop at their first failure)")


def main(argv=None):
    args = parse_args(argv)
    names = module_names(args.modules)
    commit = git("rev-parse", args.rev)
    if args.rev == "HEAD" and git("status", "--porcelain", "--", "fvis", "tests", "conf"):
        print("warning: uncommitted changes under fvis/, tests/ or conf/ are not part of the run "
              "(it mutates and tests the commit)", file=sys.stderr)
    work = args.work.resolve()
    clones = [work / f"repo{i}" for i in range(max(1, args.jobs))]
    cache = work / "cache"  # FVIS_CACHE_DIR of the test runs: model conversions, JAX compilations
    cache.mkdir(parents=True, exist_ok=True)
    for clone in clones:
        prepare_clone(clone, commit, work)
    tests = {n: tests_for(n, clones[0]) for n in names}
    state = work / "runs" / run_key(commit, args, names, tests)
    state.mkdir(parents=True, exist_ok=True)
    modules = [Module(n, tests[n], state / f"{n}.sqlite") for n in names]
    print(f"commit {commit[:12]}, state {state}", flush=True)
    create_sessions(modules, clones[0], args.sample, args.seed, state, args.min_per_module)
    if not args.report_only:
        check_imports(clones[0], cache)
    measure_baselines(modules, clones[0], cache, state, args.timeout_factor, args.min_timeout,
                      run=not args.report_only)
    if args.plan:
        return print_plan(modules)
    if not args.report_only:
        try:
            execute(modules, clones, cache)
        except KeyboardInterrupt:
            print("interrupted: run the same command again to continue", file=sys.stderr)
    settings = {"commit": commit, "date": datetime.date.today().isoformat(), "seed": args.seed,
                "sample": args.sample, "min_per_module": args.min_per_module, "modules_given": args.modules,
                "jobs": args.jobs, "cosmic_ray": _cosmic_ray_version(), "timeout_factor": args.timeout_factor,
                "min_timeout": args.min_timeout, "note": args.note}
    write_report(args.out, modules, settings)


def _cosmic_ray_version():
    from importlib.metadata import version
    return version("cosmic-ray")


if __name__ == "__main__":
    main()
