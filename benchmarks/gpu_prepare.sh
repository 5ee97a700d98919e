#!/usr/bin/env bash
# Stages what a GPU job needs on a machine without a network (benchmarks/gpu_table1.sh,
# gpu_check.sh), in $STAGE (default .gpu_stage/); run it on a machine with a network, beforehand:
#   $STAGE/whl/      wheels the GPU machine's image lacks (ml-collections, tensorboardX; for the
#                    release: kornia, torchnet and visdom with their small needs), Python 3.12 x86_64
#   $STAGE/IDM/      a checkout of the authors' release (github uitrbn/IDM), never committed
#   $STAGE/cifar10-jpeg.tar.gz  the CIFAR-10 archive named by $IDM_CIFAR10 (docs/RUNNING.md)
# $STAGE is listed in .git/info/exclude: it is copied to the GPU machine with the checkout, never
# committed (docs/GPU_JOB.md).
#   IDM_CIFAR10=/path/to/cifar10-jpeg.tar.gz bash benchmarks/gpu_prepare.sh /path/to/IDM-checkout
set -euo pipefail
cd "$(dirname "$0")/.."
release=${1:?usage: gpu_prepare.sh RELEASE_CHECKOUT}
stage=${STAGE:-.gpu_stage}
archive=${IDM_CIFAR10:?set IDM_CIFAR10 to the CIFAR-10 archive to carry (docs/RUNNING.md)}
grep -qx "/$stage/" .git/info/exclude 2>/dev/null || echo "/$stage/" >> .git/info/exclude
mkdir -p "$stage"/whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in "ml-collections>=1.0,<2" "tensorboardX>=2.6,<3" kornia kornia-rs jsonpatch jsonpointer \
           websocket-client tornado; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$stage"/whl "$pkg"
done
# visdom and torchnet 0.0.4 ship only as source archives: build their (pure Python) wheels here,
# in a throwaway venv with a setuptools that still has pkg_resources (visdom's setup.py imports
# it; setuptools 81 removed it) and the wheel package (older setuptools need it for bdist_wheel).
builder=$(mktemp -d)
trap 'rm -rf "$builder"' EXIT
python3 -m venv "$builder"
"$builder/bin/python" -m pip install -q "setuptools>=61,<70" wheel
"$builder/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$stage"/whl visdom "torchnet==0.0.4"
rm -rf "$stage"/IDM && cp -r "$release" "$stage"/IDM && rm -rf "$stage"/IDM/.git
cp "$archive" "$stage"/cifar10-jpeg.tar.gz
du -sh "$stage"
