"""synthetic_sets/: every published set loads, matches its README row and its name, and was made
with the paper's 20,000 iterations; and the publish command (idm_jax/publish.py) that puts it there."""

import glob
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from idm_jax import export, publish
from idm_jax import results as results_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = os.path.join(ROOT, "synthetic_sets")
PUBLISHED = sorted(glob.glob(os.path.join(SETS, "*.npz")))
IMAGE_SHAPE = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}
CLASSES = {"cifar10": 10, "cifar100": 100}


def _readme_rows(path):
    """{cell: [cell, accuracy, command, date, sha256]}, parsed here independently of publish.py."""
    lines = open(path).read().splitlines()
    header = lines.index("| cell | accuracy (%) | command | date | sha256 |")
    assert lines[header + 1] == "|---|---|---|---|---|"
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert len(cells) == 5, line
        assert cells[0] not in rows, f"two rows for {cells[0]}"
        rows[cells[0]] = cells
    return rows


def test_readme_table_and_folder_agree():
    rows = _readme_rows(os.path.join(SETS, "README.md"))
    files = {os.path.basename(p)[:-len(".npz")] for p in PUBLISHED}
    assert not set(rows) - files, f"README rows without their file: {sorted(set(rows) - files)}"
    assert not files - set(rows), f"published files without a README row: {sorted(files - set(rows))}"
    for cell, (_, accuracy, command, date, sha) in rows.items():
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d \(\d+ \w+\)", accuracy), (cell, accuracy)
        assert command.startswith("`python main.py --config=configs/") and command.endswith("`"), command
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", date) and re.fullmatch(r"[0-9a-f]{64}", sha), (date, sha)


@pytest.mark.parametrize("path", PUBLISHED, ids=[os.path.basename(p) for p in PUBLISHED])
def test_published_set(path):
    cell = os.path.basename(path)[:-len(".npz")]
    name = re.fullmatch(r"([a-z0-9]+)_ipc(\d+)_([a-z0-9]+)", cell)
    assert name, f"{cell}: not <dataset>_ipc<ipc>_<method>"
    dataset, ipc, method = name[1], int(name[2]), name[3]
    assert os.path.getsize(path) <= 10_000_000
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert _readme_rows(os.path.join(SETS, "README.md"))[cell][4] == sha, f"{cell}: file differs from its row"
    s = export.load_synthetic(path)
    classes = CLASSES.get(dataset, s.num_classes)
    assert s.method == method and s.num_classes == classes
    l = s.partition_factor
    assert l == (2 if method == "idm" else 1)
    assert s.images_normalized.shape == (classes * ipc, *IMAGE_SHAPE.get(dataset, s.image_shape))
    np.testing.assert_array_equal(np.bincount(s.labels, minlength=classes), [ipc] * classes)
    assert np.all(np.isfinite(s.images_normalized))
    assert export.recorded_config(s.config_json)["idm.iterations"] == 20000


# ----------------------------------------------------------------------------------------------
# The publish command, on workdirs written by the run's own writers (save_synthetic, write_results)

MEAN, STD = np.array([0.5], np.float32), np.array([0.25], np.float32)
CMD = "python main.py --config=configs/quick.py:2 --workdir=runs/digits_ipc2_idm"


def _workdir(tmp_path, name="run", *, iterations=20000, ipc=2, n_classes=3, hw=4, method="idm", mean=51.0,
             seed=0, info=True):
    """A finished run's workdir: synthetic.npz (config_json with idm.iterations), results.json, cell.json."""
    wd = tmp_path / name
    images = np.random.default_rng(seed).normal(size=(n_classes * ipc, hw, hw, 1)).astype(np.float32)
    labels = np.repeat(np.arange(n_classes), ipc)
    export.save_synthetic(str(wd / "synthetic.npz"), images, labels, mean=MEAN, std=STD,
                          class_names=[f"c{k}" for k in range(n_classes)], partition_factor=2, method=method,
                          dataset="digits", config_json=json.dumps({"idm.iterations": iterations, "ipc": ipc}))
    results_lib.write_results(str(wd), {"method": method, "iterations": iterations, "train_arch": "ConvNetD2",
                                   "archs": {"ConvNetD2": {"mean": mean, "std": 1.0, "num_seeds": 3,
                                                           "accuracies": [mean - 1, mean, mean + 1]}}})
    if info:
        (wd / "cell.json").write_text(json.dumps({"command": CMD, "date": "2026-12-01", "device": "H200"}))
    return str(wd)


