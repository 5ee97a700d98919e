"""DD-Ranking's scores (HLR, IOR, LRS), the cached reference accuracies, and refusing non-finite sets."""

import json
import math
import os

import numpy as np
import pytest

from configs import base
from idm_jax import config_check, data, evaluate, references, results, synthetic_file, yardstick

E = math.e


def test_lrs_of_known_fractions():
    # a = 0 (IOR = HLR = 0): (1 - e^-1) / (e - e^-1) = 1 / (1 + e), not 0.5.
    assert yardstick.lrs(0.0, 0.0) == pytest.approx(1 / (1 + E)) == pytest.approx(0.2689414)
    assert yardstick.lrs(1.0, 0.0, w=1.0) == pytest.approx(1.0)  # a = 1: the top
    assert yardstick.lrs(0.0, 1.0, w=0.0) == pytest.approx(0.0)  # a = -1: the bottom
    # IOR 0.2, HLR 0.3, w 0.5: a = 0.1 - 0.15 = -0.05
    assert yardstick.lrs(0.2, 0.3) == pytest.approx((math.exp(-0.05) - 1 / E) / (E - 1 / E))
    assert yardstick.lrs(0.2, 0.3) == pytest.approx(0.2481915, abs=1e-7)  # (0.951229 - 0.367879) / 2.350402
    with pytest.raises(ValueError, match=r"weight w must lie in \[0, 1\], got 1.5"):
        yardstick.lrs(0.1, 0.1, w=1.5)


def test_scores_from_percentages_are_fractions_with_points_beside():
    s = yardstick.scores(60.0, 40.0, 90.0)
    assert s["ior_pp"] == pytest.approx(20.0) and s["hlr_pp"] == pytest.approx(30.0)
    assert s["ior"] == pytest.approx(0.2) and s["hlr"] == pytest.approx(0.3)
    assert s["lrs"] == pytest.approx(yardstick.lrs(0.2, 0.3)) and s["w"] == 0.5
    unknown = yardstick.scores(60.0, 40.0, None)
    assert unknown["hlr"] is None and unknown["lrs"] is None and unknown["ior_pp"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match=r"whole-data accuracy must be a percentage in \[0, 100\], got 190.0"):
        yardstick.scores(60.0, 40.0, 190.0)


def test_scores_table_in_results_md():
    entry = {"accuracy": 60.0, "random_real": 40.0, "whole_data": 90.0, "whole_data_source": "given: paper",
             **yardstick.scores(60.0, 40.0, 90.0)}
    record = {"method": "idm", "dataset": "digits", "ipc": 1, "partition_factor": 2, "train_arch": "ConvNetD2",
              "archs": {"ConvNetD2": {"mean": 60.0, "std": 1.0, "num_seeds": 2, "epochs": 3,
                                      "num_train_images": 40}},
              "scores": {"ConvNetD2": entry}}
    table = results.results_markdown(record)
    assert "#### DD-Ranking scores" in table
    assert ("| ConvNetD2 | 60.00 | 40.00 | 90.00 | given: paper | +20.00 | +30.00 | +0.2000 | +0.3000 | 0.2482 |"
            in table)


def test_ddranking_codes_lrs_on_percentages_is_named_beside_ours():
    """DD-Ranking's code puts IOR and HLR in points into the formula: 60 / 40 / 90 % gives
    a = 0.5 * 20 - 0.5 * 30 = -5, (e^-5 - e^-1) / (e - e^-1) = -0.1537, near its floor -0.1565."""
    s = yardstick.scores(60.0, 40.0, 90.0)
    assert s["lrs_ddranking_code"] == pytest.approx(-0.1536509, abs=1e-7)
    assert s["lrs"] == pytest.approx(0.2481915, abs=1e-7)  # ours, of the fractions
    assert yardstick.lrs_ddranking_code(0.0, 100.0) == pytest.approx(-1 / E / (E - 1 / E), abs=1e-9)
    assert yardstick.lrs_ddranking_code(0.0, 100.0) == pytest.approx(-0.1565176, abs=1e-7)  # the floor
    assert yardstick.lrs_ddranking_code(30.0, 20.0) == pytest.approx((math.exp(5) - 1 / E) / (E - 1 / E))
    assert s["units"]["lrs"].startswith("LRS of the fractions") and s["units"]["ior_pp, hlr_pp"] == "percentage points"
    assert "ddranking 0.2.0's code" in s["units"]["lrs_ddranking_code"]
    assert yardstick.scores(60.0, 40.0, None)["lrs_ddranking_code"] is None
    table = yardstick.scores_markdown({"ConvNet": {"accuracy": 60.0, "random_real": 40.0, "whole_data": 90.0, **s}})
    assert "| LRS (of fractions) | LRS, DD-Ranking's code (of %) |" in table
    assert "| +0.2000 | +0.3000 | 0.2482 | -0.1537 |" in table


