"""Speed of the two conv weight-gradient implementations (idm_jax.models.CONV_IMPLS) on CIFAR-10 shapes.

For each network and conv_impl ("xla": XLA's conv gradient; "matmul": im2col matmul weight
gradient) the script times, after compilation, on random 32x32x3 images and labels:

* forward:   logits of one batch (train=False)
* train:     one training step, value_and_grad of the cross-entropy w.r.t. the parameters plus an
             SGD (momentum 0.9) update, i.e. the step of the model queue and of the evaluation protocol
* scan5:     (with --scan) 5 such steps inside one lax.scan (a while loop), per step; XLA:CPU runs
             conv weight gradients inside while loops far slower
             (docs/RESULTS.md#xlacpu-behaviours-behind-the-cpu-defaults)

and prints one table in milliseconds (median of --repeats runs, and the fastest training step)
with the compile time of the step and the speed-up of the training step over the first impl.
The impls are timed in turns, as the machine may be shared; the script prints the load average
before and after.

  python benchmarks/conv_speed.py                                   # ConvNet-3 only, batch 256
  python benchmarks/conv_speed.py --archs=ConvNet,AlexNet,VGG11,ResNet18 --repeats=2
  python benchmarks/conv_speed.py --scan --scan_impls=matmul        # scan without the slow xla case
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idm_jax import models  # noqa: E402

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def time_ms(fn: Callable[[], object]) -> float:
    """Wall time of one `fn()` call, blocked until its outputs are ready, in ms."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return 1000.0 * (time.perf_counter() - start)


def make_step(model, tx: optax.GradientTransformation):
    """(variables, opt_state, x: f32[B, 32, 32, 3], y: i32[B]) -> (variables, opt_state, loss)."""

    def step(variables, opt_state, x, y):
        def loss_fn(params):
            logits, new_vars = models.apply_model(model, {**variables, "params": params}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_vars

        (loss, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        return {**new_vars, "params": optax.apply_updates(variables["params"], updates)}, opt_state, loss

    return step


def compile_benchmarks(arch: str, impl: str, batch: int, scan: bool) -> tuple[dict[str, Callable], float]:
    """({"forward": f, "train": f[, "scan5": f]} zero-argument callables on fixed inputs, compile seconds)."""
    model = models.get_model(arch, NUM_CLASSES, IMAGE_SHAPE[-1], conv_impl=impl)
    key_init, key_x, key_y = jax.random.split(jax.random.PRNGKey(0), 3)
    variables = jax.jit(lambda k: models.init_variables(model, k, IMAGE_SHAPE))(key_init)
    x = jax.random.normal(key_x, (batch, *IMAGE_SHAPE))
    y = jax.random.randint(key_y, (batch,), 0, NUM_CLASSES)
    tx = optax.sgd(0.01, momentum=0.9)
    opt_state = tx.init(variables["params"])
    step = make_step(model, tx)

    forward = jax.jit(lambda v, x: models.apply_model(model, v, x, train=False)[0])
    fns = {"forward": lambda: forward(variables, x)}
    start = time.perf_counter()
    train = jax.jit(step).lower(variables, opt_state, x, y).compile()
    compile_s = time.perf_counter() - start
    fns["train"] = lambda: train(variables, opt_state, x, y)
    if scan:
        xs, ys = jnp.stack([x] * 5), jnp.stack([y] * 5)

        def five_steps(v, s):
            def body(carry, xy):
                v, s, _ = step(*carry, *xy)
                return (v, s), None
            return jax.lax.scan(body, (v, s), (xs, ys))[0]

        loop = jax.jit(five_steps).lower(variables, opt_state).compile()
        fns["scan5"] = lambda: loop(variables, opt_state)
    for fn in fns.values():  # warm-up
        jax.block_until_ready(fn())
    return fns, compile_s


def bench_arch(arch: str, impls: list[str], batch: int, repeats: int,
               scan_impls: list[str]) -> dict[str, dict[str, float]]:
    """Per impl: median ms of forward / train (/ scan5 per step), min train ms, compile seconds.

    The impls are timed in turns (A B A B ...) so that load from other processes on a shared
    machine hits them alike.
    """
    compiled = {impl: compile_benchmarks(arch, impl, batch, impl in scan_impls) for impl in impls}
    times: dict[str, dict[str, list[float]]] = {impl: {k: [] for k in fns} for impl, (fns, _) in compiled.items()}
    for _ in range(repeats):
        for impl, (fns, _) in compiled.items():
            for what, fn in fns.items():
                times[impl][what].append(time_ms(fn) / (5 if what == "scan5" else 1))
    rows = {}
    for impl, (_, compile_s) in compiled.items():
        row = {what: statistics.median(ts) for what, ts in times[impl].items()}
        rows[impl] = {**row, "train_min": min(times[impl]["train"]), "compile_s": compile_s}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="ConvNet", help="comma-separated models.MODEL_NAMES")
    parser.add_argument("--impls", default="xla,matmul", help="comma-separated conv_impl values")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan", action="store_true", help="also time 5 steps inside lax.scan")
    parser.add_argument("--scan_impls", default="xla,matmul", help="conv_impl values timed with --scan")
    args = parser.parse_args()
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for a in archs:
        if a not in models.MODEL_NAMES:
            parser.error(f"unknown arch {a!r}; valid: {', '.join(models.MODEL_NAMES)}")
    for i in impls:
        if i not in models.CONV_IMPLS:
            parser.error(f"unknown conv_impl {i!r}; valid: {', '.join(models.CONV_IMPLS)}")

    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} (shared machine)", flush=True)
    header = (f"{'arch':<10} {'batch':>5} {'impl':<7} {'forward ms':>11} {'train ms':>9} {'(min)':>7} "
              f"{'scan ms/step':>13} {'compile s':>9} {'train speedup':>13}")
    print(header)
    print("-" * len(header), flush=True)
    scan_impls = [i.strip() for i in args.scan_impls.split(",")] if args.scan else []
    for arch in archs:
        rows = bench_arch(arch, impls, args.batch, args.repeats, scan_impls)
        base = rows[impls[0]]["train"]
        for impl, row in rows.items():
            scan = f"{row['scan5']:13.0f}" if "scan5" in row else f"{'-':>13}"
            print(f"{arch:<10} {args.batch:>5} {impl:<7} {row['forward']:11.0f} {row['train']:9.0f} "
                  f"{row['train_min']:7.0f} {scan} {row['compile_s']:9.1f} {base / row['train']:12.2f}x", flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
