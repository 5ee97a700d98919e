"""The full pipeline for one setting: condense (IDM, DM) and a Random coreset, then evaluate.

    python benchmarks/pipeline.py --config=cifar10 --ipc=10 --iterations=300 --epochs=300
    python benchmarks/pipeline.py --config=cifar10 --ipc=10 --iterations=idm:40,dm:150 --epochs=300 --seeds=2
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
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import logging  # noqa: E402

from benchmarks.common import peak_memory_gib  # noqa: E402
from idm_jax import baselines, condense, data, runner  # noqa: E402
from idm_jax import results as results_lib  # noqa: E402


def parse_iterations(text: str) -> dict[str, int]:
    """"300" -> {"*": 300}; "idm:40,dm:150" -> {"idm": 40, "dm": 150}; "0" = the config's."""
    if ":" not in text:
        return {"*": int(text)}
    out = {}
    for part in text.split(","):
        method, _, n = part.partition(":")
        if method not in ("idm", "dm") or not n.isdigit():
            raise SystemExit(f"--iterations: bad entry {part!r}; expected e.g. idm:40,dm:150")
        out[method] = int(n)
    return out


def _config(name: str, ipc: int, method: str, args):
    c = importlib.import_module(f"configs.{name}").get_config(f"{ipc},{'dm' if method == 'dm' else 'idm'}")
    iterations = parse_iterations(args.iterations)
    c.idm.iterations = iterations.get(method, iterations.get("*", 0)) or c.idm.iterations
    c.eval.epochs = args.epochs or c.eval.epochs
    c.eval.num_seeds = args.seeds or c.eval.num_seeds
    c.log_every = max(1, min(c.log_every, c.idm.iterations))
    c.checkpoint_every = c.idm.iterations
    c.checkpoint_every_minutes = 0.0  # timed runs: no extra saves
    if method == "random":
        c.baseline.method = "random"
    return c


def _row(method, c, ds, workdir, results, seconds):
    arch = next(iter(results["archs"]))
    acc = results["archs"][arch]
    rates = []
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        rows = [json.loads(line) for line in open(metrics)]
        rates = [r["it_per_s"] for r in rows if r.get("it_per_s")]  # none for the compiling one
    rate = sorted(rates)[len(rates) // 2] if rates else float("nan")
    paper = results_lib.paper_accuracy(results["dataset"], method, c.ipc, arch,
                                  partition_factor=results.get("partition_factor", 1))
    images_per_it = (condense.real_images_per_iteration(condense.settings_from_config(c, ds))
                     if method != "random" else 0)
    return {"method": method, "ipc": c.ipc, "iterations": c.idm.iterations if method != "random" else 0,
            "s_per_it": 1.0 / rate if rate == rate and rate > 0 else float("nan"),
            "images_per_s": images_per_it * rate if rate == rate else float("nan"),
            "peak_gib": peak_memory_gib(),
            "eval_s": acc.get("train_seconds", float("nan")) + acc.get("test_seconds", 0.0),
            "epochs": acc["epochs"], "seeds": acc["num_seeds"], "mean": acc["mean"], "std": acc["std"],
            "paper": None if paper is None else paper[0], "wall_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar10")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--methods", default="idm,dm,random")
    parser.add_argument("--iterations", default="0",
                        help="condensation iterations: N for all, or idm:N,dm:M; 0 = the config's")
    parser.add_argument("--epochs", type=int, default=0, help="evaluation epochs; 0 = the config's")
    parser.add_argument("--seeds", type=int, default=0, help="evaluation seeds; 0 = the config's")
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "pipeline"))
    args = parser.parse_args()
    logging.set_verbosity(logging.INFO)  # the runner's progress lines (iteration, loss, it/s, ETA)
    rows, ds = [], None
    for method in args.methods.split(","):
        c = _config(args.config, args.ipc, method, args)
        ds = ds or data.load_config_dataset(c)  # the same data for every method
        workdir = os.path.join(args.root, f"{args.config}_ipc{args.ipc}_{method}")
        t0 = time.time()
        if method == "random":
            results = baselines.run_baseline(c, workdir)
        else:
            summary = runner.run_condensation(c, workdir)
            if "results" not in summary:  # stopped by a signal: checkpoint saved, rerun resumes
                print(f"{method}: stopped at iteration {summary.get('step')}; rerun the same command "
                      "to resume", file=sys.stderr)
                break
            results = summary["results"]
        rows.append(_row(method, c, ds, workdir, results, time.time() - t0))
    import jax  # pylint: disable=g-import-not-at-top

    dev = jax.devices()[0]
    print(f"\n{args.config} IPC {args.ipc}; {dev.platform} ({dev.device_kind}), jax {jax.__version__}; "
          "peak memory is the running maximum of the process (device memory on GPU/TPU)\n")
    print("| method | iterations | s / it | real images / s | peak memory (GiB) | eval epochs x seeds "
          "| eval time (s) | accuracy (%) | paper (%) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        paper = "—" if r["paper"] is None else f"{r['paper']:.1f}"
        speed = ("— | —" if r["method"] == "random"
                 else f"{r['s_per_it']:.2f} | {r['images_per_s']:.0f}")
        print(f"| {r['method']} | {r['iterations']} | {speed} | "
              f"{r['peak_gib']:.2f} | {r['epochs']} x {r['seeds']} | {r['eval_s']:.1f} | "
              f"{r['mean']:.2f} ± {r['std']:.2f} | {paper} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
