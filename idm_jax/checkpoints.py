"""The run's checkpoints: the orbax manager and its cadence, saving (a full disk stops with one
line, partial files removed), and restoring the newest checkpoint that restores (damaged ones
are set aside in checkpoints_damaged/)."""

from __future__ import annotations

import contextlib
import glob
import logging as std_logging
import os
import re
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from idm_jax import condense
from idm_jax import distributed
from idm_jax import workdir as workdir_lib


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


def save_state(mngr: ocp.CheckpointManager, state: condense.CondenseState) -> None:
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
        drop_disk_full_asyncio_reports()
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


def disk_full_record(record: std_logging.LogRecord) -> bool:
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
    logger.addFilter(disk_full_record)
    try:
        yield
    finally:
        logger.removeFilter(disk_full_record)


def drop_disk_full_asyncio_reports() -> None:
    """After a save failed on a full disk, asyncio reports orbax's abandoned write futures
    ('_GatheringFuture exception was never retrieved', with a traceback) whenever they are garbage
    collected, which can be after the save returned or at exit: drop those disk-full records
    from then on (the NoSpaceError about to be raised says it once)."""
    logger = std_logging.getLogger("asyncio")
    if disk_full_record not in logger.filters:
        logger.addFilter(disk_full_record)


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
        _refuse_nonfinite(mngr, step, restored)  # before anything is moved or written
        _set_aside(mngr, skipped, step)
        return restored
    listed = "; ".join(f"iteration {k}: {why}" for k, why in skipped)
    raise workdir_lib.WorkdirError(
        f"no checkpoint in {mngr.directory} can be restored with this config ({listed}); "
        "use a new --workdir, or pass --restart to start over")


@jax.jit
def _nonfinite_counts(images):
    return jnp.sum(jnp.isnan(images)), jnp.sum(jnp.isinf(images))


def _refuse_nonfinite(mngr: ocp.CheckpointManager, step: int, state: condense.CondenseState) -> None:
    """Raises WorkdirError naming the checkpoint when its synthetic images hold NaN or infinite
    values: resuming would train on them, and --reevaluate would score noise."""
    nan, inf = (int(n) for n in _nonfinite_counts(state.syn.images))
    if nan or inf:
        raise workdir_lib.WorkdirError(
            f"the checkpoint at iteration {step} in {mngr.directory} holds non-finite synthetic images "
            f"({nan + inf} of {state.syn.images.size} values: {nan} NaN, {inf} infinite); refusing to resume "
            "from it. Pass --restart to start over (or use a new --workdir)")


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
