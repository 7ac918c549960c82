"""Golden outputs: small jobs give today's results again, within measured float-rounding tolerances.

The reference results are in tests/golden/<case>.npz (cases and tolerances: tests/golden/cases.py
and README.md). A change that moves them on purpose regenerates them in the same commit
(`python tests/golden/make_golden.py`) and says why.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import shared_path
from tests.golden import cases

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def computed():
    """Each case's fresh results (computed once per module, on first use): {case name: arrays}."""
    if jax.default_backend() != "cpu":
        pytest.skip(f"the golden files hold CPU results; {jax.default_backend()} kernels round differently")
    built, done = {}, {}

    def get(name):
        case = cases.CASES[name]
        if case.model == "mobilenet":
            shared_path(*cases.MOBILENET_WEIGHTS)  # skips where ../shared is absent
        if name not in done:
            if case.model not in built:
                built[case.model] = cases.build_model(case.model)
            done[name] = cases.compute(case, built[case.model])
        return done[name]

    return get


def check(name, fresh, keys):
    golden = np.load(GOLDEN / f"{name}.npz")
    problems = cases.mismatches(golden, fresh, keys)
    made_with, now = json.loads(str(golden["versions"])), json.loads(cases.versions())
    changed = {k: f"{made_with.get(k)} -> {now[k]}" for k in now if made_with.get(k) != now[k]}
    assert not problems, (f"{name} no longer reproduces tests/golden/{name}.npz:\n  " + "\n  ".join(problems)
                          + (f"\nversions changed since the golden files were made: {changed}" if changed else "")
                          + "\nIf the change is intended, regenerate: python tests/golden/make_golden.py")


@pytest.mark.parametrize("name", list(cases.CASES))
def test_results_match_golden(name, computed):
    """Images, objective curves, final values, gradient norms and dead flags are today's."""
    check(name, computed(name), cases.RESULT_KEYS)


@pytest.mark.parametrize("name", list(cases.CASES))
def test_quality_figures_match_golden(name, computed):
    """The quality report (per-image records and the run's summary) of each case is today's."""
    check(name, computed(name), cases.QUALITY_KEYS)


def test_golden_files_are_small_and_complete():
    """One golden file per case, together well under 1 MB, each with every compared array."""
    files = sorted(GOLDEN.glob("*.npz"))
    assert [f.stem for f in files] == sorted(cases.CASES)
    assert sum(f.stat().st_size for f in files) < 600_000
    for f in files:
        assert set(cases.RESULT_KEYS + cases.QUALITY_KEYS) <= set(np.load(f).files), f.name
