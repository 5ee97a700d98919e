"""Named ablation sweeps (cells resolve to their overrides; resumable cell by cell) and pre-trained pools."""

import json
import os
import time

import jax
import numpy as np
import pytest

from configs import cifar10, cifar100, quick
from idm_jax import cell_status, condense, config_check, data as data_lib, pool, sweep_table, sweeps
from helpers import tiny_config


def test_every_cell_of_every_sweep_is_a_valid_config():
    for base in (cifar10.get_config("10"), cifar100.get_config("10")):
        for name, sweep in sweep_table.SWEEPS.items():
            for cell, overrides in sweep["cells"].items():
                c = sweeps.cell_config(base, overrides, iterations=123)
                config_check.validate(c)
                assert c.idm.iterations == 123, (name, cell)
            assert set(sweep["paper"]) <= set(sweep["cells"]), name


def test_cells_resolve_to_the_intended_overrides():
    base = cifar100.get_config("10")
    t2 = sweep_table.SWEEPS["table2"]["cells"]
    dm = sweeps.cell_config(base, t2["DM"])
    assert (dm.method, dm.idm.use_queue, dm.idm.partition_factor, dm.idm.use_ce, dm.idm.lr_img) == \
        ("dm", False, 1, False, 1.0)
    sampling = sweeps.cell_config(base, t2["DM + model sampling"])
    assert (sampling.method, sampling.idm.use_queue, sampling.idm.partition_factor, sampling.idm.use_ce) == \
        ("idm", True, 1, False)
    reg = sweeps.cell_config(base, t2["DM + model sampling + regularization"])
    assert (reg.idm.use_queue, reg.idm.partition_factor, reg.idm.use_ce, reg.idm.ce_weight) == (True, 1, True, 0.1)
    full = sweeps.cell_config(base, t2["IDM (all three)"])
    assert full.to_dict() == base.to_dict()  # the preset itself
    assert base.idm.partition_factor == 2 and base.method == "idm"  # the base is not modified
    assert [sweeps.cell_config(base, o).idm.partition_factor
            for o in sweep_table.SWEEPS["table3"]["cells"].values()] == [1, 2, 3]
    assert [sweeps.cell_config(base, o).idm.ce_weight
            for o in sweep_table.SWEEPS["fig5"]["cells"].values()] == [0.0, 0.05, 0.1, 0.2, 0.5, 1.0]
    assert [sweeps.cell_config(base, o).idm.model_train_steps
            for o in sweep_table.SWEEPS["fig6"]["cells"].values()] == [1, 5, 10, 20, 50, 100]
    assert [sweeps.cell_config(base, o).idm.net_num
            for o in sweep_table.SWEEPS["fig7"]["cells"].values()] == [5, 10, 20, 50, 100, 200]
    e30 = sweeps.cell_config(base, sweep_table.SWEEPS["fig3"]["cells"]["DM, pool E=30"])
    assert (e30.method, e30.idm.use_queue, e30.idm.pool_epochs) == ("dm", False, 30)
    assert sweep_table.SWEEPS["table2"]["paper"]["IDM (all three)"] == [45.1, 0.1]


def test_bad_sweep_names_cells_and_keys_are_named():
    base = quick.get_config("1")
    with pytest.raises(ValueError, match="unknown sweep 'table9'"):
        sweep_table.get_sweep("table9")
    with pytest.raises(ValueError, match="sweep has no cell 'l=4'"):
        sweep_table.selected_cells(sweep_table.SWEEPS["table3"], "l=1,l=4")
    assert sweep_table.selected_cells(sweep_table.SWEEPS["table2"], "DM_model_sampling") == ["DM + model sampling"]
    with pytest.raises(ValueError, match="config has no field 'idm.qeue'"):
        sweeps.cell_config(base, {"idm.qeue": 3})
    dm = quick.get_config("1,dm")
    with pytest.raises(ValueError, match="sweeps start from the IDM preset"):
        sweeps.run_sweep(dm, "/nonexistent")
    bad = quick.get_config("1")
    bad.sweep.name = "fig7"
    bad.idm.net_init_num = 6  # N_max=5 then holds fewer than the initial nets
    with pytest.raises(ValueError, match="cell 'N_max=5'.*net_init_num"):
        sweeps.run_sweep(bad, "/nonexistent")


NO_DSA = {"eval.dsa": False}  # the evaluation's DSA is not what these tests are about


