"""A run's folder: checked before any compute, its config history, starting over.

What a condensation run writes under --workdir (docs/RUNNING.md, "Outputs"):
config.json (the config of the latest start), config_history.jsonl (every
config the workdir has run with, one row per start), metrics.jsonl,
tensorboard/, checkpoints/, synthetic.npz/.png, results.json/.md.

A workdir holds one run. Resuming with a config that changes the condensed
state (IPC, data, network, seed, any idm.* hyperparameter) is refused before
anything is written; fields listed in RESUMABLE (evaluation, logging,
checkpoint cadence, how the step is chunked or placed on devices, the
iteration budget) may change between starts and are recorded.

One process works in a workdir at a time: idm_jax/workdir_lock.py holds
workdir.lock.
Writes that run out of space raise NoSpaceError, one line saying what could
not be written and how much it needed; files are replaced atomically, so the
previous version stays intact.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any


CONFIG = "config.json"
HISTORY = "config_history.jsonl"
METRICS = "metrics.jsonl"
# Checkpoints that could not be restored are moved here (outside orbax's step folder), not deleted.
DAMAGED = "checkpoints_damaged"
# What a run writes besides its config files; --restart removes exactly these.
RUN_OUTPUTS = ("checkpoints", DAMAGED, METRICS, "tensorboard", "synthetic.npz", "synthetic.png",
               "results.json", "results.md")

# Dotted config keys (or prefixes ending in ".") that do not change the condensed state.
RESUMABLE = ("eval.", "baseline.", "data.cache_dir", "log_every", "checkpoint_every",
             "checkpoint_every_minutes", "keep_checkpoints", "mesh_devices", "idm.iterations",
             "idm.queue_train_impl", "idm.conv_impl", "idm.class_batch", "idm.real_chunk_size",
             "idm.max_unrolled_queue_steps",
             "idm.steps_per_dispatch")  # how iterations are computed and dispatched, not what they compute


class WorkdirError(ValueError):
    """The workdir cannot be used as asked; the message says why and what to do."""


class NoSpaceError(WorkdirError):
    """A write ran out of disk space (or quota); what was there before is intact."""


def check_writable(workdir: str) -> str:
    """Creates `workdir` if needed and checks that files can be written in it.

    Returns its absolute path; raises WorkdirError naming the path at fault.
    """
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir {path} exists and is a file, not a folder; pick another --workdir")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parent = _first_existing_parent(path)
        if not os.path.isdir(parent):
            why = f"{parent} is a file, not a folder"
        else:
            why = f"{e.strerror.lower()} in {parent}" if e.strerror else str(e)
        raise WorkdirError(f"cannot create workdir {path}: {why}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise WorkdirError(f"workdir {path} is not writable: {e.strerror or e}") from None
    return path


def _first_existing_parent(path: str) -> str:
    parent = os.path.dirname(path)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent


def flat(config: Any) -> dict[str, Any]:
    """A (nested) ConfigDict or dict as {"a.b": value}."""
    out = {}
    for k, v in config.items():
        if hasattr(v, "items"):
            out.update({f"{k}.{kk}": vv for kk, vv in flat(v).items()})
        else:
            out[k] = v
    return out


def saved_config(workdir: str) -> dict[str, Any] | None:
    """The flat config.json of `workdir`, or None if it has none."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return flat(json.load(f))
    except (OSError, ValueError) as e:
        raise WorkdirError(f"cannot read {path} ({e}); move it away to start this workdir over") from None


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} for every flat key whose value differs."""
    if old is None:
        return {}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def resumable(key: str) -> bool:
    return any(key.startswith(r) if r.endswith(".") else key == r for r in RESUMABLE)


def check_resume(workdir: str, new: dict[str, Any], checkpoint_step: int | None) -> dict[str, tuple]:
    """The config changes since the workdir's last start; raises if they forbid resuming.

    Nothing is written. A change outside RESUMABLE is an error only when a
    checkpoint exists (without one there is nothing to resume).
    """
    diff = changes(saved_config(workdir), new)
    blocking = {k: v for k, v in diff.items() if not resumable(k)}
    if blocking and checkpoint_step is not None:
        listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in blocking.items())
        raise WorkdirError(
            f"workdir {workdir} holds a run (checkpoint at iteration {checkpoint_step}) with a "
            f"different config: {listed}. These change the condensed state, so it cannot resume. "
            "Use a new --workdir, or pass --restart to delete this run's outputs and start over")
    return diff


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def record_config(workdir: str, config_json: str, *, start_step: int,
                  diff: dict[str, tuple[Any, Any]]) -> None:
    """Writes config.json (atomically) and appends this start to config_history.jsonl."""
    row = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "start_step": int(start_step), "changed": {k: list(v) for k, v in diff.items()},
           "config": json.loads(config_json)}
    history = os.path.join(workdir, HISTORY)
    line = json.dumps(row) + "\n"
    try:
        with open(history, "a") as f:
            f.write(line)
    except OSError as e:
        if is_disk_full(e):
            raise no_space(f"a row of {HISTORY}", history, len(line)) from None
        raise
    atomic_write(os.path.join(workdir, CONFIG), config_json)


def atomic_write(path: str, text: str) -> None:
    """Replaces `path` by `text` in one step (see `atomic_file`)."""
    data = text.encode()
    with atomic_file(path, needed_bytes=len(data)) as f:
        f.write(data)


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process's umask."""
    try:  # Linux says it without changing it (another thread may be creating files)
        with open("/proc/self/status") as f:
            umask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except OSError:
        umask = None
    if umask is None:
        umask = os.umask(0o022)  # elsewhere reading it means setting it: put it straight back
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str, needed_bytes: float | None = None) -> Iterator[Any]:
    """Yields a binary file in `path`'s folder (created if needed); on success it replaces `path`
    in one step (temporary file, fsync, rename).

    A crash or any failure leaves either the old file or the new one, never a half-written one
    (nor the temporary file); a full disk (or quota) raises NoSpaceError naming the file and
    `needed_bytes` (an estimate).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp's 0600 would hide the outputs from a shared group
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and is_disk_full(e):
            raise no_space(os.path.basename(path), path, needed_bytes) from None
        raise


def start_over(workdir: str) -> list[str]:
    """Deletes the run's outputs (RUN_OUTPUTS) in workdir; keeps the config history."""
    removed = []
    for name in RUN_OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        else:
            continue
        removed.append(name)
    return removed


