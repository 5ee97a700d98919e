"""Step variants that compute the same values, timed against each other to pick the fastest.

The condensation step can be built several ways that give the same synthetic set within float32
tolerance: the queue members trained vmapped or one after the other (idm.queue_train_impl), the
convolutions' form (idm.conv_impl), how many classes are updated together (idm.class_batch), and
how many iterations run per jitted call (idm.steps_per_dispatch). Which is fastest depends on the
machine, so Table 1's mode times them at its first cell's settings before running any cell.

The search is greedy, one choice at a time from the config's own: each choice's other values are
timed with the best of the choices before, and a value is kept only when it is faster. The queue's
form and the convolutions' form are one choice, their pairs timed together: batched members are
fast only with convolutions written as matmuls ("taps"; with XLA's convolution, vmap makes them
grouped convolutions), so neither half alone says which pair wins.
A variant starts only when, as long as the longest one before it, it would end within the
search's time; the table says what was timed. Variants whose resolved step
settings equal one already timed are the same program and are not timed again.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from idm_jax import backend
from idm_jax import condense
from idm_jax import config_check
from idm_jax import data as data_lib
from idm_jax import presets

# The choices the search visits, in order (the likely largest gain first), and the fields they set.
CHOICES = {"forms": ("idm.queue_train_impl", "idm.conv_impl"), "class chunks": ("idm.class_batch",),
           "dispatch": ("idm.steps_per_dispatch",)}
# The (queue training, convolution) pairs, the accelerator default and the batched form without
# grouped convolutions first: the search may run out of time before the last.
FORM_PAIRS = (("map", "xla"), ("vmap", "taps"), ("map", "taps"), ("map", "matmul"), ("vmap", "xla"),
              ("vmap", "matmul"))
MAX_STEPS_PER_DISPATCH = 10
TIMED_CALLS = 3  # calls of the compiled step after the first, their median is the figure


@dataclasses.dataclass
class Timing:
    """One row of the tuning table."""

    overrides: dict[str, Any]  # the config fields the variant sets ({} = the config as given)
    compile_s: float | None
    s_per_it: float | None
    note: str = ""  # why it has no figure (an error, the time ran out)

    @property
    def label(self) -> str:
        return variant_label(self.overrides)

    def row(self) -> dict[str, Any]:
        return {"variant": self.label, "overrides": dict(self.overrides), "compile_s": self.compile_s,
                "s_per_it": self.s_per_it, "note": self.note}


def variant_label(overrides: dict[str, Any]) -> str:
    """"idm.conv_impl=matmul, idm.class_batch=1" ("as configured" for none)."""
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "as configured"


def dispatch_size(config, cap: int = MAX_STEPS_PER_DISPATCH) -> int:
    """The most iterations per call (<= cap) that divide every cadence the host acts on (log rows,
    checkpoints, periodic evaluations): 1 when only 1 does or the data stay on the host."""
    cadences = [c for c in (config.log_every, config.checkpoint_every, config.eval.interval) if c]
    common = math.gcd(*cadences) if cadences else cap
    if config.data.on_device == "host":
        return 1
    return max(k for k in range(1, cap + 1) if common % k == 0)


def choice_values(config, num_classes: int) -> dict[str, list[dict[str, Any]]]:
    """{choice: the overrides of each of its values} for what this config's method uses (no queue:
    the convolutions' form alone; class chunks: auto, one class, all `num_classes`)."""
    values: dict[str, list[dict[str, Any]]] = {}
    if config.idm.use_queue:
        values["forms"] = [{"idm.queue_train_impl": q, "idm.conv_impl": c} for q, c in FORM_PAIRS]
    else:
        values["forms"] = [{"idm.conv_impl": c} for c in backend.CONV_IMPLS if c != "auto"]
    values["class chunks"] = [{"idm.class_batch": v} for v in (0, 1, int(num_classes))]
    k = dispatch_size(config)
    if k > 1:
        values["dispatch"] = [{"idm.steps_per_dispatch": v} for v in (1, k)]
    return {name: v for name, v in values.items()
            if all(presets.field_problem(config, f) is None for f in CHOICES[name])}


def with_overrides(config, overrides: dict[str, Any]):
    """A copy of config with the variant's fields set."""
    c = config.copy_and_resolve_references()
    for key, value in overrides.items():
        presets.set_dotted(c, key, value)
    return c


def program_key(config, ds: data_lib.ArrayDataset) -> tuple:
    """What decides the compiled program: the resolved step settings and iterations per call."""
    return condense.settings_from_config(config, ds), int(config.idm.steps_per_dispatch)


def time_step(config, ds: data_lib.ArrayDataset, calls: int = TIMED_CALLS) -> tuple[float, float]:
    """(seconds to lower and compile config's step, median seconds per iteration of `calls`
    calls after a first one), each blocked until ready. The state is donated: each call takes
    the previous one's output."""
    import jax  # pylint: disable=g-import-not-at-top

    s = condense.settings_from_config(config, ds)
    state = condense.init_state(s, ds, 0, config.idm.init)
    data = condense.device_data(ds)
    k = int(config.idm.steps_per_dispatch)
    jitted = condense.make_step(s) if k == 1 else condense.make_multi_step(s, k)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    seconds = []
    for _ in range(calls + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - t0)
    return compile_s, statistics.median(seconds[1:]) / k


TimeFn = Callable[[Any, data_lib.ArrayDataset], tuple[float, float]]


def tune(config, ds: data_lib.ArrayDataset, budget_s: float, *, time_fn: TimeFn = time_step,
         clock: Callable[[], float] = time.monotonic) -> list[Timing]:
    """The tuning table of config's step: the config as given first, then the greedy search
    (module docstring) until `budget_s` seconds have passed. time_fn(config, ds) -> (compile
    seconds, seconds per iteration); the tests inject one."""
    start = clock()
    table: list[Timing] = []
    seen: set = set()
    values = choice_values(config, ds.num_classes)
    best: dict[str, Any] = {}
    best_s = None
    longest = 0.0  # seconds of the longest variant timed so far
    queue: list[dict[str, Any]] = [{}]  # the config as given, then each choice's values in turn
    choices = list(values)
    while queue or choices:
        if not queue:
            queue = [{**best, **v} for v in values[choices.pop(0)]]
            continue
        overrides = queue.pop(0)
        c = with_overrides(config, overrides)
        try:
            config_check.validate(c)
            key = program_key(c, ds)
        except ValueError as e:
            table.append(Timing(overrides, None, None, f"not valid here: {e}"))
            continue
        if key in seen:
            continue
        seen.add(key)
        # A variant starts only when it would end in time, judged by the longest one so far.
        if clock() - start + longest > budget_s:
            table.append(Timing(overrides, None, None, "not timed: the tuning time was spent"))
            continue
        began = clock()
        try:
            compile_s, s_per_it = time_fn(c, ds)
        except Exception as e:  # pylint: disable=broad-except  (a variant this backend cannot run)
            table.append(Timing(overrides, None, None, f"failed: {str(e).splitlines()[0][:160]}"))
            continue
        finally:
            longest = max(longest, clock() - began)
        table.append(Timing(overrides, compile_s, s_per_it))
        if best_s is None or s_per_it < best_s:
            best, best_s = overrides, s_per_it
    return table


def fastest(table: list[Timing]) -> Timing | None:
    """The timed row with the fewest seconds per iteration (None when nothing was timed)."""
    timed = [t for t in table if t.s_per_it is not None]
    return min(timed, key=lambda t: t.s_per_it) if timed else None