@pytest.mark.slow
def test_sweep_end_to_end_on_digits_and_a_rerun_skips_done_cells(tmp_path):
    c = tiny_config(iterations=None, sets=NO_DSA)  # quick's iterations
    c.sweep.name = "table2"
    c.sweep.iterations = 2
    c.sweep.cells = "DM,IDM (all three)"
    out = str(tmp_path)
    table = sweeps.run_sweep(c, out)
    for name in ("sweep.json", "sweep.md", "sweep.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert [r["cell"] for r in table["cells"]] == ["DM", "IDM (all three)"]
    assert not any(r["skipped"] for r in table["cells"]) and not table["complete"]
    assert [r["partition_factor"] for r in table["cells"]] == [1, 2]
    for r in table["cells"]:
        acc = r["archs"]["ConvNetD2"]
        assert len(acc["accuracies"]) == 2 and 0 <= acc["mean"] <= 100
    md = open(os.path.join(out, "sweep.md")).read()
    assert "| DM | method=dm |" in md and "29.7 ± 0.3" in md and "2 condensation iterations" in md
    # Rerun: both cells are read back, nothing is condensed or trained again.
    t = time.perf_counter()
    again = sweeps.run_sweep(c, out)
    assert all(r["skipped"] for r in again["cells"]) and time.perf_counter() - t < 20
    assert [r["archs"] for r in again["cells"]] == [r["archs"] for r in table["cells"]]
    # A larger budget is a different result: the cell runs again (resuming its checkpoint).
    done = json.load(open(os.path.join(out, "cells", "DM", "results.json")))
    assert done["iterations"] == 2 and cell_status.finished_results(os.path.join(out, "cells", "DM"), 3) is None


def _pool_config(tmp_path):
    c = tiny_config(iterations=None, sets=NO_DSA)  # quick's iterations
    c.method = "dm"
    c.idm.use_queue, c.idm.partition_factor, c.idm.use_ce = False, 1, False
    c.idm.pool_epochs, c.idm.pool_size = 1, 2
    c.data.cache_dir = str(tmp_path)
    config_check.validate(c)
    return c


def test_pre_trained_pool_is_built_once_cached_and_sampled(tmp_path, monkeypatch):
    ds = data_lib.load_dataset("digits")
    s = condense.settings_from_config(_pool_config(tmp_path), ds)
    assert (s.pool_epochs, s.pool_size, s.pool_cache_dir) == (1, 2, str(tmp_path))
    built = []

    def fake_build(ds, model_name, *, epochs, size, seed, **hparams):  # init only: no training here
        built.append((model_name, epochs, size, seed, hparams))
        return jax.vmap(lambda k: condense.make_init_fn(s)(k)[0])(jax.random.split(jax.random.PRNGKey(seed), size))

    monkeypatch.setattr(pool, "build_pool", fake_build)
    state = condense.init_state(s, ds, 0, "real")
    cached = os.listdir(tmp_path / "pools")
    assert len(cached) == 1 and "1ep_2nets" in cached[0] and len(built) == 1
    assert built[0][:4] == ("ConvNetD2", 1, 2, 0) and built[0][4]["batch_size"] == 16
    leaves = jax.tree.leaves(state.pool)
    assert all(leaf.shape[0] == 2 for leaf in leaves)
    assert not np.allclose(leaves[0][0], leaves[0][1])  # two differently initialised nets
    again = condense.init_state(s, ds, 0, "real")  # loaded from the cache, not built
    assert len(built) == 1
    for a, b in zip(leaves, jax.tree.leaves(again.pool)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The matching net of a step is one of the pool's members, drawn at random.
    picks = set()
    for k in range(6):
        _, nets, accs, _ = condense.matching_nets(s, state, jax.random.PRNGKey(k), condense.make_init_fn(s))
        first = np.asarray(jax.tree.leaves(nets[0])[0])
        picks |= {i for i in range(2) if np.array_equal(first, np.asarray(leaves[0][i]))}
        assert len(nets) == 1 and float(accs[0]) == 0.0
    assert picks == {0, 1}


@pytest.mark.slow
def test_pre_trained_pool_trains_on_real_data_and_the_step_runs(tmp_path):
    ds = data_lib.load_dataset("digits")
    s = condense.settings_from_config(_pool_config(tmp_path), ds)
    state = condense.init_state(s, ds, 0, "real")
    fresh = condense.make_init_fn(s)(jax.random.PRNGKey(0))[0]
    assert jax.tree.leaves(state.pool)[0].shape[0] == 2
    assert not np.allclose(jax.tree.leaves(state.pool)[0][0], jax.tree.leaves(fresh)[0])
    state, m = condense.make_step(s)(state, condense.device_data(ds))
    assert int(state.step) == 1 and np.isfinite(float(m["loss"])) and state.pool is not None


def test_pool_config_errors_are_named():
    c = quick.get_config("1")
    c.idm.pool_epochs = 10  # with the queue on
    with pytest.raises(ValueError, match="idm.pool_epochs=10.*needs idm.use_queue=False"):
        config_check.validate(c)
    c.idm.pool_epochs = -1
    with pytest.raises(ValueError, match="idm.pool_epochs must be an integer >= 0.*-1"):
        config_check.validate(c)
    with pytest.raises(ValueError, match="epochs >= 1 and size >= 1, got 0 and 3"):
        pool.load_or_build(data_lib.load_dataset("digits"), "ConvNetD2", epochs=0, size=3, seed=0,
                           lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=16)
