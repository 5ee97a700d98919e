"""Runs that survive faults (issue 27): one run per workdir, damaged checkpoints, full disks,
atomic outputs, two processes racing on one workdir.

Lock tests use plain Python subprocesses (idm_jax.workdir imports no JAX) and are fast; the
in-process runs share test_condense's tiny setting; the main.py races are marked slow.
"""

import errno
import glob
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from idm_jax import synthetic_file
from idm_jax import checkpoints
from idm_jax import results as results_lib
from idm_jax import runner
from idm_jax import workdir as workdir_lib
from idm_jax import workdir_lock
from helpers import (NO_FINAL_EVAL, TINY_FLAGS, compile_cache_env, metric_steps, run_main, snapshot, synthetic_images,
                     tiny_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A process that takes the lock, says so, and waits (for a kill, a signal, or an error).
HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from idm_jax import workdir_lock
holder = workdir_lock.acquire_lock({workdir!r})
print("held", holder["pid"], flush=True)
time.sleep(120)
"""


def start_holder(workdir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=REPO, workdir=str(workdir))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("held"), proc.stderr.read()
    return proc


def try_lock_elsewhere(workdir) -> tuple[int, str]:
    """(returncode, last stderr line) of another process trying the lock once."""
    code = (f"import sys; sys.path.insert(0, {REPO!r}); from idm_jax import workdir_lock; "
            f"workdir_lock.acquire_lock({str(workdir)!r}); workdir_lock.release_lock({str(workdir)!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return out.returncode, (out.stderr.strip().splitlines() or [""])[-1]


def error_lines(stderr) -> list[str]:
    """stderr without absl's INFO/WARNING lines ("I1205 08:20:50.008833 ...")."""
    return [l for l in stderr.splitlines() if l.strip() and not re.match(r"[IW]\d{4} \d\d:", l)]


@pytest.fixture
def warnings(monkeypatch):
    """The warning lines workdir_lock and runner log (absl), formatted."""
    seen = []
    for module in (workdir_lock, runner):
        monkeypatch.setattr(module.logging, "warning", lambda msg, *a: seen.append(msg % a))
    return seen


# --------------------------------------------------------------------------- #
# 1. One run per workdir
# --------------------------------------------------------------------------- #


def test_a_held_workdir_stops_another_process_and_is_released(tmp_path):
    holder = workdir_lock.acquire_lock(str(tmp_path))
    lock = tmp_path / workdir_lock.LOCK
    written = json.loads(lock.read_text())
    assert written == holder and written["pid"] == os.getpid() and written["host"] == socket.gethostname()
    assert set(written) >= {"started", "boot_id", "command"}

    rc, line = try_lock_elsewhere(tmp_path)
    assert rc == 1 and f"WorkdirBusyError: workdir {tmp_path} is in use by process {os.getpid()} on host " \
        f"{socket.gethostname()}, started {holder['started']}" in line, line

    # Nested holds (main.py, then run_condensation) in one process: the last release frees it.
    assert workdir_lock.acquire_lock(str(tmp_path)) == holder
    workdir_lock.release_lock(str(tmp_path))
    assert lock.exists() and try_lock_elsewhere(tmp_path)[0] == 1
    workdir_lock.release_lock(str(tmp_path))
    assert not lock.exists()
    assert try_lock_elsewhere(tmp_path)[0] == 0
    assert sorted(os.listdir(tmp_path)) == []  # nothing left behind


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, warnings):
    proc = start_holder(tmp_path)
    try:
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f"in use by process {proc.pid} on host"):
            workdir_lock.acquire_lock(str(tmp_path))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert (tmp_path / workdir_lock.LOCK).exists()  # kill -9: no cleanup, but the OS dropped the flock
    holder = workdir_lock.acquire_lock(str(tmp_path))
    try:
        assert holder["pid"] == os.getpid()
        assert len(warnings) == 1 and f"took over the lock left by process {proc.pid} on host" in warnings[0]
        assert "\n" not in warnings[0]
    finally:
        workdir_lock.release_lock(str(tmp_path))


