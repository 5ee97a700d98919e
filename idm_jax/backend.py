"""Which variant of each loop runs on which backend, and why: the one place "auto" is resolved.

Every computation has one meaning and two shapes of code: the one GPUs/TPUs want (batched with
`vmap`, loops kept as `lax.scan` / `fori_loop` inside one jitted call) and the one XLA:CPU runs
fast. A result never depends on the choice (test_condense.py and test_evaluate.py run both on
CPU with tiny shapes and compare them); "auto" (every config default) picks by `jax.default_backend()`:

| choice (config field)                 | CPU                    | GPU / TPU          |
|---------------------------------------|------------------------|--------------------|
| conv weight gradient (`conv_impl`)    | "matmul" (im2col)      | "xla"              |
| queue training (`idm.queue_train_impl`) | "map": member by member | "vmap": one batch |
| evaluation seeds (`eval.seed_parallel`) | "map": seed by seed   | "vmap": one batch  |
| evaluation epochs (`eval.loop`)       | "host": Python loop    | "device": on device |
| step loops (`StepSettings.unroll_loops`) | unrolled at trace time (classes: up to 10 chunks) | `lax.scan` / map |
| classes per chunk (`idm.class_batch=0`) | 1 once a class fills 256 images | ~4096 images' worth |

Why (XLA:CPU; the figures, with machine and date, are in docs/RESULTS.md#xlacpu-behaviours-behind-the-cpu-defaults
and the sections named below; benchmarks/ has the scripts that measure them):

* `vmap` of a convolution over different weights lowers to a grouped convolution, which XLA:CPU
  runs slower than the same networks one after another; on GPU/TPU the batched form fills the
  device that small per-network batches leave idle.
* Convolution weight gradients inside a while loop (scan, fori_loop, lax.map) keep
  non-canonical layouts and miss XLA:CPU's fast path, so a step inside a loop runs many times
  slower than the same step jitted alone or unrolled. Hence the host loop and the unrolled step
  on CPU. With conv_impl="matmul" (XLA's own conv weight gradient is the slow part) the gap
  shrinks but remains, and a device loop compiles longer (docs/RESULTS.md#evaluation-speed).
* Memory: the unrolled step holds independent pieces of work (the classes, the queue members,
  the queue training beside the synthetic update). XLA:CPU's default scheduler runs them side
  by side for concurrency and keeps all their activations alive at once. On CPU, XLA is told
  to schedule for memory (`use_cpu_memory_scheduler`) and each piece starts after the previous
  one (`sequenced`), so only one piece's activations are alive at a time; the per-tap weight
  gradient (models.conv_weight_grad_matmul) saves more (docs/RESULTS.md#where-the-memory-went).
* Stacking classes into larger convolutions is slower per image on CPU than one class at a
  time (docs/RESULTS.md#condensation-speed); on GPU/TPU only memory bounds the chunk
  (`condense.auto_class_batch`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import jax
import jax.numpy as jnp

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


# XLA:CPU's concurrency-optimized scheduler overlaps independent work to run it on several
# threads, at the price of keeping its buffers alive together; the convolutions' intra-op
# threads already use the cores. Per-jit `compiler_options` do not reach the scheduler (tried;
# docs/RESULTS.md#where-the-memory-went): it must be an XLA_FLAGS entry, read once when JAX starts its CPU backend.
CPU_MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_ACCELERATOR_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin", "libtpu")


def use_cpu_memory_scheduler(environ=None) -> bool:
    """Adds CPU_MEMORY_FLAG to $XLA_FLAGS for a process that will compute on the CPU.

    Call before JAX starts its backends (main.py, the benchmarks and the tests do); a
    library user who condenses on CPU can call it first thing, or set the flag. Leaves
    $XLA_FLAGS alone when it already names the option (the user's choice wins), when
    $JAX_PLATFORMS excludes the CPU, or when an accelerator plugin is installed and
    $JAX_PLATFORMS does not force the CPU. Returns whether the flag is now set.
    """
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    name = CPU_MEMORY_FLAG.split("=")[0]
    if name in flags:
        return CPU_MEMORY_FLAG in flags.split()
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and platforms[0] != "cpu":
        return False
    if not platforms and any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS):
        return False
    environ["XLA_FLAGS"] = f"{flags} {CPU_MEMORY_FLAG}".strip()
    return True


def sequenced(previous, value):
    """`value`, made to depend on `previous`: XLA cannot start work on it before `previous` exists.

    Orders independent pieces of unrolled work (see the module notes on memory) so each one's
    activations are freed before the next begins. `lax.optimization_barrier` would say this,
    but XLA:CPU drops barriers before it schedules. The dependency adds an exact zero (0 times a
    sum of `previous`'s floats) to every leaf of `value`; a non-finite `previous` makes it NaN,
    which only happens when the step is already failing (the state is then kept, see
    condense.make_step).
    """
    floats = [x for x in jax.tree.leaves(previous) if jnp.issubdtype(x.dtype, jnp.floating)]
    zero = 0.0 * sum(jnp.sum(x) for x in floats)
    return jax.tree.map(lambda v: v + zero.astype(v.dtype), value)


def release_freed_memory() -> None:
    """Hands memory that was freed but kept by glibc's allocator back to the OS (Linux only).

    XLA's compiler frees its working memory (a sizeable share of the CPU step's peak,
    docs/RESULTS.md#xlacpu-behaviours-behind-the-cpu-defaults) in small pieces that malloc keeps,
    and the step's buffers are then allocated beside it; trimming in between makes peak memory
    the larger of the two instead of their sum.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
