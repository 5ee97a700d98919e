"""benchmarks/release_parity.py's pieces: the release adapter's numpy side, the snapshot
converter and the table/plot writer, on tiny fake release-style outputs (no torch here)."""

import json
import os
import sys

import numpy as np
import pytest

from benchmarks import release_parity
from benchmarks.parity import release_side, report
from idm_jax import synthetic_file

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def test_release_layout_is_totensor_then_normalize():
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[0, 1, 2] = (255, 0, 51)
    out = release_side.to_release_layout(images, MEAN, STD)
    assert out.shape == (2, 3, 4, 5) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out[0, :, 1, 2], [(1 - MEAN[0]) / STD[0], -MEAN[1] / STD[1],
                                                (0.2 - MEAN[2]) / STD[2]], rtol=1e-6)
    np.testing.assert_allclose(out[1, 2], np.full((4, 5), -MEAN[2] / STD[2]), rtol=1e-6)


def test_budget_bookkeeping_and_release_flags():
    # One step per class per iteration: the 100th step of 10 classes ends iteration 10.
    assert [release_side.budget_reached(n, 10, [0, 10, 30]) for n in (99, 100, 200, 300)] == [None, 10, None, 30]
    argv = release_side.release_argv("CIFAR10", 10, [0, 10, 30])
    flags = dict(zip(argv[::2], argv[1::2]))
    # The release loops it = 0..Iteration: 29 gives 30 updates; evaluation never triggers.
    assert argv[argv.index("--Iteration") + 1] == "29" and int(argv[argv.index("--eval_interval") + 1]) > 29
    assert argv[argv.index("--num_exp") + 1] == "1" and "--aug" in argv and "--syn_ce" in argv
    assert flags["--dataset"] == "CIFAR10" and argv[argv.index("--ce_weight") + 1] == "0.5"
    assert argv[argv.index("--embed_last") + 1] == "1000" and argv[argv.index("--lr_img") + 1] == "0.2"
    ipc1 = release_side.release_argv("CIFAR10", 1, [5])
    assert ipc1[ipc1.index("--batch_real") + 1] == "5000" and ipc1[ipc1.index("--Iteration") + 1] == "4"
    with pytest.raises(SystemExit, match="no published command"):
        release_side.release_argv("CIFAR10", 20, [5])


class _FakeTensor:
    """What the recorder reads of a torch tensor: detach().cpu().numpy()."""

    def __init__(self, array):
        self.array, self.ndim, self.shape = array, array.ndim, array.shape

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array.copy()


def test_recorder_snapshots_at_budgets_and_times_iterations(tmp_path):
    images = np.zeros((4, 3, 2, 2), np.float32)  # 2 classes x IPC 2, NCHW
    rec = release_side.Recorder(str(tmp_path), num_classes=2, num_images=4, budgets=[0, 2])
    tensor = _FakeTensor(images)
    assert rec.is_synthetic([tensor]) and not rec.is_synthetic([_FakeTensor(np.zeros((3, 3)))])
    rec.attach(tensor)  # the init is budget 0
    for step in range(6):  # 3 iterations x 2 classes
        rec.before_step()
        images += 1.0  # the optimizer's update
        rec.after_step()
    snap0, snap2 = (np.load(tmp_path / f"snap_{b}.npz") for b in (0, 2))
    np.testing.assert_array_equal(snap0["images_nchw"], 0.0)
    np.testing.assert_array_equal(snap2["images_nchw"], 4.0)  # after 2 iterations = 4 class steps
    np.testing.assert_array_equal(snap2["labels"], [0, 0, 1, 1])
    assert not os.path.exists(tmp_path / "snap_3.npz")
    assert len(rec.iteration_seconds(end=1e12)) == 3
    calls = []
    rec_cb = release_side.Recorder(str(tmp_path / "cb"), 2, 4, [0, 1], on_snapshot=lambda: calls.append(1))
    os.makedirs(tmp_path / "cb")
    rec_cb.attach(_FakeTensor(images))
    rec_cb.before_step()
    rec_cb.after_step()
    assert calls == [1]  # the init; iteration 1 is not over after one of its two class steps
    rec_cb.before_step()
    rec_cb.after_step()
    assert calls == [1, 1]  # a run cut short keeps the timings up to its last snapshot
    init_only = release_side.Recorder(str(tmp_path / "x"), 2, 4, [0])
    os.makedirs(tmp_path / "x")
    with pytest.raises(release_side.InitOnly):
        init_only.attach(_FakeTensor(images))


