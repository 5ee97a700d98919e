"""Which variant of each loop runs on which backend, and why: the one place "auto" is resolved.

Every computation has one meaning and two shapes of code: the one GPUs/TPUs want (batched with
`vmap`, loops kept as `lax.scan` / `fori_loop` inside one jitted call) and the one XLA:CPU runs
fast. A result never depends on the choice (tests/test_backend_paths.py runs both on CPU with
tiny shapes and compares them); "auto" (every config default) picks by `jax.default_backend()`:

| choice (config field)                 | CPU                    | GPU / TPU          |
|---------------------------------------|------------------------|--------------------|
| conv weight gradient (`conv_impl`)    | "matmul" (im2col)      | "xla"              |
| queue training (`idm.queue_train_impl`) | "map": member by member | "vmap": one batch |
| evaluation seeds (`eval.seed_parallel`) | "map": seed by seed   | "vmap": one batch  |
| evaluation epochs (`eval.loop`)       | "host": Python loop    | "device": on device |
| step loops (`StepSettings.unroll_loops`) | unrolled at trace time | `lax.scan` / map |
| classes per chunk (`idm.class_batch=0`) | 1 once a class fills 256 images | ~4096 images' worth |

Why, measured with jax 0.10 on XLA:CPU (numbers in docs/RESULTS.md and benchmarks/):

* `vmap` of a convolution over different weights lowers to a grouped convolution, 3-4x slower
  than running the same networks one after another; on GPU/TPU the batched form fills the
  device that small per-network batches leave idle.
* Convolution weight gradients inside a while loop (scan, fori_loop, lax.map) keep
  non-canonical layouts and miss XLA:CPU's fast path, 2-40x slower than the same step jitted
  alone or unrolled (ConvNet-2 step: 45 ms alone, 930 ms in a scan). Hence the host loop and
  the unrolled step on CPU. With conv_impl="matmul" (XLA's own conv weight gradient is ~30x
  slower on CPU) the gap shrinks but remains: CIFAR-10 IPC 10, 5 ConvNets, 53.9 s per epoch
  host vs 66.8 s device, and the device loop compiles 3x longer.
* Stacking classes into larger convolutions measured 1.35x slower per iteration on CPU at
  CIFAR-10 IPC 10 (1.6x at IPC 1); on GPU/TPU only memory bounds the chunk
  (`condense.auto_class_batch`).
"""

from __future__ import annotations

import jax

CONV_IMPLS = ("auto", "xla", "matmul")
QUEUE_TRAIN_IMPLS = ("auto", "vmap", "map")
SEED_PARALLEL = ("auto", "vmap", "map")
EVAL_LOOPS = ("auto", "device", "host")


def on_cpu() -> bool:
    """True when JAX computes on the CPU backend (the "auto" choices below take its variant)."""
    return jax.default_backend() == "cpu"


def _pick(value: str, valid: tuple[str, ...], what: str, cpu: str, accelerator: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    if value != "auto":
        return value
    return cpu if on_cpu() else accelerator


def conv_impl(value: str = "auto") -> str:
    """"xla" or "matmul": how conv weight gradients are computed (call at trace time)."""
    return _pick(value, CONV_IMPLS, "conv_impl", cpu="matmul", accelerator="xla")


def queue_train_impl(value: str = "auto") -> str:
    """"vmap" or "map": how the drawn queue members train together (idm.queue_train_impl)."""
    return _pick(value, QUEUE_TRAIN_IMPLS, "idm.queue_train_impl", cpu="map", accelerator="vmap")


def seed_parallel(value: str = "auto") -> str:
    """"vmap" or "map": how the evaluation networks of one architecture train (eval.seed_parallel)."""
    return _pick(value, SEED_PARALLEL, "seed_parallel", cpu="map", accelerator="vmap")


def eval_loop(value: str = "auto") -> str:
    """"device" or "host": where the loop over evaluation epochs and batches runs (eval.loop)."""
    return _pick(value, EVAL_LOOPS, "loop", cpu="host", accelerator="device")


def unroll_loops() -> bool:
    """Whether the condensation step unrolls its loops over SGD steps and class chunks."""
    return on_cpu()
