"""benchmarks/gpu_check.sh must work the first time on a GPU: its dry run (same commands, toy
sizes, no installs) runs here on the CPU and brings back every table."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from helpers import assert_out_comes_back_whole

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu"
    # Limits with room for a loaded host (2 shared cores at load 9: the idm_jax stage took 158 s).
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "LIMITS": "300 0 0 300 0 300", "DEADLINE": "1000"}
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=1100, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    timings = (out / "timings.txt").read_text()
    for part in ("parity_idm_jax", "parity_eval", "parity_report", "condense_speed"):
        assert f"end {part} rc=0" in timings, timings
    assert timings.rstrip().endswith("done")
    condense = (out / "condense_speed.md").read_text().splitlines()
    assert any(line.startswith("| idm | 1 | ") for line in condense)
    parity = (out / "parity.md").read_text().splitlines()
    rows = [line for line in parity if line.startswith("| 0 |") or line.startswith("| 1 |")]
    # idm_jax's side pooled over the two condensation seeds; no release in a dry run
    assert len(rows) == 2 and all("(2 runs, 2 nets) | (pending) | —" in r for r in rows), parity
    assert (out / "parity.png").read_bytes()[:4] == b"\x89PNG"
    # At most 8 files come back from a device run: everything else is in one archive.
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "condense_speed.md", "devices.txt", "parity.md", "parity.png", "results.tar.gz", "timings.txt"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/parity_eval.log" in names and "parity_run/seed_1/idm_jax/snap_1.npz" in names
    assert not any("checkpoints" in n or n.endswith("data.npz") for n in names)


# ----------------------------------------------------------------------------------------------
# benchmarks/gpu_speed.py (issue 23): the summaries it writes, then its dry run


def _gpu_trace():
    """A trace as jax.profiler writes it on a GPU: a device process with a stream line and a
    derived "XLA Ops" line (which repeats the kernels' time and must not be counted)."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #20(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "python"}},
    ]
    kernel = lambda name, dur: {"ph": "X", "pid": 1, "tid": 7, "name": name, "ts": 0, "dur": dur}
    events = []
    for _ in range(2):  # two iterations
        events += [kernel("sm90_xmma_fprop_implicit_gemm", 300.0), kernel("loop_gather_fusion", 100.0),
                   kernel("input_reduce_fusion", 50.0), kernel("loop_gather_fusion", 50.0)]
    events += [{"ph": "X", "pid": 1, "tid": 8, "name": "convolution.3", "ts": 0, "dur": 600.0},
               {"ph": "X", "pid": 2, "tid": 9, "name": "PjitFunction(step)", "ts": 0, "dur": 5000.0}]
    return {"traceEvents": meta + events}


def test_trace_summary_counts_device_kernels_per_iteration():
    from benchmarks import gpu_speed
    got = gpu_speed.summarize_trace(_gpu_trace(), iterations=2)
    assert got["source"] == "device kernels"
    assert got["kernels_per_it"] == 4 and got["distinct_kernels"] == 3
    assert got["busy_s_per_it"] == pytest.approx(500e-6)  # 300 + 100 + 50 + 50 us
    assert [t["name"] for t in got["top"]] == ["sm90_xmma_fprop_implicit_gemm", "loop_gather_fusion",
                                               "input_reduce_fusion"]
    assert got["top"][1]["calls_per_it"] == 2 and got["top"][1]["ms_per_it"] == pytest.approx(0.15)
    assert got["top"][0]["share"] == pytest.approx(0.6)
    assert got["by_kind_share"] == pytest.approx({"convolution": 0.6, "gather/scatter": 0.3, "reduction": 0.1})


