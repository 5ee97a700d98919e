#!/usr/bin/env bash
# One prepared GPU check: install what the device image lacks, then measure and write every figure.
#
#   bash benchmarks/gpu_prepare.sh                 # here, once: stage .carry/ (wheels, release, CIFAR-10)
#   device run, carry [".carry"], timeout_s 560:
#     bash benchmarks/gpu_check.sh "$OUT"
#   DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/x  # tiny CPU settings, no installs (the test suite runs this)
#
# Budget: under 9 minutes on a fresh H100/H200 (device time is ~15 min a session, start-up
# included). Each part has its own time limit and a failed part does not stop the others, so
# one run always brings back something. Figures land in OUTDIR as markdown tables:
#   devices.txt, condense_speed.md, evaluate_speed.md, parity.md (+ parity.png), timings.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/timings.txt"; }
part() {  # part <name> <seconds> <command...>: run with a time limit, keep going on failure
  local name=$1 limit=$2; shift 2
  log "start $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.md" 2>"$out/$name.log"  # parity.md is replaced by the final table
  local rc=$?
  log "end $name rc=$rc"
  [ $rc -ne 0 ] && tail -5 "$out/$name.log"
  return 0
}

if [ -n "${DRY_RUN:-}" ]; then
  # The same commands at toy sizes on whatever JAX sees (CPU in the test suite).
  cfg=quick ipcs=1 steps=1 source=digits budgets=0,1 epochs=1 seeds=1 release=""
else
  if ls .carry/whl/*.whl >/dev/null 2>&1; then  # packages the device image lacks
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -m pip install -q --no-deps --no-build-isolation -e . || log "editable install failed; running from the tree"
  export IDM_CIFAR10=$PWD/.carry/cifar10-jpeg.tar.gz
  cfg=cifar10 ipcs=1,10,50 steps=5 source=$IDM_CIFAR10 budgets=0,10,20 epochs=50 seeds=3
  release=$PWD/.carry/IDM
fi

$PY -c "import jax, platform; print(jax.__version__, jax.devices(), platform.processor())" >"$out/devices.txt" 2>&1
log "devices: $(head -c 300 "$out/devices.txt")"
# Decode the dataset once (the cache serves every later process).
[ -z "${DRY_RUN:-}" ] && $PY -c "from idm_jax import data; data.load_dataset('$source', normalization='cifar10')"

part condense_speed 200 $PY benchmarks/condense_speed.py --config=$cfg --ipc=$ipcs --steps=$steps
if [ -n "${DRY_RUN:-}" ]; then
  part evaluate_speed 120 $PY benchmarks/evaluate_speed.py --source=$source --modes=map/host --epochs=1 --seeds=1 \
    --ipc=1 --no-test
  part parity 200 $PY benchmarks/release_parity.py --root="$out/parity_run" --config=quick --ipc=1 \
    --budgets=$budgets --epochs=$epochs --seeds=$seeds --stage=data,idm_jax,eval,report
else
  part evaluate_speed 90 $PY benchmarks/evaluate_speed.py --source=$source --modes=vmap/device,map/device --epochs=5
  part parity 240 $PY benchmarks/release_parity.py --release="$release" --release-python=$PY \
    --root="$out/parity_run" --budgets=$budgets --epochs=$epochs --seeds=$seeds
fi
cp "$out/parity_run/parity.md" "$out/parity_run/parity.png" "$out/" 2>/dev/null  # the final table
log "done"
