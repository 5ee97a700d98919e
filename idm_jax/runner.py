"""The condensation run: load, resume, loop, log, checkpoint, export, evaluate.

`run_condensation(config, workdir)` is what `main.py --mode=condense` calls.
Rerunning the same command in the same workdir resumes from the newest
orbax checkpoint and produces the same synthetic set as an uninterrupted
run (every random draw derives from the seed and the iteration number).
Checkpoints are written every `checkpoint_every` iterations and at least every
`checkpoint_every_minutes` of wall-clock time; the workdir is checked (and a
config that would change the condensed state refused) before any compute
(idm_jax/workdir.py).

The checkpoints (manager, save, restore) live in idm_jax/checkpoints.py, the metrics rows,
progress line and stop signals in idm_jax/run_io.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from idm_jax import backend
from idm_jax import checkpoints
from idm_jax import condense
from idm_jax import data as data_lib
from idm_jax import distributed
from idm_jax import evaluate
from idm_jax import synthetic_file
from idm_jax import models
from idm_jax import progress
from idm_jax import references
from idm_jax import results as results_lib
from idm_jax import workdir as workdir_lib
from idm_jax import workdir_lock
from idm_jax.run_io import LoopClock, MetricsWriter, StopFlag


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class DivergedError(NonFiniteLossError):
    """The synthetic images left the data's range by far (finite, but no image any more)."""


# Synthetic pixels may leave [0, 1] (the release does not clip them), by a fraction of the range;
# beyond this many ranges on either side the step size has diverged (e.g. idm.lr_img=1e30).
DIVERGED_PIXEL_MARGIN = 100.0


def export_synthetic(workdir: str, state, ds, s: condense.StepSettings, config) -> str:
    """synthetic.npz + synthetic.png in workdir; returns the .npz path."""
    images, labels = condense.synthetic_arrays(state)  # gathered from every process
    path = os.path.join(workdir, "synthetic.npz")
    if not distributed.is_main():  # process 0 writes the outputs
        return path
    # The pixel space the set was condensed in: (0, 1) under idm.unnormalized.
    mean, std = condense.pixel_stats(s, ds.mean, ds.std)
    synthetic_file.save_synthetic(path, images, labels, mean=mean, std=std,
                                  class_names=ds.class_names, partition_factor=s.loss.partition_factor,
                                  method=config.method, dataset=ds.name,
                          config_json=synthetic_file.config_json(config))
    pixels = np.clip(np.asarray(data_lib.denormalize(images, mean, std)), 0.0, 1.0)
    synthetic_file.save_grid_png(os.path.join(workdir, "synthetic.png"), pixels, labels, ds.num_classes)
    return path


