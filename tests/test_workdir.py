"""A workdir a user can trust: bad folders, config changes, checkpoints by time,
metrics after a resume, finished runs, kill -9 at random moments.

In-process runs share test_condense's tiny setting (one compilation of the
step); the kill tests run main.py in subprocesses with a persistent
compilation cache, so only the first one compiles.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from idm_jax import condense
from idm_jax import data as data_lib
from idm_jax import evaluate
from idm_jax import runner
from idm_jax import workdir as workdir_lib
from helpers import (NO_FINAL_EVAL, REPO, TINY_FLAGS, compile_cache_env, metric_steps, run_main, snapshot,
                     synthetic_images, tiny_config)


# --------------------------------------------------------------------------- #
# 1. Bad workdirs: one line naming the path, before any compute
# --------------------------------------------------------------------------- #


def test_bad_workdirs_are_named_before_any_compute(tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("loaded data for an unusable workdir")
    monkeypatch.setattr(data_lib, "load_config_dataset", no_data)

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(workdir_lib.WorkdirError, match=f"workdir {a_file} exists and is a file"):
        runner.run_condensation(tiny_config(sets=NO_FINAL_EVAL), str(a_file))
    with pytest.raises(workdir_lib.WorkdirError,
                       match=f"cannot create workdir {a_file}/run: {a_file} is a file, not a folder"):
        runner.run_condensation(tiny_config(sets=NO_FINAL_EVAL), str(a_file / "run"))

    # Read-only places. Root ignores permission bits, so simulate what a read-only
    # mount answers (EROFS) where the real thing cannot be arranged.
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_makedirs, real_mkstemp = os.makedirs, workdir_lib.tempfile.mkstemp

    def makedirs(path, *args, **kwargs):
        if str(path).startswith(str(read_only) + os.sep):
            raise OSError(30, "Read-only file system", str(path))
        return real_makedirs(path, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
        if str(dir).startswith(str(read_only)):
            raise OSError(30, "Read-only file system", dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(workdir_lib.os, "makedirs", makedirs)
    monkeypatch.setattr(workdir_lib.tempfile, "mkstemp", mkstemp)
    with pytest.raises(workdir_lib.WorkdirError, match=f"workdir {read_only} is not writable: Read-only"):
        runner.run_condensation(tiny_config(sets=NO_FINAL_EVAL), str(read_only))
    with pytest.raises(workdir_lib.WorkdirError,
                       match=f"cannot create workdir {read_only}/a/b: read-only file system in {read_only}"):
        runner.run_condensation(tiny_config(sets=NO_FINAL_EVAL), str(read_only / "a" / "b"))
    assert os.listdir(read_only) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_folder_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(workdir_lib.WorkdirError, match=f"cannot create workdir {locked}/run"):
            workdir_lib.check_writable(str(locked / "run"))
        with pytest.raises(workdir_lib.WorkdirError, match=f"workdir {locked} is not writable"):
            workdir_lib.check_writable(str(locked))
    finally:
        locked.chmod(0o755)


def test_cli_prints_one_line_per_error(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = run_main("--config=configs/quick.py", f"--workdir={a_file}/run")
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert lines == [f"error: cannot create workdir {a_file}/run: {a_file} is a file, not a folder"], out.stderr


# --------------------------------------------------------------------------- #
# 2. Config changes: refused untouched, or resumed and recorded
# --------------------------------------------------------------------------- #


def test_shape_changing_rerun_leaves_every_file_unchanged(tmp_path):
    workdir = str(tmp_path / "run")
    runner.run_condensation(tiny_config(sets=NO_FINAL_EVAL), workdir, max_steps=2)
    before = snapshot(workdir)
    assert "checkpoints/2/" in before and "config.json" in before

    other = tiny_config(sets=NO_FINAL_EVAL)
    other.ipc = 2
    other.model = "ConvNet"
    with pytest.raises(workdir_lib.WorkdirError) as e:
        runner.run_condensation(other, workdir)
    message = str(e.value)
    assert "\n" not in message
    assert "ipc: 1 -> 2" in message and 'model: "ConvNetD2" -> "ConvNet"' in message
    assert "checkpoint at iteration 2" in message
    assert "new --workdir" in message and "--restart" in message
    assert snapshot(workdir) == before

    # The command line says the same in one line, and touches nothing either.
    out = run_main("--config=configs/quick.py:2", f"--workdir={workdir}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (error,) = [l for l in out.stderr.splitlines() if "ipc: 1 -> 2" in l]  # printed once
    assert error.startswith("error: workdir") and error.endswith("start over")
    assert snapshot(workdir) == before


def test_state_preserving_changes_resume_and_are_recorded(tmp_path):
    workdir = str(tmp_path / "run")
    runner.run_condensation(tiny_config(sets=NO_FINAL_EVAL), workdir, max_steps=2)
    changed = tiny_config(sets={**NO_FINAL_EVAL, "eval.epochs": 3, "log_every": 2})
    summary = runner.run_condensation(changed, workdir, max_steps=1)
    assert summary["start_step"] == 2 and summary["step"] == 3
    history = [json.loads(line) for line in open(os.path.join(workdir, workdir_lib.HISTORY))]
    assert [h["start_step"] for h in history] == [0, 2]
    assert history[0]["changed"] == {}
    assert history[1]["changed"] == {"eval.epochs": [2, 3], "log_every": [1, 2]}
    assert history[0]["config"]["eval"]["epochs"] == 2 and history[1]["config"]["eval"]["epochs"] == 3
    assert json.load(open(os.path.join(workdir, "config.json")))["log_every"] == 2

    # --restart: the run's outputs go, the history stays, the new config starts at 0.
    other = tiny_config(sets=NO_FINAL_EVAL)
    other.seed = 1
    with pytest.raises(workdir_lib.WorkdirError, match="seed: 0 -> 1"):
        runner.run_condensation(other, workdir)
    summary = runner.run_condensation(other, workdir, max_steps=1, restart=True)
    assert summary["start_step"] == 0 and summary["step"] == 1
    assert metric_steps(workdir) == [1]
    history = [json.loads(line) for line in open(os.path.join(workdir, workdir_lib.HISTORY))]
    assert [h["start_step"] for h in history] == [0, 2, 0] and history[2]["changed"]["seed"] == [0, 1]


def test_dispatch_and_memory_knobs_may_change_between_starts():
    for key in ("idm.steps_per_dispatch", "idm.class_batch", "idm.max_unrolled_queue_steps", "eval.epochs"):
        assert workdir_lib.resumable(key), key
    for key in ("idm.lr_img", "idm.partition_factor", "seed", "ipc"):
        assert not workdir_lib.resumable(key), key


# --------------------------------------------------------------------------- #
# 3. Checkpoints by wall-clock time as well as by iteration
# --------------------------------------------------------------------------- #


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_checkpoint_cadence_by_time_and_by_iteration(tmp_path):
    # Time only, with a tiny interval: every iteration is saved.
    timed = str(tmp_path / "timed")
    runner.run_condensation(tiny_config(sets={**NO_FINAL_EVAL, "checkpoint_every": 0, "checkpoint_every_minutes": 1e-6,
                                              "keep_checkpoints": 10}), timed)
    assert checkpoint_steps(timed) == [1, 2, 3, 4]
    # Iterations only: every 3rd, and the last.
    counted = str(tmp_path / "counted")
    runner.run_condensation(tiny_config(sets={**NO_FINAL_EVAL, "checkpoint_every": 3, "checkpoint_every_minutes": 0.0,
                                              "keep_checkpoints": 10}), counted)
    assert checkpoint_steps(counted) == [3, 4]
    # Both, with an hour: the first iteration (no checkpoint yet), every 3rd, the last.
    both = str(tmp_path / "both")
    runner.run_condensation(tiny_config(sets={**NO_FINAL_EVAL, "checkpoint_every": 3, "checkpoint_every_minutes": 60.0,
                                              "keep_checkpoints": 10}), both)
    assert checkpoint_steps(both) == [1, 3, 4]
    np.testing.assert_array_equal(synthetic_images(timed), synthetic_images(counted))


# --------------------------------------------------------------------------- #
# 4. metrics.jsonl (and TensorBoard) after a resume: one row per iteration
# --------------------------------------------------------------------------- #


def test_resume_drops_metrics_rows_beyond_the_checkpoint(tmp_path, monkeypatch):
    # Both runs within one second, as on a fast machine (CI once was): tensorboardX names
    # event files by the second, so without a unique suffix the resume overwrote the first.
    import tensorboardX.event_file_writer as tb_writer  # pylint: disable=import-outside-toplevel
    import types  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(tb_writer, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))
    workdir = str(tmp_path / "run")
    runner.run_condensation(tiny_config(sets={**NO_FINAL_EVAL, "checkpoint_every": 2, "checkpoint_every_minutes": 0.0}),
                            workdir, max_steps=3)
    # As if killed after logging iteration 3, before its checkpoint, mid-way through a row.
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 1.')
    assert metric_steps_lenient(workdir) == [1, 2, 3]
    summary = runner.run_condensation(tiny_config(sets={**NO_FINAL_EVAL, "checkpoint_every": 2}), workdir)
    assert summary["start_step"] == 2
    assert metric_steps(workdir) == [1, 2, 3, 4]

    assert tensorboard_steps(os.path.join(workdir, "tensorboard"), "loss") == [1, 2, 3, 4]


def tensorboard_steps(logdir, tag) -> list[int]:
    """The steps TensorBoard shows for `tag`: events in file order, where a SessionLog
    START at step s (tensorboardX's purge_step) discards the earlier events at steps >= s."""
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    steps = []
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            length = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                steps = [s for s in steps if s < event.step]
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def metric_steps_lenient(workdir):
    steps = []
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


# --------------------------------------------------------------------------- #
# 5. A finished workdir: reported, not recomputed
# --------------------------------------------------------------------------- #


def test_completed_rerun_does_no_training_and_no_evaluation(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    first = runner.run_condensation(tiny_config(), workdir)
    before = snapshot(workdir)

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed a finished run")
    monkeypatch.setattr(condense, "make_step", forbidden)
    monkeypatch.setattr(data_lib, "load_config_dataset", forbidden)
    monkeypatch.setattr(evaluate, "evaluate_archs", forbidden)
    again = runner.run_condensation(tiny_config(), workdir)
    assert again["complete"] and again["step"] == 4
    assert again["results"]["archs"] == json.loads(json.dumps(first["results"]["archs"]))
    assert snapshot(workdir) == before

    # --reevaluate: evaluates again, still without a training step.
    monkeypatch.undo()
    calls = []
    real_evaluate = evaluate.evaluate_archs
    monkeypatch.setattr(evaluate, "evaluate_archs", lambda *a, **k: calls.append(1) or real_evaluate(*a, **k))
    real_make_step = condense.make_step

    def no_steps(*args, **kwargs):
        step = real_make_step(*args, **kwargs)
        return lambda *a: forbidden() if a else step
    monkeypatch.setattr(condense, "make_step", no_steps)
    redone = runner.run_condensation(tiny_config(), workdir, reevaluate=True)
    assert calls == [1] and redone["start_step"] == 4 and "complete" not in redone
    assert metric_steps(workdir) == [1, 2, 3, 4]


# --------------------------------------------------------------------------- #
# 3 + 4 end to end: kill -9 at random moments, including during a save
# --------------------------------------------------------------------------- #


def _rows(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def _kill_during_save(proc, workdir, nth: int) -> bool:
    """SIGKILLs proc as soon as its nth checkpoint of this start is being written."""
    seen, ckpt = set(), os.path.join(workdir, "checkpoints")
    while proc.poll() is None:
        if os.path.isdir(ckpt):
            seen |= {d for d in os.listdir(ckpt) if "tmp" in d}
            if len(seen) >= nth:
                proc.send_signal(signal.SIGKILL)
                return True
        time.sleep(0.002)
    return False


def _kill_at_random(proc, workdir, rng) -> bool:
    """SIGKILLs proc at a random moment after its 1st to 3rd new metrics row (anywhere in the
    iteration that follows: saving, stepping or logging). Counting rows rather than seconds keeps
    the kill inside the run however fast the machine (a fixed 0-1.5 s once let it finish first)."""
    rows = _rows(workdir) + rng.randint(1, 3)
    while proc.poll() is None and _rows(workdir) < rows:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        return True
    return False


@pytest.mark.slow
def test_kill_9_at_random_moments_gives_the_uninterrupted_result(tmp_path):
    env = compile_cache_env(tmp_path / "compile_cache")
    reference = str(tmp_path / "reference")
    out = run_main(*TINY_FLAGS, f"--workdir={reference}", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    # Logs: no orbax chatter, no error lines, a clear end.
    assert "orbax" not in out.stderr and "checkpoint_manager.py" not in out.stderr
    assert "condensation done at iteration 8/8" in out.stderr

    workdir = str(tmp_path / "killed")
    rng = random.Random(0)
    kills = {"save": 0, "random": 0}
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "main.py", *TINY_FLAGS, f"--workdir={workdir}"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        mode = "random" if attempt % 2 == 0 else "save"  # random first: the most iterations left
        killed = (_kill_during_save(proc, workdir, nth=2) if mode == "save"
                  else _kill_at_random(proc, workdir, rng))
        _, err = proc.communicate(timeout=300)
        if not killed or proc.returncode == 0:
            assert proc.returncode == 0, err[-2000:]
            break
        assert proc.returncode == -signal.SIGKILL
        kills[mode] += 1
    else:
        raise AssertionError(f"not finished after 12 starts ({kills})")
    print(f"kills: {kills}")
    assert kills["save"] >= 1 and kills["random"] >= 1, kills
    np.testing.assert_array_equal(synthetic_images(workdir), synthetic_images(reference))
    assert metric_steps(workdir) == list(range(1, 9))
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
