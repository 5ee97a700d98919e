"""The accelerator step at the hardware's pace: one script that profiles and times it all.

    python benchmarks/gpu_speed.py --out=runs/gpu_speed              # on the GPU (or: CHECK=speed gpu_check.sh)
    python benchmarks/gpu_speed.py --dry-run --out=/tmp/gpu_speed    # toy sizes on CPU (the test suite)

Every part runs in its own process under its own time limit (--limits); a failed or cut part
leaves its figures null and the others still run. Each part appends JSON rows to
OUT/parts/<part>.jsonl as it measures, so a part cut by its limit keeps what it finished.
Parts, in order of priority (release settings, configs/<dataset>.py:<ipc>):

* cifar10_ipc10, cifar10_ipc1 (profiled) and cifar10_ipc50, cifar100_ipc10 (timed):
  - compile: the step lowered and compiled ahead (seconds), the optimized HLO's op counts
    (fusions, custom calls by target = cuDNN/cuBLAS calls, convolutions, while loops, copies)
  - step: median s/iteration over --steps calls of the compiled step (as the runner calls it,
    runner.compile_ahead), each blocked until ready; the state donated: any "donated buffers
    were not usable" warning is recorded, and so is every XLA compilation during the timed calls
    (0 = nothing recompiles); host peak RSS so far (getrusage)
  - flops: XLA's cost analysis of the same step with every loop unrolled (a loop body is
    counted once by the analysis), so TFLOP/s = flops / (s/iteration)
  - dispatch: --dispatch iterations per call (condense.make_multi_step): s/iteration without
    the per-iteration host round trip
  - trace (profiled settings): jax.profiler trace of --trace-steps steps, summarised into
    kernels per iteration, device-busy seconds per iteration and the top kernels by time
  - phases (profiled settings): benchmarks/step_phases.py's phases, each jitted and timed alone
* candidates: step variants that change values, s/iteration, shown and never used for a set:
  true f32 at CIFAR-10 IPC 10 (matmul/conv precision "highest" instead of XLA's default, TF32 on
  NVIDIA GPUs). The value-preserving variants (queue form, convolution form, class chunks, steps
  per dispatch) are timed and picked by `main.py --mode=table1` (idm_jax/step_variants.py).
* eval: the paper's evaluation of one CIFAR-10 IPC-10 set (5 ConvNets, 400 expanded images),
  --eval-epochs timed after the first, extrapolated to the release schedule's 1001 passes, plus
  the test pass over 10,000 images
* release: the authors' release at CIFAR-10 IPC 10 on the same host (benchmarks/parity/
  release_side.py, --release and --release-python), median s/iteration

Writes gpu_speed.json (the keys of docs/gpu_speed.json: each a number or null, the command,
and every row measured under "details") and gpu_speed.md (the tables) into --publish (default
--out): at the start, after each part and at the end, each atomically (a rename), so that a kill
at any moment leaves a valid record of what was measured; SIGTERM ends the part in flight and
writes it. The parts' own files (rows, logs, traces, the release's data) stay in --out. Each part
runs in a process group of its own, ended whole at its limit (the release's torch process too).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import glob
import gzip
import importlib
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def host_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def host_rss_now_gib() -> float:
    """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return host_rss_gib()


_RSS_AT_START_GIB = host_rss_now_gib()  # before JAX and idm_jax are imported


from benchmarks import common  # noqa: E402  (XLA:CPU's memory scheduler, set before JAX starts)
from idm_jax import workdir  # noqa: E402  (atomic writes; imports no JAX)

# json key prefix -> (config module, ipc, profiled); the dry run maps them onto the digits.
SETTINGS = {
    "cifar10_ipc10": ("cifar10", 10, True),
    "cifar10_ipc1": ("cifar10", 1, True),
    "cifar10_ipc50": ("cifar10", 50, False),
    "cifar100_ipc10": ("cifar100", 10, False),
}
DRY_SETTINGS = {  # one program for all (the parts' processes share it through the compilation cache)
    "cifar10_ipc10": ("quick", 1, True),
    "cifar10_ipc1": ("quick", 1, False),
    "cifar10_ipc50": ("quick", 1, False),
    "cifar100_ipc10": ("quick", 1, False),
}
# Small enough that a dry run compiles in seconds (the shapes of tests/test_condense.py).
DRY_OVERRIDES = ("--config.idm.batch_real=8", "--config.idm.batch_train=16", "--config.idm.model_train_steps=2",
                 "--config.idm.net_num=4", "--config.idm.net_generate_interval=2")
