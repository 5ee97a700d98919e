"""Seconds per condensation iteration and peak memory, CIFAR-10 IPC 1/10/50.

    python benchmarks/condense_speed.py                      # IPC 1, 10, 50; release settings
    python benchmarks/condense_speed.py --ipc=10 --steps=5 --impl=map,vmap
    python benchmarks/condense_speed.py --ipc=10 --config.idm.class_batch=1   # main.py's overrides

Each setting runs in its own process (so peak memory is its own): build the
release's config, compile the step, run --steps iterations after the first
(compile) one and report the median. Real CIFAR-10 from the config's source
($IDM_CIFAR10 when set, see docs/RUNNING.md; else tfds:cifar10).
Prints one markdown table; copy it into docs/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402


def measure_one(ipc: int, method: str, impl: str, steps: int, config_name: str,
                overrides: list[str] | None = None) -> dict:
    import jax  # pylint: disable=g-import-not-at-top

    from idm_jax import condense  # pylint: disable=g-import-not-at-top

    config = importlib.import_module(f"configs.{config_name}").get_config(f"{ipc},{method}")
    config.idm.queue_train_impl = impl
    common.apply_config_overrides(config, overrides or [])
    ready = condense.step_from_config(config)
    s, data, step = ready.settings, ready.data, ready.step
    box = {"state": ready.state}

    def one_step():  # the step donates its state: each call takes the previous output
        box["state"], box["metrics"] = step(box["state"], data)
        return box["state"]

    first, sec = common.first_and_median_seconds(one_step, steps)
    metrics = box["metrics"]
    dev = jax.devices()[0]
    real_images = condense.real_images_per_iteration(s)
    return {"ipc": ipc, "method": method, "impl": s.queue_train_impl if s.use_queue else "-",
            "update": "per_class" if s.per_class_update else "joint",
            "first_step_s": first, "s_per_it": sec, "real_images_per_s": real_images / sec,
            "peak_gib": common.peak_memory_gib(), "loss": float(metrics["loss"]),
            "device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", default="1,10,50")
    parser.add_argument("--method", default="idm", help="idm, dm or idm,dm")
    parser.add_argument("--impl", default="auto", help="queue training: auto, map, vmap (comma list)")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations after the first")
    parser.add_argument("--config", default="cifar10")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    argv, overrides = common.split_config_overrides(sys.argv[1:])
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(int(args.ipc), args.method, args.impl, args.steps, args.config, overrides)))
        return
    # Check the overrides in this process, so a typo stops here with its name, not in every child.
    common.apply_config_overrides(importlib.import_module(f"configs.{args.config}").get_config(), overrides)
    rows = []
    for method in args.method.split(","):
        for ipc in args.ipc.split(","):
            for impl in args.impl.split(","):
                row = common.run_in_own_process(
                    __file__, [f"--ipc={ipc}", f"--method={method}", f"--impl={impl}", f"--steps={args.steps}",
                               f"--config={args.config}", *overrides],
                    f"IPC {ipc} {method} {impl}", ROOT)
                rows += [row] if row else []
    print(f"\n{args.config}, {common.machine_line(rows, ' '.join(overrides))}\n")
    print("| method | IPC | queue training | synthetic update | compile + 1st it (s) | s / it "
          "| real images / s | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ipc']} | {r['impl']} | {r['update']} | {r['first_step_s']:.1f} | "
              f"{r['s_per_it']:.2f} | {r['real_images_per_s']:.0f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