def test_without_flock_the_lock_file_and_its_pid_decide(tmp_path, monkeypatch, warnings):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
    lock = tmp_path / workdir_lock.LOCK

    def left_by(pid, host=None):
        lock.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                    "boot_id": workdir_lock.boot_id(), "started": "then"}))

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left_by(alive.pid)
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f"process {alive.pid} .*if that process is "
                           f"gone, delete {lock}"):
            workdir_lock.acquire_lock(str(tmp_path))
    finally:
        alive.kill()
        alive.wait()
    left_by(alive.pid, host="elsewhere")  # another machine's pid cannot be checked: still busy
    with pytest.raises(workdir_lock.WorkdirBusyError, match="on host elsewhere"):
        workdir_lock.acquire_lock(str(tmp_path))
    left_by(alive.pid)  # gone, on this machine: stale
    assert workdir_lock.acquire_lock(str(tmp_path))["pid"] == os.getpid()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert [w for w in warnings if f"left by process {alive.pid}" in w]
    workdir_lock.release_lock(str(tmp_path))
    assert not lock.exists()


EXITS = {
    "exception": "raise RuntimeError('boom')",
    "sigterm": "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)",
    # A shell starts background jobs with SIGINT ignored (and Python keeps that): restore Ctrl-C first.
    "ctrl_c": ("signal.signal(signal.SIGINT, signal.default_int_handler); "
               "os.kill(os.getpid(), signal.SIGINT); time.sleep(30)"),
}


@pytest.mark.parametrize("ending", sorted(EXITS))
def test_main_releases_the_lock_however_it_ends(tmp_path, ending):
    # main.py's own two lines (SIGTERM handler, lock_until_exit), then the ending.
    code = (f"import os, signal, sys, time; sys.path.insert(0, {REPO!r}); os.environ['JAX_PLATFORMS'] = 'cpu'\n"
            "import main\nfrom idm_jax import workdir_lock\n"
            "signal.signal(signal.SIGTERM, main._exit_on_sigterm)\n"
            f"workdir_lock.lock_until_exit({str(tmp_path)!r})\n"
            f"assert os.path.exists({str(tmp_path / workdir_lock.LOCK)!r})\n" + EXITS[ending])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == {"exception": 1, "sigterm": 128 + signal.SIGTERM,
                              "ctrl_c": -signal.SIGINT}[ending], out.stderr
    assert "AssertionError" not in out.stderr
    assert os.listdir(tmp_path) == []


def test_main_refuses_a_workdir_in_use_in_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    holder = workdir_lock.acquire_lock(str(workdir))
    try:
        before = snapshot(workdir)
        out = run_main("--config=configs/quick.py", f"--workdir={workdir}")
        assert out.returncode == 2
        lines = error_lines(out.stderr)
        assert lines == [f"error: workdir {workdir} is in use by process {os.getpid()} on host "
                         f"{socket.gethostname()}, started {holder['started']} ({holder['command']}); wait for "
                         "that run to end (or stop it), or use another --workdir"], out.stderr
        assert snapshot(workdir) == before
    finally:
        workdir_lock.release_lock(str(workdir))


