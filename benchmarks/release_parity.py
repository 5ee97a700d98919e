"""idm_jax beside the authors' release at equal budget: same data, same iterations, same evaluator.

    python benchmarks/release_parity.py --release=/tmp/IDM --release-python=/tmp/release-venv/bin/python \\
        --root=runs/parity --ipc=10 --budgets=0,10,25,50 --epochs=100 --seeds=3

--release is a checkout of github uitrbn/IDM (never vendored here); --release-python a Python
with torch, torchvision, kornia, scipy and torchnet (see docs/RESULTS.md for the set-up). Stages,
each skipped when its outputs already exist, so a rerun resumes where the last one stopped:

1. data:     the CIFAR arrays idm_jax loads (config's data.source) -> ROOT/data.npz
2. idm_jax:  a child process condenses with the config's release settings up to max(budgets),
             copying synthetic.npz at every budget (ROOT/idm_jax/snap_<b>.npz) and writing
             ROOT/idm_jax/timings.json (seconds of every iteration, peak resident memory)
3. release:  benchmarks/parity/release_side.py runs the release's own script on data.npz and
             snapshots its synthetic set at the same budgets (ROOT/release/snap_<b>.npz, timings)
4. eval:     every snapshot of both is scored by idm_jax's evaluator with the same seeds and
             epochs (ROOT/eval/<impl>_<b>/results.json), largest and smallest budgets first
5. cross:    idm_jax's largest-budget set is also scored by the release's own evaluate_synset
6. report:   ROOT/parity.md + parity.json + parity.png, copied to --docs (after every stage)

Budget 0 is the init (real images, each of the 4 quadrants a downscaled real image).

--seed=0,1,2 repeats the condensation of both implementations with each seed (ROOT/seed_<s>/, one
shared ROOT/data.npz) and writes a pooled ROOT/parity.md whose spread is over the runs: without it
the table's error bars hold only the evaluation networks' noise, not the condensation's own (which
real images each run draws). Each stage loops over the seeds, so a run cut short by a time limit
leaves whole stages for every seed it reached; evaluation goes budget by budget across the seeds.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import common  # noqa: E402,F401  (sets XLA:CPU's memory scheduler before JAX starts)
from benchmarks.parity import report  # noqa: E402
from benchmarks.parity.release_side import peak_rss_gib, write_json  # noqa: E402  (numpy-only helpers)

RELEASE_SIDE = os.path.join(ROOT, "benchmarks", "parity", "release_side.py")
RELEASE_DATASET = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise SystemExit(f"--budgets: expected comma-separated iteration counts, got {text!r}") from None
    if not budgets or budgets[0] < 0:
        raise SystemExit(f"--budgets: expected counts >= 0, got {text!r}")
    return budgets


def eval_order(budgets: list[int]) -> list[int]:
    """Largest and smallest budget first (the two ends of the curve), then the rest ascending."""
    ends = [budgets[-1]] + ([budgets[0]] if len(budgets) > 1 else [])
    return ends + [b for b in budgets if b not in ends]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seed: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seed: expected distinct integers, got {text!r}")
    return seeds


def seed_runs(args) -> list[argparse.Namespace]:
    """One namespace per condensation seed: ROOT itself for a single seed, else ROOT/seed_<s>."""
    seeds = parse_seeds(args.seed)
    runs = []
    for seed in seeds:
        run = copy.copy(args)
        run.seed = seed
        run.root = args.root if len(seeds) == 1 else os.path.join(args.root, f"seed_{seed}")
        run.data = os.path.join(args.root, "data.npz")
        os.makedirs(run.root, exist_ok=True)
        runs.append(run)
    return runs


def make_config(args, iterations: int):
    c = importlib.import_module(f"configs.{args.config}").get_config(str(args.ipc))
    c.seed = int(args.seed)
    c.idm.iterations = max(iterations, 1)
    c.eval.at_end = False
    c.eval.epochs = args.epochs
    c.eval.num_seeds = args.seeds
    c.eval.archs = "ConvNet"
    c.log_every = 1  # every iteration's time lands in metrics.jsonl
    c.checkpoint_every = 1_000_000  # the runner saves at the end of each call
    c.checkpoint_every_minutes = 0.0
    return c


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# stages

def stage_data(args, ds) -> str:
    path = args.data
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            np.savez(f, train_images=ds.train_images, train_labels=ds.train_labels,
                     test_images=ds.test_images, test_labels=ds.test_labels,
                     class_names=np.asarray(ds.class_names, dtype=str), mean=ds.mean, std=ds.std)
        os.replace(path + ".tmp", path)
    return path


def jax_condense(args) -> None:
    """Child process: condense to every budget in turn (resumable via the runner's checkpoints)."""
    from idm_jax import runner  # pylint: disable=g-import-not-at-top

    logging.set_verbosity(logging.INFO)
    out = os.path.join(args.root, "idm_jax")
    workdir = os.path.join(out, "run")
    os.makedirs(workdir, exist_ok=True)
    budgets = parse_budgets(args.budgets)
    start = time.perf_counter()
    for budget in budgets:
        snap = os.path.join(out, f"snap_{budget}.npz")
        if os.path.exists(snap):
            continue
        summary = runner.run_condensation(make_config(args, budget), workdir,
                                          max_steps=budget - _checkpoint_step(workdir))
        if summary.get("interrupted") or summary["step"] != budget:
            raise SystemExit(f"idm_jax condensation stopped at iteration {summary.get('step')}")
        shutil.copyfile(summary["synthetic"], snap + ".tmp")
        os.replace(snap + ".tmp", snap)
        print(f"[parity] idm_jax snapshot after {budget} iterations -> {snap}", flush=True)
    import jax  # pylint: disable=g-import-not-at-top

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    seconds = [1.0 / r["it_per_s"] for r in rows if r.get("it_per_s", 0) > 0]
    write_json(os.path.join(out, "timings.json"), {
        "implementation": "idm_jax", "budgets": budgets, "iteration_seconds": seconds,
        "seconds_this_call": time.perf_counter() - start,
        "peak_rss_gib": peak_rss_gib(),
        "jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "host": cpu_name(), "cores": os.cpu_count()})


def _checkpoint_step(workdir: str) -> int:
    ckpt = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps, default=0)


def stage_jax(args) -> None:
    out = os.path.join(args.root, "idm_jax")
    if os.path.exists(os.path.join(out, "timings.json")):
        return
    argv = [sys.executable, os.path.abspath(__file__), "--stage=jax-condense", *_common_argv(args)]
    subprocess.run(argv, check=True)


def stage_release(args, ds) -> None:
    out = os.path.join(args.root, "release")
    budgets = parse_budgets(args.budgets)
    timings = load_json(os.path.join(out, "timings.json"))
    if not (timings and timings.get("complete", True)):  # none yet, or written by a run cut short
        if not args.release:  # snapshots already written (e.g. by a run still going) are converted
            print("[parity] no --release given: not running the release's condensation", flush=True)
        else:
            subprocess.run([args.release_python, RELEASE_SIDE, "condense", f"--release={args.release}",
                            f"--data={args.data}", f"--out={out}",
                            f"--dataset={RELEASE_DATASET[args.config]}", f"--ipc={args.ipc}",
                            f"--budgets={args.budgets}", f"--seed={args.seed}"], check=True)
    for budget in budgets:
        synthetic = os.path.join(out, f"synthetic_{budget}.npz")
        snap = os.path.join(out, f"snap_{budget}.npz")
        if os.path.exists(snap) and not os.path.exists(synthetic):
            report.release_snapshot_to_synthetic(snap, synthetic, mean=ds.mean, std=ds.std,
                                                 class_names=ds.class_names, partition_factor=2,
                                                 dataset=ds.name)


def synthetic_path(args, impl: str, budget: int) -> str:
    name = f"snap_{budget}.npz" if impl == "idm_jax" else f"synthetic_{budget}.npz"
    return os.path.join(args.root, impl, name)


def stage_eval(args, runs) -> None:
    """Budget by budget (the curve's two ends first), every seed's run, both implementations."""
    from idm_jax import evaluate_set  # pylint: disable=g-import-not-at-top

    for budget in eval_order(parse_budgets(args.budgets)):
        for run in runs:
            for impl in report.IMPLEMENTATIONS:
                synthetic = synthetic_path(run, impl, budget)
                workdir = os.path.join(run.root, "eval", f"{impl}_{budget}")
                if os.path.exists(os.path.join(workdir, "results.json")) or not os.path.exists(synthetic):
                    continue
                print(f"[parity] seed {run.seed}: evaluating {impl} after {budget} iterations", flush=True)
                evaluate_set.run_evaluation(make_config(run, budget), workdir, synthetic)
                write_reports(args, runs)


def stage_cross(args) -> None:
    budget = parse_budgets(args.budgets)[-1]
    out = os.path.join(args.root, "eval", f"release_evaluator_idm_jax_{budget}.json")
    if os.path.exists(out) or not args.release:
        return
    subprocess.run([args.release_python, RELEASE_SIDE, "evaluate", f"--release={args.release}",
                    f"--data={args.data}", f"--out={out}",
                    f"--dataset={RELEASE_DATASET[args.config]}",
                    f"--synthetic={synthetic_path(args, 'idm_jax', budget)}",
                    f"--epochs={args.epochs}", f"--seeds={args.seeds}"], check=True)


def cross_check(run, rows) -> dict | None:
    """The release's evaluate_synset beside idm_jax's evaluator on idm_jax's largest-budget set."""
    top = parse_budgets(run.budgets)[-1]
    release_eval = load_json(os.path.join(run.root, "eval", f"release_evaluator_idm_jax_{top}.json"))
    if not release_eval:
        return None
    own = next((r.get("idm_jax") for r in rows if r["budget"] == top), None)
    own_results = load_json(os.path.join(run.root, "eval", f"idm_jax_{top}", "results.json"))
    return {"set": f"idm_jax's set after {top} iterations (seed {run.seed})", "idm_jax": own,
            "release": release_eval, "release_pass_seconds": float(np.median(release_eval["seconds_per_pass"])),
            # per network: the evaluator reports seconds per epoch for all its seeds together
            "idm_jax_pass_seconds": (own_results["archs"]["ConvNet"]["seconds_per_epoch"]
                                     / own_results["archs"]["ConvNet"]["num_seeds"]
                                     if own_results else float("nan"))}


def run_timings(run) -> dict:
    timings = {impl: load_json(os.path.join(run.root, impl, "timings.json")) for impl in report.IMPLEMENTATIONS}
    return {k: v for k, v in timings.items() if v}


def ran_on(timings: dict) -> str:
    """Where the condensations ran, from their timings.json (not the machine writing the report)."""
    parts = []
    if "idm_jax" in timings:
        t = timings["idm_jax"]
        cores = f", {t['cores']} cores" if "cores" in t else ""
        parts.append(f"idm_jax on {t['host']}{cores}, {t.get('device', t['backend'])} (jax {t['jax']})")
    if "release" in timings:
        t = timings["release"]
        parts.append(f"release on {t.get('device', 'cpu')} (torch {t['torch']}, {t.get('threads', '?')} threads)")
    return "; ".join(parts) or "not yet"


def write_report(args, rows, timings, cross, where: str, runs_note: str = "", show: bool = True) -> None:
    """ROOT/parity.md, parity.json and parity.png (and copies in --docs) from measured rows."""
    header = (f"{args.config} IPC {args.ipc}, evaluation: ConvNet, {args.epochs} epochs (release schedule), "
              f"{args.seeds} networks per set{runs_note}. Condensed: {where}. "
              f"Written {time.strftime('%Y-%m-%d %H:%M')} on {cpu_name()}, {os.cpu_count()} cores")
    text = report.markdown(rows, timings, cross, header)
    with open(os.path.join(args.root, "parity.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(args.root, "parity.json"),
               {"rows": rows, "timings": timings, "cross_check": cross, "args": vars(args)})
    png = report.plot(rows, os.path.join(args.root, "parity.png"),
                      f"{args.config} IPC {args.ipc}: idm_jax vs the authors' release "
                      f"({args.epochs} epochs x {args.seeds} nets{runs_note})")
    if args.docs:
        stem = f"parity_{args.config}_ipc{args.ipc}"
        os.makedirs(args.docs, exist_ok=True)
        shutil.copyfile(os.path.join(args.root, "parity.md"), os.path.join(args.docs, stem + ".md"))
        if png:
            shutil.copyfile(png, os.path.join(args.docs, stem + ".png"))
    if show:
        print(text, flush=True)


def write_reports(args, runs) -> None:
    """One report per seed's run; with several seeds also the pooled one at ROOT (copied to --docs)."""
    budgets = parse_budgets(args.budgets)
    measured = [(report.accuracy_rows(run.root, budgets), run_timings(run)) for run in runs]
    for run, (rows, timings) in zip(runs, measured):
        if len(runs) > 1:  # --docs gets the pooled report only
            run = copy.copy(run)
            run.docs = ""
        write_report(run, rows, timings, cross_check(run, rows), ran_on(timings), show=len(runs) == 1)
    if len(runs) > 1:
        rows = report.pool_rows([rows for rows, _ in measured])
        timings = {impl: report.pooled_timings([t.get(impl) for _, t in measured]) for impl in report.IMPLEMENTATIONS}
        timings = {k: v for k, v in timings.items() if v}
        first_rows, first_timings = measured[0]
        write_report(args, rows, timings, cross_check(runs[0], first_rows), ran_on(first_timings),
                     runs_note=f", condensation seeds {','.join(str(r.seed) for r in runs)}")


def _common_argv(args) -> list[str]:
    return [f"--root={args.root}", f"--config={args.config}", f"--ipc={args.ipc}", f"--budgets={args.budgets}",
            f"--epochs={args.epochs}", f"--seeds={args.seeds}", f"--seed={args.seed}"]


STAGES = ("data", "idm_jax", "release", "eval", "cross", "report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", default="", help="checkout of github uitrbn/IDM ('' = idm_jax side only)")
    parser.add_argument("--release-python", default=sys.executable, help="a Python with torch for the release")
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "parity"))
    parser.add_argument("--docs", default="", help="also copy parity.md/.png here, e.g. docs/")
    parser.add_argument("--config", default="cifar10", choices=sorted(RELEASE_DATASET) + ["quick"],
                        help="quick: the embedded digits, idm_jax side only (dry runs)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--budgets", default="0,10,25,50")
    parser.add_argument("--epochs", type=int, default=100, help="evaluation epochs (release schedule)")
    parser.add_argument("--seeds", type=int, default=3, help="evaluation networks per set")
    parser.add_argument("--seed", default="0", help="condensation seed, or several (0,1,2): one run each")
    parser.add_argument("--stage", default="all", help=f"one of {STAGES}, 'all', or jax-condense (internal)")
    args = parser.parse_args()
    parse_budgets(args.budgets)
    os.makedirs(args.root, exist_ok=True)
    runs = seed_runs(args)
    if args.stage == "jax-condense":
        if len(runs) != 1:
            raise SystemExit("--stage=jax-condense takes one --seed")
        return jax_condense(runs[0])
    stages = STAGES if args.stage == "all" else tuple(args.stage.split(","))
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"--stage: unknown stage {s!r}; expected {STAGES}")
    if args.release and args.config not in RELEASE_DATASET:
        raise SystemExit(f"--config={args.config}: the release has no such setting; use {sorted(RELEASE_DATASET)}")
    if args.release and not os.path.isfile(os.path.join(args.release, "IDM_cifar10.py")):
        raise SystemExit(f"--release={args.release!r} holds no IDM_cifar10.py: point it at a checkout "
                         "of github uitrbn/IDM")
    from idm_jax import data  # pylint: disable=g-import-not-at-top

    logging.set_verbosity(logging.INFO)
    ds = data.load_config_dataset(make_config(runs[0], 1))
    stage_data(runs[0], ds)
    for s in stages:
        for run in runs:
            if s == "idm_jax":
                stage_jax(run)
            elif s == "release":
                stage_release(run, ds)
            elif s == "cross" and run is runs[0]:  # one set is enough to compare the evaluators
                stage_cross(run)
        if s == "eval":
            stage_eval(args, runs)
        write_reports(args, runs)


if __name__ == "__main__":
    main()