def _evaluate(state, ds, s, config, *, epochs, step) -> dict:
    images, labels = condense.synthetic_arrays(state)
    return evaluate.evaluate_archs(  # spread over the processes of a multi-process run
        images, labels, ds, config.eval, archs=models.parse_archs(config.eval.archs),
        key=jax.random.fold_in(jax.random.PRNGKey(config.seed), step),
        partition_factor=s.loss.partition_factor, epochs=epochs)


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

    config: checked once by its caller (main.py; from Python, `idm_jax.validate_config(config)`).
    Resumes from the newest checkpoint in workdir that restores. A workdir whose run is
    complete is only reported (no training, no evaluation) unless `reevaluate`.
    `restart` deletes the workdir's run outputs first (workdir.RUN_OUTPUTS).
    max_steps stops after that many iterations in this call (the run stays
    resumable); used by tests and benchmarks. Returns a summary dict.
    Holds workdir.lock throughout: another process in the workdir raises WorkdirBusyError.
    """
    workdir = workdir_lib.check_writable(workdir)
    with workdir_lock.locked(workdir):
        return _condense(config, workdir, max_steps=max_steps, restart=restart, reevaluate=reevaluate)


def _condense(config, workdir: str, *, max_steps: int | None, restart: bool,
              reevaluate: bool) -> dict[str, Any]:
    """run_condensation in a checked workdir whose lock this process holds.

    The phases: check the workdir (a finished run is only reported), `_prepare` (data, settings,
    mesh, the restored or fresh state), `_build_feed` (real batches and compiled programs),
    `_loop` (the iterations: logs, evaluations, checkpoints, signals) and `_finish` (outputs
    and the final evaluation).
    """
    if restart and distributed.is_main():
        removed = workdir_lib.start_over(workdir)
        logging.info("--restart: removed %s from %s", ", ".join(removed) or "nothing", workdir)
    config_json = config.to_json_best_effort(indent=2)
    latest = checkpoints.latest_checkpoint(workdir)
    diff = workdir_lib.check_resume(workdir, workdir_lib.flat(json.loads(config_json)), latest)
    total = config.idm.iterations
    if latest is not None and latest > total:
        raise workdir_lib.WorkdirError(
            f"workdir {workdir} has a checkpoint at iteration {latest}, past idm.iterations={total}; "
            f"set --config.idm.iterations={latest} (or more), or pass --restart to start over")
    results = None if reevaluate else _completed(workdir, config, latest)
    if results is not None:
        return _report_complete(workdir, total, results, diff)

    run, state = _prepare(config, workdir, latest, max_steps)  # before any write: a refused restore
    if distributed.is_main():                                    # leaves the workdir as it was
        workdir_lib.record_config(workdir, config_json, start_step=latest or 0, diff=diff)
    if diff:
        logging.info("config changed since this workdir's last start (recorded in %s): %s",
                     workdir_lib.HISTORY, "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    writer = MetricsWriter(workdir, run.start) if distributed.is_main() else distributed.NullWriter()
    feed = _build_feed(run, state)
    clock = LoopClock(time.time())
    try:
        state, summary = _loop(run, state, feed, writer, clock)
    finally:
        feed.close()
        writer.close()
        run.mngr.close()
    if summary.get("interrupted"):
        return summary
    return _finish(run, state, summary, clock)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the phases of one start of a run share (the state itself is passed along)."""

    config: Any
    workdir: str
    ds: data_lib.ArrayDataset
    s: condense.StepSettings
    mesh: Any  # jax.sharding.Mesh, or None on one device
    mngr: Any  # orbax CheckpointManager
    start: int  # the iteration this start resumes from
    stop_at: int  # the iteration this start stops at (max_steps)

    @property
    def total(self) -> int:
        return self.config.idm.iterations


def _prepare(config, workdir: str, latest: int | None, max_steps: int | None):
    """(_Run, state): the dataset, step settings, mesh and checkpoint manager, and the newest
    checkpoint that restores (or a fresh state), with what it is about to do logged."""
    total = config.idm.iterations
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
    mesh = condense.class_mesh(config.mesh_devices, ds.num_classes)  # all processes' devices
    logging.info("%d iterations on %s %s%s%s", total, _plural(mesh.size if mesh else 1, "device"),
                 f"({devices[0].device_kind})",
                 ", the classes sharded over them" if mesh is not None else "",
                 f" in {jax.process_count()} processes" if distributed.multi_process() else "")
    cadence = [f"every {_plural(config.checkpoint_every, 'iteration')}"] if config.checkpoint_every else []
    if config.checkpoint_every_minutes:
        cadence.append(f"every {config.checkpoint_every_minutes:g} minutes")
    logging.info("outputs in %s (checkpoints %s and at the end)", workdir, " or ".join(cadence) or "only")
    mngr = checkpoints.checkpoint_manager(workdir, config.keep_checkpoints, config.checkpoint_every,
                              config.checkpoint_every_minutes)
    logging.info("%s, then compiling the step (on a CPU, a minute or more before the first line)",
                 f"restoring the checkpoint at iteration {latest} of {total}" if latest is not None
                 else "initialising the synthetic set and the model queue")
    state = checkpoints.restore_or_init(mngr, s, ds, config, mesh)
    start = int(state.step)
    stop_at = total if max_steps is None else min(total, start + max_steps)
    return _Run(config, workdir, ds, s, mesh, mngr, start, stop_at), state


@dataclasses.dataclass
class _Feed:
    """The real data of each call (`batches`), where it is drawn, the dispatch plan and the
    programs it runs; with host placement, the sampler and its batch generator to close."""

    batches: Iterator
    placement: str
    plan: list[tuple[int, int]]
    step_fn: Any
    multi_fn: Any
    sampler: condense.HostSampler | None = None
    host_batches: Iterator | None = None

    def close(self) -> None:
        if self.placement == "host":
            self.host_batches.close()
            self.sampler.close()


