"""The condensation run: load, resume, loop, log, checkpoint, export, evaluate.

`run_condensation(config, workdir)` is what `main.py --mode=condense` calls.
Rerunning the same command in the same workdir resumes from the newest
orbax checkpoint and produces the same synthetic set as an uninterrupted
run (every random draw derives from the seed and the iteration number).
Checkpoints are written every `checkpoint_every` iterations and at least every
`checkpoint_every_minutes` of wall-clock time; the workdir is checked (and a
config that would change the condensed state refused) before any compute
(idm_jax/workdir.py).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging as std_logging
import os
import re
import shutil
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from idm_jax import backend
from idm_jax import baselines
from idm_jax import condense
from idm_jax import config_check
from idm_jax import data as data_lib
from idm_jax import distributed
from idm_jax import export
from idm_jax import models
from idm_jax import progress
from idm_jax import workdir as workdir_lib


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class MetricsWriter:
    """metrics.jsonl (one JSON object per row) + TensorBoard events in workdir.

    start_step: the iteration the run resumes from. metrics.jsonl rows beyond it
    (written before a crash, now redone) are dropped atomically, and TensorBoard
    is told to purge its events beyond it, so each iteration appears once.
    """

    def __init__(self, workdir: str, start_step: int = 0):
        dropped = workdir_lib.truncate_metrics(workdir, start_step)
        if dropped:
            logging.info("dropped %d metrics.jsonl rows beyond iteration %d (redone now)",
                         dropped, start_step)
        self._jsonl = open(os.path.join(workdir, workdir_lib.METRICS), "a")
        try:
            from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
            # tensorboardX names its file by the second and opens it "wb": a resume within
            # the same second would overwrite the first run's events. A nanosecond suffix
            # keeps each run's file, and sorting by name stays chronological.
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None,
                                     filename_suffix=f".{time.time_ns()}")
        except ImportError:  # TensorBoard output is optional
            self._tb = None

    def write(self, step: int, row: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


class StopFlag:
    """Set by SIGINT/SIGTERM so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def checkpoint_manager(workdir: str, keep: int, every: int = 0,
                       every_minutes: float = 0.0) -> ocp.CheckpointManager:
    """Orbax manager of workdir/checkpoints; `mngr.should_save(step)` follows the cadence.

    every: save when the iteration is a multiple of it; every_minutes: save when
    that much wall-clock time passed since the newest checkpoint (orbax's
    ContinuousCheckpointingPolicy; with no checkpoint yet, at the first
    iteration). 0 turns either off. A save is written to a temporary folder and
    renamed when complete, so a kill during a save leaves the previous
    checkpoint as the newest; leftovers are cleaned up on the next start.
    """
    policies = []
    if every:
        policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(every))
    if every_minutes:
        policies.append(ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
            minimum_interval_secs=every_minutes * 60))
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies)))


def latest_checkpoint(workdir: str) -> int | None:
    """The newest complete checkpoint's iteration in workdir, without writing anything."""
    steps = ocp.utils.checkpoint_steps(os.path.join(os.path.abspath(workdir), "checkpoints"))
    return max(steps) if steps else None


def _save(mngr: ocp.CheckpointManager, state: condense.CondenseState) -> None:
    """Saves `state` at its step (unless saved already); a full disk raises NoSpaceError.

    orbax writes into <step>.orbax-checkpoint-tmp and renames it when complete, so a failed
    save leaves the previous checkpoints as they were; its partial folder is removed here.
    """
    step, previous = int(state.step), mngr.latest_step()
    if previous == step:
        return
    _drop_closed_loop_callbacks()
    try:
        with _without_disk_full_tracebacks():
            mngr.save(step, args=ocp.args.StandardSave(state), force=True)
            mngr.wait_until_finished()
    except Exception as e:  # orbax/TensorStore report a full disk as ValueError(RESOURCE_EXHAUSTED...)
        if not workdir_lib.is_disk_full(e):
            raise
        folder = str(mngr.directory)
        if distributed.is_main():
            for partial in glob.glob(os.path.join(folder, f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(partial, ignore_errors=True)
        kept = (f"the checkpoint at iteration {previous} and every earlier output are intact"
                if previous is not None else "no checkpoint was written yet; earlier outputs are intact")
        raise workdir_lib.no_space(f"the checkpoint at iteration {step}", os.path.join(folder, str(step)),
                                   state_nbytes(state), kept=kept) from None


def state_nbytes(state) -> int:
    """Bytes of every array in `state` (all processes' shards): about what a checkpoint needs."""
    return int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state)))


