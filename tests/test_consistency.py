"""Consistency ratio: known answers by hand on toy features, and the mode end to end on the digits."""

import json
import os

import numpy as np
import pytest

from configs import quick
from idm_jax import consistency, data as data_lib, synthetic_file


def test_well_separated_clusters_give_one_at_every_k():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    real = np.concatenate([c + rng.normal(size=(20, 2)) for c in centers])
    real_labels = np.repeat(np.arange(3), 20)
    syn = centers + 0.5
    ratio = consistency.consistency_ratio(syn, np.arange(3), real, real_labels, 20)
    np.testing.assert_array_equal(ratio, np.ones(20))
    # Synthetic images sitting in the wrong cluster: 0 at every k up to the cluster size.
    wrong = consistency.consistency_ratio(syn, np.array([1, 2, 0]), real, real_labels, 20)
    np.testing.assert_array_equal(wrong, np.zeros(20))


def test_a_mislabelled_real_image_gives_the_fraction_worked_out_by_hand():
    # 1-D features. Class 0 at 0, 1, 2 and a mislabelled image at 3 (label 1); class 1 at 100-102.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [100.0], [101.0], [102.0]])
    real_labels = np.array([0, 0, 0, 1, 1, 1, 1])
    syn, syn_labels = np.array([[0.0], [101.0]]), np.array([0, 1])
    ratio = consistency.consistency_ratio(syn, syn_labels, real, real_labels, 5)
    # Synthetic 0: neighbours 0, 1, 2, 3*, 100* -> 1, 1, 1, 3/4, 3/5.
    # Synthetic 1: neighbours 101, 100/102 (tie), the other, 3 (label 1), 2 -> 1, 1, 1, 1, 4/5.
    np.testing.assert_allclose(ratio, [1.0, 1.0, 1.0, (0.75 + 1.0) / 2, (0.6 + 0.8) / 2])


def test_bad_inputs_are_named():
    real, labels = np.zeros((4, 3)), np.zeros(4, int)
    with pytest.raises(ValueError, match="max_k must be an integer in \\[1, 4\\].*got 5"):
        consistency.consistency_ratio(np.zeros((1, 3)), [0], real, labels, 5)
    with pytest.raises(ValueError, match="same D"):
        consistency.consistency_ratio(np.zeros((1, 2)), [0], real, labels, 1)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        consistency.parse_sets("DM=nope.npz")
    with pytest.raises(ValueError, match="no synthetic set"):
        consistency.parse_sets(" , ")


def _save_set(path, ds, idx, labels):
    images = np.asarray(data_lib.normalize(ds.train_images[idx], ds.mean, ds.std))
    return synthetic_file.save_synthetic(path, images, labels, mean=ds.mean, std=ds.std, class_names=ds.class_names,
                                         partition_factor=1, method="random", dataset=ds.name)


@pytest.mark.slow  # ~40 s on 2 busy cores: the feature net's compile
def test_consistency_mode_end_to_end_on_digits(tmp_path):
    ds = data_lib.load_dataset("digits")
    c = quick.get_config("1")
    c.consistency.max_k = 10
    c.consistency.feature_epochs = 2
    c.eval.test_batch_size = 364
    idx = np.concatenate([np.flatnonzero(ds.train_labels == k)[:2] for k in range(10)])
    good = _save_set(str(tmp_path / "real.npz"), ds, idx, ds.train_labels[idx])
    shuffled = (ds.train_labels[idx] + 1) % 10  # every image labelled as the next class
    bad = _save_set(str(tmp_path / "wrong.npz"), ds, idx, shuffled)
    out = str(tmp_path / "out")
    result = consistency.run_consistency(c, out, f"real images={good},wrong labels={bad}")
    for name in ("consistency.json", "consistency.md", "consistency.png"):
        assert os.path.exists(os.path.join(out, name)), name
    saved = json.load(open(os.path.join(out, "consistency.json")))
    assert saved["feature_network"]["arch"] == "ConvNetD2" and "trained 2 epochs" in saved["feature_network"]["name"]
    right, wrong = (np.asarray(result["sets"][n]["ratio"]) for n in ("real images", "wrong labels"))
    assert right.shape == (10,) and right[0] == 1.0  # a real training image's nearest neighbour is itself
    assert right.mean() > wrong.mean()
    assert "Feature network: ConvNetD2 trained 2 epochs" in open(os.path.join(out, "consistency.md")).read()


def test_plot_without_matplotlib_fails_with_a_clear_message(monkeypatch):
    import builtins
    from idm_jax import errors, plots
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(errors.MissingDependency, match="pip install \"idm_jax\\[plots\\]\""):
        plots.bars("x.png", ["a"], [1.0], [0.0])
