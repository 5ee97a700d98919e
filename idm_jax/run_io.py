"""What a condensation run writes and hears besides its checkpoints: metrics rows
(metrics.jsonl + TensorBoard), the progress line, the stop signals, and quieter library logs."""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from idm_jax import progress
from idm_jax import workdir as workdir_lib


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
        line = json.dumps(row) + "\n"
        try:
            self._jsonl.write(line)
            self._jsonl.flush()
        except OSError as e:
            if workdir_lib.is_disk_full(e):  # one line naming the file, not a bare "[Errno 28]"
                raise workdir_lib.no_space(f"the row of iteration {int(step)} of {workdir_lib.METRICS}",
                                           self._jsonl.name, len(line),
                                           kept="the earlier rows and the checkpoints are intact") from None
            raise
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        try:
            self._jsonl.close()
        except OSError as e:  # flushing a row that a full disk refused: `write` has said so
            if not workdir_lib.is_disk_full(e):
                raise
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


def progress_line(step, total, m, rate) -> str:
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


@dataclasses.dataclass
class LoopClock:
    """The loop's wall-clock bookkeeping: it/s over each log window, and the ETA's average, which
    leaves out the first (compiling) iteration and the time spent evaluating."""

    start: float
    window: float = 0.0  # when the current log window began
    window_steps: int = 0
    first: float | None = None  # when the first iteration was done
    eval_seconds: float = 0.0

    def __post_init__(self):
        self.window = self.start

    def log_row(self, writer: MetricsWriter, done: int, total: int, start: int, metrics) -> None:
        """The progress line and the metrics row of iteration `done`; starts a new log window."""
        m = jax.device_get(metrics)
        now = time.time()
        rate = self.window_steps / (now - self.window) if self.window_steps else None
        measured = done - start - 1
        avg = measured / max(now - self.first - self.eval_seconds, 1e-9) if measured else None
        logging.info(progress_line(done, total, m, avg))
        writer.write(done, {**m, **({"it_per_s": rate} if rate else {})})
        self.window, self.window_steps = now, 0


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