def test_hlo_op_counts_and_the_json_record_keys():
    from benchmarks import gpu_speed
    hlo = """ENTRY %main {
  %fusion.1 = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, calls=%fused
  %cc = (f32[8,8]{1,0}, s8[0]{0}) custom-call(f32[8,8]{1,0} %a), custom_call_target="__cublas$gemm"
  %cc.2 = (f32[8,8]{1,0}, s8[0]{0}) custom-call(f32[8,8]{1,0} %a), custom_call_target="__cudnn$convForward"
  %w = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %t), condition=%c, body=%b
  %copy.1 = f32[8]{0} copy(f32[8]{0} %fusion.1)
}"""
    counts = gpu_speed.hlo_op_counts(hlo)
    assert (counts["fusion"], counts["custom_call"], counts["while"], counts["copy"]) == (1, 2, 1, 1)
    assert counts["custom_calls"] == {"__cublas$gemm": 1, "__cudnn$convForward": 1}
    rows = {"cifar10_ipc10": [{"what": "environment", "device": "gpu:H200", "jax": "0.10.2"},
                              {"what": "step", "s_per_it": 0.1, "host_rss_gib": 3.5}],
            "eval": [{"what": "eval", "total_s": 25.0}]}
    record = gpu_speed.summary_json(rows, "python benchmarks/gpu_speed.py", dry_run=False)
    assert tuple(record)[:len(gpu_speed.JSON_KEYS)] == gpu_speed.JSON_KEYS
    assert record["cifar10_ipc10_s_per_it"] == 0.1 and record["host_rss_gib"] == 3.5
    assert record["eval_5nets_1000ep_ipc10_s"] == 25.0 and record["device"] == "gpu:H200"
    assert record["cifar10_ipc1_s_per_it"] is None and record["release_cifar10_ipc10_s_per_it"] is None
    with open(os.path.join(ROOT, "docs", "gpu_speed.json")) as f:  # the committed file has the same keys
        assert tuple(json.load(f))[:len(gpu_speed.JSON_KEYS)] == gpu_speed.JSON_KEYS


def test_host_memory_stages_add_up_to_the_resident_size():
    from benchmarks import gpu_speed
    memory = gpu_speed.HostMemory(start_gib=gpu_speed.host_rss_now_gib())
    ballast = bytearray(256 * 2**20)  # 256 MiB written, so resident
    ballast[::4096] = b"x" * len(ballast[::4096])
    memory.after("ballast")
    row = memory.row()
    first, second = row["stages"]
    assert first["stage"] == "python started" and second["stage"] == "ballast"
    assert first["added_gib"] == first["rss_gib"] > 0
    assert 0.2 < second["added_gib"] < 0.3  # the 0.25 GiB just written
    assert abs(first["added_gib"] + second["added_gib"] - second["rss_gib"]) < 1e-9
    assert row["peak_gib"] >= second["rss_gib"] - 1e-3
    record = {"device": "gpu:H200", "jax_version": "0.11", "date": "2026-12-05", "dry_run": False,
              "command": "c", "details": {"cifar10_ipc10": [{"what": "host_memory", **row}]}}
    assert "| ballast | " in gpu_speed.markdown(record)
    del ballast


