"""Prints how far other runs of the golden cases are from tests/golden, in the test's measure.

    python tests/golden/make_golden.py --out /tmp/scan --set loop=scan
    python tests/golden/compare.py /tmp/scan [more folders...]

For each case and compared array: max |difference| / max |golden| (the quantity
`tests/test_golden.py` bounds by `cases.TOLERANCES`), or whether exact arrays are equal.
This is how the tolerances in README.md were measured.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tests.golden import cases  # noqa: E402


def main(folders):
    golden_dir = Path(__file__).resolve().parent
    for folder in map(Path, folders):
        print(f"== {folder}")
        for name in cases.CASES:
            if not (folder / f"{name}.npz").exists():
                continue
            golden, other = np.load(golden_dir / f"{name}.npz"), np.load(folder / f"{name}.npz")
            parts = []
            for key in cases.RESULT_KEYS + cases.QUALITY_KEYS:
                if key in cases.EXACT:
                    parts.append(f"{key} {'equal' if np.array_equal(golden[key], other[key]) else 'DIFFERS'}")
                else:
                    parts.append(f"{key} {cases.scaled_difference(golden[key], other[key]):.2g}"
                                 f" (tol {cases.TOLERANCES[key]:g})")
            print(f"{name}: " + "; ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1:])
