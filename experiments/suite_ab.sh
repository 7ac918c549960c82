#!/usr/bin/env bash
# The test suite's cost, side by side: a subset of its files run by two checkouts in alternation
# (same Python environment), wall seconds and the process tree's user/system CPU seconds per run.
#   bash experiments/suite_ab.sh <before checkout> <after checkout> [rounds] [test files...]
set -euo pipefail
before=$(realpath "$1"); after=$(realpath "$2"); rounds=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
files=${*:-"tests/test_bad_inputs.py tests/test_cli.py tests/test_transforms.py tests/test_winograd.py
tests/test_models.py tests/test_golden.py tests/test_sweeps.py tests/test_flax_zoo.py"}
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%FT%TZ)"
for round in $(seq "$rounds"); do
  for which in before after; do
    dir=$before; [ "$which" = after ] && dir=$after
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    cpu=$(cd "$dir" && PYTHONPATH="$dir" /usr/bin/time -f "%U %S" python -m pytest -q -p no:cacheprovider $files 2>&1 \
          >/dev/null | tail -1)
    echo "round $round $which ($(git -C "$dir" rev-parse --short HEAD)): wall $(echo "$(date +%s.%N) - $start" | bc) s, user/system CPU $cpu s"
  done
done
