#!/usr/bin/env bash
# A GPU job with a wall-clock limit and a cap on what it returns (docs/GPU_JOB.md): install what the
# machine lacks, then measure and write every figure into DEST.
#
#   bash benchmarks/gpu_prepare.sh IDM-CHECKOUT    # beforehand, with a network: stage .gpu_stage/
#   bash benchmarks/gpu_check.sh DEST              # on the GPU machine: the parity run, then the step speed
#   CHECK=speed bash benchmarks/gpu_check.sh DEST  # instead: the step's profile and speed
#                  (benchmarks/gpu_speed.py; brings back gpu_speed.json, gpu_speed.md, timings.txt,
#                  devices.txt, results.tar.gz); SPEED_LIMITS="eval=60,..." overrides its parts'
#                  limits, SPEED_PARTS=cifar10_ipc10,eval picks parts
#   DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/x  # tiny CPU settings, no installs (the test suite runs this)
#
# Time: the whole job, installs included, ends by DEADLINE seconds (default 560) after its start:
# each part's limit is cut to what is left. DEST holds at every moment at most 8 files, each under
# 16 MiB and written whole (a copy beside its final name, then a rename), so whatever moment the
# job is stopped, DEST holds whole files. Logs, the parts' rows, traces, parity runs and data live
# in $WORK (default a fresh /tmp/gpu_check.*) and are archived into results.tar.gz at the end.
# With CHECK=speed a valid gpu_speed.json (all null) is in DEST before anything is installed, and
# gpu_speed.py rewrites it after each part.
#
# Each part has its own time limit and a failed or cut part does not stop the others, so one job
# always brings back something; the parity run's stages resume from what is written. Order =
# priority: the parity run beside the release (3 condensation seeds each, then evaluation budget by
# budget, then both evaluators on one set, timed), then the step speed at IPC 10/50/1. On an H200
# (2026-11-27) the limits let seed 0 reach 200 iterations and seed 1 100; a later job adds seeds
# (RUNS=2,3): unpack its results.tar.gz beside the first's seed_<s>/ folders and run
# `release_parity.py --stage=report --seed=0,1,2,3` to pool them. What comes back (8 files):
#   parity.md + parity.png (pooled over the seeds), timings.txt (every part's start/end/rc),
#   condense_speed.md, devices.txt, results.tar.gz (every log, table, json and the largest-budget
#   synthetic sets of each run).
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${1:?usage: gpu_check.sh DEST}
mkdir -p "$dest"
made_work=""
[ -z "${WORK:-}" ] && made_work=1
work=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$work/logs"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
deadline=${DEADLINE:-560}  # seconds from the start to the end of everything
archive_s=10               # of them, kept for the archive and the copies into DEST
cap=$(( 16 * 2**20 - 4096 ))  # bytes: the largest file that comes back, less a margin
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$dest/timings.txt"; }
left() { echo $(( deadline - archive_s - ($(date +%s) - start) )); }
pause_at() {  # test hook (tests/test_gpu_check.py): IDM_PAUSE_AT=<stage> waits here to be killed
  [ "${IDM_PAUSE_AT:-}" = "$1" ] || return 0
  echo "$1" >"$IDM_PAUSED"
  sleep 3600
}
move_in() {  # move_in FILE: into DEST under its own name, whole (a copy beside it, then a rename)
  local name size
  name=$(basename "$1")
  size=$(stat -c %s "$1" 2>/dev/null) || return 0
  if [ "$size" -gt "$cap" ]; then log "$name left out: $size bytes, over what comes back"; return 0; fi
  cp "$1" "$dest/$name.tmp" && pause_at "move:$name" && mv -f "$dest/$name.tmp" "$dest/$name"
}
part() {  # part <name> <seconds> <command...>: run with a time limit, keep going on failure
  local name=$1 limit=$2 now rc
  shift 2
  now=$(left)
  [ "$now" -lt "$limit" ] && limit=$now  # nothing runs past the deadline
  if [ "$limit" -lt 5 ]; then log "skip $name: ${now}s left before the deadline"; return 0; fi
  log "start $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" >"$work/logs/$name.out" 2>"$work/logs/$name.log"
  rc=$?
  log "end $name rc=$rc"
  [ $rc -ne 0 ] && tail -5 "$work/logs/$name.log"
  return 0
}
speed_command() {  # what a user types for this run: gpu_speed.json's "command"
  local v words="CHECK=speed"
  for v in DRY_RUN SPEED_LIMITS SPEED_PARTS DEADLINE; do
    [ -n "${!v:-}" ] && words+=" $v=${!v}"
  done
  echo "$words bash benchmarks/gpu_check.sh DEST"
}
null_record() {  # $dest/gpu_speed.json before anything runs: docs/gpu_speed.json's keys, all null
  $PY - "$dest" "$(speed_command)" "${DRY_RUN:-}" <<'PYTHON'
import datetime, json, os, sys
out, command, dry_run = sys.argv[1:]
with open("docs/gpu_speed.json") as f:
    record = json.load(f)
record.update(date=datetime.date.today().isoformat(), command=command, dry_run=bool(dry_run), details={},
              note="written before any part ran; gpu_speed.py rewrites it after each part")
with open(os.path.join(out, "gpu_speed.json.tmp"), "w") as f:
    json.dump(record, f, indent=1)
os.replace(os.path.join(out, "gpu_speed.json.tmp"), os.path.join(out, "gpu_speed.json"))
PYTHON
}
finish() {  # finish PATH...: $work's PATHs (relative) archived into $dest, then $work goes if made here
  (cd "$work" && tar -czf results.tar.gz "$@")
  if [ "$(stat -c %s "$work/results.tar.gz")" -gt "$cap" ]; then  # the logs outgrew it: the rows alone
    (cd "$work" && find "$@" -name '*.json*' -o -name '*.md' | tar -czf results.tar.gz -T -)
  fi
  move_in "$work/results.tar.gz"
  [ -n "$made_work" ] && rm -rf "$work"
  log "done"
}

