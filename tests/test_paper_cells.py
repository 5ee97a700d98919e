"""benchmarks/paper_cells.sh's loop (issue 32): what fits first, one line per skipped cell, and
$OUT as the device brings it back. A stand-in for main.py makes the runs take a second."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest

from helpers import assert_out_comes_back_whole

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# main.py as a cell sees it: config.json, a metrics row with it_per_s per iteration, a checkpoint
# and exit 0 on SIGTERM, results.json and synthetic.npz at the end; resumes from its checkpoint.
STAND_IN_MAIN = r'''
import json, os, signal, sys, time
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
wd, its = flags["workdir"], int(flags.get("config.idm.iterations", 4))
pace = float(os.environ.get("STAND_IN_S_PER_IT", "0.01"))
os.makedirs(os.path.join(wd, "checkpoints"), exist_ok=True)
with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump({"model": "ConvNet", "idm": {"iterations": its}}, f)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
result = {"train_arch": "ConvNet", "archs": {"ConvNet": {"mean": 50.0, "std": 1.0, "num_seeds": 2,
                                                         "accuracies": [49.0, 51.0]}}}
if flags.get("mode") != "baseline":
    done = max([int(d) for d in os.listdir(os.path.join(wd, "checkpoints"))] or [0])
    for step in range(done + 1, its + 1):
        time.sleep(pace)
        with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0, "it_per_s": 1 / pace}) + "\n")
        if stop:
            os.makedirs(os.path.join(wd, "checkpoints", str(step)))
            sys.exit(0)
    result["iterations"] = its
with open(os.path.join(wd, "results.json"), "w") as f:
    json.dump(result, f)
with open(os.path.join(wd, "synthetic.npz"), "wb") as f:
    f.write(b"set" * 100)
'''

def _run(tmp_path, cells, methods, *, seconds=1000.0, fixed=1.0, prefix=3, paces=None, iterations=6,
         pace_of_main="0.01", monkeypatch=None):
    from benchmarks import paper_cells

    main = tmp_path / "main_stand_in.py"
    main.write_text(STAND_IN_MAIN)
    monkeypatch.setenv("STAND_IN_S_PER_IT", pace_of_main)
    root, out = tmp_path / "cells", tmp_path / "out"
    root.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    now = time.time()
    budget = paper_cells.Budget(now, now + seconds, 0.0, fixed, prefix, paces or {})
    log = paper_cells.Log(str(out), now)
    paper_cells.run_cells(paper_cells.plan(cells, methods), str(root), str(out), budget, "test host", "2",
                          [f"--config.idm.iterations={iterations}"], log, main=str(main))
    paper_cells.publish(str(root), str(out), log)
    return root, out, (out / "timings.txt").read_text().splitlines()


def test_plan_puts_random_then_dm_before_idm():
    from benchmarks import paper_cells

    got = [c.name for c in paper_cells.plan(["cifar10:1", "cifar10:10"], ["idm", "dm", "random"])]
    assert got == ["cifar10_ipc1_random", "cifar10_ipc10_random", "cifar10_ipc1_dm", "cifar10_ipc10_dm",
                   "cifar10_ipc1_idm", "cifar10_ipc10_idm"]
    assert paper_cells.parse_paces("idm=0.1,dm=0.02") == {"idm": 0.1, "dm": 0.02}
    assert paper_cells.parse_paces("0.1") == {"": 0.1}
    cell = paper_cells.Cell("cifar10", 10, "idm")
    assert paper_cells.skip_reason(cell, 20000, 0.101, 180, 412.4) == (
        "skip cifar10 ipc10 idm: 20000 its x 0.101 s/it = 2020 s + 180 s fixed > 412 s left")
    assert paper_cells.skip_reason(cell, 2000, 0.101, 180, 412) is None  # 382 s fits
    # a run's first row leaves out the compiling iteration; rows without it_per_s are evaluations
    rows = [{"step": 10, "it_per_s": 9.0}, {"step": 10, "eval/ConvNet/mean": 50.0}, {"step": 20, "it_per_s": 5.0}]
    assert paper_cells.measured_pace(rows, 0) == (19, 20, pytest.approx((1.0 + 2.0) / 19))


def test_cells_run_in_order_and_a_cell_that_does_not_fit_is_skipped_with_one_line(tmp_path, monkeypatch):
    """A forced pace makes IDM not fit; Random and DM run, and each set comes back in $OUT."""
    root, out, lines = _run(tmp_path, ["digits:1", "digits:2"], ["idm", "dm", "random"], paces={"idm": 1000.0},
                            monkeypatch=monkeypatch)
    events = [re.sub(r"^\[\d+s\] ", "", line) for line in lines]
    ends = [e.split()[1] for e in events if e.startswith("end ")]
    assert ends == ["digits_ipc1_random", "digits_ipc2_random", "digits_ipc1_dm", "digits_ipc2_dm"]
    assert all("rc=0 (done)" in e for e in events if e.startswith("end "))
    skips = [e for e in events if e.startswith("skip ")]
    assert len(skips) == 2 and events[-2:] == skips  # after every run
    for ipc, skip in zip((1, 2), skips):
        assert re.fullmatch(rf"skip digits ipc{ipc} idm: 6 its x 1000\.000 s/it = 6000 s \+ 1 s fixed > \d+ s left",
                            skip), skip
    assert not (root / "digits_ipc1_idm").exists()  # never started
    info = json.loads((root / "digits_ipc1_dm" / "cell.json").read_text())
    assert info["s_per_it"] > 0 and info["calls"][0]["rc"] == 0  # the pace it measured, for the next call
    assert_out_comes_back_whole(out)
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert {"digits_ipc1_dm/synthetic.npz", "digits_ipc2_random/synthetic.npz"} <= set(names)
    assert "| digits | 1 |" in (out / "table1.md").read_text()


def test_a_cell_whose_timed_prefix_does_not_fit_stops_with_a_checkpoint_and_is_not_restarted(tmp_path, monkeypatch):
    """Started with no pace known: its first iterations are timed, the estimate does not fit, so
    it is stopped (SIGTERM: a checkpoint); the next call skips it on that pace without starting."""
    kwargs = dict(seconds=60.0, fixed=1.0, prefix=3, iterations=100000, monkeypatch=monkeypatch)
    root, out, lines = _run(tmp_path, ["digits:1"], ["idm"], **kwargs)
    skip = next(line for line in lines if " skip " in f" {line.split('] ', 1)[1]}")
    assert re.search(r"skip digits ipc1 idm: \d+ its x \d+\.\d+ s/it = \d+ s \+ 1 s fixed > \d+ s left "
                     r"\(timed over \d+ its; stopped with a checkpoint: a later call resumes\)$", skip), skip
    wd = root / "digits_ipc1_idm"
    from benchmarks import paper_cells
    assert paper_cells.cell_state(str(wd)) == "partial" and paper_cells.progress(str(wd)) >= 4
    assert paper_cells.cell_pace(str(wd)) > 0
    assert_out_comes_back_whole(out)
    _, _, again = _run(tmp_path, ["digits:1"], ["idm"], **kwargs)
    new = again[len(lines):]
    assert not any("start digits_ipc1_idm" in line for line in new)
    assert any(line.endswith("(pace measured by an earlier call)") and "skip digits ipc1 idm" in line
               for line in new), new


def test_paper_cells_dry_run_skips_what_does_not_fit_in_order(tmp_path):
    """The shell command end to end, nothing run: every cell's estimate is over the time left."""
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "FIXED_S": "100000",
           "CELLS": "digits:1 digits:2", "METHODS": "idm dm random"}
    run = subprocess.run(["bash", "benchmarks/paper_cells.sh", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    skips = [line.split("] ", 1)[1].split(":")[0] for line in (out / "timings.txt").read_text().splitlines()
             if "] skip " in line]
    assert skips == ["skip digits ipc1 random", "skip digits ipc2 random", "skip digits ipc1 dm",
                     "skip digits ipc2 dm", "skip digits ipc1 idm", "skip digits ipc2 idm"]
    assert_out_comes_back_whole(out)
    assert (tmp_path / "out.cells").is_dir()  # the cells live beside $OUT