CANDIDATES = (  # name, setting, config overrides (main.py's syntax), matmul precision (None = XLA's default)
    ("true f32 (precision highest)", "cifar10_ipc10", (), "highest"),
)
PARTS = ("cifar10_ipc10", "cifar10_ipc1", "cifar10_ipc50", "cifar100_ipc10", "candidates", "eval", "release")
# Seconds per part on the GPU: 8.1 minutes together, compilation included.
LIMITS = {"cifar10_ipc10": 120, "cifar10_ipc1": 80, "cifar10_ipc50": 45, "cifar100_ipc10": 65,
          "candidates": 75, "eval": 45, "release": 55}
# cifar100_ipc10_s_per_it is CIFAR-100's own figure; where the machine lacks CIFAR-100 (the device
# has no network) its settings run on CIFAR-10 relabelled into 100 classes and the figure goes
# under STAND_IN_KEY instead, so that nobody reads it as CIFAR-100's.
STAND_IN_KEY = "cifar100_settings_on_relabelled_cifar10_ipc10_s_per_it"
JSON_KEYS = ("device", "jax_version", "date", "cifar10_ipc1_s_per_it", "cifar10_ipc10_s_per_it",
             "cifar10_ipc50_s_per_it", "cifar100_ipc10_s_per_it", STAND_IN_KEY, "eval_5nets_1000ep_ipc10_s",
             "host_rss_gib", "release_cifar10_ipc10_s_per_it", "command")


# ----------------------------------------------------------------------------------------------
# Pure helpers (tested without JAX work)


def hlo_op_counts(hlo_text: str) -> dict:
    """Op counts of an optimized HLO module's text: what the device launches, per program (a
    loop body counted once). custom_calls: {target: count} (cuDNN convolutions, cuBLAS gemms)."""
    ops = collections.Counter(re.findall(r"^\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s.*?\s([a-z][\w-]*)\(", hlo_text, re.M))
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))
    return {"fusion": ops["fusion"], "custom_call": ops["custom-call"], "convolution": ops["convolution"],
            "while": ops["while"], "copy": ops["copy"], "transpose": ops["transpose"],
            "instructions": sum(ops.values()), "custom_calls": dict(targets.most_common(8))}


KERNEL_KINDS = (  # (kind, substrings of a kernel's name, lower case), first match wins
    ("convolution", ("conv", "cudnn", "xmma", "implicit", "wgrad", "dgrad", "fprop")),
    ("matmul", ("gemm", "cublas", "cutlass", "dot")),
    ("gather/scatter", ("gather", "scatter", "dynamic-slice", "dynamic_slice", "dynamic-update")),
    ("layout (copy/transpose)", ("transpose", "copy")),
    ("reduction", ("reduce", "reduction")),
)
# Trace lines that summarise other lines (not kernels) on a device's row of the trace.
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Launch Stats", "Source", "TensorFlow")


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other fusion")


