#!/usr/bin/env bash
# Table 1 at the paper's schedule (issue 24): one prepared device command runs the cells in order,
# each the unchanged command of its config (20,000 iterations, the paper's final evaluation:
# 5 ConvNets x 1000 epochs, release schedule) plus periodic ConvNet evaluations for the curve.
#
#   bash benchmarks/gpu_prepare.sh IDM-CHECKOUT       # here, once: stage .carry/ (wheels, CIFAR-10)
#   device run, carry [".carry"], timeout_s 590:
#     bash benchmarks/paper_cells.sh "$OUT"
#   DRY_RUN=1 bash benchmarks/paper_cells.sh /tmp/x   # toy sizes on the CPU (the test suite runs this)
#
# Order (the issue's): CIFAR-10 IPC 10, 50, 1, then CIFAR-100 IPC 1, 10 (only where $IDM_CIFAR100 or
# .carry/cifar100*.tar.gz gives the data: the device has no network); at each IPC IDM, then DM
# (`:<ipc>,dm`), then Random real images (`--mode=baseline`). CELLS="cifar10:10 cifar10:1" and
# METHODS="idm dm" pick others. Each cell's command adds only --workdir and
# --config.eval.interval=$CURVE_INTERVAL (default 5000: 300-epoch evaluations at 5k, 10k, 15k; eval.*
# does not change the condensed set).
#
# Time: everything ends within TOTAL_LIMIT seconds (default 560; the device allows ~9.5 min a call).
# A cell gets what is left; cut by its limit (SIGTERM), the run checkpoints and stops, and the next
# call resumes it - on the same warm machine only: the workdirs live in $CELLS_ROOT (default
# runs/paper_cells, git-ignored, so it stays between calls to a warm machine) and a checkpoint
# (the model queue: ~250 MB at CIFAR-10) is too large to come back or be carried. A cell needs
# about 9 minutes on an H200 to finish in one call (20,000 x ~0.1 s + evaluation, measured
# 2026-11-27: it does not yet). Finished cells are skipped.
#
# What comes back (at most 8 files): table1.md (paper IDM/DM/Random beside idm_jax's, how each cell
# ran, the periodic evaluations), curve.png (accuracy vs iteration, IDM and DM), timings.txt,
# devices.txt, results.tar.gz (each cell's config, metrics, results, cell.json, log, png, and the
# finished cells' synthetic.npz that fit) and sets_<k>.tar.gz for sets that did not fit. Then here:
#   mkdir -p runs/paper_cells && tar -xzf results.tar.gz -C runs/paper_cells   # (and sets_*.tar.gz)
#   python -m idm_jax.publish runs/paper_cells/cifar10_ipc10_idm --cell=cifar10_ipc10_idm
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/paper_cells_out}}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
total=${TOTAL_LIMIT:-560}
reserve=${RESERVE:-40}     # seconds kept for the report and the archives
min_cell=${MIN_CELL:-60}   # a cell is not started with less than this left
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/timings.txt"; }

if [ -n "${DRY_RUN:-}" ]; then
  # The same commands at toy sizes: the digits (configs/quick.py), 4 iterations (DRY_ITERATIONS),
  # 2 x 2-epoch nets.
  root=${CELLS_ROOT:-$out/cells}
  cells=${CELLS:-digits:1}
  curve=${CURVE_INTERVAL:-2}
  extra=(--config.idm.iterations="${DRY_ITERATIONS:-4}" --config.eval.epochs=2 --config.eval.num_seeds=2
         --config.eval.compare_random=False
         --config.eval.interval_epochs=1 --config.log_every=2 --config.checkpoint_every=2)
else
  source benchmarks/device_setup.sh && device_setup  # wheels, the project, IDM_CIFAR10/100, the compile cache
  root=${CELLS_ROOT:-runs/paper_cells}
  cells=${CELLS:-cifar10:10 cifar10:50 cifar10:1 cifar100:1 cifar100:10}
  curve=${CURVE_INTERVAL:-5000}
  extra=()
fi
methods=${METHODS:-idm dm random}
mkdir -p "$root"

$PY -c "import jax, platform; print(jax.__version__, jax.devices(), platform.processor())" >"$out/devices.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$out/devices.txt" 2>/dev/null
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
device=${device:-CPU $(uname -m), $(nproc) cores}
log "devices: $(head -c 300 "$out/devices.txt")"

config_of() {  # dataset label -> config file
  case $1 in digits) echo configs/quick.py ;; *) echo "configs/$1.py" ;; esac
}
has_data() {  # the device has no network: CIFAR-100 needs an archive
  case $1 in cifar100) [ -n "${IDM_CIFAR100:-}" ] && [ -e "$IDM_CIFAR100" ] ;; *) true ;; esac
}

stop=""
for spec in $cells; do
  dataset=${spec%%:*} ipc=${spec##*:}
  if ! has_data "$dataset"; then
    log "skip $dataset IPC $ipc: no data on this machine (set IDM_CIFAR100 or stage .carry/cifar100*.tar.gz)"
    continue
  fi
  for method in $methods; do
    cell=${dataset}_ipc${ipc}_${method} wd=$root/${dataset}_ipc${ipc}_${method}
    state=$($PY benchmarks/paper_cells.py state --workdir="$wd")
    if [ "$state" = done ]; then log "$cell: done before"; continue; fi
    left=$(( total - reserve - ($(date +%s) - start) ))
    if [ "$left" -lt "$min_cell" ]; then stop=1; log "$cell: not started, ${left}s left (a later call runs it)"; break; fi
    config=$(config_of "$dataset"):$ipc
    case $method in
      idm)    args=(--config="$config" --workdir="$wd" --config.eval.interval="$curve") ;;
      dm)     args=(--config="$config,dm" --workdir="$wd" --config.eval.interval="$curve") ;;
      random) args=(--config="$config" --mode=baseline --config.baseline.method=random --workdir="$wd") ;;
    esac
    command="python main.py ${args[*]} ${extra[*]}"
    $PY benchmarks/paper_cells.py record --workdir="$wd" --command="${command% }" --device="$device"
    log "start $cell ($state, limit ${left}s): ${command% }"
    t0=$(date +%s)
    timeout -k 30 "$left" $PY main.py "${args[@]}" "${extra[@]}" >>"$wd/main.log" 2>&1
    rc=$?
    $PY benchmarks/paper_cells.py record --workdir="$wd" --command="${command% }" --device="$device" \
      --seconds=$(( $(date +%s) - t0 )) --rc=$rc
    log "end $cell rc=$rc ($($PY benchmarks/paper_cells.py state --workdir="$wd"))"
    [ $rc -ne 0 ] && tail -3 "$wd/main.log"
  done
  [ -n "$stop" ] && break
done

$PY benchmarks/paper_cells.py report --root="$root" --out="$out" || log "report failed"
$PY benchmarks/paper_cells.py pack --root="$root" --out="$out" | tee -a "$out/timings.txt"
log "done"
