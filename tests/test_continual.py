"""Continual learning (GDumb, class-incremental): class orders, per-step memory, the mode end to end."""

import json
import os
import time

import numpy as np
import pytest

from configs import quick
from helpers import tiny_config
from idm_jax import continual, data as data_lib, presets


def test_class_orders_are_permutations_fixed_by_seed():
    orders = [continual.class_order(s, 100) for s in range(5)]
    for o in orders:
        np.testing.assert_array_equal(np.sort(o), np.arange(100))
    np.testing.assert_array_equal(continual.class_order(3, 100), orders[3])  # same seed, same order
    assert len({tuple(o) for o in orders}) == 5
    np.testing.assert_array_equal(orders[0], np.random.RandomState(0).permutation(100))  # as documented
    groups = continual.split_steps(orders[0], 5)
    assert [len(g) for g in groups] == [20] * 5
    np.testing.assert_array_equal(np.concatenate(groups), orders[0])
    with pytest.raises(ValueError, match="num_steps=3 must be >= 1 and divide the 100 classes"):
        continual.split_steps(orders[0], 3)


def test_option_errors_are_named_before_any_compute(tmp_path):
    c = quick.get_config("1")
    c.continual.methods = "idm,dsa"
    with pytest.raises(ValueError, match="continual.methods names unknown method 'dsa'"):
        continual.run_continual(c, str(tmp_path / "w"))
    c.continual.methods, c.continual.num_steps = "random", "five"
    with pytest.raises(ValueError, match="continual.num_steps must be comma-separated integers.*'five'"):
        continual.run_continual(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    assert presets.int_list("5, 10", "continual.num_steps") == [5, 10]
    assert presets.name_list(["dm", "random"], "continual.methods", presets.CONTINUAL_METHODS) == ["dm", "random"]


def test_class_subset_keeps_only_those_classes_relabelled_in_order():
    ds = data_lib.load_dataset("digits")
    sub = continual.class_subset(ds, [7, 2])
    assert sub.num_classes == 2 and sub.class_names == ("7", "2")
    assert len(sub.train_labels) == int(np.sum(np.isin(ds.train_labels, [7, 2])))
    np.testing.assert_array_equal(sub.train_images[sub.train_labels == 0], ds.train_images[ds.train_labels == 7])
    np.testing.assert_array_equal(sub.test_images[sub.test_labels == 1], ds.test_images[ds.test_labels == 2])


def test_new_class_memory_holds_the_budget_of_the_new_classes_only():
    ds = data_lib.load_dataset("digits")
    c = quick.get_config("1")
    c.continual.ipc = 3
    images, labels, factor = continual.new_class_memory("random", c, ds, np.array([4, 9]), seed=0)
    assert images.shape == (6, 16, 16, 1) and factor == 1 and images.dtype == np.float32
    np.testing.assert_array_equal(np.sort(labels), [4, 4, 4, 9, 9, 9])


def _continual_config(methods):
    return tiny_config(sets={"continual.methods": methods, "continual.num_steps": "2",
                             "continual.class_order_seeds": "0", "continual.ipc": 2, "continual.iterations": 2,
                             "eval.num_seeds": 1, "eval.dsa": False})


def _check_memories(out, workdir, methods):
    order = continual.class_order(0, 10)
    for m in methods:
        folder = os.path.join(workdir, "orders", f"{m}_2steps_order0")
        for t in range(2):
            record = json.load(open(os.path.join(folder, f"step{t}.json")))
            seen = set(order[:5 * (t + 1)].tolist())
            # Exactly the budget of every seen class, and no other class.
            assert record["memory_class_counts"] == {str(k): 2 for k in sorted(seen)}
            assert record["memory_images"] == 2 * len(seen) and record["num_seen"] == len(seen)
        r = out["results"]["2"][m]
        assert r["num_seen"] == [5, 10] and len(r["mean"]) == 2 and len(r["per_order"]) == 1
        assert all(0 <= a <= 100 for a in r["mean"])


def test_continual_random_end_to_end_on_digits_and_resume(tmp_path):
    c = _continual_config("random")
    workdir = str(tmp_path)
    out = continual.run_continual(c, workdir)
    for name in ("continual.json", "continual.md", "continual.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    _check_memories(out, workdir, ["random"])
    assert out["class_orders"]["0"] == continual.class_order(0, 10).tolist()
    assert out["paper"] is None  # the digits are not the paper's dataset
    t = time.perf_counter()
    again = continual.run_continual(c, workdir)  # every step is read back
    assert again["results"] == out["results"] and time.perf_counter() - t < 15


@pytest.mark.slow
def test_continual_idm_and_dm_end_to_end_on_digits(tmp_path):
    c = _continual_config("idm,dm")
    out = continual.run_continual(c, str(tmp_path))
    _check_memories(out, str(tmp_path), ["idm", "dm"])
    md = open(tmp_path / "continual.md").read()
    assert "| idm |" in md and "| dm |" in md and "#### 2 steps" in md


def test_paper_final_numbers_are_found_for_cifar100():
    paper = continual.paper_continual("tfds:cifar100")
    assert paper["steps"] == [5, 10]
    assert continual._paper_final(paper, "idm", 5) == 39.3 and continual._paper_final(paper, "random", 10) == 25.2
    assert continual._paper_final(paper, "dm", 2) is None