def summarize_trace(trace: dict, iterations: int, top: int = 12) -> dict:
    """Kernels per iteration, busy seconds per iteration and the top kernels of a profiler trace
    (the perfetto / trace-viewer JSON that jax.profiler.trace writes).

    GPU/TPU: the complete events on the device rows ("/device:..." processes), their stream
    lines, not the derived ones. CPU (no device rows): the XLA thunks on the host's XLA threads.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if devices:
        source = "device kernels"
        kernels = [e for e in complete if e["pid"] in devices
                   and not threads.get((e["pid"], e.get("tid")), "").startswith(DERIVED_LINES)]
    else:
        source = "XLA:CPU thunks on the host's XLA threads"
        noise = ("ThreadpoolListener", "end: ", "ThunkExecutor", "SlinkyThreadPool", "Thunk::")
        kernels = [e for e in complete if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
                   and not e["name"].startswith(noise)]
    per_name = collections.defaultdict(lambda: [0, 0.0])
    kinds = collections.Counter()
    for e in kernels:
        per_name[e["name"]][0] += 1
        per_name[e["name"]][1] += e["dur"] / 1e6
        kinds[kernel_kind(e["name"])] += e["dur"] / 1e6
    busy = sum(seconds for _, seconds in per_name.values())
    n = max(iterations, 1)
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"source": source, "iterations": iterations, "kernels_per_it": len(kernels) / n,
            "distinct_kernels": len(per_name), "busy_s_per_it": busy / n,
            "by_kind_share": {k: v / busy for k, v in kinds.most_common()} if busy else {},
            "top": [{"name": name[:120], "calls_per_it": c / n, "ms_per_it": 1e3 * s / n,
                     "share": s / busy if busy else 0.0} for name, (c, s) in ranked]}


def summary_json(rows: dict[str, list[dict]], command: str, dry_run: bool) -> dict:
    """docs/gpu_speed.json's record from the parts' rows: its keys (null where a part
    did not measure it), the command, and every row under "details"."""
    def find(part, what, key):
        return next((r[key] for r in rows.get(part, []) if r.get("what") == what and r.get(key) is not None), None)

    env = next((r for part in rows.values() for r in part if r.get("what") == "environment"), {})
    out = {"device": env.get("device"), "jax_version": env.get("jax"),
           "date": datetime.date.today().isoformat()}
    for key in sorted(SETTINGS, key=lambda k: JSON_KEYS.index(f"{k}_s_per_it")):
        out[f"{key}_s_per_it"] = find(key, "step", "s_per_it")
    out[STAND_IN_KEY] = None
    if find("cifar100_ipc10", "setting", "stand_in") is not None:  # timed on relabelled CIFAR-10
        out[STAND_IN_KEY], out["cifar100_ipc10_s_per_it"] = out["cifar100_ipc10_s_per_it"], None
    out["eval_5nets_1000ep_ipc10_s"] = find("eval", "eval", "total_s")
    out["host_rss_gib"] = find("cifar10_ipc10", "step", "host_rss_gib")
    out["release_cifar10_ipc10_s_per_it"] = find("release", "release", "s_per_it")
    out["command"] = command
    assert tuple(out) == JSON_KEYS
    return {**out, "dry_run": dry_run, "details": rows}


# ----------------------------------------------------------------------------------------------
# Parts (each in its own process)


class Rows:
    """Appends a part's rows to its .jsonl file as they are measured (a cut part keeps them)."""

    def __init__(self, path: str):
        self.path = path

    def add(self, what: str, **values) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"what": what, **values}, default=float) + "\n")
        print(f"[gpu_speed] {os.path.basename(self.path)}: {what} {values}", file=sys.stderr, flush=True)


class HostMemory:
    """Resident GiB after each named stage, so that each GiB of the peak has a cause."""

    def __init__(self, start_gib: float = _RSS_AT_START_GIB):
        self.stages = [("python started", start_gib)]

    def after(self, stage: str) -> None:
        self.stages.append((stage, host_rss_now_gib()))

    def row(self) -> dict:
        return {"stages": [{"stage": name, "rss_gib": gib,
                            "added_gib": gib - (self.stages[i - 1][1] if i else 0.0)}
                           for i, (name, gib) in enumerate(self.stages)],
                "peak_gib": host_rss_gib()}


def environment_row(rows: Rows) -> None:
    import jax  # pylint: disable=g-import-not-at-top

    dev = jax.devices()[0]
    rows.add("environment", device=f"{dev.platform}:{dev.device_kind}", jax=jax.__version__,
             matmul_precision=str(jax.config.jax_default_matmul_precision))