def _disk_full_record(record: std_logging.LogRecord) -> bool:
    """False for log records about a full disk: the NoSpaceError raised after them says it once."""
    error = record.exc_info[1] if record.exc_info else None
    full = workdir_lib.mentions_disk_full(record.getMessage()) or (
        error is not None and workdir_lib.is_disk_full(error))
    return not full


@contextlib.contextmanager
def _without_disk_full_tracebacks():
    """orbax logs a full disk from each of its writer threads with a traceback (14 on a CPU run):
    drop those while a save runs (orbax logs through absl's logger)."""
    logger = std_logging.getLogger("absl")
    logger.addFilter(_disk_full_record)
    try:
        yield
    finally:
        logger.removeFilter(_disk_full_record)


def _drop_closed_loop_callbacks() -> None:
    """After a failed save or restore, TensorStore operations still in flight call back into
    orbax's closed asyncio loop, and each prints an 'Event loop is closed' traceback (through
    sys.unraisablehook, also while orbax is still failing, so it is installed before a save or a
    restore); this hook drops exactly those."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop", False):
        return

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)
    hook.drops_closed_loop = True
    sys.unraisablehook = hook


def restore_or_init(mngr, s: condense.StepSettings, ds, config,
                    mesh=None) -> condense.CondenseState:
    """The newest checkpoint in workdir that restores, else a fresh state; placed on `mesh`.

    A checkpoint that cannot be restored (files truncated by a crash or a full disk) is skipped
    with one warning line and, once an older one restores, moved to workdir/checkpoints_damaged/
    (kept, not deleted, and no longer a step orbax sees). When none restores, a WorkdirError
    says why for each, and nothing is moved.
    """
    state = condense.shard_state(condense.init_state(s, ds, config.seed, config.idm.init), mesh)
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    _drop_closed_loop_callbacks()
    skipped = []
    for step in steps:
        try:
            restored, problem = mngr.restore(step, args=ocp.args.StandardRestore(abstract)), None
        except Exception as e:  # pylint: disable=broad-except  (any failure: try the next older one)
            restored, problem = None, restore_problem(e)
        if distributed.any_process(problem is not None):  # every process resumes from the same step
            skipped.append((step, problem or "it failed on another process"))
            continue
        _set_aside(mngr, skipped, step)
        return restored
    listed = "; ".join(f"iteration {k}: {why}" for k, why in skipped)
    raise workdir_lib.WorkdirError(
        f"no checkpoint in {mngr.directory} can be restored with this config ({listed}); "
        "use a new --workdir, or pass --restart to start over")


def restore_problem(error: BaseException, limit: int = 160) -> str:
    """Why a restore failed, in one short line: the innermost message, without TensorStore's
    spec dump ("See full TensorStore details: ...") or the database path."""
    chain = [error]
    while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    text = next((str(e) for e in reversed(chain) if str(e).strip()), type(error).__name__)
    text = text.split("See full TensorStore details")[0]
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    text = " ".join(text.split()).rstrip(". ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _set_aside(mngr: ocp.CheckpointManager, skipped: list[tuple[int, str]], resumed: int) -> None:
    """Moves the checkpoints that failed to restore to workdir/checkpoints_damaged/<step>-<time>."""
    if not skipped:
        return
    folder = str(mngr.directory)
    damaged = os.path.join(os.path.dirname(folder), workdir_lib.DAMAGED)
    if distributed.is_main():
        os.makedirs(damaged, exist_ok=True)
        for step, why in skipped:
            target = os.path.join(damaged, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            while os.path.exists(target):
                target += "+"
            os.rename(os.path.join(folder, str(step)), target)
            logging.warning("the checkpoint at iteration %d cannot be restored (%s); moved it to %s and "
                            "resuming from iteration %d", step, why, target, resumed)
    distributed.any_process(False)  # a barrier: every process sees the folders moved
    mngr.reload()


def export_synthetic(workdir: str, state, ds, s: condense.StepSettings, config) -> str:
    """synthetic.npz + synthetic.png in workdir; returns the .npz path."""
    images, labels = condense.synthetic_arrays(state)  # gathered from every process
    path = os.path.join(workdir, "synthetic.npz")
    if not distributed.is_main():  # process 0 writes the outputs
        return path
    # The pixel space the set was condensed in: (0, 1) under idm.unnormalized.
    mean, std = condense.pixel_stats(s, ds.mean, ds.std)
    export.save_synthetic(path, images, labels, mean=mean, std=std,
                          class_names=ds.class_names, partition_factor=s.loss.partition_factor,
                          method=config.method, dataset=ds.name,
                          config_json=json.dumps(workdir_lib.flat(config)))
    pixels = np.clip(np.asarray(data_lib.denormalize(images, mean, std)), 0.0, 1.0)
    export.save_grid_png(os.path.join(workdir, "synthetic.png"), pixels, labels, ds.num_classes)
    return path


def _progress_line(step, total, m, rate) -> str:
    """One line per log interval; rate None until measured (the first iteration compiles)."""
    parts = [f"it {step}/{total}", f"loss {m['loss']:.4f}", f"mmd {m['mmd']:.4f}"]
    if "queue_acc" in m:
        parts.append(f"ce {m['ce']:.3f}")
        # The matching net's training accuracy (it weights the CE term); its meter is
        # empty for a net not trained yet (or just after a meter reset).
        parts.append(f"match net acc {m['match_acc']:.1f}%" if m.get("match_seen", 1) > 0
                     else "match net untrained")
        parts.append(f"queue {int(m['queue_size'])} nets, train acc {m['queue_acc']:.1f}%")
    if rate:
        parts.append(progress.speed_and_eta(rate, total - step, "it"))
    else:
        parts.append("ETA after the next interval (the first iteration compiles)")
    return " | ".join(parts)


def _evaluate(state, ds, s, config, *, epochs, step) -> dict:
    images, labels = condense.synthetic_arrays(state)
    return distributed.evaluate_archs(  # one process: evaluate.evaluate_archs
        images, labels, ds, config.eval, archs=models.parse_archs(config.eval.archs),
        key=jax.random.fold_in(jax.random.PRNGKey(config.seed), step),
        partition_factor=s.loss.partition_factor, epochs=epochs)


def quiet_library_logs() -> None:
    """Hides orbax's and JAX's INFO lines (about 100 per checkpoint); warnings still show.

    A filter on the absl handler (orbax logs through absl.logging, so its records
    share our logger; they are told apart by the file that wrote them).
    """
    handler = logging.get_absl_handler()
    if _not_orbax_info not in handler.filters:
        handler.addFilter(_not_orbax_info)
    std_logging.getLogger("jax").setLevel(std_logging.WARNING)  # e.g. "Unable to initialize backend 'tpu'"


def _not_orbax_info(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname.replace(os.sep, "/")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _completed(workdir: str, config, latest: int | None) -> dict[str, Any] | None:
    """results.json (or {} without eval.at_end) if workdir holds this run finished, else None."""
    total = config.idm.iterations
    if latest != total or not os.path.exists(os.path.join(workdir, "synthetic.npz")):
        return None
    if not config.eval.at_end:
        return {}
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None  # killed during the final evaluation: do it now
    return results if results.get("iterations") == total else None


def run_condensation(config, workdir: str, *, max_steps: int | None = None,
                     restart: bool = False, reevaluate: bool = False) -> dict[str, Any]:
    """Condenses config.data into config.ipc images per class in workdir.

    Resumes from the newest checkpoint in workdir that restores. A workdir whose run is
    complete is only reported (no training, no evaluation) unless `reevaluate`.
    `restart` deletes the workdir's run outputs first (workdir.RUN_OUTPUTS).
    max_steps stops after that many iterations in this call (the run stays
    resumable); used by tests and benchmarks. Returns a summary dict.
    Holds workdir.lock throughout: another process in the workdir raises WorkdirBusyError.
    """
    config_check.validate(config)
    workdir = workdir_lib.check_writable(workdir)
    with workdir_lib.locked(workdir):
        return _condense(config, workdir, max_steps=max_steps, restart=restart, reevaluate=reevaluate)


def _condense(config, workdir: str, *, max_steps: int | None, restart: bool,
              reevaluate: bool) -> dict[str, Any]:
    """run_condensation in a checked workdir whose lock this process holds."""
    if restart and distributed.is_main():
        removed = workdir_lib.start_over(workdir)
        logging.info("--restart: removed %s from %s", ", ".join(removed) or "nothing", workdir)
    config_json = config.to_json_best_effort(indent=2)
    latest = latest_checkpoint(workdir)
    diff = workdir_lib.check_resume(workdir, workdir_lib.flat(json.loads(config_json)), latest)
    total = config.idm.iterations
    if latest is not None and latest > total:
        raise workdir_lib.WorkdirError(
            f"workdir {workdir} has a checkpoint at iteration {latest}, past idm.iterations={total}; "
            f"set --config.idm.iterations={latest} (or more), or pass --restart to start over")
    results = None if reevaluate else _completed(workdir, config, latest)
    if results is not None:
        return _report_complete(workdir, total, results, diff)

    if distributed.is_main():
        workdir_lib.record_config(workdir, config_json, start_step=latest or 0, diff=diff)
    if diff:
        logging.info("config changed since this workdir's last start (recorded in %s): %s",
                     workdir_lib.HISTORY, "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    ds = data_lib.load_config_dataset(config)
    s = condense.settings_from_config(config, ds)
    if distributed.multi_process():
        distributed.check_replicated(distributed.data_fingerprint(ds), "the loaded dataset")
    h, w, c = ds.image_shape
    devices = jax.devices()
    logging.info("%s on %s: %s, %d classes (%d train images, %dx%dx%d), matching net %s",
                 config.method.upper(), ds.name, _plural(config.ipc, "image") + " per class",
                 ds.num_classes, len(ds.train_labels), h, w, c, config.model)
    logging.info("synthetic update: %s (lr %g, momentum %g); real batch %d per class",
                 "one SGD step per class, shared momentum (release)" if s.per_class_update
                 else "one joint step on the summed class losses", s.lr_img, s.momentum_img,
                 s.batch_real)
    mesh = distributed.class_mesh(config.mesh_devices, ds.num_classes)  # all processes' devices
    logging.info("%d iterations on %s %s%s%s", total, _plural(mesh.size if mesh else 1, "device"),
                 f"({devices[0].device_kind})",
                 ", the classes sharded over them" if mesh is not None else "",
                 f" in {jax.process_count()} processes" if distributed.multi_process() else "")
    cadence = [f"every {_plural(config.checkpoint_every, 'iteration')}"] if config.checkpoint_every else []
    if config.checkpoint_every_minutes:
        cadence.append(f"every {config.checkpoint_every_minutes:g} minutes")
    logging.info("outputs in %s (checkpoints %s and at the end)", workdir, " or ".join(cadence) or "only")
    mngr = checkpoint_manager(workdir, config.keep_checkpoints, config.checkpoint_every,
                              config.checkpoint_every_minutes)
    logging.info("%s, then compiling the step (on a CPU, a minute or more before the first line)",
                 f"restoring the checkpoint at iteration {latest} of {total}" if latest is not None
                 else "initialising the synthetic set and the model queue")
    state = restore_or_init(mngr, s, ds, config, mesh)
    start = int(state.step)
    step_fn = condense.make_step(s, mesh)
    writer = MetricsWriter(workdir, start) if distributed.is_main() else distributed.NullWriter()
    stop_at = total if max_steps is None else min(total, start + max_steps)
    placement = condense.resolve_data_placement(config.data.on_device, ds)
    if placement == "device":
        feed = itertools.repeat(condense.replicate(condense.device_data(ds), mesh))
    else:  # state.key is read before the first step donates the state
        sampler = condense.HostSampler(s, ds, jax.device_get(state.key), mesh)
        host_batches = sampler.batches(start, stop_at)
        feed = host_batches
    logging.info("real batches drawn on the %s (data.on_device=%s, train images %.2f GB)", placement,
                 config.data.on_device, ds.train_images.nbytes / 1e9)
    per_dispatch = config.idm.get("steps_per_dispatch", 1)
    if per_dispatch > 1 and placement != "device":
        raise ValueError(f"invalid config: idm.steps_per_dispatch={per_dispatch} needs the real data on the "
                         f"device, but data.on_device={config.data.on_device!r} puts it on the host "
                         "(dataset too large); use idm.steps_per_dispatch=1")
    plan = dispatch_plan(start, stop_at, per_dispatch)
    multi_fn = condense.make_multi_step(s, per_dispatch, mesh) if per_dispatch > 1 else None
    if start < stop_at:
        first_batch = next(feed)
        if any(n == 1 for _, n in plan):  # compile only what the plan dispatches
            step_fn = compile_ahead(step_fn, state, first_batch)
        if multi_fn is not None and any(n > 1 for _, n in plan):
            multi_fn = compile_ahead(multi_fn, state, first_batch)
        feed = itertools.chain([first_batch], feed)
    summary = {"start_step": start, "data_placement": placement}
    t_start = time.time()
    t_window, steps_window = t_start, 0
    t_first, eval_seconds = None, 0.0  # ETA: iterations after the first (compiling) one
    try:
        with StopFlag() as stop:
            in_flight = None
            for it, n in plan:
                if n == 1:
                    state, metrics = step_fn(state, next(feed))
                else:  # n iterations in one call; the rows below are due only at its end
                    state, metrics = multi_fn(state, next(feed))
                    metrics = jax.tree.map(lambda m: m[-1], metrics)
                # Async dispatch would let the loop queue every remaining iteration and notice
                # Ctrl-C only at the end; waiting for the previous one keeps at most two in flight.
                if in_flight is not None:
                    jax.block_until_ready(in_flight)
                in_flight = metrics
                steps_window += n
                done = it + n
                if it == start:
                    jax.block_until_ready(state)
                    t_first = time.time()
                    summary["first_step_seconds"] = t_first - t_start
                    logging.info("first iteration (incl. compilation) took %.1f s",
                                 summary["first_step_seconds"])
                    t_window, steps_window = t_first, 0
                log_now = done % config.log_every == 0 or done == stop_at
                stop_now, save_due = stop.signal is not None, mngr.should_save(done)
                if distributed.multi_process():
                    # A signal, and the wall-clock checkpoint cadence, reach the processes at
                    # different iterations: they agree (a collective) at iterations every process
                    # knows - log, iteration-cadence and last ones - and all save and stop there.
                    agree = log_now or done == stop_at or (
                        config.checkpoint_every and done % config.checkpoint_every == 0)
                    stop_now = bool(agree) and distributed.any_process(stop_now)
                    save_due = bool(agree) and distributed.any_process(save_due)
                ckpt_now = done == stop_at or stop_now or save_due
                if log_now or ckpt_now:
                    _check_finite(state, mngr)
                if log_now:
                    m = jax.device_get(metrics)
                    now = time.time()
                    rate = steps_window / (now - t_window) if steps_window else None
                    measured = done - start - 1
                    avg = measured / max(now - t_first - eval_seconds, 1e-9) if measured else None
                    logging.info(_progress_line(done, total, m, avg))
                    writer.write(done, {**m, **({"it_per_s": rate} if rate else {})})
                    t_window, steps_window = now, 0
                if config.eval.interval and done % config.eval.interval == 0 and done < total:
                    t_eval = time.time()
                    res = _evaluate(state, ds, s, config,
                                    epochs=config.eval.interval_epochs, step=done)
                    writer.write(done, {f"eval/{a}/mean": r["mean"] for a, r in res.items()})
                    eval_seconds += time.time() - t_eval
                    t_window += time.time() - t_eval
                if ckpt_now:
                    if distributed.multi_process():
                        distributed.check_replicated(state.replace(syn=None), "the replicated state")
                    _save(mngr, state)
                if stop_now:
                    logging.warning("stopped by signal %d at iteration %d; checkpoint saved, "
                                    "rerun the same command to resume", stop.signal or signal.SIGTERM, done)
                    summary.update(interrupted=True, step=done)
                    return summary
    finally:
        if placement == "host":
            host_batches.close()
            sampler.close()
        writer.close()
        mngr.close()

    summary.update(step=int(state.step), synthetic=export_synthetic(workdir, state, ds, s, config))
    logging.info("condensation %s at iteration %d/%d after %s in this start; synthetic set: %s (+ .png)",
                 "done" if int(state.step) >= total else "paused", int(state.step), total,
                 progress.hms(time.time() - t_start), summary["synthetic"])
    if int(state.step) >= total and config.eval.at_end:
        archs = _evaluate(state, ds, s, config, epochs=config.eval.epochs, step=total)
        results = export.results_record(
            method=config.method, dataset=ds.name, ipc=config.ipc,
            partition_factor=s.loss.partition_factor, num_images=config.ipc * ds.num_classes,
            train_arch=config.model, iterations=total, synthetic=summary["synthetic"], archs=archs)
        if config.eval.compare_random and not distributed.multi_process():
            results["random_reference"] = baselines.random_reference(
                config, ds, jax.random.fold_in(jax.random.PRNGKey(config.seed), total + 1))
        if distributed.is_main():
            export.finish_results(workdir, results)
        summary["results"] = results
        logging.info("finished: %s; results in %s", _accuracies(results),
                     os.path.join(workdir, "results.json"))
        if "random_reference" in results:
            logging.info(_versus_random(config.method, results))
    return summary


def dispatch_plan(start: int, stop: int, per_dispatch: int) -> list[tuple[int, int]]:
    """[(first iteration, iterations in the call)] from `start` to `stop`, `per_dispatch` at a time.

    Calls of per_dispatch iterations cover the multiples of per_dispatch in between; iterations
    before the first multiple (a resume from a wall-clock checkpoint) and after the last one (the
    end) run one per call, so logs and checkpoints due at multiples of per_dispatch (config_check)
    fall at the end of a call and only two programs are ever compiled.
    """
    k = per_dispatch
    first, last = min(-(-start // k) * k, stop), max(stop // k * k, start)
    if first >= last:  # no whole aligned call fits
        return [(i, 1) for i in range(start, stop)]
    return ([(i, 1) for i in range(start, first)] + [(i, k) for i in range(first, last, k)]
            + [(i, 1) for i in range(last, stop)])


def compile_ahead(jitted, *args):
    """`jitted` compiled for `args` before it first runs, the compiler's freed memory released.

    Compiling inside the first call would allocate the step's buffers while the memory the
    compiler just freed is still held by malloc (CIFAR-10 IPC 10 on CPU: 0.3 GiB more peak).
    """
    if not hasattr(jitted, "lower"):  # a plain (e.g. wrapped) step function: nothing to do ahead
        return jitted
    compiled = jitted.lower(*args).compile()
    backend.release_freed_memory()
    return compiled


def _versus_random(method: str, results: dict) -> str:
    """One line per eval arch: the condensed set against ipc random real images per class."""
    rows = []
    for arch, r in results["archs"].items():
        ref = results["random_reference"][arch]
        rows.append(f"{arch}: {method.upper()} {r['mean']:.2f} ± {r['std']:.2f} % vs Random real images "
                    f"{ref['mean']:.2f} ± {ref['std']:.2f} % ({r['mean'] - ref['mean']:+.2f} pp)")
    return "; ".join(rows)


def _accuracies(results: dict) -> str:
    return ", ".join(f"{a} {r['mean']:.2f} ± {r['std']:.2f} %" for a, r in results.get("archs", {}).items())


def _report_complete(workdir: str, total: int, results: dict, diff: dict) -> dict[str, Any]:
    """A rerun of a finished workdir: say so and show its results; nothing is computed."""
    table_path = os.path.join(workdir, "results.md")
    table = open(table_path).read() if results and os.path.exists(table_path) else ""
    eval_changed = sorted(k for k in diff if k.startswith("eval."))
    logging.info(
        "the run in %s is complete (%d iterations): nothing to do. %s%s",
        workdir, total, f"Results: {_accuracies(results)} (results.json, results.md)." if results
        else "Synthetic set: synthetic.npz (eval.at_end is off).",
        f" The evaluation settings changed ({', '.join(eval_changed)}): pass --reevaluate to "
        "evaluate again with them." if eval_changed else " Pass --reevaluate to evaluate again, "
        "--restart to start over.")
    if table:
        logging.info("results (%s):\n%s", os.path.join(workdir, "results.json"), table)
    summary = {"start_step": total, "step": total, "complete": True,
               "synthetic": os.path.join(workdir, "synthetic.npz")}
    if results:
        summary["results"] = results
    return summary


def _check_finite(state, mngr) -> None:
    bad = int(state.nonfinite_step)
    if bad >= 0:
        raise NonFiniteLossError(
            f"the loss became non-finite (NaN/inf) at iteration {bad}; stopping. The synthetic "
            f"set is kept as of iteration {bad}; the last checkpoint is at iteration "
            f"{mngr.latest_step()}. Lower idm.lr_img or check the data.")


def combine_runs(run_results: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict over several condensations: every evaluation network of every run.

    The release runs 5 condensations and evaluates each with 5 networks; the paper's mean and
    std are over those 25 networks. Per arch: all accuracies, their mean and std (ddof 0, as
    np.std), num_seeds = networks in all, and each run's own mean in run_means.
    """
    if not run_results:
        raise ValueError("combine_runs needs at least one run's results")
    first = run_results[0]
    archs = {}
    for arch in first["archs"]:
        per_run = [r["archs"][arch] for r in run_results]
        accs = [float(a) for r in per_run for a in r["accuracies"]]
        archs[arch] = {**per_run[0], "accuracies": accs, "mean": float(np.mean(accs)),
                       "std": float(np.std(accs)), "num_seeds": len(accs),
                       "run_means": [float(r["mean"]) for r in per_run],
                       "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in per_run))}
    return {**{k: v for k, v in first.items() if k not in ("archs", "synthetic")}, "runs": len(run_results),
            "synthetic": [r.get("synthetic") for r in run_results], "archs": archs}


def run_repeated(config, workdir: str) -> dict[str, Any]:
    """config.runs condensations (seeds seed, seed+1, ...) in workdir/run_<i>, then one table.

    Each run is an ordinary resumable run_condensation with its final evaluation; rerunning
    the command skips finished runs and resumes an interrupted one. workdir/results.json holds
    the accuracies of all runs' evaluation networks together (see combine_runs).
    """
    config_check.validate(config)
    if not config.eval.at_end:
        raise ValueError(f"runs={config.runs} combines the runs' final evaluations; set eval.at_end=True")
    results = []
    for i in range(config.runs):
        sub = config.copy_and_resolve_references()
        sub.runs, sub.seed = 1, int(config.seed) + i
        run_dir = os.path.join(workdir, f"run_{i}")
        done = os.path.join(run_dir, "results.json")
        if os.path.exists(done):
            with open(done) as f:
                results.append(json.load(f))
            logging.info("run %d/%d (seed %d) already finished: %s", i + 1, config.runs, sub.seed, done)
            continue
        logging.info("run %d/%d (seed %d) in %s", i + 1, config.runs, sub.seed, run_dir)
        summary = run_condensation(sub, run_dir)
        if "results" not in summary:  # stopped by a signal: checkpoint saved
            return {**summary, "run": i}
        results.append(summary["results"])
    combined = combine_runs(results)
    if distributed.is_main():
        export.finish_results(workdir, combined)
    return {"step": int(config.idm.iterations), "runs": config.runs, "results": combined}
