"""Throughput of idm_jax.augment (images/s), jitted, after warm-up.

Prints one row per DSA family and for the full default strategy, in Siamese mode
(one parameter draw per batch), per-image mode, and Siamese forward + backward
(what condensation differentiates through), plus partition_expand (factor 2).

Each timing is a block of `--calls` calls with different keys (so the full
strategy averages over the families it draws), ended by block_until_ready;
the table shows the median over `--repeats` blocks.

    python benchmarks/augment_throughput.py [--batch 256 --size 32 --repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from idm_jax import augment, defaults


def images_per_second(
    fn: Callable[[jax.Array, jax.Array], jax.Array], images: jax.Array, calls: int, repeats: int
) -> float:
    """Median images/s of `fn(images, key)` over `repeats` blocks of `calls` calls."""
    keys = jax.random.split(jax.random.key(0), calls)
    jax.block_until_ready(fn(images, keys[0]))  # compile and warm up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for key in keys:
            out = fn(images, key)
        jax.block_until_ready(out)
        rates.append(images.shape[0] * calls / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--calls", type=int, default=12, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks; the median is shown")
    args = parser.parse_args()

    shape = (args.batch, args.size, args.size, args.channels)
    images = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"batch {shape}, median of {args.repeats} x {args.calls} calls")
    print(f"{'strategy':<38} {'siamese img/s':>14} {'per-image img/s':>16} {'siamese fwd+bwd img/s':>22}")

    for strategy in (*augment.FAMILIES, defaults.DSA_STRATEGY):
        siamese = jax.jit(lambda x, k, s=strategy: augment.dsa(x, k, s))
        per_image = jax.jit(lambda x, k, s=strategy: augment.dsa(x, k, s, per_image=True))
        # Gradient of a scalar through the augmentation, as in the synthetic-image update.
        backward = jax.jit(jax.grad(lambda x, k, s=strategy: jnp.sum(augment.dsa(x, k, s) ** 2)))
        rates = [images_per_second(f, images, args.calls, args.repeats) for f in (siamese, per_image, backward)]
        print(f"{strategy:<38} {rates[0]:>14,.0f} {rates[1]:>16,.0f} {rates[2]:>22,.0f}")

    expand = jax.jit(lambda x, k: augment.partition_expand(x, None, 2)[0])
    rate = images_per_second(expand, images, args.calls, args.repeats)
    print(f"{'partition_expand (factor 2, input img/s)':<38} {rate:>14,.0f}")


if __name__ == "__main__":
    main()