# --------------------------------------------------------------------------- #
# 2. A damaged newest checkpoint
# --------------------------------------------------------------------------- #


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def truncate_arrays(step_folder):
    """What a crash or a full disk mid-copy leaves: every array file cut to half."""
    files = glob.glob(os.path.join(step_folder, "**", "d", "*"), recursive=True)
    assert files
    for path in files:
        os.truncate(path, os.path.getsize(path) // 2)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_an_older_one(tmp_path, warnings):
    workdir = str(tmp_path / "run")
    config = tiny_config(sets={**NO_FINAL_EVAL, "checkpoint_every": 1, "checkpoint_every_minutes": 0.0,
                               "keep_checkpoints": 2})
    runner.run_condensation(config, workdir, max_steps=2)
    straight = synthetic_images(workdir)  # the set at iteration 2
    truncate_arrays(os.path.join(workdir, "checkpoints", "2"))
    damaged_files = snapshot(os.path.join(workdir, "checkpoints", "2"))

    summary = runner.run_condensation(config, workdir, max_steps=1)
    assert summary["start_step"] == 1 and summary["step"] == 2
    np.testing.assert_array_equal(synthetic_images(workdir), straight)  # redone from iteration 1: the same set
    (aside,) = os.listdir(os.path.join(workdir, workdir_lib.DAMAGED))
    assert aside.startswith("2-")
    assert snapshot(os.path.join(workdir, workdir_lib.DAMAGED, aside)) == damaged_files  # kept as it was
    assert checkpoint_steps(workdir) == [1, 2]  # iteration 2 written again
    (warning,) = warnings
    assert warning.startswith("the checkpoint at iteration 2 cannot be restored (")
    assert f"moved it to {os.path.join(workdir, workdir_lib.DAMAGED, aside)} and resuming from iteration 1" \
        in warning
    assert "\n" not in warning and "TensorStore" not in warning and len(warning) < 400

    # None restores: one line, and nothing is moved.
    for step in (1, 2):
        truncate_arrays(os.path.join(workdir, "checkpoints", str(step)))
    before = snapshot(os.path.join(workdir, "checkpoints"))
    with pytest.raises(workdir_lib.WorkdirError) as e:
        runner.run_condensation(config, workdir, max_steps=1)
    message = str(e.value)
    assert message.startswith(f"no checkpoint in {workdir}/checkpoints can be restored with this config "
                              "(iteration 2: ")
    assert "; iteration 1: " in message and message.endswith("pass --restart to start over")
    assert "\n" not in message and "TensorStore" not in message
    assert snapshot(os.path.join(workdir, "checkpoints")) == before
    assert len(os.listdir(os.path.join(workdir, workdir_lib.DAMAGED))) == 1


def test_restore_problem_is_one_short_line():
    try:
        try:
            raise ValueError('OUT_OF_RANGE: Error reading "syn.images/0" in OCDBT database at local file '
                             '"/w/checkpoints/2/default/": Requested byte range [1, 9) is not valid')
        except ValueError as inner:
            raise Exception("Encountered error while reading array index: (slice(0, 4, 1),). See full "
                            "TensorStore details: <bound method spec of TensorStore({\n 'driver': 'zarr'})>") \
                from inner
    except Exception as e:  # pylint: disable=broad-except
        assert checkpoints.restore_problem(e) == ('OUT_OF_RANGE: Error reading "syn.images/0": Requested byte '
                                             'range [1, 9) is not valid')
    assert checkpoints.restore_problem(KeyError()) == "KeyError"
    assert len(checkpoints.restore_problem(ValueError("x" * 500))) == 160


def test_a_checkpoint_with_non_finite_images_is_refused_in_one_line_writing_nothing(tmp_path, monkeypatch):
    """A checkpoint whose synthetic images hold NaN and inf values: resuming, or --reevaluate, stops
    naming it, and the workdir is left exactly as it was (no config row, nothing moved)."""
    import jax.numpy as jnp
    workdir = str(tmp_path / "run")
    config = tiny_config(sets={**NO_FINAL_EVAL, "checkpoint_every": 2, "checkpoint_every_minutes": 0.0})
    real_save = checkpoints.save_state

    def poisoned(mngr, state):
        if int(state.step) == 2:
            images = state.syn.images.at[0, 0, 0, 0, 0].set(jnp.nan).at[1, 0, 0, 0, 0].set(jnp.inf)
            images = images.at[1, 0, 1, 0, 0].set(-jnp.inf)
            state = state.replace(syn=state.syn.replace(images=images))
        real_save(mngr, state)
    monkeypatch.setattr(checkpoints, "save_state", poisoned)
    runner.run_condensation(config, workdir, max_steps=2)
    monkeypatch.undo()
    saved = synthetic_file.load_synthetic(os.path.join(workdir, "synthetic.npz"))  # an ordinary run's set
    pixels = saved.images_normalized * saved.std + saved.mean  # leaves [0, 1] by far less than the margin
    assert -1.0 < pixels.min() and pixels.max() < 2.0 < 1 + runner.DIVERGED_PIXEL_MARGIN
    before = snapshot(workdir)
    size = 10 * 1 * 16 * 16 * 1  # classes x ipc x H x W x C of the quick config at IPC 1
    for reevaluate in (False, True):
        with pytest.raises(workdir_lib.WorkdirError) as e:
            runner.run_condensation(config, workdir, reevaluate=reevaluate)
        assert str(e.value) == (f"the checkpoint at iteration 2 in {workdir}/checkpoints holds non-finite "
                                f"synthetic images (3 of {size} values: 1 NaN, 2 infinite); refusing to resume "
                                "from it. Pass --restart to start over (or use a new --workdir)")
        assert snapshot(workdir) == before


def test_synthetic_images_that_diverge_stop_the_run_without_saving_them(tmp_path):
    """idm.lr_img=1e30 keeps the images finite (about 1e30 normalized): the range check stops the run
    before the first checkpoint, and no set is written."""
    workdir = str(tmp_path / "run")
    config = tiny_config(sets={**NO_FINAL_EVAL, "checkpoint_every": 2, "checkpoint_every_minutes": 0.0})
    config.idm.lr_img = 1e30
    with pytest.raises(runner.DivergedError) as e:
        runner.run_condensation(config, workdir, max_steps=2)
    message = str(e.value)
    assert message.startswith("the synthetic images diverged by iteration 1: their pixels span [")
    assert message.endswith("far outside the data's [0, 1]; stopping without saving them (no checkpoint was "
                            "written). Lower idm.lr_img (now 1e+30) and start over (--restart or a new --workdir)")
    lo, hi = (float(v) for v in re.search(r"span \[(\S+), (\S+)\]", message).groups())
    assert min(-lo, hi) > 1e20  # about 1e30 times the range, both ways
    assert not os.path.exists(os.path.join(workdir, "synthetic.npz"))
    assert checkpoint_steps(workdir) == []


def _interrupt(args, phrase=None, delay=0.3, env=None) -> tuple[int, str]:
    """(returncode, stderr) of main.py sent SIGINT (Ctrl-C) `delay` s after it starts, or once a
    stderr line holds `phrase`."""
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    if phrase is None:
        time.sleep(delay)
    else:
        for line in proc.stderr:
            seen.append(line)
            if phrase in line:
                break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    code, stderr = _interrupt([*TINY_FLAGS, f"--workdir={workdir}"])
    assert code == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert line.startswith("error: interrupted (Ctrl-C)"), stderr[-3000:]
    assert not workdir.exists() or os.listdir(workdir) == []  # nothing written (the lock released)


@pytest.mark.slow  # a real main.py run, interrupted twice: about a minute on 2 cores
def test_ctrl_c_while_restoring_or_compiling_says_what_is_kept(tmp_path):
    env = compile_cache_env(tmp_path / "compile_cache")
    workdir = str(tmp_path / "run")
    first = run_main(*TINY_FLAGS, "--config.idm.iterations=2", f"--workdir={workdir}", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(os.path.join(workdir, "checkpoints"))
    code, stderr = _interrupt([*TINY_FLAGS, f"--workdir={workdir}"], phrase="restoring the checkpoint at iteration 2",
                              env=env)
    assert code == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-3000:]
    assert error_lines(stderr) == [f"error: interrupted (Ctrl-C); the checkpoint at iteration 2 in {workdir} is "
                                   "kept: rerun the same command to resume from it"]
    assert snapshot(os.path.join(workdir, "checkpoints")) == before
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK))


