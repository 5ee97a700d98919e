#!/usr/bin/env bash
# Table 1 as a GPU job with a wall-clock limit and a cap on what it returns (docs/GPU_JOB.md):
# install what the machine lacks, run `main.py --mode=table1` within what is left of the limit,
# and copy the table and the finished sets into DEST as they come.
#
#   bash benchmarks/gpu_prepare.sh IDM-CHECKOUT     # beforehand, on a machine with a network
#   bash benchmarks/gpu_table1.sh DEST              # on the GPU machine
#   DRY_RUN=1 bash benchmarks/gpu_table1.sh DEST    # the digits at toy sizes on the CPU (tests)
#   SHOW=1 bash benchmarks/gpu_table1.sh DEST       # print the table1 command only
#
# Knobs (environment): TOTAL_S (560: seconds for everything, installs included), RESERVE_S (20:
# of them, kept after the cells), CELLS (cifar10:10,cifar10:1,cifar10:50, and cifar100:1,10 when
# $IDM_CIFAR100 names its archive), METHODS (random,dm,idm), ORDER (cifar10:10:idm: the paper's
# headline cell first when it fits), TUNE_S (90: step variants timed first), ITERATIONS (20000),
# PACE (s/iteration instead of the tuning's and docs/gpu_speed.json's, e.g. idm=0.02,dm=0.005),
# MAX_FILES and MAX_MB (the cap on what DEST may hold: 8 files of 16 MB), CELLS_ROOT (the cells'
# folders, runs/table1: kept between jobs on the same machine, so a later job resumes them).
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${1:?usage: gpu_table1.sh DEST}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*"; }

if [ -n "${DRY_RUN:-}" ]; then  # the same mode at toy sizes: cells, iterations, evaluation
  config=configs/quick.py cells=${CELLS:-quick:1} order=${ORDER:-} tune=${TUNE_S:-0}
  iterations=${ITERATIONS:-2} pace=${PACE:-idm=5,dm=5}  # untuned: a CPU's pace at toy sizes, generous
  extra=(--config.eval.epochs=2 --config.eval.scores=False --config.table1.startup_s=5)
  root=${CELLS_ROOT:-$dest.cells}  # beside DEST, not in it: DEST holds only what is returned
else
  if [ -z "${SHOW:-}" ]; then
    source benchmarks/device_setup.sh && device_setup  # wheels, this project, the staged data
  fi
  config=configs/cifar10.py order=${ORDER:-cifar10:10:idm} tune=${TUNE_S:-90} iterations=${ITERATIONS:-20000}
  pace=${PACE:-}
  cells=${CELLS:-cifar10:10,cifar10:1,cifar10:50}
  [ -z "${CELLS:-}" ] && [ -n "${IDM_CIFAR100:-}" ] && [ -e "$IDM_CIFAR100" ] && cells+=",cifar100:1,cifar100:10"
  extra=()
  root=${CELLS_ROOT:-runs/table1}
fi
budget=$(( ${TOTAL_S:-560} - ${RESERVE_S:-20} - ($(date +%s) - start) ))
cmd=($PY main.py --mode=table1 --config="$config" --workdir="$root"
     --config.table1.cells="$cells" --config.table1.methods="${METHODS:-random,dm,idm}"
     --config.table1.order="$order" --config.table1.iterations="$iterations"
     --config.table1.budget_s="$budget" --config.table1.tune_s="$tune" --config.table1.pace="$pace"
     --config.table1.export_dir="$dest" --config.table1.export_max_files="${MAX_FILES:-8}"
     --config.table1.export_max_mb="${MAX_MB:-16}" "${extra[@]}")
if [ -n "${SHOW:-}" ]; then
  echo "${cmd[*]}"
  exit 0
fi
mkdir -p "$dest" "$root"
log "table1 within ${budget}s: ${cmd[*]}"
"${cmd[@]}" >"$root/main.log" 2>&1
rc=$?
grep -v '^[IWE][0-9]' "$root/main.log" | tail -40
log "done rc=$rc"
exit $rc
