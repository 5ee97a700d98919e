"""--mode=table1 (idm_jax/table1.py) and its step tuning (idm_jax/step_variants.py).

The cells' own runs are replaced by stand-ins that write a results.json (their code is tested
elsewhere), so these tests check the mode's decisions in seconds: the order, the skip lines under
a budget, resuming without recomputing, the table's values, the tuner's table and pick, the
export's caps. The slow test runs the real digits cells through main.py.
"""

import json
import os
import tarfile

import numpy as np
import pytest

from helpers import run_main
from idm_jax import baselines, cell_status, config_check, config_files, runner, step_variants, table1, table1_plan
from idm_jax import results as results_lib

QUICK = config_files.named_config_path("quick")


def _config(**table1_fields):
    c = config_files.load_config_file(QUICK, "1")
    c.table1.cells = "quick:1"
    c.table1.iterations = 4
    for key, value in table1_fields.items():
        c.table1[key] = value
    return c


# Accuracy each stand-in cell reports: distinct numbers, so a row can only have come from its cell.
ACCURACY = {"random": [40.0, 44.0], "dm": [60.0, 62.0, 64.0], "idm": [70.0, 71.0]}


class StandIns:
    """runner.run_condensation and baselines.run_baseline replaced: each call is recorded and
    writes the results.json its cell would (the method's accuracies, the iterations asked for)."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(runner, "run_condensation", self._condense)
        monkeypatch.setattr(baselines, "run_baseline", self._baseline)

    def _write(self, config, workdir, method, **extra):
        accs = ACCURACY[method]
        os.makedirs(workdir, exist_ok=True)
        np.savez(os.path.join(workdir, "synthetic.npz"), images=np.zeros((10, 2), np.float32))
        record = results_lib.results_record(
            method=method, dataset="digits", ipc=config.ipc, partition_factor=config.idm.partition_factor
            if method != "random" else 1, num_images=10 * config.ipc, train_arch=config.model,
            archs={config.model: {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accuracies": accs}},
            **extra)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(record, f)
        return record

    def _condense(self, config, workdir, **_):
        self.calls.append((config.method, os.path.basename(workdir), {
            k: config.idm[k] for k in ("queue_train_impl", "conv_impl", "class_batch", "steps_per_dispatch")}))
        scores = {config.model: {"ior_pp": 5.0, "hlr_pp": 20.0, "lrs": 0.3}} if config.method == "idm" else None
        return {"results": self._write(config, workdir, config.method, iterations=config.idm.iterations,
                                       scores=scores), "interrupted": False}

    def _baseline(self, config, workdir):
        self.calls.append(("random", os.path.basename(workdir), None))
        return self._write(config, workdir, "random")


def test_plan_runs_random_then_dm_then_idm_unless_an_order_is_given():
    cells = [("cifar10", 1), ("cifar10", 10)]
    assert [c.spec for c in table1_plan.plan(cells, ["idm", "random", "dm"])] == [
        "cifar10:1:random", "cifar10:10:random", "cifar10:1:dm", "cifar10:10:dm", "cifar10:1:idm", "cifar10:10:idm"]
    first = table1_plan.plan(cells, ["random", "idm"], "cifar10:10:idm")
    assert [c.spec for c in first] == ["cifar10:10:idm", "cifar10:1:random", "cifar10:10:random", "cifar10:1:idm"]
    assert first[0].name == "cifar10_ipc10_idm" and first[0].config_arg == "10"
    with pytest.raises(ValueError, match="table1.order: 'cifar10:10:dm' is not among the cells"):
        table1_plan.plan(cells, ["idm"], "cifar10:10:dm")
    assert table1_plan.parse_cells("cifar10:1, quick:10") == [("cifar10", 1), ("quick", 10)]
    for bad, message in (("cifar10", "bad cell 'cifar10'"), ("cifar10:0", "bad cell")):
        with pytest.raises(ValueError, match=message):
            table1_plan.parse_cells(bad)
    table1_plan.check_config_files([("cifar10", 1), ("quick", 10)])
    with pytest.raises(ValueError, match="no config file configs/nosuch.py for cell 'nosuch:1'"):
        table1_plan.check_config_files(table1_plan.parse_cells("quick:1,nosuch:1"))
    with pytest.raises(ValueError, match="table1.methods: herding; expected some of random,dm,idm"):
        table1_plan.parse_methods("idm,herding")
    assert table1_plan.parse_paces("idm=0.1, dm=0.02") == {"idm": 0.1, "dm": 0.02}
    with pytest.raises(ValueError, match="table1.pace: bad entry 'idm=fast'"):
        table1_plan.parse_paces("idm=fast")


def test_cells_run_cheapest_first_the_table_reads_their_results_and_a_rerun_does_nothing(tmp_path, monkeypatch):
    stand_ins = StandIns(monkeypatch)
    out = str(tmp_path / "t1")
    record = table1.run_table1(_config(), out, overrides={"eval.epochs": 3, "table1.iterations": 4})
    assert [(m, d) for m, d, _ in stand_ins.calls] == [
        ("random", "digits_ipc1_random"), ("dm", "digits_ipc1_dm"), ("idm", "digits_ipc1_idm")]
    saved = json.load(open(os.path.join(out, "table1.json")))
    assert saved["complete"] and [r["method"] for r in saved["rows"]] == ["random", "dm", "idm"]
    for row in saved["rows"]:  # every number is its own cell's results.json
        results = json.load(open(os.path.join(out, row["folder"], "results.json")))
        measured = results["archs"]["ConvNetD2"]
        assert (row["mean"], row["std"]) == (measured["mean"], measured["std"])
        assert row["networks"] == len(ACCURACY[row["method"]]) and row["arch"] == "ConvNetD2"
    assert saved["rows"][1]["mean"] == pytest.approx(62.0) and saved["rows"][2]["std"] == pytest.approx(0.5)
    assert saved["rows"][0]["iterations"] is None and saved["rows"][2]["iterations"] == 4
    idm_command = saved["rows"][2]["command"]
    assert idm_command == (f"python main.py --config=configs/quick.py:1 --workdir={out}/digits_ipc1_idm "
                           "--config.data.source=digits --config.eval.epochs=3 --config.idm.iterations=4")
    assert "--mode=baseline --config.baseline.method=random" in saved["rows"][0]["command"]
    md = open(os.path.join(out, "table1.md")).read()
    assert "| quick:1 | dm | 62.00 ± 1.63 | 3 | — | — |" in md and os.path.exists(os.path.join(out, "table1.png"))
    assert saved["rows"][2]["scores"] == {"ior_pp": 5.0, "hlr_pp": 20.0, "lrs": 0.3}
    assert "| quick:1 | idm | 70.50 ± 0.50 | 2 | — | IOR +5.00 pp, HLR 20.00 pp, LRS 0.3000 |" in md
    assert record == saved
    # Nothing left to do: no cell runs, each says so, the table is the same.
    stand_ins.calls.clear()
    again = table1.run_table1(_config(), out, overrides={"eval.epochs": 3})
    assert stand_ins.calls == [] and again["rows"] == saved["rows"]
    log = open(os.path.join(out, table1.LOG)).read()
    assert log.count("finished before") == 3
    # More iterations are a different result: the condensation cells run again, Random does not.
    table1.run_table1(_config(iterations=6), out)
    assert [m for m, _, _ in stand_ins.calls] == ["dm", "idm"]


def test_a_cell_that_does_not_fit_the_budget_is_skipped_with_one_line(tmp_path, monkeypatch):
    stand_ins = StandIns(monkeypatch)
    out = str(tmp_path / "t1")
    now = [0.0]
    c = _config(budget_s=100.0, pace="idm=30,dm=1", startup_s=5.0, eval_s=40.0, iterations=4)
    table1.run_table1(c, out, clock=lambda: now[0])
    # Random: 5 s + 40 s x (10 images / 400) x (150 / 1000 epochs) x (2 / 5 nets) = 5.06 s;
    # DM: 4 its x 1 s + the same = 9 s; IDM (l = 2: 40 images): 4 x 30 + 5.24 = 125 s > 100 s.
    assert [m for m, _, _ in stand_ins.calls] == ["random", "dm"]
    log = open(os.path.join(out, table1.LOG)).read().splitlines()
    skips = [line for line in log if "skip" in line]
    assert skips == ["[0s] skip quick:1:idm: 4 its x 30.0000 s/it (table1.pace) + 5 s fixed = 125 s > 100 s left"]
    rows = json.load(open(os.path.join(out, "table1.json")))["rows"]
    assert [r["state"] for r in rows] == ["done", "done", "skipped"] and rows[2]["skipped"] in skips[0]
    assert not json.load(open(os.path.join(out, "table1.json")))["complete"]


def test_estimates_scale_the_evaluation_and_take_the_last_gpu_figures(tmp_path):
    c10 = config_files.load_config_file(config_files.named_config_path("cifar10"), "10")
    c50 = config_files.load_config_file(config_files.named_config_path("cifar10"), "50")
    ten, fifty = (table1_plan.eval_seconds(c, 10, 2, 30.0) for c in (c10, c50))
    assert ten == pytest.approx(30.0) and fifty == pytest.approx(5 * ten)  # 400 vs 2,000 images
    cell = table1_plan.Cell("cifar10", 10, "idm")
    figures = {"cifar10_ipc10_s_per_it": 0.02, "eval_5nets_1000ep_ipc10_s": 30.0}
    t1 = c10.table1
    est = table1_plan.estimate(cell, c10, str(tmp_path), 0, 10, t1, {}, {}, figures)
    assert est.seconds == pytest.approx(20000 * 0.02 + 30.0 + 30.0)
    assert est.text == "20000 its x 0.0200 s/it (docs/gpu_speed.json) + 60 s fixed = 460 s"
    assert table1_plan.skip_line(cell, est, 500.0) is None
    assert table1_plan.skip_line(cell, est, 400.0).endswith("= 460 s > 400 s left")
    tuned = table1_plan.estimate(cell, c10, str(tmp_path), 15000, 10, t1, {}, {"cifar10:10:idm": 0.01}, figures)
    assert tuned.seconds == pytest.approx(5000 * 0.01 + 60.0) and "(the tuning table)" in tuned.text
    unknown = table1_plan.estimate(cell, c10, str(tmp_path), 0, 10, t1, {}, {}, {})
    assert unknown.seconds is None and table1_plan.skip_line(cell, unknown, 1e9).startswith(
        "skip cifar10:10:idm: 20000 its, no pace known")
    with open(tmp_path / "metrics.jsonl", "w") as f:  # a started cell's own pace comes first
        f.write('{"step": 10, "it_per_s": 50.0}\n{"step": 20, "it_per_s": 25.0}\n{"step": 30, "it_per_s": 2')
    assert table1_plan.metrics_pace(str(tmp_path)) == pytest.approx(0.03)


def _fake_timings(fast):
    """time_fn whose s/it is 1.0 less 0.1 per field of `fast` the variant sets to that value."""
    seen = []

    def time_fn(config, ds):
        del ds
        hits = sum(config.idm[k.split(".")[1]] == v for k, v in fast.items())
        seen.append(hits)
        return 2.0, 1.0 - 0.1 * hits
    return time_fn, seen


def test_the_tuner_times_each_choice_keeps_what_is_faster_and_stops_when_its_time_is_spent(digits):
    c = config_files.load_config_file(QUICK, "1")
    time_fn, _ = _fake_timings({"idm.conv_impl": "taps", "idm.class_batch": 1})
    table = step_variants.tune(c, digits, 1000.0, time_fn=time_fn)
    labels = [t.label for t in table]
    # On the CPU "auto" is map and matmul, and the digits' auto class chunk is all 10 classes: those
    # values are the configured program and are not timed again. The forms are timed in pairs.
    vmap_taps = "idm.queue_train_impl=vmap, idm.conv_impl=taps"
    assert labels == ["as configured", "idm.queue_train_impl=map, idm.conv_impl=xla", vmap_taps,
                      "idm.queue_train_impl=map, idm.conv_impl=taps", "idm.queue_train_impl=vmap, idm.conv_impl=xla",
                      "idm.queue_train_impl=vmap, idm.conv_impl=matmul", f"{vmap_taps}, idm.class_batch=1",
                      f"{vmap_taps}, idm.class_batch=1, idm.steps_per_dispatch=10"]
    assert [t.s_per_it for t in table] == pytest.approx([1.0, 1.0, 0.9, 0.9, 1.0, 1.0, 0.8, 0.8])
    assert step_variants.fastest(table).overrides == {"idm.queue_train_impl": "vmap", "idm.conv_impl": "taps",
                                                      "idm.class_batch": 1}
    assert table[0].row() == {"variant": "as configured", "overrides": {}, "compile_s": 2.0, "s_per_it": 1.0,
                              "note": ""}
    now = [0.0]

    def slow_fn(config, ds):
        now[0] += 30.0
        return time_fn(config, ds)
    cut = step_variants.tune(c, digits, 65.0, time_fn=slow_fn, clock=lambda: now[0])  # 30 s each
    assert [t.s_per_it is not None for t in cut] == [True, True] + [False] * 6
    assert cut[2].note == "not timed: the tuning time was spent"
    dm = config_files.load_config_file(QUICK, "1,dm")  # no queue: the convolutions' form alone
    assert step_variants.choice_values(dm, 10)["forms"] == [{"idm.conv_impl": c} for c in ("xla", "matmul", "taps")]
    assert step_variants.dispatch_size(c) == 10 and step_variants.variant_label({}) == "as configured"


def test_the_pick_runs_every_later_cell_and_a_started_cell_keeps_its_variant(tmp_path, monkeypatch):
    stand_ins = StandIns(monkeypatch)
    out = str(tmp_path / "t1")
    time_fn, _ = _fake_timings({"idm.queue_train_impl": "map", "idm.conv_impl": "taps"})
    os.makedirs(os.path.join(out, "digits_ipc1_dm"))
    with open(os.path.join(out, "digits_ipc1_dm", "cell.json"), "w") as f:  # started before with its own
        json.dump({"variant": {"idm.class_batch": 1}}, f)
    table1.run_table1(_config(tune_s=60.0), out, time_fn=time_fn)
    tuning = json.load(open(os.path.join(out, table1.TUNING)))
    picked = {"idm.queue_train_impl": "map", "idm.conv_impl": "taps"}
    assert tuning["idm"]["cell"] == "quick:1:idm" and tuning["idm"]["pick"] == picked
    assert tuning["dm"]["cell"] == "quick:1:dm"
    by_method = {m: impls for m, _, impls in stand_ins.calls}
    assert by_method["idm"]["conv_impl"] == "taps" and by_method["dm"]["class_batch"] == 1
    rows = {r["method"]: r for r in json.load(open(os.path.join(out, "table1.json")))["rows"]}
    label = "idm.queue_train_impl=map, idm.conv_impl=taps"
    assert rows["idm"]["variant"] == label and rows["idm"]["command"].endswith(
        "--config.idm.iterations=4 --config.idm.queue_train_impl=map --config.idm.conv_impl=taps")
    assert rows["dm"]["variant"] == "idm.class_batch=1"
    md = open(os.path.join(out, "table1.md")).read()
    assert f"Step variants timed at quick:1:idm (idm; picked: {label})" in md
    assert f"| {label} | 2.0 | 0.8000 |" in md
    # A rerun reads the table back: nothing is timed again.
    calls = []
    table1.run_table1(_config(tune_s=60.0), out, time_fn=lambda *a: calls.append(a))
    assert calls == []


def test_export_copies_whole_files_within_the_caps(tmp_path, monkeypatch):
    StandIns(monkeypatch)
    out, dest = str(tmp_path / "t1"), str(tmp_path / "export")
    record = table1.run_table1(_config(methods="random,idm", export_dir=dest), out)
    assert sorted(os.listdir(dest)) == ["digits_ipc1_idm.tar.gz", "digits_ipc1_random.tar.gz", "table1.json",
                                        "table1.md", "table1.png"]
    assert open(os.path.join(dest, "table1.md")).read() == open(os.path.join(out, "table1.md")).read()
    with tarfile.open(os.path.join(dest, "digits_ipc1_idm.tar.gz")) as tar:  # what publishing needs
        assert sorted(tar.getnames()) == ["digits_ipc1_idm/cell.json", "digits_ipc1_idm/results.json",
                                          "digits_ipc1_idm/synthetic.npz"]
        assert json.load(tar.extractfile("digits_ipc1_idm/results.json"))["iterations"] == 4
    capped = str(tmp_path / "capped")
    lines = table1.export(out, record, capped, max_files=4, max_mb=0.01)
    assert sorted(os.listdir(capped)) == ["digits_ipc1_random.tar.gz", "table1.json", "table1.md"]
    assert lines[0].startswith("export: table1.png left out (") and "> table1.export_max_mb=0.01)" in lines[0]
    assert lines[-1] == "export: digits_ipc1_idm.tar.gz left out (table1.export_max_files=4 reached)"


def test_the_finished_check_and_the_config_loader(tmp_path):
    assert cell_status.finished_results(str(tmp_path), 5) is None
    (tmp_path / "results.json").write_text('{"iterations": 5, "archs": {}}')
    assert cell_status.finished_results(str(tmp_path), 5) == {"iterations": 5, "archs": {}}
    assert cell_status.finished_results(str(tmp_path), 6) is None
    assert cell_status.finished_results(str(tmp_path), None) is not None  # a baseline: any results
    (tmp_path / "results.json").write_text('{"iterations": 5, "ar')  # cut by a kill
    assert cell_status.finished_results(str(tmp_path), 5) is None
    assert config_files.load_config_file(QUICK, "10,dm").method == "dm"
    with pytest.raises(ValueError, match="config file 'nowhere.py' not found"):
        config_files.load_config_file("nowhere.py")
    with pytest.raises(ValueError, match="IPC must be >= 1"):
        config_files.load_config_file(QUICK, "0")


def test_bad_table1_values_are_one_line_errors(tmp_path):
    out = run_main("--config=configs/quick.py", "--mode=table1", f"--workdir={tmp_path}",
                   "--config.table1.cells=quick:1,cifar10", timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: table1.cells: bad cell 'cifar10'; expected <config file name>:<ipc>, e.g. cifar10:10 or quick:1")
    c = _config(budget_s=-1.0)
    with pytest.raises(ValueError, match=r"^invalid config: table1.budget_s must be >= 0 \(0 = off\), got -1.0$"):
        config_check.validate(c)


@pytest.mark.slow
def test_the_digits_table1_through_main(tmp_path):
    """The real cells at toy sizes: each folder is a finished run, the table its numbers."""
    out = str(tmp_path / "t1")
    args = ["--config=configs/quick.py", "--mode=table1", f"--workdir={out}", "--config.table1.cells=quick:1",
            "--config.table1.iterations=2", "--config.eval.epochs=2", "--config.eval.scores=False"]
    first = run_main(*args, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.load(open(os.path.join(out, "table1.json")))["rows"]
    assert [r["state"] for r in rows] == ["done"] * 3
    for r in rows:
        results = json.load(open(os.path.join(out, r["folder"], "results.json")))
        assert r["mean"] == results["archs"]["ConvNetD2"]["mean"] and r["networks"] == 2
    again = run_main(*args, timeout=300)
    assert again.returncode == 0 and json.load(open(os.path.join(out, "table1.json")))["rows"] == rows
