"""The condensation run: load, resume, loop, log, checkpoint, export, evaluate.

`run_condensation(config, workdir)` is what `main.py --mode=condense` calls.
Rerunning the same command in the same workdir resumes from the newest
orbax checkpoint and produces the same synthetic set as an uninterrupted
run (every random draw derives from the seed and the iteration number).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from idm_jax import condense
from idm_jax import config_check
from idm_jax import data as data_lib
from idm_jax import evaluate
from idm_jax import export
from idm_jax import models
from idm_jax import progress


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class MetricsWriter:
    """metrics.jsonl (one JSON object per row) + TensorBoard events in workdir."""

    def __init__(self, workdir: str):
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
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


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _save(mngr: ocp.CheckpointManager, state: condense.CondenseState) -> None:
    step = int(state.step)
    if mngr.latest_step() != step:
        mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()


def restore_or_init(mngr, s: condense.StepSettings, ds, config,
                    mesh=None) -> condense.CondenseState:
    """The newest checkpoint in workdir if any, else a fresh state; placed on `mesh`."""
    state = condense.shard_state(condense.init_state(s, ds, config.seed, config.idm.init), mesh)
    latest = mngr.latest_step()
    if latest is None:
        return state
    logging.info("resuming from checkpoint at iteration %d", latest)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return mngr.restore(latest, args=ocp.args.StandardRestore(abstract))


def _check_resume_config(workdir: str, config_json: str) -> None:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(config_json)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            logging.warning("config differs from %s in %s; resuming anyway", path, changed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config_json)
    os.replace(tmp, path)


def _flat(config) -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if hasattr(v, "items"):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat(v).items()})
        else:
            out[k] = v
    return out


def export_synthetic(workdir: str, state, ds, s: condense.StepSettings, config) -> str:
    """synthetic.npz + synthetic.png in workdir; returns the .npz path."""
    images, labels = condense.synthetic_arrays(state)
    path = os.path.join(workdir, "synthetic.npz")
    export.save_synthetic(path, images, labels, mean=ds.mean, std=ds.std,
                          class_names=ds.class_names, partition_factor=s.loss.partition_factor,
                          method=config.method, dataset=ds.name,
                          config_json=json.dumps(_flat(config)))
    pixels = np.clip(np.asarray(data_lib.denormalize(images, ds.mean, ds.std)), 0.0, 1.0)
    export.save_grid_png(os.path.join(workdir, "synthetic.png"), pixels, labels, ds.num_classes)
    return path


def _progress_line(step, total, m, rate) -> str:
    parts = [f"it {step}/{total}", f"loss {m['loss']:.4f}", f"mmd {m['mmd']:.4f}",
             f"ce {m['ce']:.3f}", f"acc {m['match_acc']:.1f}%"]
    if "queue_acc" in m:
        parts.append(f"queue {int(m['queue_size'])} nets, train acc {m['queue_acc']:.1f}%")
    parts.append(progress.speed_and_eta(rate, total - step, "it"))
    return " | ".join(parts)


def _evaluate(state, ds, s, config, *, epochs, step) -> dict:
    images, labels = condense.synthetic_arrays(state)
    return evaluate.evaluate_archs(
        images, labels, ds, config.eval, archs=models.parse_archs(config.eval.archs),
        key=jax.random.fold_in(jax.random.PRNGKey(config.seed), step),
        partition_factor=s.loss.partition_factor, epochs=epochs)


def run_condensation(config, workdir: str, *, max_steps: int | None = None) -> dict[str, Any]:
    """Condenses config.data into config.ipc images per class in workdir.

    max_steps stops after that many iterations in this call (the run stays
    resumable); used by tests and benchmarks. Returns a summary dict.
    """
    config_check.validate(config)
    os.makedirs(workdir, exist_ok=True)
    ds = data_lib.load_config_dataset(config)
    s = condense.settings_from_config(config, ds)
    _check_resume_config(workdir, config.to_json_best_effort(indent=2))
    logging.info("dataset %s: %d train images %s, %d classes; %s IPC %d on %s (%s)",
                 ds.name, len(ds.train_labels), ds.image_shape, ds.num_classes, config.method,
                 config.ipc, jax.default_backend(), jax.devices()[0].device_kind)
    logging.info("synthetic update: %s (lr %g, momentum %g); real batch %d per class",
                 "one SGD step per class, shared momentum (release)" if s.per_class_update
                 else "one joint step on the summed class losses", s.lr_img, s.momentum_img,
                 s.batch_real)

    mesh = condense.class_mesh(config.mesh_devices, ds.num_classes)
    if mesh is not None:
        logging.info("sharding the %d classes over %d devices", ds.num_classes, mesh.size)
    mngr = checkpoint_manager(workdir, config.keep_checkpoints)
    state = restore_or_init(mngr, s, ds, config, mesh)
    step_fn = condense.make_step(s, mesh)
    writer = MetricsWriter(workdir)
    total = config.idm.iterations
    start = int(state.step)
    stop_at = total if max_steps is None else min(total, start + max_steps)
    placement = condense.resolve_data_placement(config.data.get("on_device", "auto"), ds)
    if placement == "device":
        feed = itertools.repeat(condense.replicate(condense.device_data(ds), mesh))
    else:  # state.key is read before the first step donates the state
        sampler = condense.HostSampler(s, ds, jax.device_get(state.key), mesh)
        feed = sampler.batches(start, stop_at)
    logging.info("real batches drawn on the %s (data.on_device=%s, train images %.2f GB)", placement,
                 config.data.get("on_device", "auto"), ds.train_images.nbytes / 1e9)
    summary = {"start_step": start, "data_placement": placement}
    t_window, steps_window = time.time(), 0
    try:
        with StopFlag() as stop:
            t0 = time.time()
            in_flight = None
            for it in range(start, stop_at):
                state, metrics = step_fn(state, next(feed))
                # Async dispatch would let the loop queue every remaining iteration and notice
                # Ctrl-C only at the end; waiting for the previous one keeps at most two in flight.
                if in_flight is not None:
                    jax.block_until_ready(in_flight)
                in_flight = metrics
                steps_window += 1
                done = it + 1
                if it == start:
                    jax.block_until_ready(state)
                    summary["first_step_seconds"] = time.time() - t0
                    logging.info("first iteration (incl. compilation) took %.1f s",
                                 summary["first_step_seconds"])
                    t_window, steps_window = time.time(), 0
                log_now = done % config.log_every == 0 or done == stop_at
                ckpt_now = done % config.checkpoint_every == 0 or done == stop_at
                if log_now or ckpt_now or stop.signal:
                    _check_finite(state, mngr)
                if log_now:
                    m = jax.device_get(metrics)
                    rate = steps_window / max(time.time() - t_window, 1e-9) if steps_window else 0.0
                    logging.info(_progress_line(done, total, m, rate))
                    writer.write(done, {**m, "it_per_s": rate})
                    t_window, steps_window = time.time(), 0
                if ckpt_now or stop.signal:
                    _save(mngr, state)
                if config.eval.interval and done % config.eval.interval == 0 and done < total:
                    res = _evaluate(state, ds, s, config,
                                    epochs=config.eval.interval_epochs, step=done)
                    writer.write(done, {f"eval/{a}/mean": r["mean"] for a, r in res.items()})
                if stop.signal:
                    logging.warning("stopped by signal %d at iteration %d; checkpoint saved, "
                                    "rerun the same command to resume", stop.signal, done)
                    summary.update(interrupted=True, step=done)
                    return summary
    finally:
        if placement == "host":
            feed.close()
            sampler.close()
        writer.close()
        mngr.close()

    summary.update(step=int(state.step), synthetic=export_synthetic(workdir, state, ds, s, config))
    if int(state.step) >= total and config.eval.at_end:
        archs = _evaluate(state, ds, s, config, epochs=config.eval.epochs, step=total)
        results = export.results_record(
            method=config.method, dataset=ds.name, ipc=config.ipc,
            partition_factor=s.loss.partition_factor, num_images=config.ipc * ds.num_classes,
            train_arch=config.model, iterations=total, synthetic=summary["synthetic"], archs=archs)
        export.finish_results(workdir, results)
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
    export.finish_results(workdir, combined)
    return {"step": int(config.idm.iterations), "runs": config.runs, "results": combined}