def test_release_snapshot_converts_to_an_idm_jax_synthetic_set(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "snap_5.npz", images_nchw=nchw, labels=np.array([0, 0, 1, 1], np.int32), budget=5)
    out = report.release_snapshot_to_synthetic(str(tmp_path / "snap_5.npz"), str(tmp_path / "syn.npz"),
                                               mean=MEAN, std=STD, class_names=["a", "b"],
                                               partition_factor=2, dataset="cifar10")
    synset = synthetic_file.load_synthetic(out)
    np.testing.assert_array_equal(synset.images_normalized, nchw.transpose(0, 2, 3, 1))
    expected_pixels = np.clip(nchw.transpose(0, 2, 3, 1) * np.float32(STD) + np.float32(MEAN), 0, 1)
    np.testing.assert_allclose(synset.images, expected_pixels, rtol=1e-6)
    assert synset.partition_factor == 2 and synset.class_names == ("a", "b") and synset.ipc == 2


def _fake_results(root, impl, budget, accs):
    d = os.path.join(root, "eval", f"{impl}_{budget}")
    os.makedirs(d)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump({"archs": {"ConvNet": {"accuracies": accs, "mean": float(np.mean(accs)),
                                         "std": float(np.std(accs)), "epochs": 100}}}, f)


def test_table_and_plot_from_fake_results(tmp_path):
    root = str(tmp_path)
    _fake_results(root, "idm_jax", 0, [30.0, 31.0, 32.0])
    _fake_results(root, "release", 0, [31.0, 32.0, 33.0])
    _fake_results(root, "idm_jax", 10, [40.0, 41.0, 42.0])
    _fake_results(root, "release", 10, [45.0, 45.5, 46.0])
    rows = report.accuracy_rows(root, [0, 10, 30])
    assert rows[2] == {"budget": 30}  # not measured yet
    d, se = report.difference(rows[0]["idm_jax"], rows[0]["release"])
    assert d == pytest.approx(-1.0) and se == pytest.approx(np.sqrt(1.0 / 3 + 1.0 / 3))
    timings = {"idm_jax": {"iteration_seconds": [0.0, 2.0, 4.0, 3.0], "peak_rss_gib": 2.0},
               "release": {"iteration_seconds": [6.0, 6.0], "peak_rss_gib": 3.0}}
    text = report.markdown(rows, timings, None, "header")
    lines = text.splitlines()
    assert "| 0 | 31.00 ± 0.82 (3) | 32.00 ± 0.82 (3) | -1.00 ± 0.82 | yes |" in lines
    assert any(line.startswith("| 10 |") and line.endswith("| NO |") for line in lines)  # 4.5 pp apart
    assert "| 30 | (pending) | (pending) | — | — |" in lines
    assert "| median s / iteration | 3.00 | 6.00 | 2.00x |" in lines  # the 0 (compile row) is dropped
    png = report.plot(rows, str(tmp_path / "parity.png"), "title")
    assert png and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert report.plot([{"budget": 0}], str(tmp_path / "none.png"), "t") is None