def test_cifar100_without_its_data_is_timed_on_cifar10_shapes_relabelled(monkeypatch):
    """The device has no network: CIFAR-100's settings run on CIFAR-10's pixels as 100 classes."""
    import configs.cifar10
    from benchmarks import gpu_speed
    from idm_jax import data
    rng = np.random.default_rng(0)
    cifar10_like = data.ArrayDataset(  # 10 classes of 25 (test: 110 images)
        "cifar10-jpeg", rng.integers(0, 256, (250, 32, 32, 3), np.uint8), np.arange(250, dtype=np.int32) % 10,
        rng.integers(0, 256, (110, 32, 32, 3), np.uint8), np.arange(110, dtype=np.int32) % 10,
        tuple("abcdefghij"), np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))
    real_load = data.load_config_dataset

    def load(config):
        return cifar10_like if config.data.source == "/data/cifar10.tar.gz" else real_load(config)

    monkeypatch.delenv("IDM_CIFAR100", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # tfds:cifar100 cannot load
    monkeypatch.setattr(configs.cifar10, "data_source", lambda: "/data/cifar10.tar.gz")
    monkeypatch.setattr(data, "load_config_dataset", load)
    config, ds, s, device_data, stand_in = gpu_speed.load_setting("cifar100", 10)
    assert stand_in.startswith("CIFAR-10's 250 training images relabelled into 100 classes (tfds:cifar100: loading")
    assert config.data.source == "/data/cifar10.tar.gz" and s.num_classes == 100 and len(ds.class_names) == 100
    np.testing.assert_array_equal(ds.train_labels, np.arange(250) % 100)  # round-robin: sizes differ by <= 1
    np.testing.assert_array_equal(np.asarray(device_data.class_counts), [3] * 50 + [2] * 50)
    np.testing.assert_array_equal(ds.train_images, cifar10_like.train_images)  # the pixels are CIFAR-10's
    np.testing.assert_array_equal(ds.test_labels, np.arange(110) % 100)
    with pytest.raises(ValueError, match="3 train images cannot fill 100 classes"):
        gpu_speed.relabelled_stand_in(dataclasses.replace(ds, train_images=ds.train_images[:3],
                                                          train_labels=ds.train_labels[:3]), 100)
    record = {"device": "gpu:H200", "jax_version": "0.11", "date": "2026-12-05", "dry_run": False, "command": "c",
              "details": {"cifar100_ipc10": [{"what": "setting", "stand_in": stand_in}]}}
    assert f"cifar100_ipc10 was timed on {stand_in}." in gpu_speed.markdown(record)


def test_total_limit_shortens_then_skips_parts_and_still_writes_the_record(tmp_path, capsys):
    from benchmarks import gpu_speed
    reserve, least = gpu_speed.SUMMARY_RESERVE_S, gpu_speed.MIN_PART_S
    assert gpu_speed.part_limit(120, 0, 1e6) == 120  # no --total: the part's own limit
    assert gpu_speed.part_limit(120, 555, 100.0) == 120  # 440 s left
    assert gpu_speed.part_limit(120, 555, 500.0) == 555 - reserve - 500  # shortened to what is left
    assert gpu_speed.part_limit(0, 555, 500.0) == 555 - reserve - 500  # "no limit" is capped too
    assert gpu_speed.part_limit(120, 555, 555 - reserve - least + 0.5) is None  # under 10 s: skipped
    # A --total with no room for any part: every part skipped, gpu_speed.json written all null.
    gpu_speed.main(["--dry-run", f"--out={tmp_path}", f"--total={reserve + least - 1}"])
    with open(tmp_path / "gpu_speed.json") as f:
        record = json.load(f)
    assert record["details"] == {} and record["cifar10_ipc10_s_per_it"] is None
    assert capsys.readouterr().out.count("skipped, under 10 s") == len(gpu_speed.PARTS)


@pytest.mark.slow
def test_gpu_speed_dry_run_measures_every_figure(tmp_path):
    out = tmp_path / "speed"
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "DRY_RUN": "1", "CHECK": "speed",
                                           "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "end gpu_speed rc=0" in (out / "timings.txt").read_text()
    record = json.loads((out / "gpu_speed.json").read_text())
    assert tuple(record)[:12] == (
        "device", "jax_version", "date", "cifar10_ipc1_s_per_it", "cifar10_ipc10_s_per_it", "cifar10_ipc50_s_per_it",
        "cifar100_ipc10_s_per_it", "cifar100_settings_on_relabelled_cifar10_ipc10_s_per_it",
        "eval_5nets_1000ep_ipc10_s", "host_rss_gib", "release_cifar10_ipc10_s_per_it", "command")
    measured = [k for k in record if k.endswith("_s_per_it") and not k.startswith(("release", "cifar100_settings"))]
    assert all(isinstance(record[k], float) and 0 < record[k] < 60 for k in measured), record
    assert record["eval_5nets_1000ep_ipc10_s"] > 0 and 0.1 < record["host_rss_gib"] < 16
    assert record["release_cifar10_ipc10_s_per_it"] is None  # no release in a dry run
    assert record["dry_run"] and record["device"].startswith("cpu")
    assert record["command"] == 'CHECK=speed DRY_RUN=1 bash benchmarks/gpu_check.sh DEST'  # what a user types
    rows = record["details"]["cifar10_ipc10"]
    step = next(r for r in rows if r["what"] == "step")
    assert step["compiles"] == 0 and not step["warnings"]  # no recompilation, the state donated
    flops = next(r for r in rows if r["what"] == "flops")
    assert flops["flops_per_it"] > 1e6 and flops["tflops_per_s"] > 0
    trace = next(r for r in rows if r["what"] == "trace")
    assert trace["kernels_per_it"] > 10 and trace["top"]
    phases = {r["phase"] for r in rows if r["what"] == "phase"}
    assert phases == {"real embeddings", "synthetic gradient", "queue training", "queue push + sample"}
    compiled, memory = [r for r in rows if r["what"] == "host_memory"]  # after compiling, after the steps
    assert [m["stage"] for m in memory["stages"]][:3] == [
        "python started", "jax and idm_jax imported", "backend started (jax.devices)"]
    assert len(memory["stages"]) == 7 and all(m["rss_gib"] > 0 for m in memory["stages"])
    assert compiled["stages"] == memory["stages"][:6]
    assert memory["peak_gib"] >= max(m["rss_gib"] for m in memory["stages"]) - 1e-3
    dispatch = next(r for r in rows if r["what"] == "dispatch")
    assert dispatch["steps_per_dispatch"] == 2 and dispatch["s_per_it"] > 0 and dispatch["compiles"] == 0
    assert any(r["what"] == "candidate" for r in record["details"]["candidates"])
    assert "| cifar10_ipc10 |" in (out / "gpu_speed.md").read_text()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "devices.txt", "gpu_speed.json", "gpu_speed.md", "results.tar.gz", "timings.txt"]


