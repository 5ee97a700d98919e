#!/usr/bin/env bash
# One prepared GPU check: install what the device image lacks, then measure and write every figure.
#
#   bash benchmarks/gpu_prepare.sh                 # here, once: stage .carry/ (wheels, release, CIFAR-10)
#   device run, carry [".carry"], timeout_s 590:
#     bash benchmarks/gpu_check.sh "$OUT"
#   DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/x  # tiny CPU settings, no installs (the test suite runs this)
#   CHECK=speed bash benchmarks/gpu_check.sh "$OUT"  # instead: the step's profile and speed (issue 23,
#                  benchmarks/gpu_speed.py: ~8.5 min; brings back gpu_speed.json, gpu_speed.md, timings.txt,
#                  devices.txt, results.tar.gz); SPEED_LIMITS="eval=60,..." overrides its parts' limits
#
# Budget: about 9 minutes on a fresh H100/H200 (device time is ~15 min a session, start-up
# included). Each part has its own time limit and a failed or cut part does not stop the others,
# so one run always brings back something; the parity run's stages resume from what is written.
# Order = priority: the parity run beside the release (3 condensation seeds each, then evaluation
# budget by budget, then both evaluators on one set, timed), then the step speed at IPC 10/50/1.
# On an H200 (2026-11-27) the limits let seed 0 reach 200 iterations and seed 1 100; a later call
# adds seeds (RUNS=2,3): unpack its results.tar.gz beside the first's seed_<s>/ folders and run
# `release_parity.py --stage=report --seed=0,1,2,3` here to pool them. What comes back (8 files):
#   parity.md + parity.png (pooled over the seeds), timings.txt (every part's start/end/rc),
#   condense_speed.md, devices.txt, results.tar.gz (every log, table, json and the largest-budget
#   synthetic sets of each run).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out/logs"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/timings.txt"; }
part() {  # part <name> <seconds> <command...>: run with a time limit, keep going on failure
  local name=$1 limit=$2; shift 2
  log "start $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/logs/$name.out" 2>"$out/logs/$name.log"
  local rc=$?
  log "end $name rc=$rc"
  [ $rc -ne 0 ] && tail -5 "$out/logs/$name.log"
  return 0
}

if [ -n "${DRY_RUN:-}" ]; then
  # The same commands at toy sizes on whatever JAX sees (CPU in the test suite).
  cfg=quick ipcs=1 steps=1 source=digits budgets=0,1 epochs=1 seeds=1 runs=0,1 release="" IPC=1
  limits=(100 0 0 200 0 200)  # idm_jax, release, convert, eval, cross, condense_speed
else
  source benchmarks/device_setup.sh && device_setup  # wheels, the project, IDM_CIFAR10, the compile cache
  cfg=cifar10 ipcs=${SPEED_IPCS:-10,50,1} steps=5 source=$IDM_CIFAR10 budgets=${BUDGETS:-0,50,100,200} epochs=300
  seeds=3 runs=${RUNS:-0,1,2} release=$PWD/.carry/IDM
  # idm_jax, release, convert, eval, cross, condense_speed (seconds; 0 skips a part). A second,
  # shorter call can pick other settings, e.g. IPC=1 BUDGETS=0,25 RUNS=0 LIMITS="70 70 10 50 0 0".
  read -r -a limits <<<"${LIMITS:-110 160 15 110 35 50}"
fi
ipc=${IPC:-10}

$PY -c "import jax, platform; print(jax.__version__, jax.devices(), platform.processor())" >"$out/devices.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$out/devices.txt" 2>/dev/null
log "devices: $(head -c 300 "$out/devices.txt")"
# Decode the dataset once (the cache serves every later process).
[ -z "${DRY_RUN:-}" ] && $PY -c "from idm_jax import data; data.load_dataset('$source', normalization='cifar10')"

if [ "${CHECK:-parity}" = speed ]; then  # each part of gpu_speed.py has its own limit inside
  if [ -n "${DRY_RUN:-}" ]; then
    speed=(--dry-run --steps=2 --dispatch=2 --trace-steps=2 --eval-epochs=1)
  else
    speed=(--release-python="$PY")
    [ -d "$release" ] && speed+=(--release="$release")
  fi
  part gpu_speed 570 $PY benchmarks/gpu_speed.py --out="$out/speed" --limits="${SPEED_LIMITS:-}" --total=555 \
    "${speed[@]}"
  cp "$out/speed/gpu_speed.json" "$out/speed/gpu_speed.md" "$out/" 2>/dev/null
  (cd "$out" && tar -czf results.tar.gz logs speed/parts)
  rm -rf "$out/logs" "$out/speed"
  log "done"
  exit 0
fi

parity=($PY benchmarks/release_parity.py --root="$out/parity_run" --config=$cfg --ipc=$ipc
        --budgets=$budgets --epochs=$epochs --seeds=$seeds --seed=$runs)
part parity_idm_jax "${limits[0]}" "${parity[@]}" --stage=data,idm_jax
if [ -n "$release" ] && [ "${limits[1]}" != 0 ]; then
  part parity_release "${limits[1]}" "${parity[@]}" --stage=release --release="$release" --release-python=$PY
  # A release run cut by its limit left snapshots: convert them (no --release: nothing is rerun).
  part parity_convert "${limits[2]}" "${parity[@]}" --stage=release
fi
part parity_eval "${limits[3]}" "${parity[@]}" --stage=eval
[ -n "$release" ] && [ "${limits[4]}" != 0 ] && part parity_cross "${limits[4]}" "${parity[@]}" --stage=cross \
  --release="$release" --release-python=$PY
part parity_report 20 "${parity[@]}" --stage=report
cp "$out/parity_run/parity.md" "$out/parity_run/parity.png" "$out/" 2>/dev/null

if [ "${limits[5]}" != 0 ]; then
  part condense_speed "${limits[5]}" $PY benchmarks/condense_speed.py --config=$cfg --ipc=$ipcs --steps=$steps
  cp "$out/logs/condense_speed.out" "$out/condense_speed.md"
fi

# Everything small in one archive (the files that come back are few): logs, tables, json, and
# the largest-budget synthetic set of each run. Not the data, checkpoints or the release's work dir.
top=${budgets##*,}
(cd "$out" && find logs parity_run \( -name '*.out' -o -name '*.log' -o -name '*.md' -o -name '*.json' \
   -o -name '*.png' -o -name "snap_$top.npz" -o -name "synthetic_$top.npz" \) \
   -not -path '*/work/*' -not -path '*/run/checkpoints/*' -print0 | tar -czf results.tar.gz --null -T -)
rm -rf "$out/logs"
[ -n "${DRY_RUN:-}" ] || rm -rf "$out/parity_run"  # only $OUT's top files come back
log "done"
