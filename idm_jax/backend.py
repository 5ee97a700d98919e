"""Which variant of each loop runs on which backend, and why: the one place "auto" is resolved.

Every computation has one meaning and several shapes of code: the one GPUs/TPUs want (loops kept
as `lax.scan` / `fori_loop` inside one jitted call), the one XLA:CPU runs fast, and the batched
(`vmap`) forms. A result never depends on the choice (test_condense.py, test_evaluate.py and
test_models.py run them on CPU with tiny shapes and compare them); "auto" (every config default)
picks by `jax.default_backend()`:

| choice (config field)                 | CPU                    | GPU / TPU          |
|---------------------------------------|------------------------|--------------------|
| convolutions (`idm.conv_impl`, `eval.conv_impl`) | "matmul" (im2col weight gradient) | "xla" |
| queue training (`idm.queue_train_impl`) | "map": member by member | "map": member by member |
| evaluation seeds (`eval.seed_parallel`) | "map": seed by seed   | "map": seed by seed |
| evaluation epochs (`eval.loop`)       | "host": Python loop    | "device": on device |
| step loops (`StepSettings.unroll_loops`) | unrolled at trace time (classes: up to 10 chunks) | `lax.scan` / map |
| classes per chunk (`idm.class_batch=0`) | 1 once a class fills 256 images | ~4096 images' worth |

`defaults_for(platform)` resolves "auto" as on another platform, e.g. to lower the accelerator
program on a CPU and count what is in it (benchmarks/hlo_census.py).

Why (XLA:CPU; the figures, with machine and date, are in docs/RESULTS.md#xlacpu-behaviours-behind-the-cpu-defaults
and the sections named below; benchmarks/ has the scripts that measure them):

* `vmap` of a convolution over different weights (queue members, evaluation seeds) lowers to a
  grouped convolution (feature_group_count > 1; its weight gradient batch_group_count > 1).
  XLA:CPU runs it slower than the same networks one after another, and CUDA runs its backward
  pass far slower than a plain convolution's. So every platform trains them one after another
  by default ("map": plain convolutions, each of a full batch). The batched form without
  grouped convolutions is "vmap" with conv_impl "taps" (every conv as matmuls, which vmap turns
  into batched matmuls); which of the two is faster on a given accelerator is measured, not assumed
  (table1's tuning step times both).
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
  gradient (convs.conv_weight_grad_matmul) saves more (docs/RESULTS.md#where-the-memory-went).
* Stacking classes into larger convolutions is slower per image on CPU than one class at a
  time (docs/RESULTS.md#condensation-speed); on GPU/TPU only memory bounds the chunk
  (`condense.auto_class_batch`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import importlib.util
import os

import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "xla", "matmul", "taps")
QUEUE_TRAIN_IMPLS = ("auto", "vmap", "map")
SEED_PARALLEL = ("auto", "vmap", "map")
EVAL_LOOPS = ("auto", "device", "host")


PLATFORMS = ("cpu", "gpu", "tpu")
# Set only inside `defaults_for`: the platform whose defaults "auto" takes instead of JAX's backend's.
_assumed_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar("assumed_platform", default=None)


@contextlib.contextmanager
def defaults_for(platform: str):
    """Within this block, every "auto" choice resolves as on `platform` ("cpu", "gpu", "tpu"),
    whatever JAX computes on: the accelerator's program can be lowered and inspected on a CPU.
    Only what is traced inside the block takes these defaults."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; valid: {', '.join(PLATFORMS)}")
    token = _assumed_platform.set(platform)
    try:
        yield
    finally:
        _assumed_platform.reset(token)


def on_cpu() -> bool:
    """True when the "auto" choices below take the CPU's variant: JAX computes on the CPU
    backend (or `defaults_for("cpu")` says to)."""
    return (_assumed_platform.get() or jax.default_backend()) == "cpu"


def _pick(value: str, valid: tuple[str, ...], what: str, cpu: str, accelerator: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    if value != "auto":
        return value
    return cpu if on_cpu() else accelerator


def conv_impl(value: str = "auto") -> str:
    """"xla", "matmul" or "taps": how convs are computed (models.py; call at trace time)."""
    return _pick(value, CONV_IMPLS, "conv_impl", cpu="matmul", accelerator="xla")


def queue_train_impl(value: str = "auto") -> str:
    """"vmap" or "map": how the drawn queue members train together (idm.queue_train_impl)."""
    return _pick(value, QUEUE_TRAIN_IMPLS, "idm.queue_train_impl", cpu="map", accelerator="map")


def seed_parallel(value: str = "auto") -> str:
    """"vmap" or "map": how the evaluation networks of one architecture train (eval.seed_parallel)."""
    return _pick(value, SEED_PARALLEL, "seed_parallel", cpu="map", accelerator="map")


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