[ "${CHECK:-parity}" = speed ] && null_record
pause_at setup
if [ -n "${DRY_RUN:-}" ]; then
  # The same commands at toy sizes on whatever JAX sees (CPU in the test suite).
  cfg=quick ipcs=1 steps=1 source=digits budgets=0,1 epochs=1 seeds=1 runs=0,1 release="" IPC=1
  read -r -a limits <<<"${LIMITS:-100 0 0 200 0 200}"  # idm_jax, release, convert, eval, cross, condense_speed
else
  source benchmarks/device_setup.sh && device_setup  # wheels, the project, IDM_CIFAR10, the compile cache
  cfg=cifar10 ipcs=${SPEED_IPCS:-10,50,1} steps=5 source=$IDM_CIFAR10 budgets=${BUDGETS:-0,50,100,200} epochs=300
  seeds=3 runs=${RUNS:-0,1,2} release=$PWD/${STAGE:-.gpu_stage}/IDM
  # idm_jax, release, convert, eval, cross, condense_speed (seconds; 0 skips a part). A second,
  # shorter call can pick other settings, e.g. IPC=1 BUDGETS=0,25 RUNS=0 LIMITS="70 70 10 50 0 0".
  read -r -a limits <<<"${LIMITS:-110 160 15 110 35 50}"
fi
ipc=${IPC:-10}

$PY -c "import jax, platform; print(jax.__version__, jax.devices(), platform.processor())" >"$work/devices.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$work/devices.txt" 2>/dev/null
move_in "$work/devices.txt"
log "devices: $(head -c 300 "$work/devices.txt")"
# Decode the dataset once (the cache serves every later process).
[ -z "${DRY_RUN:-}" ] && part decode 120 $PY -c "from idm_jax import data; data.load_dataset('$source', normalization='cifar10')"

if [ "${CHECK:-parity}" = speed ]; then  # each part of gpu_speed.py has its own limit inside
  if [ -n "${DRY_RUN:-}" ]; then
    speed=(--dry-run --steps=2 --dispatch=2 --trace-steps=2 --eval-epochs=1)
  else
    speed=(--release-python="$PY")
    [ -d "$release" ] && speed+=(--release="$release")
  fi
  [ -n "${SPEED_PARTS:-}" ] && speed+=(--parts="$SPEED_PARTS")
  budget=$(left)  # gpu_speed.py gets 5 s less: on SIGTERM it ends the part in flight and writes the record
  part gpu_speed "$budget" $PY benchmarks/gpu_speed.py --out="$work/speed" --publish="$dest" \
    --command="$(speed_command)" --limits="${SPEED_LIMITS:-}" --total=$(( budget - 5 )) "${speed[@]}"
  pause_at archive
  finish logs speed/parts
  exit 0
fi

parity=($PY benchmarks/release_parity.py --root="$work/parity_run" --config=$cfg --ipc=$ipc
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
move_in "$work/parity_run/parity.md"
move_in "$work/parity_run/parity.png"

if [ "${limits[5]}" != 0 ]; then
  part condense_speed "${limits[5]}" $PY benchmarks/condense_speed.py --config=$cfg --ipc=$ipcs --steps=$steps
  cp "$work/logs/condense_speed.out" "$work/condense_speed.md" && move_in "$work/condense_speed.md"
fi

# Everything small in one archive (the files that come back are few): logs, tables, json, and
# the largest-budget synthetic set of each run. Not the data, checkpoints or the release's work dir.
top=${budgets##*,}
mapfile -d '' small < <(cd "$work" && find logs parity_run \( -name '*.out' -o -name '*.log' -o -name '*.md' \
   -o -name '*.json' -o -name '*.png' -o -name "snap_$top.npz" -o -name "synthetic_$top.npz" \) \
   -not -path '*/work/*' -not -path '*/run/checkpoints/*' -print0)
finish "${small[@]}"