def test_a_figure_timed_on_relabelled_cifar10_is_not_filed_as_cifar100():
    from benchmarks import gpu_speed
    stand_in = "CIFAR-10's 50000 training images relabelled into 100 classes (tfds:cifar100: offline)"
    rows = {"cifar100_ipc10": [{"what": "setting", "stand_in": stand_in}, {"what": "step", "s_per_it": 0.2}]}
    record = gpu_speed.summary_json(rows, "c", dry_run=False)
    assert record["cifar100_ipc10_s_per_it"] is None
    assert record[gpu_speed.STAND_IN_KEY] == 0.2 and "relabelled_cifar10" in gpu_speed.STAND_IN_KEY
    assert "| cifar100_ipc10 on a stand-in (below) |" in gpu_speed.markdown(record)
    rows["cifar100_ipc10"][0]["stand_in"] = None  # CIFAR-100 itself
    record = gpu_speed.summary_json(rows, "c", dry_run=False)
    assert record["cifar100_ipc10_s_per_it"] == 0.2 and record[gpu_speed.STAND_IN_KEY] is None


def test_rows_cut_mid_line_by_a_kill_are_left_out(tmp_path):
    from benchmarks import gpu_speed
    (tmp_path / "eval.jsonl").write_text('{"what": "environment"}\n{"what": "eval", "tot')
    assert gpu_speed.read_rows(str(tmp_path)) == {"eval": [{"what": "environment"}]}


