#!/usr/bin/env bash
# The reference job end to end as a user runs it, fvis at two commits and the seed's TensorFlow
# code, run alternately (each round: this checkout, the other checkout, TensorFlow), so all three
# see the machine as it is in that round. One JSON line per run.
#
#   git worktree add /tmp/before <commit>
#   bash experiments/reference_ab.sh /tmp/before /path/to/python-with-tensorflow 5 experiments/results/reference_ab.jsonl
#
# fvis: `python -m fvis model=resnet50v2 model.weights=null` (quality report on) with a fresh,
# empty compilation cache, run from each checkout (so `python -m fvis` imports that checkout's fvis)
# with this checkout's virtual environment; wall seconds of the whole process and the timings of
# its results.json. TensorFlow: `experiments/bench.py method=tf_seed job=reference` (the seed's code
# in its own process; `tf_process_s` is that process' wall time).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs || true)
before=$(cd "$1" && pwd); tf_python=$2; rounds=${3:-5}; out=$(realpath -m "${4:-$here/experiments/results/reference_ab.jsonl}")
python=${FVIS_PYTHON:-$here/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for round in $(seq 1 "$rounds"); do
  for variant in now before tf; do
    if [ "$variant" = tf ]; then
      (cd "$here" && "$python" experiments/bench.py method=tf_seed job=reference tf_python="$tf_python" \
        out="$work/tf.json" hydra.run.dir="$work/tf" > /dev/null 2>&1)
      "$python" -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({'variant': 'tf', 'round': $round, 'tf_process_s': r.get('tf_process_s'), 'job_s': r.get('job_s'),
                  'load': r.get('loadavg_1min')}))" "$work/tf.json" >> "$out"
      continue
    fi
    tree=$here; [ "$variant" = before ] && tree=$before
    rm -rf "$work/cache" "$work/run"; mkdir -p "$work/cache"
    start=$(date +%s.%N)
    (cd "$tree" && "$python" -m fvis model=resnet50v2 model.weights=null compilation_cache="$work/cache" \
      hydra.run.dir="$work/run" > /dev/null 2>&1)
    end=$(date +%s.%N)
    "$python" -c "
import json, os, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({'variant': '$variant', 'round': $round, 'commit': sys.argv[2], 'cpu': '$model', 'cores': os.cpu_count(),
                  'wall_s': $end - $start,
                  **r['timings'], 'load': os.getloadavg()[0]}))" "$work/run/results.json" \
      "$(git -C "$tree" rev-parse --short HEAD)" >> "$out"
  done
done
