#!/usr/bin/env bash
# Table 1 at the paper's schedule (issue 24): one prepared device command runs the cells that fit,
# each the unchanged command of its config (20,000 iterations, the paper's final evaluation:
# 5 ConvNets x 1000 epochs, release schedule) plus periodic ConvNet evaluations for the curve.
#
#   bash benchmarks/gpu_prepare.sh IDM-CHECKOUT       # here, once: stage .carry/ (wheels, CIFAR-10)
#   device run, carry [".carry"], timeout_s 590:
#     bash benchmarks/paper_cells.sh "$OUT"
#   DRY_RUN=1 bash benchmarks/paper_cells.sh /tmp/x   # toy sizes on the CPU (the test suite runs this)
#
# Order (issue 32: what fits first): every Random real-image cell (`--mode=baseline`, an
# evaluation only), then every DM cell (`:<ipc>,dm`), then every IDM cell, each over CELLS
# (default CIFAR-10 IPC 1, 10, 50, then CIFAR-100 IPC 1, 10 where $IDM_CIFAR100 or
# .carry/cifar100*.tar.gz gives the data: the device has no network). METHODS="dm idm" picks
# methods. Each cell's command adds only --workdir and --config.eval.interval=$CURVE_INTERVAL
# (default 5000: 300-epoch evaluations at 5k, 10k, 15k; eval.* does not change the condensed set).
#
# Time: everything, installs included, ends within TOTAL_LIMIT seconds (default 560: 30 s inside
# the call's timeout_s of 590); RESERVE (40) of them are kept for the report and the archives.
# A cell starts only when its estimate fits in what is left, else one line says why, e.g.
#   skip cifar10 ipc10 idm: 19961 its x 0.101 s/it = 2016 s + 120 s fixed > 412 s left
# The estimate: its remaining iterations x its pace + FIXED_S (default 120: start-up, compilation,
# the curve's and the final evaluation; a Random cell is FIXED_S alone). The pace is the one an
# earlier call measured (cell.json), else a condensation cell is started and its first PREFIX_ITS
# (30) iterations after compiling are timed; if the estimate then does not fit, the run is stopped
# there (SIGTERM: it checkpoints, so a later call on the same warm machine resumes from the
# prefix). PACE_S_PER_IT (0.1, or idm=0.1,dm=0.02) replaces the measured pace (the tests force a
# skip or a run with it). The workdirs live in $CELLS_ROOT (default runs/paper_cells, git-ignored,
# kept between calls to a warm machine; a checkpoint, ~250 MB at CIFAR-10, is too large to come
# back). IDM needs 20,000 x ~0.1 s on an H200: no IDM cell fits one call. Finished cells are skipped.
#
# What comes back ($OUT holds at most 8 files at every moment, each under 16 MiB, each written
# whole: a temporary, then a rename): table1.md (paper IDM/DM/Random beside idm_jax's, how each
# cell ran, the periodic evaluations), curve.png (accuracy vs iteration, IDM and DM), timings.txt,
# devices.txt, results.tar.gz (each cell's config, metrics, results, cell.json, log, png, and the
# finished cells' synthetic.npz that fit) and sets_2/3.tar.gz for sets that did not fit; the
# table and archives are rewritten as soon as a cell finishes. Then here:
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
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/timings.txt"; }

if [ -n "${DRY_RUN:-}" ]; then
  # The same commands at toy sizes: the digits (configs/quick.py), 4 iterations (DRY_ITERATIONS),
  # 2 x 2-epoch nets. The cells live beside $out, not in it (only $out's files come back).
  root=${CELLS_ROOT:-$out.cells}
  cells=${CELLS:-digits:1}
  curve=${CURVE_INTERVAL:-2}
  fixed=${FIXED_S:-20} prefix=${PREFIX_ITS:-1}
  extra=(--config.idm.iterations="${DRY_ITERATIONS:-4}" --config.eval.epochs=2 --config.eval.num_seeds=2
         --config.eval.compare_random=False
         --config.eval.interval_epochs=1 --config.log_every=2 --config.checkpoint_every=2)
else
  source benchmarks/device_setup.sh && device_setup  # wheels, the project, IDM_CIFAR10/100, the compile cache
  root=${CELLS_ROOT:-runs/paper_cells}
  cells=${CELLS:-cifar10:1 cifar10:10 cifar10:50 cifar100:1 cifar100:10}
  curve=${CURVE_INTERVAL:-5000}
  fixed=${FIXED_S:-120} prefix=${PREFIX_ITS:-30}
  extra=()
fi
mkdir -p "$root"

$PY -c "import jax, platform; print(jax.__version__, jax.devices(), platform.processor())" >"$root/devices.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$root/devices.txt" 2>/dev/null
cp "$root/devices.txt" "$out/devices.txt.tmp" && mv -f "$out/devices.txt.tmp" "$out/devices.txt"
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
device=${device:-CPU $(uname -m), $(nproc) cores}
log "devices: $(head -c 300 "$out/devices.txt")"

$PY benchmarks/paper_cells.py cells --root="$root" --out="$out" --cells="$cells" \
  --methods="${METHODS:-random dm idm}" --start="$start" --deadline=$(( start + total - reserve )) \
  --min-cell="${MIN_CELL:-60}" --fixed="$fixed" --prefix="$prefix" --pace="${PACE_S_PER_IT:-}" \
  --curve="$curve" --device="$device" --extra="${extra[*]}" || {
  log "the cells' loop failed: the report and archives of what is there"
  $PY benchmarks/paper_cells.py report --root="$root" --out="$out"
  $PY benchmarks/paper_cells.py pack --root="$root" --out="$out" | tee -a "$out/timings.txt"
}
log "done"
