"""Rewrites the golden files tests/golden/<case>.npz from the current code.

    python tests/golden/make_golden.py                       # all cases, into tests/golden/
    python tests/golden/make_golden.py --out /tmp/v --set loop=scan --set batch_size=4

Run it from the repository root. `--set key=value` passes a `fvis.prepare` setting
(an integer where the value is one) and `--out` writes elsewhere: that is how the
tolerances in README.md were measured (`compare.py` prints the differences). About
40 s on 2 CPU cores; the MobileNet cases need ../shared.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tests.golden import cases  # noqa: E402


def _setting(text):
    key, _, value = text.partition("=")
    return key, int(value) if value.lstrip("-").isdigit() else value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cases", nargs="*", default=list(cases.CASES))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    built = {}
    for name in args.cases:
        case = cases.CASES[name]
        if case.model not in built:
            built[case.model] = cases.build_model(case.model)
        arrays = cases.compute(case, built[case.model], **dict(args.set))
        np.savez_compressed(args.out / f"{name}.npz", **arrays, versions=np.array(cases.versions()))
        print(f"{args.out / name}.npz: final {' '.join(f'{v:.4g}' for v in arrays['final'].ravel())}", flush=True)


if __name__ == "__main__":
    main()