def _build_feed(run: _Run, state) -> _Feed:
    """Real batches on the device (repeated) or from the host, the dispatch plan, and the step
    programs the plan runs, compiled ahead for the first batch."""
    config, ds, s, mesh = run.config, run.ds, run.s, run.mesh
    step_fn = condense.make_step(s, mesh)
    placement = condense.resolve_data_placement(config.data.on_device, ds)
    sampler = host_batches = None
    if placement == "device":
        batches = itertools.repeat(condense.replicate(condense.device_data(ds), mesh))
    else:  # state.key is read before the first step donates the state
        sampler = condense.HostSampler(s, ds, jax.device_get(state.key), mesh)
        batches = host_batches = sampler.batches(run.start, run.stop_at)
    logging.info("real batches drawn on the %s (data.on_device=%s, train images %.2f GB)", placement,
                 config.data.on_device, ds.train_images.nbytes / 1e9)
    per_dispatch = config.idm.steps_per_dispatch
    if per_dispatch > 1 and placement != "device":
        raise ValueError(f"invalid config: idm.steps_per_dispatch={per_dispatch} needs the real data on the "
                         f"device, but data.on_device={config.data.on_device!r} puts it on the host "
                         "(dataset too large); use idm.steps_per_dispatch=1")
    plan = dispatch_plan(run.start, run.stop_at, per_dispatch)
    multi_fn = condense.make_multi_step(s, per_dispatch, mesh) if per_dispatch > 1 else None
    if run.start < run.stop_at:
        first_batch = next(batches)
        if any(n == 1 for _, n in plan):  # compile only what the plan dispatches
            step_fn = compile_ahead(step_fn, state, first_batch)
        if multi_fn is not None and any(n > 1 for _, n in plan):
            multi_fn = compile_ahead(multi_fn, state, first_batch)
        batches = itertools.chain([first_batch], batches)
    return _Feed(batches, placement, plan, step_fn, multi_fn, sampler, host_batches)


def _loop(run: _Run, state, feed: _Feed, writer, clock: LoopClock):
    """Runs the planned calls: (state, summary); summary["interrupted"] when a signal stopped it
    (checkpoint saved)."""
    config = run.config
    summary = {"start_step": run.start, "data_placement": feed.placement}
    with StopFlag() as stop:
        in_flight = None
        for it, n in feed.plan:
            if n == 1:
                state, metrics = feed.step_fn(state, next(feed.batches))
            else:  # n iterations in one call; the rows below are due only at its end
                state, metrics = feed.multi_fn(state, next(feed.batches))
                metrics = jax.tree.map(lambda m: m[-1], metrics)
            # Async dispatch would let the loop queue every remaining iteration and notice
            # Ctrl-C only at the end; waiting for the previous one keeps at most two in flight.
            if in_flight is not None:
                jax.block_until_ready(in_flight)
            in_flight = metrics
            clock.window_steps += n
            done = it + n
            if it == run.start:
                jax.block_until_ready(state)
                clock.first = time.time()
                summary["first_step_seconds"] = clock.first - clock.start
                logging.info("first iteration (incl. compilation) took %.1f s", summary["first_step_seconds"])
                clock.window, clock.window_steps = clock.first, 0
            log_now, stop_now, ckpt_now = _due(run, done, stop)
            if log_now or ckpt_now:  # before any save: a broken set is never checkpointed or exported
                _check_finite(state, run.mngr)
                _check_in_range(state, run)
            if log_now:
                clock.log_row(writer, done, run.total, run.start, metrics)
            if config.eval.interval and done % config.eval.interval == 0 and done < run.total:
                t_eval = time.time()
                res = _evaluate(state, run.ds, run.s, config, epochs=config.eval.interval_epochs, step=done)
                writer.write(done, {f"eval/{a}/mean": r["mean"] for a, r in res.items()})
                clock.eval_seconds += time.time() - t_eval
                clock.window += time.time() - t_eval
            if ckpt_now:
                if distributed.multi_process():
                    distributed.check_replicated(state.replace(syn=None), "the replicated state")
                checkpoints.save_state(run.mngr, state)
            if stop_now:
                logging.warning("stopped by signal %d at iteration %d; checkpoint saved, "
                                "rerun the same command to resume", stop.signal or signal.SIGTERM, done)
                summary.update(interrupted=True, step=done)
                break
    return state, summary