def test_pooled_rows_spread_is_over_condensation_runs(tmp_path):
    # Two runs per implementation; each cell pools a run's networks into one mean.
    roots = [str(tmp_path / "seed_0"), str(tmp_path / "seed_1")]
    _fake_results(roots[0], "idm_jax", 0, [30.0, 32.0])
    _fake_results(roots[1], "idm_jax", 0, [34.0, 36.0])
    _fake_results(roots[0], "release", 0, [33.0, 33.0])
    _fake_results(roots[1], "release", 0, [35.0, 37.0])
    _fake_results(roots[0], "idm_jax", 10, [40.0, 40.0])  # one run only so far at budget 10
    rows = report.pooled_rows(roots, [0, 10])
    a, b = rows[0]["idm_jax"], rows[0]["release"]
    assert a["accuracies"] == [31.0, 35.0] and b["accuracies"] == [33.0, 36.0]
    assert (a["mean"], a["std"], a["runs"], a["networks"]) == (33.0, 2.0, 2, 4)
    d, se = report.difference(a, b)
    assert d == pytest.approx(-1.5) and se == pytest.approx(np.sqrt(8.0 / 2 + 4.5 / 2))
    assert rows[1]["idm_jax"]["runs"] == 1 and "release" not in rows[1]
    lines = report.markdown(rows, {}, None, "h").splitlines()
    assert "| 0 | 33.00 ± 2.00 (2 runs, 4 nets) | 34.50 ± 1.50 (2 runs, 4 nets) | -1.50 ± 2.50 | yes |" in lines
    assert any("over condensation runs" in line for line in lines)
    one_each = [{"budget": 5, "idm_jax": dict(a, accuracies=[31.0], runs=1),
                 "release": dict(b, accuracies=[33.0], runs=1)}]
    assert report.markdown(one_each, {}, None, "h").splitlines()[4].endswith("| n/a |")  # no spread: no verdict
    pooled = report.pooled_timings([{"iteration_seconds": [1.0, 2.0], "peak_rss_gib": 3.0}, None,
                                    {"iteration_seconds": [4.0], "peak_rss_gib": 2.5}])
    assert pooled == {"iteration_seconds": [1.0, 2.0, 4.0], "peak_rss_gib": 3.0, "runs": 2}
    assert report.pooled_timings([None]) is None


def test_welch_verdict_uses_the_t_distribution():
    a, b = {"accuracies": [30.0, 31.0, 32.0]}, {"accuracies": [32.0, 33.0, 34.0]}
    # Equal variances 1, 3 a side: se = sqrt(2/3), df = 4 exactly, t = 2 / 0.816 = 2.45 < 2.776.
    assert report.welch_df(a, b) == pytest.approx(4.0) and report.verdict(a, b) == "yes"
    assert report.verdict(a, {"accuracies": [33.0, 34.0, 35.0]}) == "NO"  # t = 3.67 > 2.776
    assert report.t_critical_95(1.6) == 12.706 and report.t_critical_95(40) == 1.96  # df rounded down
    assert report.verdict(a, {"accuracies": [40.0]}) == "n/a"
    unequal = {"accuracies": [30.0, 30.0, 30.0, 30.0, 40.0]}  # var 20, n 5 against var 1, n 3
    va, vb = 20 / 5, 1 / 3
    assert report.welch_df(unequal, a) == pytest.approx((va + vb) ** 2 / (va**2 / 4 + vb**2 / 2))


def test_seed_runs_share_the_data_and_split_the_roots(tmp_path):
    import argparse

    args = argparse.Namespace(root=str(tmp_path), seed="0,2")
    runs = release_parity.seed_runs(args)
    assert [(r.seed, r.root) for r in runs] == [(0, str(tmp_path / "seed_0")), (2, str(tmp_path / "seed_2"))]
    assert {r.data for r in runs} == {str(tmp_path / "data.npz")} and args.seed == "0,2"
    single = release_parity.seed_runs(argparse.Namespace(root=str(tmp_path), seed="3"))
    assert [(r.seed, r.root) for r in single] == [(3, str(tmp_path))]  # one seed: the flat layout
    for bad in ("1,1", "a", ""):
        with pytest.raises(SystemExit, match="--seed"):
            release_parity.parse_seeds(bad)


def test_removed_scipy_namespace_is_provided(monkeypatch):
    ndimage = pytest.importorskip("scipy.ndimage")
    monkeypatch.setitem(sys.modules, "scipy.ndimage.interpolation", None)  # as if SciPy had dropped it
    release_side.provide_removed_scipy_module()
    from scipy.ndimage.interpolation import rotate  # what the release's utils.py imports

    assert rotate is ndimage.rotate


def test_parity_cli_helpers():
    assert release_parity.parse_budgets("30, 0,10,10") == [0, 10, 30]
    assert release_parity.eval_order([0, 10, 25, 50]) == [50, 0, 10, 25]
    with pytest.raises(SystemExit, match="counts >= 0"):
        release_parity.parse_budgets("-1,5")
    with pytest.raises(SystemExit, match="comma-separated"):
        release_parity.parse_budgets("ten")