def test_publish_copies_the_set_and_writes_its_row(tmp_path):
    dest = tmp_path / "sets"
    wd = _workdir(tmp_path)
    row = publish.publish(wd, "digits_ipc2_idm", str(dest))
    published = dest / "digits_ipc2_idm.npz"
    assert published.read_bytes() == open(os.path.join(wd, "synthetic.npz"), "rb").read()  # byte for byte
    sha = hashlib.sha256(published.read_bytes()).hexdigest()
    assert row["how"] == "copy" and row["sha256"] == sha
    assert _readme_rows(dest / "README.md") == {"digits_ipc2_idm": [
        "digits_ipc2_idm", "51.00 ± 1.00 (3 ConvNetD2)", f"`{CMD}`", "2026-12-01", sha]}
    assert row["evaluate"] == (f"python main.py --config=configs/quick.py:2 --mode=evaluate "
                               f"--synthetic={published} --workdir=runs/eval_digits_ipc2_idm")
    # A second cell is appended; publishing a cell again replaces its row.
    publish.publish(_workdir(tmp_path, "dm", method="dm"), "digits_ipc2_dm", str(dest))
    publish.publish(_workdir(tmp_path, "again", mean=60.0, seed=1), "digits_ipc2_idm", str(dest),
                    command="python main.py --config=configs/quick.py:2,idm --workdir=x", date="2026-12-02")
    rows = _readme_rows(dest / "README.md")
    assert list(rows) == ["digits_ipc2_dm", "digits_ipc2_idm"]
    assert rows["digits_ipc2_idm"][1:4] == ["60.00 ± 1.00 (3 ConvNetD2)",
                                            "`python main.py --config=configs/quick.py:2,idm --workdir=x`",
                                            "2026-12-02"]
    assert rows["digits_ipc2_idm"][4] == hashlib.sha256(published.read_bytes()).hexdigest() != sha
    assert sorted(os.listdir(dest)) == ["README.md", "digits_ipc2_dm.npz", "digits_ipc2_idm.npz"]


def test_publish_refuses_short_runs_except_outside_the_repository(tmp_path):
    readme = open(os.path.join(SETS, "README.md")).read()
    short = _workdir(tmp_path, iterations=200)
    with pytest.raises(publish.PublishError, match=r"idm.iterations=200, not the paper's 20000"):
        publish.publish(short, "digits_ipc2_idm", str(tmp_path / "sets"))
    with pytest.raises(publish.PublishError, match="only outside the repository"):
        publish.publish(short, "digits_ipc2_idm", allow_short=True)  # default dest: synthetic_sets/
    with pytest.raises(publish.PublishError, match="only outside the repository"):
        publish.publish(short, "digits_ipc2_idm", os.path.join(ROOT, "runs", "x"), allow_short=True)
    assert not os.path.exists(tmp_path / "sets")
    assert open(os.path.join(SETS, "README.md")).read() == readme  # nothing written in the repository
    assert sorted(glob.glob(os.path.join(SETS, "*.npz"))) == PUBLISHED
    row = publish.publish(short, "digits_ipc2_idm", str(tmp_path / "sets"), allow_short=True)
    assert os.path.exists(row["path"]) and row["how"] == "copy"


def test_publish_checks_name_results_and_command(tmp_path):
    wd = _workdir(tmp_path)
    with pytest.raises(publish.PublishError, match=r"bad cell name 'digits-ipc2'.*cifar10_ipc10_idm"):
        publish.publish(wd, "digits-ipc2", str(tmp_path / "s"))
    with pytest.raises(publish.PublishError, match=r"cell 'digits_ipc10_dm' does not match.*ipc 2, method 'idm'"):
        publish.publish(wd, "digits_ipc10_dm", str(tmp_path / "s"))
    with pytest.raises(publish.PublishError, match=r"cell 'cifar10_ipc2_idm' does not match.*dataset 'digits'"):
        publish.publish(wd, "cifar10_ipc2_idm", str(tmp_path / "s"))
    no_info = _workdir(tmp_path, "noinfo", info=False)
    with pytest.raises(publish.PublishError, match="no command for .*noinfo: pass --command"):
        publish.publish(no_info, "digits_ipc2_idm", str(tmp_path / "s"))
    os.remove(os.path.join(wd, "results.json"))
    with pytest.raises(publish.PublishError, match=r"results.json does not exist"):
        publish.publish(wd, "digits_ipc2_idm", str(tmp_path / "s"))
    assert not os.path.exists(tmp_path / "s")


