"""Memory of one condensation step as the number of classes grows (CIFAR-10 vs CIFAR-100 shapes).

    python benchmarks/step_memory.py                         # 10 and 100 classes, IPC 1 and 10
    python benchmarks/step_memory.py --classes=10,100 --ipc=10 --steps=1
    python benchmarks/step_memory.py --settings=cifar10 --ipc=10   # the number of classes alone
    python benchmarks/step_memory.py --ipc=10 --config.idm.class_batch=2   # main.py's overrides

Each cell runs in its own process (so peak memory is its own) on random uint8 images of CIFAR's
shape (50,000 train images, 32x32x3, spread evenly over the classes) with the release's settings for
that IPC (configs/cifar10.py for 10 classes, configs/cifar100.py for 100; --settings=cifar10 keeps
CIFAR-10's for both, so that only the number of classes changes: CIFAR-100's IPC-10 row trains each
queue network 50 steps, not 10). It compiles the step ahead of time as the runner does, runs --steps
iterations and reports XLA's own account of the step (temporaries, arguments) and the process's peak
resident memory. The classes are updated a fixed chunk at a time (idm.class_batch; auto = 1 class on
CPU), so the temporaries should not grow with the number of classes: only the synthetic set and the
arguments do.
Prints one markdown table; copy it into docs/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

TRAIN_IMAGES = 50_000


def fake_dataset(num_classes: int):
    """CIFAR-shaped random uint8 images, labels 0..num_classes-1 in turn (equal class sizes)."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    from idm_jax import data  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (TRAIN_IMAGES, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(TRAIN_IMAGES) % num_classes).astype(np.int32)
    return data.ArrayDataset(
        name=f"random{num_classes}", train_images=images, train_labels=labels,
        test_images=images[:num_classes], test_labels=labels[:num_classes],
        class_names=tuple(str(c) for c in range(num_classes)),
        mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32))


def measure_one(num_classes: int, ipc: int, steps: int, overrides: list[str],
                settings: str = "per-dataset") -> dict:
    import jax  # pylint: disable=g-import-not-at-top

    from idm_jax import condense, runner  # pylint: disable=g-import-not-at-top

    config_name = settings if settings != "per-dataset" else ("cifar10" if num_classes == 10 else "cifar100")
    config = importlib.import_module(f"configs.{config_name}").get_config(str(ipc))
    common.apply_config_overrides(config, overrides)
    ready = condense.step_from_config(config, fake_dataset(num_classes))
    s, state, data = ready.settings, ready.state, ready.data
    start = time.perf_counter()
    step = runner.compile_ahead(ready.step, state, data)
    compile_s = time.perf_counter() - start
    analysis = step.memory_analysis()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - start)
    dev = jax.devices()[0]
    return {"classes": num_classes, "ipc": ipc, "class_batch": s.class_batch, "settings": config_name,
            "model_train_steps": s.model_train_steps,
            "class_loop": "unrolled" if condense.chunks_unrolled(num_classes, s.class_batch, s.unroll_loops)
                          else "lax.map",
            "queue_unroll": condense.queue_steps_unrolled(s),
            "compile_s": compile_s, "s_per_it": statistics.median(seconds) if seconds else float("nan"),
            "temp_gib": analysis.temp_size_in_bytes / 2**30,
            "argument_gib": analysis.argument_size_in_bytes / 2**30,
            "peak_gib": common.peak_memory_gib() if steps else float("nan"),
            "loss": float(metrics["loss"]) if steps else float("nan"),
            "device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="10,100")
    parser.add_argument("--ipc", default="1,10")
    parser.add_argument("--steps", type=int, default=1, help="iterations run after compiling (0: compile only)")
    parser.add_argument("--settings", default="per-dataset", choices=["per-dataset", "cifar10", "cifar100"],
                        help="whose release settings: each dataset's own, or one config's for every class count")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    argv, overrides = common.split_config_overrides(sys.argv[1:])
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(int(args.classes), int(args.ipc), args.steps, overrides, args.settings)))
        return
    # Check the overrides in this process, so a typo stops here with its name, not in every child.
    common.apply_config_overrides(importlib.import_module("configs.cifar10").get_config(), overrides)
    rows = []
    for ipc in args.ipc.split(","):
        for classes in args.classes.split(","):
            row = common.run_in_own_process(
                __file__, [f"--classes={classes}", f"--ipc={ipc}", f"--steps={args.steps}", *overrides,
                           f"--settings={args.settings}"],
                f"{classes} classes IPC {ipc}", ROOT)
            rows += [row] if row else []
    print(f"\n{common.machine_line(rows, ' '.join(overrides))}\n")
    print("| classes | IPC | settings | queue steps (unrolled) | classes per chunk | class loop | compile (s) "
          "| s / it | XLA temporaries (GiB) | XLA arguments (GiB) | peak resident (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['classes']} | {r['ipc']} | {r['settings']} | {r['model_train_steps']} ({r['queue_unroll']}) | "
              f"{r['class_batch']} | {r['class_loop']} | {r['compile_s']:.0f} | {r['s_per_it']:.2f} | "
              f"{r['temp_gib']:.2f} | {r['argument_gib']:.2f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
