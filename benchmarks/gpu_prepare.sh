#!/usr/bin/env bash
# Stages .carry/ for benchmarks/gpu_check.sh (run here, on the CPU machine, once per session):
#   .carry/whl/      wheels the device image lacks (ml-collections, tensorboardX; for the release:
#                    kornia, torchnet and visdom with their small needs), for Python 3.12 x86_64
#   .carry/IDM/      a checkout of the authors' release (github uitrbn/IDM), never committed
#   .carry/cifar10-jpeg.tar.gz  the CIFAR-10 archive named by $IDM_CIFAR10 (docs/RUNNING.md)
# .carry/ is listed in .git/info/exclude, so it travels only when a device run names it in carry.
#   IDM_CIFAR10=/path/to/cifar10-jpeg.tar.gz bash benchmarks/gpu_prepare.sh /path/to/IDM-checkout
set -euo pipefail
cd "$(dirname "$0")/.."
release=${1:?usage: gpu_prepare.sh RELEASE_CHECKOUT}
archive=${IDM_CIFAR10:?set IDM_CIFAR10 to the CIFAR-10 archive to carry (docs/RUNNING.md)}
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
mkdir -p .carry/whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in "ml-collections>=1.0,<2" "tensorboardX>=2.6,<3" kornia kornia-rs jsonpatch jsonpointer \
           websocket-client tornado; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .carry/whl "$pkg"
done
# visdom and torchnet 0.0.4 ship only as source archives: build their (pure Python) wheels here,
# in a throwaway venv with a setuptools that still has pkg_resources (visdom's setup.py imports
# it; setuptools 81 removed it) and the wheel package (older setuptools need it for bdist_wheel).
builder=$(mktemp -d)
trap 'rm -rf "$builder"' EXIT
python3 -m venv "$builder"
"$builder/bin/python" -m pip install -q "setuptools>=61,<70" wheel
"$builder/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w .carry/whl visdom "torchnet==0.0.4"
rm -rf .carry/IDM && cp -r "$release" .carry/IDM && rm -rf .carry/IDM/.git
cp "$archive" .carry/cifar10-jpeg.tar.gz
du -sh .carry