def test_large_sets_are_compressed_then_lose_the_pixel_copy_then_refused(tmp_path, monkeypatch):
    wd = _workdir(tmp_path, ipc=50, n_classes=4, hw=8)  # 200 images: 2 x 51 KB of float32 + labels
    size = os.path.getsize(os.path.join(wd, "synthetic.npz"))
    src = export.load_synthetic(os.path.join(wd, "synthetic.npz"))
    for limit, how in ((size, "copy"), (size - 1, "compressed"), (int(size * 0.6), "compressed, no pixel copy")):
        monkeypatch.setattr(publish, "MAX_BYTES", limit)
        out = tmp_path / f"sets_{limit}"
        row = publish.publish(wd, "digits_ipc50_idm", str(out))
        assert row["how"] == how and os.path.getsize(row["path"]) <= limit
        s = export.load_synthetic(row["path"])
        np.testing.assert_array_equal(s.images_normalized, src.images_normalized)  # what the evaluator trains on
        np.testing.assert_allclose(s.images, src.images, atol=1e-6)
        with np.load(row["path"]) as z:
            assert ("images" in z.files) == (how != "compressed, no pixel copy")
    monkeypatch.setattr(publish, "MAX_BYTES", int(size * 0.3))
    with pytest.raises(publish.PublishError, match=r"MB even compressed without its pixel copy, over the"):
        publish.publish(wd, "digits_ipc50_idm", str(tmp_path / "too_big"))
    assert not os.path.exists(tmp_path / "too_big")


def test_config_iterations_reads_flat_and_nested_configs():
    assert publish.config_iterations('{"idm.iterations": 20000}') == 20000
    assert publish.config_iterations('{"idm": {"iterations": 200}, "ipc": 1}') == 200
    assert publish.config_iterations("{}") is None and publish.config_iterations("not json") is None


def test_publish_command_line_prints_one_error_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "idm_jax.publish", str(tmp_path / "nope"), "--cell=cifar10_ipc10_idm",
                          f"--dest={tmp_path / 'sets'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope' / 'synthetic.npz'} does not exist: "
                                               "publish a finished run's workdir"]


# ----------------------------------------------------------------------------------------------
# benchmarks/paper_cells.sh (the device command that makes the sets) and its helpers


def _cell(root, name, *, iterations=20000, done=True, acc=58.0, npz_bytes=0, eval_rows=()):
    """A cell workdir as main.py leaves it: config.json, metrics.jsonl, results.json, synthetic.npz."""
    from benchmarks import paper_cells

    wd = root / name
    wd.mkdir(parents=True)
    (wd / "config.json").write_text(json.dumps({"model": "ConvNet", "idm": {"iterations": iterations}}))
    rows = [{"step": s, "eval/ConvNet/mean": a} for s, a in eval_rows] + [{"step": 10, "loss": 1.0}]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        results_lib.write_results(str(wd), {"iterations": iterations if "random" not in name else None,
                                       "train_arch": "ConvNet", "archs": {"ConvNet": {
                                           "mean": acc, "std": 0.5, "num_seeds": 5, "accuracies": [acc] * 5}}})
        if "random" in name:  # a baseline's results have no iterations
            res = json.loads((wd / "results.json").read_text())
            del res["iterations"]
            (wd / "results.json").write_text(json.dumps(res))
        (wd / "synthetic.npz").write_bytes(os.urandom(npz_bytes))
    paper_cells.record(str(wd), f"python main.py --config=configs/cifar10.py:10 --workdir={wd}", "NVIDIA H200")
    paper_cells.record(str(wd), f"python main.py --config=configs/cifar10.py:10 --workdir={wd}", "NVIDIA H200",
                       seconds=500, rc=0 if done else 124)
    return str(wd)


