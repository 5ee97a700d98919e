"""synthetic_sets/: every published set loads, matches its README row and its name, and was made
with the paper's 20,000 iterations; and the publish command (idm_jax/publish.py) that puts it there."""

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from idm_jax import publish, synthetic_file
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
    s = synthetic_file.load_synthetic(path)
    classes = CLASSES.get(dataset, s.num_classes)
    assert s.method == method and s.num_classes == classes
    l = s.partition_factor
    assert l == (2 if method == "idm" else 1)
    assert s.images_normalized.shape == (classes * ipc, *IMAGE_SHAPE.get(dataset, s.image_shape))
    np.testing.assert_array_equal(np.bincount(s.labels, minlength=classes), [ipc] * classes)
    assert np.all(np.isfinite(s.images_normalized))
    assert synthetic_file.recorded_config(s.config_json)["idm.iterations"] == 20000


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
    synthetic_file.save_synthetic(str(wd / "synthetic.npz"), images, labels, mean=MEAN, std=STD,
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
    src = synthetic_file.load_synthetic(os.path.join(wd, "synthetic.npz"))
    for limit, how in ((size, "copy"), (size - 1, "compressed"), (int(size * 0.6), "compressed, no pixel copy")):
        monkeypatch.setattr(publish, "MAX_BYTES", limit)
        out = tmp_path / f"sets_{limit}"
        row = publish.publish(wd, "digits_ipc50_idm", str(out))
        assert row["how"] == how and os.path.getsize(row["path"]) <= limit
        s = synthetic_file.load_synthetic(row["path"])
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
# benchmarks/gpu_table1.sh (the GPU job that makes the sets: --mode=table1 within a time limit)


def test_gpu_table1_runs_the_mode_within_what_is_left_of_its_limit(tmp_path):
    env = {**os.environ, "SHOW": "1", "PYTHON": "python3", "TOTAL_S": "600", "RESERVE_S": "30"}
    env.pop("IDM_CIFAR100", None)
    run = subprocess.run(["bash", "benchmarks/gpu_table1.sh", str(tmp_path / "back")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    words = run.stdout.split()
    assert words[:4] == ["python3", "main.py", "--mode=table1", "--config=configs/cifar10.py"]
    flags = dict(w[len("--config.table1."):].split("=", 1) for w in words if w.startswith("--config.table1."))
    budget = int(flags.pop("budget_s"))
    assert 565 <= budget <= 570  # 600 - 30, less the seconds the script took to get there
    assert flags == {"cells": "cifar10:10,cifar10:1,cifar10:50", "methods": "random,dm,idm",
                     "order": "cifar10:10:idm", "iterations": "20000", "tune_s": "90", "pace": "",
                     "export_dir": str(tmp_path / "back"), "export_max_files": "8", "export_max_mb": "16"}
    assert "--workdir=runs/table1" in words


@pytest.mark.slow
def test_gpu_table1_dry_run_brings_back_publishable_cells(tmp_path):
    back = tmp_path / "back"
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    run = subprocess.run(["bash", "benchmarks/gpu_table1.sh", str(back)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert sorted(p.name for p in back.iterdir()) == [  # nothing else: the cells live beside it
        "digits_ipc1_dm.tar.gz", "digits_ipc1_idm.tar.gz", "digits_ipc1_random.tar.gz",
        "table1.json", "table1.md", "table1.png"]
    rows = json.loads((back / "table1.json").read_text())["rows"]
    assert [(r["method"], r["state"], r["networks"]) for r in rows] == [
        ("random", "done", 2), ("dm", "done", 2), ("idm", "done", 2)]
    unpacked = tmp_path / "cells"
    for method in ("idm", "dm", "random"):  # what came back is what the publish command needs
        cell = f"digits_ipc1_{method}"
        with tarfile.open(back / f"{cell}.tar.gz") as tar:
            tar.extractall(unpacked, filter="data")
        pub = subprocess.run([sys.executable, "-m", "idm_jax.publish", str(unpacked / cell), f"--cell={cell}",
                              f"--dest={tmp_path / 'sets'}", "--allow_short"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert pub.returncode == 0, pub.stderr
        s = synthetic_file.load_synthetic(str(tmp_path / "sets" / f"{cell}.npz"))
        assert s.method == method and s.images.shape == (10, 16, 16, 1)
    readme = _readme_rows(tmp_path / "sets" / "README.md")
    assert "--config.data.source=digits" in readme["digits_ipc1_idm"][2]
    # A second job finds every cell finished and runs nothing.
    again = subprocess.run(["bash", "benchmarks/gpu_table1.sh", str(back)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)
    assert again.returncode == 0 and again.stdout.count("finished before") == 3
