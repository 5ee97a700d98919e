"""Time to evaluate one CIFAR-10 IPC-10 synthetic set: 5 ConvNets x 1000 epochs (1001 passes).

IPC 10 with partition l=2 trains on 400 images of 32x32x3 (two batches, 256 + 144). The script
times a few epochs after compilation for each way of running the seeds (see idm_jax.evaluate:
seed_parallel vmap | map, loop host | device), times the test pass over 10,000 images, and
extrapolates to the full protocol. A comparison with the authors' release is only made with a
per-pass time measured on the same host in the same session (--release-seconds-per-pass, e.g.
from `benchmarks/parity/release_side.py evaluate`, which times the release's own evaluate_synset).

  python benchmarks/evaluate_speed.py                       # map/host only (the CPU default)
  python benchmarks/evaluate_speed.py --modes=map/host,vmap/host --epochs=2

Uses the real CIFAR-10 from --source (default $IDM_CIFAR10, docs/RUNNING.md) when it loads, else
random images of the same shape (the speed does not depend on the pixels).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402,F401  (XLA:CPU's memory scheduler, set before JAX starts)
from idm_jax import augment, data, measure, models, trainer  # noqa: E402

CIFAR10 = os.environ.get("IDM_CIFAR10", "")  # the CIFAR-10 archive (docs/RUNNING.md)


def load_images(ipc: int, source: str, seed: int = 0):
    """(normalized f32[10 * ipc, 32, 32, 3] real images, labels, test uint8, test labels, mean,
    std, description)."""
    rng = np.random.default_rng(seed)
    try:
        ds = data.load_dataset(source, normalization="cifar10")
        idx = np.concatenate([rng.choice(np.flatnonzero(ds.train_labels == c), ipc, replace=False)
                              for c in range(10)])
        images = np.asarray(data.normalize(ds.train_images[idx], ds.mean, ds.std))
        return (images, ds.train_labels[idx], ds.test_images, ds.test_labels, ds.mean, ds.std,
                f"real CIFAR-10 ({source})")
    except (OSError, ValueError) as e:
        print(f"# could not load {source} ({e}); using random images", file=sys.stderr)
        mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2023, 0.1994, 0.2010])
        images = rng.normal(size=(10 * ipc, 32, 32, 3)).astype(np.float32)
        test = rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8)
        return (images, np.repeat(np.arange(10), ipc).astype(np.int32), test,
                rng.integers(0, 10, 10000).astype(np.int32), mean, std, "random images")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="map/host", help="comma-separated seed_parallel/loop pairs")
    parser.add_argument("--epochs", type=int, default=3, help="timed passes after the first (compile) pass")
    parser.add_argument("--no-test", action="store_true",
                        help="skip timing the test pass (vmap on CPU: grouped convs, very slow)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--partition", type=int, default=2)
    parser.add_argument("--arch", default="ConvNet")
    parser.add_argument("--source", default=CIFAR10)
    parser.add_argument("--full-epochs", type=int, default=1000, help="protocol length to extrapolate to")
    parser.add_argument("--release-seconds-per-pass", type=float, default=0.0,
                        help="the release's seconds per training pass per network, measured on THIS host "
                             "(0 = no comparison columns)")
    args = parser.parse_args(argv)

    images, labels, test_x, test_y, mean, std, what = load_images(args.ipc, args.source)
    images, labels = augment.partition_expand(jax.numpy.asarray(images), jax.numpy.asarray(labels), args.partition)
    images, labels = np.asarray(images), np.asarray(labels)
    full_passes = trainer.epoch_plan(args.full_epochs)[0]
    print(f"# {what}: {images.shape[0]} training images {images.shape[1:]} (IPC {args.ipc}, l={args.partition}), "
          f"{args.arch}, {args.seeds} seeds, batch 256, per-image DSA")
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print()
    compare = args.release_seconds_per_pass > 0
    print("| seeds | loop | compile + 1st epoch (s) | s / epoch (all seeds) | s / epoch / net | "
          f"test 10k x {args.seeds} nets (s) | {full_passes} passes (h) |"
          + (" release, same host (h) | release / idm_jax |" if compare else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if compare else ""))
    model = models.get_model(args.arch, 10, 3)
    release_h = args.seeds * full_passes * args.release_seconds_per_pass / 3600
    for pair in args.modes.split(","):
        mode, loop = pair.strip().split("/")
        nets = trainer.train_networks(model, images, labels, key=jax.random.PRNGKey(0),
                                       num_seeds=args.seeds, epochs=args.epochs + 1, schedule="paper",
                                       seed_parallel=mode, loop=loop, log_every=1, name=pair)
        test_s = float("nan")
        if not args.no_test:
            t = time.perf_counter()
            measure.measure_accuracy(model, nets.variables, test_x, test_y, mean=mean, std=std,
                                      seed_parallel=mode)
            test_s = time.perf_counter() - t
        per_epoch = nets.seconds_per_epoch
        total_h = (per_epoch * full_passes + np.nan_to_num(test_s)) / 3600
        print(f"| {mode} | {loop} | {nets.first_epoch_seconds:.1f} | {per_epoch:.2f} | "
              f"{per_epoch / args.seeds:.2f} | {test_s:.1f} | {total_h:.2f} |"
              + (f" {release_h:.2f} | {release_h / total_h:.2f}x |" if compare else ""), flush=True)


if __name__ == "__main__":
    main()