def test_whole_data_accuracy_needs_its_source():
    c = base.get_config()
    c.eval.whole_data_accuracy = 84.8
    with pytest.raises(ValueError, match="eval.whole_data_accuracy=84.8 needs its source"):
        config_check.validate(c)
    c.eval.whole_data_source = "paper Table 1"
    config_check.validate(c)
    c.eval.whole_data_accuracy = 184.8
    with pytest.raises(ValueError, match=r"percentage in \[0, 100\].*got 184.8"):
        config_check.validate(c)


def _tiny_dataset(name="toy"):
    rng = np.random.default_rng(0)
    y = np.arange(48) % 4
    x = rng.integers(0, 60, (48, 8, 8, 1)).astype(np.uint8)
    x[y == 0, :4] += 150
    x[y == 1, 4:] += 150
    x[y == 2] += 150
    return data.ArrayDataset(name=name, train_images=x[:32], train_labels=y[:32].astype(np.int32),
                             test_images=x[32:], test_labels=y[32:].astype(np.int32),
                             class_names=("a", "b", "c", "d"), mean=np.array([0.3], np.float32),
                             std=np.array([0.3], np.float32))


def _config(tmp_path):
    c = base.get_config()
    c.data.cache_dir = str(tmp_path / "cache")
    c.eval.archs = "ConvNetD2"
    c.eval.num_seeds, c.eval.epochs, c.eval.batch_size = 2, 1, 16
    return c


@pytest.fixture
def fake_evaluator(monkeypatch):
    """evaluate.evaluate_archs replaced by a recorder: accuracy = 10 x the training-set size."""
    calls = []

    def fake(images, labels, dataset, eval_cfg, *, archs, key, partition_factor):
        calls.append((len(labels), eval_cfg.epochs))
        return {a: {"mean": 10.0 * len(labels) % 100, "std": 0.5, "num_seeds": eval_cfg.num_seeds,
                    "num_train_images": len(labels)} for a in archs}

    monkeypatch.setattr(evaluate, "evaluate_archs", fake)
    return calls


def test_references_are_cached_and_a_changed_setting_recomputes(tmp_path, fake_evaluator):
    ds, c = _tiny_dataset(), _config(tmp_path)
    first, path, hit = references.random_real_accuracy(c, ds, "ConvNetD2", 2)
    assert not hit and fake_evaluator == [(8, 1)] and first["mean"] == 80.0
    assert os.path.dirname(path) == str(tmp_path / "cache" / "references")
    assert json.load(open(path))["key"]["protocol"]["epochs"] == 1
    again, path2, hit = references.random_real_accuracy(c, ds, "ConvNetD2", 2)
    assert hit and path2 == path and again == first and len(fake_evaluator) == 1  # no new training
    c.eval.epochs = 2  # another protocol: another entry, measured again
    _, path3, hit = references.random_real_accuracy(c, ds, "ConvNetD2", 2)
    assert not hit and path3 != path and fake_evaluator[-1] == (8, 2)
    _, path4, hit = references.random_real_accuracy(c, ds, "ConvNetD2", 3)  # another IPC
    assert not hit and path4 not in (path, path3) and fake_evaluator[-1] == (12, 2)
    other = _tiny_dataset("toy2")  # another dataset
    _, path5, hit = references.random_real_accuracy(c, other, "ConvNetD2", 3)
    assert not hit and path5 != path4
    # a file whose stored key does not match (e.g. edited) is not trusted
    entry = json.load(open(path4))
    entry["key"]["seed"] = 7
    json.dump(entry, open(path4, "w"))
    _, _, hit = references.random_real_accuracy(c, ds, "ConvNetD2", 3)
    assert not hit


def test_add_scores_with_a_measured_or_given_whole_data_accuracy(tmp_path, fake_evaluator):
    ds, c = _tiny_dataset(), _config(tmp_path)
    record = {"ipc": 1, "archs": {"ConvNetD2": {"mean": 65.0, "std": 2.0}}}
    references.add_scores(c, ds, record)
    s = record["scores"]["ConvNetD2"]
    # random: 4 images -> 40 %; whole: 32 images -> 320 % 100 = 20 %
    assert (s["random_real"], s["whole_data"]) == (40.0, 20.0) and fake_evaluator == [(4, 1), (32, 1)]
    assert s["ior_pp"] == pytest.approx(25.0) and s["hlr_pp"] == pytest.approx(-45.0)
    assert s["lrs"] == pytest.approx(yardstick.lrs(0.25, -0.45))
    assert s["whole_data_source"].startswith("measured here (cached: ")
    assert "random_reference" not in record  # eval.compare_random is off
    c.eval.whole_data_accuracy, c.eval.whole_data_source = 84.8, "paper Table 1"
    c.eval.compare_random = True
    record = {"ipc": 1, "archs": {"ConvNetD2": {"mean": 65.0, "std": 2.0}}}
    references.add_scores(c, ds, record)
    s = record["scores"]["ConvNetD2"]
    assert s["whole_data"] == 84.8 and s["whole_data_source"] == "given: paper Table 1"
    assert s["hlr"] == pytest.approx(0.198) and len(fake_evaluator) == 2  # both references cached
    assert record["random_reference"]["ConvNetD2"]["mean"] == 40.0