def _alive(pid: int) -> bool:
    """pid runs (a zombie, killed but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pid: int, tries: int = 200) -> bool:
    """Whether pid has ended, allowing its reaper a moment (not a timing assertion: up to 10 s)."""
    import time
    for _ in range(tries):
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_part_cut_by_its_limit_ends_its_whole_process_group(tmp_path, monkeypatch):
    """The release part's torch process outlived its part; now the part's group goes, SIGKILL
    for whatever ignores SIGTERM."""
    from benchmarks import gpu_speed
    monkeypatch.setattr(gpu_speed, "KILL_GRACE_S", 0.5)
    pid_file = tmp_path / "child.pid"
    script = f"trap '' TERM; sleep 300 & echo $! > {pid_file}; wait"  # both ignore SIGTERM
    with open(tmp_path / "log", "w") as log:
        rc = gpu_speed.run_limited(["bash", "-c", script], 1.0, log)
    assert rc == "timeout"
    assert _gone(int(pid_file.read_text()))


def _session_pids(sid: int) -> list[int]:
    """The processes of session `sid` (/proc/<pid>/stat: the session is the 4th field after the name)."""
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                    pids.append(int(entry))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL to every process of the session, as the device's outer limit ends a command."""
    import signal
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run_cut_at(stage, out, tmp_path, **env):
    """Runs the speed check's dry run until it pauses at `stage` (IDM_PAUSE_AT), then kills it."""
    import time
    paused = tmp_path / f"paused_{stage.replace(':', '_')}"
    env = {**os.environ, "DRY_RUN": "1", "CHECK": "speed", "PYTHON": sys.executable, "IDM_PAUSE_AT": stage,
           "IDM_PAUSED": str(paused), "WORK": str(tmp_path / "work"), **env}
    proc = subprocess.Popen(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(6000):  # up to 10 minutes on a loaded host: a guard, not a timing assertion
            if paused.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert paused.exists(), f"never paused at {stage} (rc {proc.poll()})"
    finally:
        _kill_session(proc.pid)
        proc.wait()


@pytest.mark.parametrize("stage", ["setup", "after:release", "move:results.tar.gz"])
def test_gpu_check_cut_at_any_stage_leaves_a_valid_record_in_out(tmp_path, stage):
    """Issue 31: wherever the outer limit strikes, $OUT holds a valid gpu_speed.json and what comes
    back is all of $OUT (the release part alone: seconds)."""
    from benchmarks import gpu_speed
    out = tmp_path / "out"
    _run_cut_at(stage, out, tmp_path, SPEED_PARTS="release")
    record = json.loads((out / "gpu_speed.json").read_text())
    assert tuple(record)[:len(gpu_speed.JSON_KEYS)] == gpu_speed.JSON_KEYS
    assert record["command"] == 'CHECK=speed DRY_RUN=1 SPEED_PARTS=release bash benchmarks/gpu_check.sh DEST'
    assert_out_comes_back_whole(out)
    if stage != "setup":  # the part's row is in the record as soon as the part ends
        assert record["details"]["release"][0]["note"] == "no --release given"
        assert (out / "gpu_speed.md").exists() and (out / "devices.txt").exists()


@pytest.mark.slow
def test_gpu_check_cut_inside_a_part_keeps_its_rows_and_the_parts_before(tmp_path):
    from benchmarks import gpu_speed
    out = tmp_path / "out"
    _run_cut_at("in:cifar10_ipc1", out, tmp_path, SPEED_PARTS="cifar10_ipc10,cifar10_ipc1,release")
    record = json.loads((out / "gpu_speed.json").read_text())
    assert tuple(record)[:len(gpu_speed.JSON_KEYS)] == gpu_speed.JSON_KEYS
    assert record["cifar10_ipc10_s_per_it"] > 0 and record["cifar10_ipc1_s_per_it"] is None  # written after its part
    assert_out_comes_back_whole(out)
    assert not (tmp_path / "work" / "speed" / "gpu_speed.json").exists()  # the record is in $OUT only


def test_gpu_speed_ends_its_part_and_writes_the_record_on_sigterm(tmp_path):
    """The outer `timeout` of gpu_check.sh sends SIGTERM: gpu_speed.py writes what it has."""
    import signal
    import time
    paused = tmp_path / "paused"
    env = {**os.environ, "IDM_PAUSE_AT": "after:release", "IDM_PAUSED": str(paused)}
    proc = subprocess.Popen([sys.executable, "benchmarks/gpu_speed.py", "--dry-run", f"--out={tmp_path / 'work'}",
                             f"--publish={tmp_path / 'out'}", "--parts=release,eval", "--command=c"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(3000):  # a guard, not a timing assertion
        if paused.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "stopped (signal 15)" in output, output
    record = json.loads((tmp_path / "out" / "gpu_speed.json").read_text())
    assert record["command"] == "c" and "eval" not in record["details"] and "release" in record["details"]