def relabelled_stand_in(ds, num_classes: int):
    """ds's images relabelled round-robin into `num_classes` equal classes: the shapes, and so
    the step's cost, of a dataset this machine lacks (CIFAR-100 on the device, which has no
    network: CIFAR-10's 50,000 images as 100 classes of 500), not its pixels."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    for split, labels in (("train", ds.train_labels), ("test", ds.test_labels)):
        if len(labels) < num_classes:
            raise ValueError(f"{ds.name}: {len(labels)} {split} images cannot fill {num_classes} classes")
    return dataclasses.replace(
        ds, name=f"{ds.name} relabelled into {num_classes} classes",
        train_labels=(np.arange(len(ds.train_labels)) % num_classes).astype(np.int32),
        test_labels=(np.arange(len(ds.test_labels)) % num_classes).astype(np.int32),
        class_names=tuple(f"stand_in_{c}" for c in range(num_classes)))


def load_setting(config_name: str, ipc: int, overrides: Sequence[str] = ()):
    """(config, dataset, step settings, device data, what stands in for the data or None);
    overrides: `--config.<field>=<value>` items, as main.py takes them."""
    from idm_jax import condense, data  # pylint: disable=g-import-not-at-top

    config = importlib.import_module(f"configs.{config_name}").get_config(str(ipc))
    common.apply_config_overrides(config, list(overrides))
    stand_in = None
    try:
        ds = data.load_config_dataset(config)
    except Exception as e:  # pylint: disable=broad-except
        if config_name != "cifar100":
            raise
        # The device has no network and no CIFAR-100 unless IDM_CIFAR100 names a copy.
        missing = f"{config.data.source}: {str(e)[:120]}"
        config.data.source = importlib.import_module("configs.cifar10").data_source()
        ds = relabelled_stand_in(data.load_config_dataset(config), 100)
        stand_in = f"CIFAR-10's {len(ds.train_labels)} training images relabelled into 100 classes ({missing})"
    s = condense.settings_from_config(config, ds)
    return config, ds, s, condense.device_data(ds), stand_in


_COMPILES = [0]  # XLA compilations in this process, counted by a jax.monitoring listener


def _count_compiles(event: str, *_, **__) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


def timed_calls(fn, state, data, steps: int) -> tuple[float, object, dict]:
    """(median seconds of `steps` calls of a donating fn after a first one, the final state,
    {"warnings": distinct warnings, "compiles": XLA compilations during the calls})."""
    import warnings  # pylint: disable=g-import-not-at-top

    import jax  # pylint: disable=g-import-not-at-top

    if not _COMPILES[1:]:  # registered once per process
        jax.monitoring.register_event_duration_secs_listener(_count_compiles)
        _COMPILES.append(True)
    box, before = [state], _COMPILES[0]

    def call():
        box[0], metrics = fn(box[0], data)
        return metrics

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, seconds = common.first_and_median_seconds(call, steps)
    return seconds, box[0], {"warnings": sorted({str(w.message)[:200] for w in caught}),
                             "compiles": _COMPILES[0] - before}


def compiled_ahead(jitted, state, data) -> tuple[object, float, dict]:
    """(the compiled program, seconds to lower and compile it, its HLO op counts)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(state, data).compile()
    return compiled, time.perf_counter() - t0, hlo_op_counts(compiled.as_text())