def _due(run: _Run, done: int, stop: StopFlag) -> tuple[bool, bool, bool]:
    """(log, stop, checkpoint) after iteration `done`, agreed by every process."""
    config = run.config
    log_now = done % config.log_every == 0 or done == run.stop_at
    stop_now, save_due = stop.signal is not None, run.mngr.should_save(done)
    if distributed.multi_process():
        # A signal, and the wall-clock checkpoint cadence, reach the processes at
        # different iterations: they agree (a collective) at iterations every process
        # knows - log, iteration-cadence and last ones - and all save and stop there.
        agree = log_now or done == run.stop_at or (
            config.checkpoint_every and done % config.checkpoint_every == 0)
        stop_now = bool(agree) and distributed.any_process(stop_now)
        save_due = bool(agree) and distributed.any_process(save_due)
    return log_now, stop_now, done == run.stop_at or stop_now or save_due


def _finish(run: _Run, state, summary: dict[str, Any], clock: LoopClock) -> dict[str, Any]:
    """Writes the synthetic set and, once the run is complete, evaluates it (results.json/md)."""
    config, ds, s, total = run.config, run.ds, run.s, run.total
    summary.update(step=int(state.step), synthetic=export_synthetic(run.workdir, state, ds, s, config))
    logging.info("condensation %s at iteration %d/%d after %s in this start; synthetic set: %s (+ .png)",
                 "done" if int(state.step) >= total else "paused", int(state.step), total,
                 progress.hms(time.time() - clock.start), summary["synthetic"])
    if int(state.step) >= total and config.eval.at_end:
        archs = _evaluate(state, ds, s, config, epochs=config.eval.epochs, step=total)
        results = results_lib.results_record(
            method=config.method, dataset=ds.name, ipc=config.ipc,
            partition_factor=s.loss.partition_factor, num_images=config.ipc * ds.num_classes,
            train_arch=config.model, iterations=total, synthetic=summary["synthetic"], archs=archs)
        if (config.eval.scores or config.eval.compare_random) and not distributed.multi_process():
            references.add_scores(config, ds, results)  # random-real / whole-data accuracy, HLR, IOR, LRS
        if distributed.is_main():
            results_lib.finish_results(run.workdir, results)
        summary["results"] = results
        logging.info("finished: %s; results in %s", _accuracies(results),
                     os.path.join(run.workdir, "results.json"))
        if "random_reference" in results:
            logging.info(versus_random(config.method, results))
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
    compiler just freed is still held by malloc, which raises the peak (docs/RESULTS.md#where-the-memory-went).
    """
    if not hasattr(jitted, "lower"):  # a plain (e.g. wrapped) step function: nothing to do ahead
        return jitted
    compiled = jitted.lower(*args).compile()
    backend.release_freed_memory()
    return compiled


def versus_random(method: str, results: dict) -> str:
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


@jax.jit
def _pixel_range(images, mean, std):
    """(min, max) of the synthetic images in [0, 1]-pixel units."""
    pixels = images * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
    return jnp.min(pixels), jnp.max(pixels)


def _check_in_range(state, run: _Run) -> None:
    """Raises DivergedError when the synthetic pixels left [0, 1] by more than DIVERGED_PIXEL_MARGIN
    ranges: finite, so the loss check passes, but the set would be saved as noise clipped to 0/1."""
    lo, hi = (float(v) for v in _pixel_range(state.syn.images, *condense.pixel_stats(run.s, run.ds.mean,
                                                                                      run.ds.std)))
    if lo >= -DIVERGED_PIXEL_MARGIN and hi <= 1.0 + DIVERGED_PIXEL_MARGIN:
        return
    latest = run.mngr.latest_step()
    kept = (f"the last checkpoint (iteration {latest}) is kept" if latest is not None
            else "no checkpoint was written")
    raise DivergedError(
        f"the synthetic images diverged by iteration {int(state.step)}: their pixels span [{lo:.3g}, {hi:.3g}], "
        f"far outside the data's [0, 1]; stopping without saving them ({kept}). Lower idm.lr_img "
        f"(now {run.s.lr_img:g}) and start over (--restart or a new --workdir)")


def run_repeated(config, workdir: str) -> dict[str, Any]:
    """config.runs condensations (seeds seed, seed+1, ...) in workdir/run_<i>, then one table.

    Each run is an ordinary resumable run_condensation with its final evaluation; rerunning
    the command skips finished runs and resumes an interrupted one. workdir/results.json holds
    the accuracies of all runs' evaluation networks together (see results.combine_runs).
    """
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
    combined = results_lib.combine_runs(results)
    if distributed.is_main():
        results_lib.finish_results(workdir, combined)
    return {"step": int(config.idm.iterations), "runs": config.runs, "results": combined}
