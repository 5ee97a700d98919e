#!/usr/bin/env bash
# Reruns every figure in docs/RESULTS.md, one benchmark after another.
#
#   bash benchmarks/run_all.sh            # hours on a 2-core CPU (docs/RESULTS.md#rerunning-everything); far less on a GPU
#
# Each table is printed and kept in runs/benchmarks/<date>/<name>.md, each
# benchmark's progress log beside it in <name>.log. Set PYTHON to choose the
# interpreter (default: python) and TORCH_PYTHON to an interpreter that has
# PyTorch to add the PyTorch comparison (benchmarks/torch_conv_speed.py). Set IDM_CIFAR10 to the
# CIFAR-10 archive (docs/RUNNING.md) for the images the figures used; unset, the benchmarks fall
# back to tfds:cifar10 or random pixels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
tables="runs/benchmarks/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$tables"

run() {  # run <name> <script> [args...]
  local name=$1; shift
  echo "== $name: $*"
  "$PYTHON" "$@" 2>"$tables/$name.log" | tee "$tables/$name.md"
}

run condense_speed benchmarks/condense_speed.py --ipc=1,10,50
run step_memory benchmarks/step_memory.py --classes=10,100 --ipc=1,10
run step_phases_ipc10 benchmarks/step_phases.py --ipc=10
run step_phases_ipc1 benchmarks/step_phases.py --ipc=1
run conv_speed benchmarks/conv_speed.py
if [[ -n "${TORCH_PYTHON:-}" ]]; then
  PYTHON=$TORCH_PYTHON run torch_conv_speed benchmarks/torch_conv_speed.py
fi
run augment_throughput benchmarks/augment_throughput.py
run evaluate_speed benchmarks/evaluate_speed.py --modes=map/host,vmap/host --epochs=2
run pipeline_ipc10 benchmarks/pipeline.py --config=cifar10 --ipc=10 --iterations=idm:40,dm:150 --epochs=300 --seeds=2
run pipeline_ipc1 benchmarks/pipeline.py --config=cifar10 --ipc=1 --iterations=idm:30,dm:100 --epochs=300 --seeds=2
run accuracy_digits -m pytest -q -m slow tests/test_integration.py -s
echo "tables in $tables"