def test_whole_data_over_the_limit_is_not_trained(tmp_path, fake_evaluator):
    ds, c = _tiny_dataset(), _config(tmp_path)
    c.eval.whole_data_max_images = 10
    record = {"ipc": 1, "archs": {"ConvNetD2": {"mean": 65.0, "std": 2.0}}}
    references.add_scores(c, ds, record)
    s = record["scores"]["ConvNetD2"]
    assert s["whole_data"] is None and s["lrs"] is None and s["ior_pp"] == pytest.approx(25.0)
    assert "32 images, over eval.whole_data_max_images=10" in s["note"]
    assert fake_evaluator == [(4, 1)]
    assert "HLR and LRS need the whole-data accuracy" in results.results_markdown(
        {**record, "method": "idm", "dataset": "toy", "archs": {"ConvNetD2": {"mean": 65.0, "std": 2.0}}})


@pytest.mark.slow
def test_references_train_real_networks(tmp_path):
    ds, c = _tiny_dataset(), _config(tmp_path)
    c.eval.num_seeds = 1
    # 4 random images x 4 classes = one batch of 16, as each of the whole set's two batches: one compile
    record = {"ipc": 4, "archs": {"ConvNetD2": {"mean": 50.0, "std": 0.0}}}
    references.add_scores(c, ds, record)
    s = record["scores"]["ConvNetD2"]
    assert s["random_real_seeds"] == 1 and 0.0 <= s["random_real"] <= 100.0 and 0.0 <= s["whole_data"] <= 100.0
    cached = json.load(open(s["random_real_source"].split(": ", 1)[1]))["result"]
    assert cached["num_train_images"] == 16 and cached["mean"] == s["random_real"]


def test_a_set_with_nan_or_infinite_pixels_is_refused_naming_the_file_and_count():
    images = np.full((4, 8, 8, 1), 0.5, np.float32)
    images[0, 0, :3] = np.nan
    images[1, 2, 2] = np.inf
    images[2, 3, 3] = -np.inf
    arrays = {"images": images, "labels": np.arange(4, dtype=np.int32)}
    with pytest.raises(ValueError, match=r"synthetic set 'bad.npz': 5 of 256 values of 'images' are not finite "
                                         r"\(3 NaN, 2 infinite\)"):
        synthetic_file.synthetic_from_arrays(arrays, "bad.npz", _tiny_dataset())
    arrays = {"images_normalized": images, "labels": np.arange(4, dtype=np.int32)}
    with pytest.raises(ValueError, match="'images_normalized' are not finite"):
        synthetic_file.synthetic_from_arrays(arrays, "bad.npz", _tiny_dataset())


def test_every_non_finite_array_is_counted_and_the_refused_action_named():
    """One NaN in `images` and two infinite values in `images_normalized`: both are reported."""
    images = np.full((4, 8, 8, 1), 0.5, np.float32)
    normalized = np.zeros((4, 8, 8, 1), np.float32)
    images[0, 0, 0] = np.nan
    normalized[1, 1, 1] = np.inf
    normalized[2, 2, 2] = -np.inf
    arrays = {"images": images, "images_normalized": normalized, "labels": np.arange(4, dtype=np.int32)}
    with pytest.raises(ValueError) as e:
        synthetic_file.synthetic_from_arrays(arrays, "bad.npz", _tiny_dataset(), action="export")
    assert str(e.value) == ("synthetic set 'bad.npz': 1 of 256 values of 'images' are not finite (1 NaN, "
                            "0 infinite); 2 of 256 values of 'images_normalized' are not finite (0 NaN, "
                            "2 infinite); refusing to export it")


@pytest.mark.parametrize("key", ["mean", "std"])
def test_a_non_finite_mean_or_std_is_refused(key):
    arrays = {"images_normalized": np.zeros((4, 8, 8, 1), np.float32), "labels": np.arange(4, dtype=np.int32),
              "mean": np.asarray([0.5], np.float32), "std": np.asarray([0.25], np.float32)}
    arrays[key] = np.asarray([np.nan], np.float32)
    with pytest.raises(ValueError) as e:
        synthetic_file.synthetic_from_arrays(arrays, "bad.npz", _tiny_dataset(), action="evaluate")
    assert str(e.value) == (f"synthetic set 'bad.npz': 1 of 1 values of {key!r} are not finite (1 NaN, "
                            "0 infinite); refusing to evaluate it")


def test_publish_refuses_a_non_finite_set_naming_the_action(tmp_path):
    from idm_jax import publish
    npz = tmp_path / "synthetic.npz"
    images = np.zeros((10, 8, 8, 1), np.float32)
    images[3, 0, 0] = np.nan
    np.savez(npz, images_normalized=images, labels=np.arange(10, dtype=np.int32), mean=np.float32([0.5]),
             std=np.float32([0.25]), class_names=np.asarray([str(k) for k in range(10)]),
             partition_factor=np.int64(1), method=np.asarray("idm"), dataset=np.asarray("digits"))
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"1 of 640 values of 'images_normalized' are not finite \(1 NaN, "
                                         r"0 infinite\); refusing to publish it$"):
        publish.publish(str(tmp_path), "digits_ipc1_idm", str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()