def test_table1_puts_paper_and_measured_side_by_side(tmp_path):
    from benchmarks import paper_cells

    _cell(tmp_path, "cifar10_ipc10_random", acc=26.0)
    _cell(tmp_path, "cifar10_ipc10_idm", acc=57.5, eval_rows=[(5000, 50.0), (10000, 55.0)])
    _cell(tmp_path, "cifar10_ipc1_idm", acc=40.0)
    _cell(tmp_path, "cifar10_ipc10_dm", done=False)
    assert paper_cells.cells(str(tmp_path)) == ["cifar10_ipc10_idm", "cifar10_ipc10_dm", "cifar10_ipc10_random",
                                                "cifar10_ipc1_idm"]
    assert [paper_cells.cell_state(str(tmp_path / n)) for n in paper_cells.cells(str(tmp_path))] == [
        "done", "partial", "done", "done"]
    md = paper_cells.table_markdown(str(tmp_path)).splitlines()
    assert ("| cifar10 | 10 | 58.6 ± 0.1 | 57.50 ± 0.50 (5) | 48.9 ± 0.6 | (running: 10 of 20,000 it.) | "
            "26.0 ± 1.2 | 26.00 ± 0.50 (5) |") in md
    assert "| cifar10 | 1 | 45.6 ± 0.7 | 40.00 ± 0.50 (5) | 26.0 ± 0.8 | — | 14.4 ± 2.0 | — |" in md
    assert any("JPEG re-encode" in line for line in md)
    assert "| cifar10_ipc10_idm | 5,000: 50.00, 10,000: 55.00 |" in md
    run = next(line for line in md if line.startswith("| cifar10_ipc10_dm | partial |"))
    assert "| NVIDIA H200 | 500.0 | 1 |" in run
    # Cut (SIGTERM) after its last metrics row: the progress is the checkpoint's iteration.
    (tmp_path / "cifar10_ipc10_dm" / "checkpoints" / "19").mkdir(parents=True)
    assert "(running: 19 of 20,000 it.)" in paper_cells.table_markdown(str(tmp_path))
    png = paper_cells.plot_curves(str(tmp_path), str(tmp_path / "curve.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_pack_splits_sets_over_the_archives_that_come_back(tmp_path, monkeypatch):
    from benchmarks import paper_cells
    import tarfile

    root, out = tmp_path / "cells", tmp_path / "out"
    out.mkdir()
    for ipc in (10, 50, 1):
        _cell(root, f"cifar10_ipc{ipc}_idm", npz_bytes=600)
    _cell(root, "cifar10_ipc10_dm", done=False)
    (root / "cifar10_ipc10_dm" / "checkpoints").mkdir()  # never packed
    monkeypatch.setattr(paper_cells, "ARCHIVE_BYTES", 1000)
    monkeypatch.setattr(paper_cells, "MAX_SET_ARCHIVES", 1)
    left_out = paper_cells.pack(str(root), str(out))
    assert sorted(os.listdir(out)) == ["results.tar.gz", "sets_2.tar.gz"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "cifar10_ipc10_idm/results.json" in names and "cifar10_ipc10_dm/cell.json" in names
    assert not any("checkpoints" in n or n.endswith(".npz") for n in names)  # the small files use ~all 1000
    with tarfile.open(out / "sets_2.tar.gz") as tar:
        assert tar.getnames() == ["cifar10_ipc10_idm/synthetic.npz"]
    assert left_out == ["cifar10_ipc50_idm", "cifar10_ipc1_idm"]


@pytest.mark.slow
def test_paper_cells_dry_run_makes_publishable_cells(tmp_path):
    import tarfile

    out = tmp_path / "device"
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    run = subprocess.run(["bash", "benchmarks/paper_cells.sh", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    timings = (out / "timings.txt").read_text()
    for method in ("idm", "dm", "random"):
        assert f"end digits_ipc1_{method} rc=0 (done)" in timings, timings
    assert timings.rstrip().endswith("done")
    assert sorted(p.name for p in out.iterdir()) == [  # nothing else in $OUT: the cells live beside it
        "curve.png", "devices.txt", "results.tar.gz", "table1.md", "timings.txt"]
    ends = [line.split()[2] for line in timings.splitlines() if " end " in line]
    assert ends == ["digits_ipc1_random", "digits_ipc1_dm", "digits_ipc1_idm"]  # what fits first (issue 32)
    table = (out / "table1.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| digits | 1 |"))
    assert re.fullmatch(r"\| digits \| 1 \|( — \| \d+\.\d\d ± \d+\.\d\d \(2\) \|){3}", row), row
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    back = tmp_path / "back"
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
        tar.extractall(back, filter="data")
    assert not any("checkpoints" in n or "tensorboard" in n for n in names)
    # What came back is what the publish command needs (a short run: only into a tmp folder).
    for method in ("idm", "dm", "random"):
        cell = f"digits_ipc1_{method}"
        pub = subprocess.run([sys.executable, "-m", "idm_jax.publish", str(back / cell), f"--cell={cell}",
                              f"--dest={tmp_path / 'sets'}", "--allow_short"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert pub.returncode == 0, pub.stderr
        assert f"--mode=evaluate --synthetic={tmp_path / 'sets' / cell}.npz" in pub.stdout
        s = export.load_synthetic(str(tmp_path / "sets" / f"{cell}.npz"))
        assert s.method == method and s.images.shape == (10, 16, 16, 1) and s.partition_factor == (
            2 if method == "idm" else 1)
    rows = _readme_rows(tmp_path / "sets" / "README.md")
    assert sorted(rows) == ["digits_ipc1_dm", "digits_ipc1_idm", "digits_ipc1_random"]
    assert "--config.eval.interval=2" in rows["digits_ipc1_idm"][2]
    # A second call finds every cell finished and runs nothing.
    again = subprocess.run(["bash", "benchmarks/paper_cells.sh", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)  # the cells beside $OUT: out.cells
    assert again.returncode == 0 and (out / "timings.txt").read_text().count("done before") == 3
