"""The full pipeline for one setting: condense (IDM, DM) and a Random coreset, then evaluate.

    python benchmarks/pipeline.py --config=cifar10 --ipc=10 --iterations=300 --epochs=300
    python benchmarks/pipeline.py --config=quick --ipc=1 --iterations=100 --epochs=300 --seeds=3

Each method runs through the same code as main.py (runner / baselines) in
its own workdir under --root, with a reduced schedule if asked. Prints one
markdown table: seconds per iteration, real images per second, peak memory,
evaluation time, accuracy mean +- std over seeds, and the paper's number for
the same setting (the paper's numbers assume the full 20,000 iterations and
1000 epochs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import logging  # noqa: E402

from idm_jax import baselines, export, runner  # noqa: E402


def _config(name: str, ipc: int, method: str, args):
    c = importlib.import_module(f"configs.{name}").get_config(f"{ipc},{'dm' if method == 'dm' else 'idm'}")
    c.idm.iterations = args.iterations or c.idm.iterations
    c.eval.epochs = args.epochs or c.eval.epochs
    c.eval.num_seeds = args.seeds or c.eval.num_seeds
    c.log_every = max(1, min(c.log_every, c.idm.iterations))
    c.checkpoint_every = c.idm.iterations
    if method == "random":
        c.baseline.method = "random"
    return c


def _row(method, c, workdir, results, seconds):
    arch = next(iter(results["archs"]))
    acc = results["archs"][arch]
    rates = []
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        rates = [json.loads(line)["it_per_s"] for line in open(metrics)]
    rate = sorted(rates)[len(rates) // 2] if rates else float("nan")
    paper = export.paper_accuracy(results["dataset"], method, c.ipc, arch,
                                  partition_factor=results.get("partition_factor", 1))
    return {"method": method, "ipc": c.ipc, "iterations": c.idm.iterations if method != "random" else 0,
            "s_per_it": 1.0 / rate if rate == rate and rate > 0 else float("nan"),
            "eval_s": acc.get("train_seconds", float("nan")) + acc.get("test_seconds", 0.0),
            "epochs": acc["epochs"], "seeds": acc["num_seeds"], "mean": acc["mean"], "std": acc["std"],
            "paper": None if paper is None else paper[0], "wall_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar10")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--methods", default="idm,dm,random")
    parser.add_argument("--iterations", type=int, default=0, help="0 = the config's")
    parser.add_argument("--epochs", type=int, default=0, help="evaluation epochs; 0 = the config's")
    parser.add_argument("--seeds", type=int, default=0, help="evaluation seeds; 0 = the config's")
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "pipeline"))
    args = parser.parse_args()
    logging.set_verbosity(logging.INFO)  # the runner's progress lines (iteration, loss, it/s, ETA)
    rows = []
    for method in args.methods.split(","):
        c = _config(args.config, args.ipc, method, args)
        workdir = os.path.join(args.root, f"{args.config}_ipc{args.ipc}_{method}")
        t0 = time.time()
        if method == "random":
            results = baselines.run_baseline(c, workdir)
        else:
            results = runner.run_condensation(c, workdir)["results"]
        rows.append(_row(method, c, workdir, results, time.time() - t0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{args.config} IPC {args.ipc}; peak host memory of the whole run {peak:.2f} GiB\n")
    print("| method | iterations | s / it | eval epochs x seeds | eval time (s) | accuracy (%) | paper (%) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        paper = "—" if r["paper"] is None else f"{r['paper']:.1f}"
        print(f"| {r['method']} | {r['iterations']} | {r['s_per_it']:.2f} | {r['epochs']} x {r['seeds']} | "
              f"{r['eval_s']:.0f} | {r['mean']:.2f} ± {r['std']:.2f} | {paper} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