def truncate_metrics(workdir: str, step: int) -> int:
    """Drops metrics.jsonl rows beyond `step` (and torn lines), atomically; returns rows dropped.

    After a resume from a checkpoint at `step`, the iterations after it are
    redone, so their old rows would otherwise appear twice.
    """
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = line.endswith("\n") and int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        atomic_write(path, "".join(kept))
    return dropped


# --------------------------------------------------------------------------- #
# Full disks: one line saying what could not be written and what it needed
# --------------------------------------------------------------------------- #

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the errors of TensorStore (orbax's array writer) say it; its errno is lost in a message.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """True when `error` (or an exception it was raised from) means no space or no quota left."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if mentions_disk_full(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def mentions_disk_full(text: str) -> bool:
    return any(t in text for t in _DISK_FULL_TEXT)


def megabytes(num_bytes: float) -> str:
    if num_bytes >= 1e5:
        return f"{num_bytes / 1e6:.1f} MB"
    return f"{num_bytes / 1e3:.1f} kB" if num_bytes >= 1e3 else f"{int(num_bytes)} bytes"


def free_bytes(path: str) -> int | None:
    """Bytes this user may still write on the filesystem holding `path` (or its nearest parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def no_space(what: str, path: str, needed_bytes: float | None, *, kept: str | None = None) -> NoSpaceError:
    """The error to raise when writing `what` to `path` ran out of space.

    needed_bytes: what the write needs (an estimate); kept: what stayed intact (default: the
    previous file at `path`, or that nothing was left half-written).
    """
    needs = f"needs about {megabytes(needed_bytes)}" if needed_bytes else "needs more space"
    free = free_bytes(path)
    where = os.path.dirname(os.path.abspath(path))
    if kept is None:
        kept = (f"the previous {os.path.basename(path)} is intact" if os.path.exists(path)
                else "nothing was left half-written")
    return NoSpaceError(f"no space left on the device to write {what} in {where} ({needs}"
                        f"{'' if free is None else f', {megabytes(free)} free'}); {kept}. Free some "
                        "space (or raise the quota) and rerun the same command to go on")
