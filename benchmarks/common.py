"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import resource
import signal
import statistics
import subprocess
import time

from idm_jax import backend, presets

backend.use_cpu_memory_scheduler()  # every benchmark imports this module before JAX starts


def peak_memory_gib() -> float:
    """Peak device memory so far (GPU/TPU allocator), else this process's peak resident memory."""
    import jax  # pylint: disable=g-import-not-at-top

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if peak is None:  # CPU: no allocator statistics
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak / 2**30


CONFIG_OVERRIDE = "--config."


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without its `--config.<field>=<value>` items, those items): the benchmarks take config
    overrides in main.py's syntax, and pass them on to the processes they start."""
    rest = [a for a in argv if not a.startswith(CONFIG_OVERRIDE)]
    overrides = [a for a in argv if a.startswith(CONFIG_OVERRIDE)]
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"error: {item}: expected {item}=<value>, e.g. --config.idm.class_batch=1")
    return rest, overrides


def apply_config_overrides(config, overrides: list[str]) -> None:
    """Applies `--config.<field>=<value>` items to `config` in place, each value parsed by absl's
    config flag as main.py's are (by the field's type). A field the config lacks, or a value of the
    wrong type, stops with one line naming it (a typo must not be added silently)."""
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    for item in overrides:
        field = item[len(CONFIG_OVERRIDE):].partition("=")[0]
        problem = presets.field_problem(config, field)
        if problem:
            raise SystemExit(f"error: --config.{field}: {problem}")
    argv = ["benchmark", *overrides]
    parsed = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=parsed, lock_config=False, sys_argv=argv)
    try:
        parsed(argv)
    except (flags.Error, ValueError) as e:
        raise SystemExit(f"error: bad config override: {' '.join(str(e).split())}") from None


def first_and_median_seconds(fn, steps: int) -> tuple[float, float]:
    """(seconds of the first `fn()` call, which compiles; median seconds of `steps` later calls),
    each blocked until its outputs are ready."""
    import jax  # pylint: disable=g-import-not-at-top

    def timed() -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    first = timed()
    return first, statistics.median(timed() for _ in range(steps))


def run_in_own_process(script: str, args: list[str], label: str, cwd: str) -> dict | None:
    """Runs `python script --one *args` in a fresh process (so its peak memory is its own) and
    returns the JSON row it prints last, or None after printing its error under `label`."""
    import json  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top

    out = subprocess.run([sys.executable, script, "--one", *args], capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        print(f"{label} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"done: {row}", file=sys.stderr, flush=True)
    return row


def machine_line(rows: list[dict], extra: str = "") -> str:
    """The header line of a benchmark table: processor, cores, device and jax of the rows."""
    import os  # pylint: disable=g-import-not-at-top
    import platform  # pylint: disable=g-import-not-at-top

    device, jax_version = (rows[0]["device"], rows[0]["jax"]) if rows else ("", "")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, "
            f"jax {jax_version}{'; ' + extra if extra else ''}")


def end_group(proc: subprocess.Popen, grace: float) -> None:
    """Ends proc's whole process group (started with process_group=0): SIGTERM, then SIGKILL after
    `grace` seconds to whatever is left, children that ignored SIGTERM included."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the leader may be gone while its children are not
    except ProcessLookupError:
        pass
    proc.wait()