def test_the_interrupt_line_of_every_mode(tmp_path):
    import main
    assert main.interrupted_line("condense", str(tmp_path)) == (
        f"interrupted (Ctrl-C) before the first checkpoint in {tmp_path}: nothing to resume from; rerun the "
        "same command to start again")
    assert main.interrupted_line("condense", str(tmp_path), runs=3).endswith(
        f"checkpoints under {tmp_path}/run_* are kept: rerun the same command to resume")
    assert main.interrupted_line("export", str(tmp_path)) == (
        f"interrupted (Ctrl-C); the files already in {tmp_path} are whole and nothing half-written is left: "
        "rerun the same command to finish --mode=export")


# --------------------------------------------------------------------------- #
# 3. A full disk
# --------------------------------------------------------------------------- #

DISK_FULL = ('RESOURCE_EXHAUSTED: Error writing "syn.images/0" in OCDBT database at local file "{path}/": '
             'Failed writing: "{path}/d/7ce8": Failed to write 2102221 bytes to file 8: No space left on device '
             '[OS error: No space left on device]')


def test_a_full_disk_during_a_checkpoint_stops_in_one_line_and_the_next_run_resumes(tmp_path, monkeypatch):
    """orbax reports TensorStore's ENOSPC as a ValueError (message as on a full 9 MB tmpfs), from
    its save thread after leaving <step>.orbax-checkpoint-tmp; the real tmpfs is a slow test."""
    workdir = str(tmp_path / "run")
    config = tiny_config(sets={**NO_FINAL_EVAL, "checkpoint_every": 1, "checkpoint_every_minutes": 0.0})
    real_save, sizes = ocp.CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        if step == 2:
            partial = os.path.join(str(self.directory), "2.orbax-checkpoint-tmp", "default")
            os.makedirs(partial)
            open(os.path.join(partial, "half"), "wb").write(b"\0" * 1000)
            sizes.append(checkpoints.state_nbytes(kwargs["args"].item))
            raise ValueError(DISK_FULL.format(path=partial))
        return real_save(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(workdir_lib.NoSpaceError) as e:
        runner.run_condensation(config, workdir, max_steps=3)
    message = str(e.value)
    assert message.startswith(f"no space left on the device to write the checkpoint at iteration 2 in "
                              f"{workdir}/checkpoints (needs about {workdir_lib.megabytes(sizes[0])}, ")
    assert sizes[0] > 1e5  # the state's arrays: images, momentum, queue nets
    assert "the checkpoint at iteration 1 and every earlier output are intact" in message and "\n" not in message
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]  # partial folder removed
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK))

    monkeypatch.undo()  # space freed
    summary = runner.run_condensation(config, workdir, max_steps=1)
    assert summary["start_step"] == 1 and summary["step"] == 2
    assert checkpoint_steps(workdir) == [1, 2]