def cost_flops(s, state, data) -> float | None:
    """Flops of one iteration by XLA's cost analysis of the step with every loop unrolled
    (classes in one chunk, queue steps unrolled, members one by one): lowered, not compiled."""
    from idm_jax import condense  # pylint: disable=g-import-not-at-top

    flat = dataclasses.replace(s, unroll_loops=True, class_batch=s.num_classes, max_unrolled_queue_steps=0,
                               queue_train_impl="map")
    try:
        cost = condense.make_step(flat).lower(state, data).cost_analysis()
    except Exception as e:  # pylint: disable=broad-except
        print(f"[gpu_speed] cost analysis failed: {e}", file=sys.stderr)
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def part_setting(args, rows: Rows, key: str) -> None:
    import jax  # pylint: disable=g-import-not-at-top

    from benchmarks import step_phases  # pylint: disable=g-import-not-at-top
    from idm_jax import condense  # pylint: disable=g-import-not-at-top

    config_name, ipc, profiled = (DRY_SETTINGS if args.dry_run else SETTINGS)[key]
    memory = HostMemory()
    memory.after("jax and idm_jax imported")
    environment_row(rows)
    memory.after("backend started (jax.devices)")
    t0 = time.perf_counter()
    config, ds, s, data, stand_in = load_setting(config_name, ipc, args.overrides)
    memory.after("dataset decoded and put on the device")
    state = condense.init_state(s, ds, 0, config.idm.init)
    memory.after("state initialised")
    rows.add("setting", config=config_name, ipc=ipc, class_batch=s.class_batch, queue=s.queue_train_impl,
             unroll_loops=s.unroll_loops, load_s=time.perf_counter() - t0, data=ds.name, stand_in=stand_in)
    step, compile_s, hlo = compiled_ahead(condense.make_step(s), state, data)
    rows.add("compile", seconds=compile_s, hlo=hlo)
    memory.after("step compiled")
    rows.add("host_memory", **memory.row())  # again below, with the steps: a part cut short keeps this one
    seconds, state, seen = timed_calls(step, state, data, args.steps)
    memory.after(f"{args.steps + 1} steps run")
    rows.add("host_memory", **memory.row())
    rows.add("step", s_per_it=seconds, steps=args.steps, **seen, host_rss_gib=host_rss_gib(),
             device_peak_gib=common.peak_memory_gib())
    pause_hook(f"in:{key}")
    flops = cost_flops(s, state, data)
    rows.add("flops", flops_per_it=flops, tflops_per_s=flops / seconds / 1e12 if flops else None)
    if profiled:  # what the step spends its time on, before any other program is compiled
        trace_dir = os.path.join(args.out, "trace", key)
        jax.block_until_ready(state)
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.trace_steps):
                state, metrics = step(state, data)
            jax.block_until_ready(metrics)
        found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
        if found:
            with gzip.open(found[-1]) as f:
                rows.add("trace", **summarize_trace(json.load(f), args.trace_steps))
    k = args.dispatch
    multi, compile_s, hlo = compiled_ahead(condense.make_multi_step(s, k), state, data)
    per_call, state, seen = timed_calls(multi, state, data, max(2, args.steps // k))
    rows.add("dispatch", steps_per_dispatch=k, s_per_it=per_call / k, compile_s=compile_s, **seen,
             while_loops=hlo["while"])
    if profiled:
        key_phases = jax.random.PRNGKey(1)
        for name, fn in step_phases.phase_fns(s).items():
            first, sec = common.first_and_median_seconds(lambda fn=fn: fn(state, data, key_phases), args.steps)
            rows.add("phase", phase=name, first_s=first, s_per_call=sec, share_of_step=sec / seconds)


def part_candidates(args, rows: Rows) -> None:
    import jax  # pylint: disable=g-import-not-at-top

    from idm_jax import condense  # pylint: disable=g-import-not-at-top

    environment_row(rows)
    for name, key, overrides, precision in CANDIDATES[:1] if args.dry_run else CANDIDATES:
        config_name, ipc, _ = (DRY_SETTINGS if args.dry_run else SETTINGS)[key]
        config, ds, s, data, _ = load_setting(config_name, ipc, [*args.overrides, *overrides])
        state = condense.init_state(s, ds, 0, config.idm.init)
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            step, compile_s, _ = compiled_ahead(condense.make_step(s), state, data)
        seconds, state, _ = timed_calls(step, state, data, args.steps)
        rows.add("candidate", candidate=name, setting=key, overrides=list(overrides), precision=precision,
                 s_per_it=seconds,
                 compile_s=compile_s)


def part_eval(args, rows: Rows) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    from idm_jax import augment, measure, models, trainer  # pylint: disable=g-import-not-at-top

    config_name, ipc, _ = (DRY_SETTINGS if args.dry_run else SETTINGS)["cifar10_ipc10"]
    environment_row(rows)
    config, ds, _, _, _ = load_setting(config_name, ipc, args.overrides)
    ev = config.eval
    rng = np.random.default_rng(0)  # real images of each class stand in for a synthetic set
    idx = np.concatenate([rng.choice(np.flatnonzero(ds.train_labels == c), ipc, replace=False)
                          for c in range(ds.num_classes)])
    from idm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    images = data_lib.normalize(ds.train_images[idx], ds.mean, ds.std)
    images, labels = augment.partition_expand(jax.numpy.asarray(images), jax.numpy.asarray(ds.train_labels[idx]),
                                              config.idm.partition_factor)
    arch = models.parse_archs(ev.archs)[0]
    model = models.get_model(arch, ds.num_classes, ds.image_shape[-1])
    seeds = 2 if args.dry_run else ev.num_seeds
    nets = trainer.train_networks(model, np.asarray(images), np.asarray(labels), key=jax.random.PRNGKey(0),
                                  num_seeds=seeds, epochs=args.eval_epochs + 1, schedule="paper",
                                  batch_size=ev.batch_size, log_every=1000, name="gpu_speed")
    t0 = time.perf_counter()
    measure.measure_accuracy(model, nets.variables, ds.test_images, ds.test_labels, mean=ds.mean, std=ds.std,
                             test_batch_size=ev.test_batch_size)
    test_s = time.perf_counter() - t0
    passes = trainer.epoch_plan(1000, "release")[0]
    rows.add("eval", arch=arch, seeds=seeds, images=int(images.shape[0]), epochs_timed=args.eval_epochs,
             first_epoch_s=nets.first_epoch_seconds, s_per_epoch=nets.seconds_per_epoch, test_s=test_s,
             passes=passes, total_s=nets.seconds_per_epoch * passes + test_s,
             method=f"{args.eval_epochs} passes timed after the first, extrapolated to {passes}, + test pass")


def part_release(args, rows: Rows) -> None:
    import numpy as np  # pylint: disable=g-import-not-at-top

    from benchmarks import release_parity  # pylint: disable=g-import-not-at-top

    if not args.release:
        rows.add("release", s_per_it=None, note="no --release given")
        return
    _, ds, _, _, _ = load_setting("cifar10", 10)
    out = os.path.join(args.out, "release")
    os.makedirs(out, exist_ok=True)
    data_npz = release_parity.stage_data(argparse.Namespace(data=os.path.join(out, "data.npz")), ds)
    subprocess.run([args.release_python, release_parity.RELEASE_SIDE, "condense", f"--release={args.release}",
                    f"--data={data_npz}", f"--out={out}", "--dataset=CIFAR10", "--ipc=10",
                    f"--budgets=0,{args.release_iterations}", "--seed=0"], check=True)
    timings = release_parity.load_json(os.path.join(out, "timings.json"))
    seconds = timings["iteration_seconds"][1:]  # the first carries cuDNN's autotuning
    rows.add("release", s_per_it=float(np.median(seconds)), iterations=len(seconds), device=timings.get("device"),
             torch=timings.get("torch"), peak_rss_gib=timings.get("peak_rss_gib"))


# ----------------------------------------------------------------------------------------------
# Driver


def parse_limits(text: str, dry_run: bool = False) -> dict[str, int]:
    """Seconds per part: LIMITS (none in a dry run, whose pace is the CPU's) with text's overrides."""
    limits = {name: 0 for name in LIMITS} if dry_run else dict(LIMITS)
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or name not in LIMITS or not value.isdigit():
            raise SystemExit(f"--limits: bad entry {item!r}; expected part=seconds with a part of {PARTS}")
        limits[name] = int(value)
    return limits


def markdown(record: dict) -> str:
    """The tables of OUT/gpu_speed.md from the json record."""
    d = record["details"]
    lines = [f"# GPU step speed ({record['device']}, jax {record['jax_version']}, {record['date']}"
             f"{', DRY RUN' if record['dry_run'] else ''})", "", f"`{record['command']}`", "",
             "| setting | compile (s) | s / it | s / it, several per dispatch | TFLOP/s | kernels / it "
             "| busy s / it | host RSS (GiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def get(part, what, key, fmt="{:.4f}"):
        value = next((r.get(key) for r in d.get(part, []) if r.get("what") == what), None)
        return "—" if value is None else fmt.format(value)

    for key in SETTINGS:
        label = key if get(key, "setting", "stand_in", "{}") == "—" else f"{key} on a stand-in (below)"
        lines.append(f"| {label} | {get(key, 'compile', 'seconds', '{:.1f}')} | {get(key, 'step', 's_per_it')} | "
                     f"{get(key, 'dispatch', 's_per_it')} | {get(key, 'flops', 'tflops_per_s', '{:.2f}')} | "
                     f"{get(key, 'trace', 'kernels_per_it', '{:.0f}')} | {get(key, 'trace', 'busy_s_per_it')} | "
                     f"{get(key, 'step', 'host_rss_gib', '{:.2f}')} |")
    for key in SETTINGS:  # a setting whose dataset this machine lacks was timed on a stand-in
        if (note := get(key, "setting", "stand_in", "{}")) != "—":
            lines += ["", f"{key} was timed on {note}."]
    for key in SETTINGS:
        phases = [r for r in d.get(key, []) if r.get("what") == "phase"]
        if phases:
            lines += ["", f"{key} phases (each jitted alone):", "", "| phase | s / call | share of the step |",
                      "|---|---:|---:|"]
            lines += [f"| {r['phase']} | {r['s_per_call']:.4f} | {100 * r['share_of_step']:.0f} % |" for r in phases]
        trace = next((r for r in d.get(key, []) if r.get("what") == "trace"), None)
        if trace:
            lines += ["", f"{key} top kernels ({trace['source']}):", "", "| kernel | calls / it | ms / it | share |",
                      "|---|---:|---:|---:|"]
            lines += [f"| `{t['name']}` | {t['calls_per_it']:.1f} | {t['ms_per_it']:.2f} | {100 * t['share']:.0f} % |"
                      for t in trace["top"]]
            lines += ["", "by kind: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in trace["by_kind_share"].items())]
    for key in SETTINGS:
        memory = next((r for r in reversed(d.get(key, [])) if r.get("what") == "host_memory"), None)  # newest
        if memory:
            lines += ["", f"{key} host memory of the process, resident after each stage (peak "
                      f"{memory['peak_gib']:.2f} GiB):", "", "| stage | resident (GiB) | added (GiB) |",
                      "|---|---:|---:|"]
            lines += [f"| {m['stage']} | {m['rss_gib']:.2f} | {m['added_gib']:+.2f} |" for m in memory["stages"]]
    cands = [r for r in d.get("candidates", []) if r.get("what") == "candidate"]
    if cands:
        lines += ["", "Step variants:", "", "| setting | variant | s / it | compile (s) |", "|---|---|---:|---:|"]
        lines += [f"| {r['setting']} | {r['candidate']} | {r['s_per_it']:.4f} | {r['compile_s']:.1f} |" for r in cands]
    lines += ["", f"evaluation 5 nets x 1000 epochs IPC 10: {get('eval', 'eval', 'total_s', '{:.1f}')} s "
              f"({get('eval', 'eval', 'method', '{}')}); release s / it (CIFAR-10 IPC 10, same host): "
              f"{get('release', 'release', 's_per_it')}"]
    return "\n".join(lines) + "\n"


MIN_PART_S = 10  # a part is not started with less time than this
SUMMARY_RESERVE_S = 15  # of --total, kept for reading the parts and writing gpu_speed.json/.md


def part_limit(limit: int, total: int, elapsed: float) -> int | None:
    """A part's time limit (0 = none) within what --total (0 = none) leaves after `elapsed`
    seconds and the summary's reserve; None when too little is left to start it."""
    if not total:
        return limit
    left = int(total - SUMMARY_RESERVE_S - elapsed)
    if left < MIN_PART_S:
        return None
    return min(limit, left) if limit else left


KILL_GRACE_S = 10  # after SIGTERM, a part's group has this long before SIGKILL
OUT_FILE_CAP = 15 * 2**20  # under the 16 MiB per file a GPU job with a cap on what it returns may allow


class Stopped(Exception):
    """The driver got SIGTERM (the outer limit): stop the part in flight and write the record."""


def _raise_stopped(signum, _frame):
    raise Stopped(f"signal {signum}")


def pause_hook(stage: str) -> None:
    """Test hook: with IDM_PAUSE_AT=stage, touch $IDM_PAUSED and wait to be killed (the test kills
    the whole job there, as an outer time limit would, and checks what its destination holds)."""
    if os.environ.get("IDM_PAUSE_AT") == stage:
        with open(os.environ["IDM_PAUSED"], "w") as f:
            f.write(stage)
        time.sleep(3600)


def run_limited(cmd: list[str], limit: float | None, log, env=None, cwd=None) -> int | str:
    """cmd's return code, or "timeout" when `limit` seconds passed: it runs in a process group of
    its own, ended whole at the limit or when this process is stopped (Stopped)."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, process_group=0)
    try:
        return proc.wait(timeout=limit or None)
    except subprocess.TimeoutExpired:
        common.end_group(proc, KILL_GRACE_S)
        return "timeout"
    except BaseException:
        common.end_group(proc, 2)
        raise


def read_rows(parts_dir: str) -> dict[str, list[dict]]:
    """Every part's rows; a line cut by a kill mid-write is left out."""
    rows = {}
    for part in PARTS:
        path = os.path.join(parts_dir, f"{part}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                rows[part] = [row for line in f if (row := _json_or_none(line)) is not None]
    return rows


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def publish(record: dict, dest: str) -> None:
    """dest/gpu_speed.json and dest/gpu_speed.md, atomically, each under OUT_FILE_CAP (the json
    drops its details rows, the tables their end, should they ever grow past it)."""
    text = json.dumps(record, indent=1, default=float)
    if len(text) > OUT_FILE_CAP:
        text = json.dumps({**record, "details": "left out: over the size that comes back"}, indent=1, default=float)
    workdir.atomic_write(os.path.join(dest, "gpu_speed.json"), text)
    workdir.atomic_write(os.path.join(dest, "gpu_speed.md"), markdown(record)[:OUT_FILE_CAP])


def run_parts(args, argv: list[str]) -> dict:
    limits = parse_limits(args.limits, args.dry_run)
    parts_dir = os.path.join(args.out, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    env = dict(os.environ)
    if args.dry_run:  # the toy settings share their programs across the parts' processes
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.out, "jax_cache"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    parts = args.parts.split(",")
    for part in parts:
        if part not in PARTS:
            raise SystemExit(f"--parts: unknown part {part!r}; expected some of {PARTS}")
    command = args.command or "python benchmarks/gpu_speed.py " + " ".join(shlex.quote(a) for a in argv)
    dest = args.publish or args.out
    os.makedirs(dest, exist_ok=True)
    for part in parts:  # this call's parts start afresh
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(parts_dir, f"{part}.jsonl"))
    publish(summary_json(read_rows(parts_dir), command, args.dry_run), dest)
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    began = time.perf_counter()
    try:
        for part in parts:
            run_part(args, argv, part, part_limit(limits[part], args.total, time.perf_counter() - began), env)
            publish(summary_json(read_rows(parts_dir), command, args.dry_run), dest)  # what is measured so far
            pause_hook(f"after:{part}")
    except Stopped as e:
        print(f"[gpu_speed] stopped ({e}): writing what the parts measured", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    record = summary_json(read_rows(parts_dir), command, args.dry_run)
    publish(record, dest)
    return record


def run_part(args, argv: list[str], part: str, limit: int | None, env: dict) -> None:
    if limit is None:
        print(f"[gpu_speed] part {part}: skipped, under {MIN_PART_S} s of --total={args.total} left", flush=True)
        return
    start = time.perf_counter()
    with open(os.path.join(args.out, "parts", f"{part}.log"), "w") as log:
        rc = run_limited([sys.executable, os.path.abspath(__file__), *argv, f"--part={part}", f"--out={args.out}"],
                         limit, log, env=env, cwd=ROOT)
    print(f"[gpu_speed] part {part}: rc={rc} after {time.perf_counter() - start:.0f} s (limit {limit} s)",
          flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = common.split_config_overrides(argv)  # for every setting, e.g. --config.idm.class_batch=1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_speed"))
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the digits (CPU, the test suite)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--limits", default="", help="part=seconds overrides, e.g. eval=60 (0 = no limit)")
    parser.add_argument("--total", type=int, default=0,
                        help="seconds for everything (0 = no limit): later parts are shortened or skipped so "
                             "that gpu_speed.json is always written")
    parser.add_argument("--steps", type=int, default=10, help="timed iterations after the first")
    parser.add_argument("--dispatch", type=int, default=10, help="iterations per call in the dispatch row")
    parser.add_argument("--trace-steps", type=int, default=3)
    parser.add_argument("--eval-epochs", type=int, default=40, help="evaluation passes timed after the first")
    parser.add_argument("--release", default="", help="checkout of github uitrbn/IDM ('' = no release part)")
    parser.add_argument("--release-python", default=sys.executable)
    parser.add_argument("--release-iterations", type=int, default=25)
    parser.add_argument("--publish", default="",
                        help="folder for gpu_speed.json/.md, rewritten after each part ('' = --out); the "
                             "parts' files stay in --out")
    parser.add_argument("--command", default="", help="the command to record (default: this one)")
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(rest)
    args.overrides = [*DRY_OVERRIDES, *overrides] if args.dry_run else overrides
    args.out = os.path.abspath(args.out)
    if not args.part:
        os.makedirs(args.out, exist_ok=True)
        record = run_parts(args, argv)
        print(markdown(record))
        return
    rows = Rows(os.path.join(args.out, "parts", f"{args.part}.jsonl"))
    if args.part in SETTINGS:
        part_setting(args, rows, args.part)
    else:
        {"candidates": part_candidates, "eval": part_eval, "release": part_release}[args.part](args, rows)


if __name__ == "__main__":
    main()
