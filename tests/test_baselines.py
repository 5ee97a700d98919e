"""The baseline and evaluation entry points (--mode=baseline, --mode=evaluate) on the digits."""

import json
import os

import jax
import numpy as np
import pytest

from helpers import tiny_config
from idm_jax import baselines, data, evaluate, evaluate_set, synthetic_file


def _digits_config(method="random", ipc=2):
    return tiny_config(arg=str(ipc), sets={"baseline.method": method, "baseline.train_epochs": 2,
                                           "eval.dsa": False})  # plumbing test: skip DSA's compile time


def test_run_baseline_random_then_run_evaluation(tmp_path):
    c = _digits_config("random", ipc=2)
    res = baselines.run_baseline(c, str(tmp_path / "random"))
    files = sorted(os.listdir(tmp_path / "random"))
    assert files == ["results.json", "results.md", "synthetic.npz", "synthetic.png"]
    syn = synthetic_file.load_synthetic(str(tmp_path / "random" / "synthetic.npz"))
    assert syn.images.shape == (20, 16, 16, 1) and syn.partition_factor == 1 and syn.method == "random"
    np.testing.assert_array_equal(np.bincount(syn.labels), [2] * 10)
    recorded = json.loads(syn.config_json)  # flat, as a condensation's set records it
    assert (recorded["baseline.method"], recorded["ipc"], recorded["data.source"]) == ("random", 2, "digits")
    on_disk = json.load(open(tmp_path / "random" / "results.json"))
    assert on_disk["method"] == "random" and on_disk["ipc"] == 2 and on_disk["dataset"] == "digits"
    r = on_disk["archs"]["ConvNetD2"]
    assert r["num_train_images"] == 20 and len(r["accuracies"]) == 2 and r["passes"] == 3
    assert r["mean"] == pytest.approx(np.mean(r["accuracies"])) == pytest.approx(res["archs"]["ConvNetD2"]["mean"])
    assert "| ConvNetD2 | 2 | 2 | 20 |" in open(tmp_path / "random" / "results.md").read()
    # The same file scored through the evaluate entry point.
    out = evaluate_set.run_evaluation(c, str(tmp_path / "eval"), str(tmp_path / "random" / "synthetic.npz"))
    assert out["method"] == "random" and out["partition_factor"] == 1
    # Pinned: the same seed reproduces the accuracies exactly (an independent evaluate_archs call).
    again = evaluate.evaluate_archs(syn.images_normalized, syn.labels, data.load_config_dataset(c), c.eval,
                                    archs="ConvNetD2", key=jax.random.PRNGKey(int(c.seed)), partition_factor=1)
    assert out["archs"]["ConvNetD2"]["accuracies"] == again["ConvNetD2"]["accuracies"]
    assert out["archs"]["ConvNetD2"]["mean"] == pytest.approx(np.mean(again["ConvNetD2"]["accuracies"]))
    assert sorted(os.listdir(tmp_path / "eval")) == ["results.json", "results.md"]


def test_run_evaluation_rejects_a_set_of_another_shape(tmp_path):
    path = synthetic_file.save_synthetic(str(tmp_path / "s.npz"), np.zeros((2, 32, 32, 3)), [0, 1],
                                         mean=[0.5] * 3, std=[0.5] * 3, class_names=[str(i) for i in range(10)],
                                         partition_factor=2, method="idm", dataset="cifar10")
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*'digits' has \(16, 16, 1\)"):
        evaluate_set.run_evaluation(_digits_config(), str(tmp_path / "w"), path)
    with pytest.raises(ValueError, match="baseline.method must be one of .* got 'kcenter'"):
        baselines.run_baseline(_digits_config("kcenter"), str(tmp_path / "w"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["herding", "forgetting", "whole"])
def test_run_baseline_end_to_end_on_digits(tmp_path, method):
    c = _digits_config(method, ipc=10)
    c.eval.dsa = True
    c.eval.epochs = 20 if method != "whole" else 2  # whole: 1433 images per epoch
    c.baseline.train_epochs = 5
    res = baselines.run_baseline(c, str(tmp_path))
    acc = res["archs"]["ConvNetD2"]["mean"]
    assert acc > 50.0, acc  # 10 classes: chance is 10 %
    if method == "whole":
        assert res["ipc"] is None and res["archs"]["ConvNetD2"]["num_train_images"] > 1000
        assert not os.path.exists(tmp_path / "synthetic.npz")
    else:
        syn = synthetic_file.load_synthetic(str(tmp_path / "synthetic.npz"))
        np.testing.assert_array_equal(np.bincount(syn.labels), [10] * 10)
        assert res["feature_net_train_accuracy"] > 50.0