def test_after_a_full_disk_asyncio_reports_of_the_abandoned_writes_are_dropped(caplog):
    """orbax's write futures, garbage-collected after a save failed on a full disk (at exit, say),
    made asyncio log '_GatheringFuture exception was never retrieved' with a traceback; from the
    failure on, such disk-full records are dropped and others still pass."""
    asyncio_log = logging.getLogger("asyncio")
    full = ValueError(DISK_FULL.format(path="/w/checkpoints/3.orbax-checkpoint-tmp"))
    checkpoints.drop_disk_full_asyncio_reports()
    checkpoints.drop_disk_full_asyncio_reports()  # installed once, however many saves fail
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio_log.error("_GatheringFuture exception was never retrieved", exc_info=(ValueError, full, None))
        asyncio_log.error("an unrelated asyncio error")
    assert [r.getMessage() for r in caplog.records] == ["an unrelated asyncio error"]
    assert asyncio_log.filters.count(checkpoints.disk_full_record) == 1


def _full_disk(monkeypatch, keep=100):
    """Writes through os.fdopen'ed files (every atomic writer's) store `keep` bytes, then ENOSPC."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(bytes(data)[:keep])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))


def test_a_full_disk_while_writing_outputs_keeps_the_previous_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    set_args = dict(mean=[0.5], std=[0.25], class_names=[str(k) for k in range(10)], partition_factor=2,
                    method="idm", dataset="digits")
    npz = str(tmp_path / "synthetic.npz")
    synthetic_file.save_synthetic(npz, rng.normal(size=(20, 8, 8, 1)), np.repeat(np.arange(10), 2), **set_args)
    results_lib.finish_results(str(tmp_path), {"method": "idm", "dataset": "digits", "ipc": 2, "archs": {}})
    workdir_lib.atomic_write(str(tmp_path / "config.json"), '{"ipc": 2}')
    before = snapshot(tmp_path)

    _full_disk(monkeypatch)
    bigger = rng.normal(size=(40, 8, 8, 1))
    with pytest.raises(workdir_lib.NoSpaceError) as e:
        synthetic_file.save_synthetic(npz, bigger, np.repeat(np.arange(10), 4), **set_args)
    # images and images_normalized (f32, 2 x 10240 bytes), labels and the small keys: 20.7 kB
    assert str(e.value).startswith(f"no space left on the device to write synthetic.npz in {tmp_path} (needs "
                                   "about 20.7 kB, ")
    assert "the previous synthetic.npz is intact" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(workdir_lib.NoSpaceError, match="to write results.json in .* the previous results.json "
                       "is intact"):
        results_lib.finish_results(str(tmp_path), {"method": "idm", "dataset": "digits", "ipc": 4, "archs": {}})
    with pytest.raises(workdir_lib.NoSpaceError, match=r"to write config.json in .*\(needs about 10 bytes, "):
        workdir_lib.atomic_write(str(tmp_path / "config.json"), '{"ipc": 4}')
    assert snapshot(tmp_path) == before  # no half-written file, no temporary file
    assert synthetic_file.load_synthetic(npz).ipc == 2


def test_a_full_disk_appending_the_config_history_is_one_line(tmp_path, monkeypatch):
    real_open = open

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path).endswith(workdir_lib.HISTORY):
            f.close()
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path))
        return f
    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(workdir_lib.NoSpaceError, match=f"to write a row of {workdir_lib.HISTORY} in {tmp_path}"):
        workdir_lib.record_config(str(tmp_path), "{}", start_step=0, diff={})


def test_a_full_disk_writing_a_metrics_row_is_one_line(tmp_path, monkeypatch):
    from idm_jax import run_io
    real_open = open

    class Full:
        def __init__(self, f):
            self._f, self.name = f, f.name

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self._f.flush()

        def close(self):  # the buffered row would fail again
            self._f.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if str(path).endswith(workdir_lib.METRICS) else f
    monkeypatch.setattr("builtins.open", full_open)
    writer = run_io.MetricsWriter(str(tmp_path))
    with pytest.raises(workdir_lib.NoSpaceError) as e:
        writer.write(3, {"loss": 1.5})
    row = json.dumps({"step": 3, "loss": 1.5}) + "\n"  # 25 bytes
    assert str(e.value).startswith(f"no space left on the device to write the row of iteration 3 of metrics.jsonl "
                                   f"in {tmp_path} (needs about {len(row)} bytes, ")
    assert "; the earlier rows and the checkpoints are intact. Free some space" in str(e.value)
    writer.close()  # the failed row is not reported twice


def test_a_full_disk_taking_the_lock_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(workdir_lib.NoSpaceError) as e:
        workdir_lock.acquire_lock(str(tmp_path))
    assert str(e.value).startswith(f"no space left on the device to write the lock file {workdir_lock.LOCK} in "
                                   f"{tmp_path} (needs about ")
    assert "; nothing else was written. Free some space" in str(e.value)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    workdir_lock.acquire_lock(str(tmp_path))  # not left half-held
    workdir_lock.release_lock(str(tmp_path))


def test_a_full_disk_caching_a_pretrained_pool_is_one_line(tmp_path, monkeypatch):
    from configs import quick
    from idm_jax import data, pool
    ds = data.load_config_dataset(quick.get_config("1"))
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    monkeypatch.setattr(pool, "build_pool", lambda *a, **k: params)
    args = dict(epochs=1, size=2, seed=0, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=8,
                cache_dir=str(tmp_path))
    _full_disk(monkeypatch)
    with pytest.raises(workdir_lib.NoSpaceError, match=r"no space left on the device to write .*\.msgpack in "
                                                       r".*\(needs about \d+ bytes, "):
        pool.load_or_build(ds, "ConvNetD2", **args)
    monkeypatch.undo()
    monkeypatch.setattr(pool, "build_pool", lambda *a, **k: params)
    np.testing.assert_array_equal(pool.load_or_build(ds, "ConvNetD2", **args)["w"], params["w"])  # written
    monkeypatch.setattr(pool, "build_pool", lambda *a, **k: 1 / 0)
    np.testing.assert_array_equal(pool.load_or_build(ds, "ConvNetD2", **args)["w"], params["w"])  # and read back


def test_disk_full_is_told_apart_from_out_of_memory():
    assert workdir_lib.is_disk_full(OSError(errno.ENOSPC, "x"))
    assert workdir_lib.is_disk_full(OSError(errno.EDQUOT, "x"))
    assert workdir_lib.is_disk_full(ValueError(DISK_FULL.format(path="/w")))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as e:
        assert workdir_lib.is_disk_full(e)
    assert not workdir_lib.is_disk_full(ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB"))
    assert not workdir_lib.is_disk_full(OSError(errno.EACCES, "Permission denied"))


# --------------------------------------------------------------------------- #
# 4. A truncated synthetic.npz given to --mode=evaluate
# --------------------------------------------------------------------------- #


def test_evaluate_on_a_truncated_synthetic_set_is_one_line(tmp_path):
    npz = str(tmp_path / "synthetic.npz")
    synthetic_file.save_synthetic(npz, np.zeros((10, 16, 16, 1)), np.arange(10), mean=[0.5], std=[0.25],
                                  class_names=[str(k) for k in range(10)], partition_factor=2, method="idm",
                                  dataset="digits")
    os.truncate(npz, os.path.getsize(npz) // 2)
    out = run_main("--config=configs/quick.py", "--mode=evaluate", f"--synthetic={npz}",
                   f"--workdir={tmp_path / 'eval'}")
    assert out.returncode == 2
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: synthetic set {npz!r} is not a readable .npz file"), \
        out.stderr
    assert sorted(os.listdir(tmp_path / "eval")) == []  # lock released, nothing written


# --------------------------------------------------------------------------- #
# 5. Two main.py processes racing on one workdir (slow: about 3 minutes)
# --------------------------------------------------------------------------- #


def _start(workdir, env):
    return subprocess.Popen([sys.executable, "main.py", *TINY_FLAGS, f"--workdir={workdir}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(workdir, proc, rows=1):
    path = os.path.join(workdir, "metrics.jsonl")
    while proc.poll() is None and (not os.path.exists(path) or sum(1 for _ in open(path)) < rows):
        time.sleep(0.01)


@pytest.mark.slow
def test_two_processes_racing_on_one_workdir_leave_a_resumable_run(tmp_path):
    env = compile_cache_env(tmp_path / "compile_cache")
    reference = str(tmp_path / "reference")
    out = run_main(*TINY_FLAGS, f"--workdir={reference}", env=env)
    assert out.returncode == 0, out.stderr[-2000:]

    # Started together: whichever takes the lock condenses; the other is refused, or (a slow
    # start on a busy host) arrives after the finish and finds the run complete.
    workdir = str(tmp_path / "together")
    results = _wait_all([_start(workdir, env) for _ in range(2)])
    _assert_one_condensed(workdir, results, reference, env)

    # The second starts while the first holds the lock: the first is stopped (SIGSTOP keeps its
    # lock) so that the collision happens however fast this host runs the first.
    workdir = str(tmp_path / "later")
    first = _start(workdir, env)
    _wait_for_rows(workdir, first, rows=2)
    first.send_signal(signal.SIGSTOP)
    second = _start(workdir, env)
    second_result = _wait_all([second])[0]
    first.send_signal(signal.SIGCONT)
    results = _wait_all([first]) + [second_result]
    assert [rc for rc, _ in results] == [0, 2], [err[-1500:] for _, err in results]
    _assert_one_condensed(workdir, results, reference, env)

    # Killed mid-run (kill -9), then two restarts race: one resumes, the other is refused (or
    # finds the resumed run complete).
    workdir = str(tmp_path / "killed")
    first = _start(workdir, env)
    _wait_for_rows(workdir, first, rows=3)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    results = _wait_all([_start(workdir, env) for _ in range(2)])
    (winner,) = [err for rc, err in results if rc == 0 and "took over the lock left by process" in err]
    np.testing.assert_array_equal(synthetic_images(workdir), synthetic_images(reference))
    assert metric_steps(workdir) == list(range(1, 9))
    for rc, err in results:
        if err is not winner:
            _assert_refused_or_found_complete(workdir, rc, err)


def _wait_all(procs):
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


def _assert_refused_or_found_complete(workdir, rc, err):
    assert "Traceback" not in err, err[-1500:]
    if rc == 2:
        (line,) = [l for l in err.splitlines() if l.startswith("error:")]
        assert f"error: workdir {workdir} is in use by process " in line
    else:
        assert rc == 0 and "is complete" in err, err[-1500:]


def _assert_one_condensed(workdir, results, reference, env):
    condensed = [err for rc, err in results if rc == 0 and "it 8/8" in err]
    assert len(condensed) == 1, [(rc, err[-1500:]) for rc, err in results]
    for rc, err in results:
        if err is not condensed[0]:
            _assert_refused_or_found_complete(workdir, rc, err)
    history = [json.loads(l) for l in open(os.path.join(workdir, workdir_lib.HISTORY))]
    assert [h["start_step"] for h in history] == [0]  # the other one wrote nothing
    assert metric_steps(workdir) == list(range(1, 9))
    # The next run finds a finished, consistent run.
    again = run_main(*TINY_FLAGS, f"--workdir={workdir}", env=env)
    assert again.returncode == 0 and "is complete" in again.stderr, again.stderr[-2000:]
    np.testing.assert_array_equal(synthetic_images(workdir), synthetic_images(reference))
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK))


# --------------------------------------------------------------------------- #
# 3 for real: a small tmpfs (root and a mount namespace allowing it; slow)
# --------------------------------------------------------------------------- #


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_real_full_disk_stops_in_one_line_and_a_rerun_with_space_finishes(tmp_path, tmpfs):
    env = compile_cache_env(tmp_path / "compile_cache")
    reference = str(tmp_path / "reference")
    assert run_main(*TINY_FLAGS, f"--workdir={reference}", env=env).returncode == 0
    workdir = str(tmpfs / "run")
    out = run_main(*TINY_FLAGS, f"--workdir={workdir}", env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "RESOURCE_EXHAUSTED" not in out.stderr, out.stderr[-3000:]
    (line,) = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert line.startswith("error: no space left on the device to write the checkpoint at iteration ")
    assert "needs about" in line and "earlier output are intact" in line
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]

    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    again = run_main(*TINY_FLAGS, f"--workdir={workdir}", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    np.testing.assert_array_equal(synthetic_images(workdir), synthetic_images(reference))
    assert metric_steps(workdir) == list(range(1, 9))


# --------------------------------------------------------------------------- #
# 1 with several processes: process 0 holds the lock, the others check it
# --------------------------------------------------------------------------- #

SHARED_LOCK = """
import json, os, sys
sys.path.insert(0, {repo!r})
from idm_jax import distributed, workdir, workdir_lock
from idm_jax import results as results_lib
from idm_jax import checkpoints
distributed.initialize("on", "localhost:{port}", 2, int(sys.argv[1]), wait_s=60)
try:
    with workdir_lock.locked({workdir!r}) as holder:
        print("HOLDER", json.dumps(holder), flush=True)
        distributed.any_process(False)  # both inside the block at once
except workdir.WorkdirError as e:
    print("REFUSED", e, flush=True)
"""


def test_processes_of_one_run_share_the_lock_of_process_0(tmp_path):
    from helpers import free_port, launch  # pylint: disable=import-outside-toplevel

    def run_both():
        code = SHARED_LOCK.format(repo=REPO, port=free_port(), workdir=str(tmp_path))
        results = launch([[sys.executable, "-c", code, str(i)] for i in range(2)], timeout=180)
        for rc, _, err in results:
            assert rc == 0, err[-2000:]
        return [out.strip().splitlines()[-1] for _, out, _ in results]

    held = run_both()
    holders = [json.loads(line.split(" ", 1)[1]) for line in held if line.startswith("HOLDER")]
    assert len(holders) == 2 and holders[0] == holders[1] and holders[0]["pid"] != os.getpid()
    assert not (tmp_path / workdir_lock.LOCK).exists()  # released by process 0

    ours = workdir_lock.acquire_lock(str(tmp_path))  # another run holds it: both stop, same line
    try:
        refused = run_both()
    finally:
        workdir_lock.release_lock(str(tmp_path))
    assert refused[0] == refused[1] and refused[0].startswith(
        f"REFUSED workdir {tmp_path} is in use by process {ours['pid']} on host"), refused


def test_restart_also_removes_the_damaged_checkpoints(tmp_path):
    (tmp_path / workdir_lib.DAMAGED / "2-20250101-000000").mkdir(parents=True)
    (tmp_path / "config.json").write_text("{}")
    assert workdir_lib.start_over(str(tmp_path)) == [workdir_lib.DAMAGED]
    assert os.listdir(tmp_path) == ["config.json"]
