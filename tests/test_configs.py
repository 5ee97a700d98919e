"""Configs: the release's per-IPC table, the DM preset, and errors before compute."""

import importlib
import os
import subprocess
import sys

import pytest

from configs import base
from idm_jax import config_check, presets
from idm_jax import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("cifar10", "cifar100", "tinyimagenet", "imagenet_subset", "mnist", "fashion_mnist", "quick")


def _get(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def _flat(c, prefix=""):
    out = {}
    for k, v in c.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("arg", [None, "1", "10", "50", "10,dm"])
def test_every_config_is_valid(name, arg):
    c = _get(name, arg)
    config_check.validate(c)
    assert c.ipc == (int(arg.split(",")[0]) if arg else (1 if name == "quick" else 10))


# The resolved values of every paper cell, pinned against docs/RELEASE.md (#data-and-normalization,
# #networks, #per-setting-table), so a future edit cannot drift silently. Columns:
# (model, eval archs, eval batch, image size (0 = native), normalization, init, batch_real,
#  batch_train, net_num, net_generate_interval, model_train_steps, ce_weight,
#  meter_reset_interval (the release's eval_interval)).
PAPER_CELLS = {
    ("cifar10", 1): ("ConvNet", "ConvNet", 256, 0, "cifar10", "real", 5000, 256, 100, 5, 10, 0.5, 100),
    ("cifar10", 10): ("ConvNet", "ConvNet", 256, 0, "cifar10", "real", 256, 256, 100, 30, 10, 0.5, 100),
    ("cifar10", 50): ("ConvNet", "ConvNet", 256, 0, "cifar10", "real", 256, 256, 100, 30, 10, 0.1, 500),
    ("cifar100", 1): ("ConvNet", "ConvNet", 256, 0, "cifar100", "real", 5000, 256, 100, 5, 10, 0.5, 100),
    ("cifar100", 10): ("ConvNet", "ConvNet", 256, 0, "cifar100", "real", 256, 256, 100, 30, 50, 0.1, 100),
    ("cifar100", 50): ("ConvNet", "ConvNet", 256, 0, "cifar100", "real", 256, 256, 100, 30, 10, 0.1, 500),
    ("tinyimagenet", 1): ("ConvNet", "ConvNet", 256, 0, "tinyimagenet", "real_whole", 256, 256, 100, 30, 10,
                          0.5, 100),
    ("tinyimagenet", 10): ("ConvNet", "ConvNet", 256, 0, "tinyimagenet", "real_whole", 256, 256, 100, 30, 10,
                           0.5, 500),
    ("tinyimagenet", 50): ("ConvNet", "ConvNet", 256, 0, "tinyimagenet", "real_whole", 256, 256, 100, 30, 50,
                           0.8, 1000),
    # ImageNet subset: 224 centre crop, ConvNet-6 both ways, eval batch 128, meters never reset (0).
    ("imagenet_subset", 1): ("ConvNetD6", "ConvNetD6", 128, 224, "imagenet", "real", 128, 128, 50, 50, 10, 3.0, 0),
    ("imagenet_subset", 10): ("ConvNetD6", "ConvNetD6", 128, 224, "imagenet", "real", 128, 128, 50, 50, 10, 3.0,
                              0),
    ("imagenet_subset", 50): ("ConvNetD6", "ConvNetD6", 128, 224, "imagenet", "real", 128, 128, 100, 50, 10, 3.0,
                              0),
}


def _cell(c):
    return (c.model, c.eval.archs, c.eval.batch_size, c.data.image_size, c.data.normalization, c.idm.init,
            c.idm.batch_real, c.idm.batch_train, c.idm.net_num, c.idm.net_generate_interval,
            c.idm.model_train_steps, c.idm.ce_weight, c.idm.meter_reset_interval)


# Partition l per cell: 2 (the release's --aug) except ImageNet subset IPC 50, whose command has
# no --aug (docs/RELEASE.md#per-setting-table, "ImageNet subset IPC 50"): l = 1, one whole real image
# per synthetic image ("real" at l = 1), evaluation on the unexpanded 5,000 images.
NO_AUG_CELLS = {("imagenet_subset", 50)}
# The release's CIFAR-10 IPC-1 branch without --aug (IDM_cifar10.py, `ipc == 1 and not aug`):
# (keep_lowest_ce_real, ce_only_misclassified), acting only at l = 1.
L1_BRANCH_CELLS = {("cifar10", 1): (2560, True)}


@pytest.mark.parametrize("name, ipc", sorted(PAPER_CELLS))
def test_paper_cells_resolve_to_the_release_settings(name, ipc):
    c = _get(name, str(ipc))
    assert _cell(c) == PAPER_CELLS[(name, ipc)]
    assert c.idm.partition_factor == (1 if (name, ipc) in NO_AUG_CELLS else 2)
    assert (c.idm.keep_lowest_ce_real, c.idm.ce_only_misclassified) == L1_BRANCH_CELLS.get((name, ipc), (0, False))
    # Release defaults shared by every cell (the ImageNet quirks other than its meters are options).
    assert (c.idm.net_init_num, c.idm.fetch_net_num, c.idm.train_net_num, c.idm.lr_img, c.idm.momentum_img,
            c.idm.iterations, c.idm.embedding, c.idm.update_mode, c.idm.unnormalized,
            c.data.class_sampling, c.data.train_sampling) == (
        3, 2, 1, 0.2, 0.5, 20000, "last_block", "per_class", False, "random", "random")
    assert (c.eval.epochs, c.eval.num_seeds, c.eval.lr, c.eval.schedule) == (1000, 5, 0.01, "release")
    # One condensation by default; ",paper" is the paper's 5 x 5 networks (--num_exp 5 --num_eval 5).
    assert c.runs == 1
    paper = _get(name, f"{ipc},paper")
    assert (paper.runs, paper.eval.num_seeds) == (5, 5)
    assert {k for k, v in _flat(paper).items() if _flat(c)[k] != v} == {"runs"}


def test_imagenet_ipc50_evaluates_the_unexpanded_set():
    from idm_jax import condense  # pylint: disable=g-import-not-at-top
    ds = data_lib.load_dataset("digits")
    c = _get("imagenet_subset", "50")
    s = condense.settings_from_config(c, ds)
    # The run evaluates with s.loss.partition_factor (runner._evaluate): 1 -> ipc images per class.
    assert s.loss.partition_factor == 1 and s.ipc * s.loss.partition_factor ** 2 == 50
    assert condense.settings_from_config(_get("imagenet_subset", "10"), ds).loss.partition_factor == 2


def test_cifar10_ipc1_low_ce_branch_acts_only_without_partition():
    from idm_jax import condense  # pylint: disable=g-import-not-at-top
    ds = data_lib.load_dataset("digits")  # ~140 images per class: batch_real 5000 clips to them
    c = _get("cifar10", "1")
    c.model = "ConvNetD2"
    s = condense.settings_from_config(c, ds)
    assert (s.loss.keep_lowest_ce_real, s.loss.ce_only_misclassified) == (0, False)  # l = 2: inert
    c.idm.partition_factor = 1
    c.idm.keep_lowest_ce_real = 100
    s = condense.settings_from_config(c, ds)
    assert (s.loss.keep_lowest_ce_real, s.loss.ce_only_misclassified) == (100, True)
    c.idm.keep_lowest_ce_real = 2560  # more than the clipped batch keeps all of it
    assert condense.settings_from_config(c, ds).loss.keep_lowest_ce_real == s.batch_real


def test_normalization_statistics_per_dataset():
    # docs/RELEASE.md#data-and-normalization: CIFAR-100 has its own statistics (not CIFAR-10's).
    stats = data_lib.NORMALIZATION
    assert stats["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert stats["cifar100"] == ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762))
    assert stats["tinyimagenet"] == stats["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert stats["mnist"] == ((0.1307,), (0.3081,)) and stats["fashion_mnist"] == ((0.2861,), (0.3530,))
    assert _get("cifar100").data.normalization == "cifar100"


def test_release_table_values():
    c10 = _get("cifar10", "10")
    assert _get("cifar10").ipc == 10 and _get("cifar10").model == "ConvNet"
    # Release defaults everywhere else.
    assert (c10.idm.net_num, c10.idm.net_init_num, c10.idm.fetch_net_num, c10.idm.model_train_steps,
            c10.idm.lr_img, c10.idm.momentum_img, c10.idm.partition_factor,
            c10.idm.iterations) == (100, 3, 2, 10, 0.2, 0.5, 2, 20000)


def test_dm_and_idm_presets_differ_only_where_they_should():
    idm, dm = _flat(_get("cifar10", "10")), _flat(_get("cifar10", "10,dm"))
    changed = {k for k in idm if idm[k] != dm[k]}
    assert changed == {"method", "idm.use_queue", "idm.partition_factor", "idm.use_ce",
                       "idm.ce_weight", "idm.lr_img", "idm.update_mode"}
    assert (dm["idm.lr_img"], dm["idm.partition_factor"], dm["idm.update_mode"]) == (1.0, 1, "joint")
    # IPC 1: DM keeps its 256 real images per class; IDM uses 5000.
    assert _get("cifar10", "1,dm").idm.batch_real == 256


@pytest.mark.parametrize("field, value, message", [
    ("ipc", 0, "ipc must be an integer >= 1, got 0"),
    ("model", "ConvNet7", "model 'ConvNet7' is unknown"),
    ("idm.partition_factor", 0, "idm.partition_factor must be an integer >= 1, got 0"),
    ("idm.update_mode", "batched", "idm.update_mode must be one of .* got 'batched'"),
    ("idm.dsa_strategy", "color_blur", "blur"),
    ("idm.fetch_net_num", 9, r"idm.fetch_net_num \(9\) exceeds"),
    ("eval.archs", "ConvNet,ResNet50", "unknown model 'ResNet50'"),
    ("idm.lr_img", -1.0, "idm.lr_img must be > 0, got -1.0"),
    ("idm.init", "reals", "idm.init must be one of .* got 'reals'"),
    ("idm.embedding", "pooled", "idm.embedding must be one of .* got 'pooled'"),
    ("idm.init", "tiled", "idm.init must be one of .*'real_tiled'.* got 'tiled'"),
    ("idm.keep_lowest_ce_real", -5, "idm.keep_lowest_ce_real must be an integer >= 0 .* got -5"),
    ("data.class_sampling", "sorted", "data.class_sampling must be one of .* got 'sorted'"),
    ("data.train_sampling", "epochs", "data.train_sampling must be one of .* got 'epochs'"),
    # Every mode's section is checked here too, not by the mode.
    ("continual.methods", "idm,dsa", "continual.methods names unknown method 'dsa'"),
    ("continual.num_steps", "five", "continual.num_steps must be comma-separated integers, got 'five'"),
    ("continual.num_steps", "5,0", "continual.num_steps must all be >= 1, got '5,0'"),
    ("continual.class_order_seeds", "", "continual.class_order_seeds is empty"),
    ("continual.ipc", 0, "continual.ipc must be an integer >= 1, got 0"),
    ("continual.iterations", -1, r"continual.iterations must be an integer >= 0 \(0 = idm.iterations\), got -1"),
    ("consistency.max_k", 0, "consistency.max_k must be an integer >= 1, got 0"),
    ("consistency.sets", " ", "consistency.sets must name a sweep"),
    ("sweep.iterations", -5, "sweep.iterations must be an integer >= 0 .* got -5"),
    ("sweep.name", "", "sweep.name must name a sweep"),
    ("sweep.name", "table9", "sweep.name: unknown sweep 'table9'; valid: table2, table3, fig5"),
    ("consistency.sets", "fig9", "consistency.sets: unknown sweep 'fig9'; valid: table2"),
    ("table1.cells", "cifar10:0", "table1.cells: bad cell 'cifar10:0'; expected <config file name>:<ipc>"),
    ("table1.methods", "idm,kip", "table1.methods: kip; expected some of random,dm,idm"),
    ("table1.order", "cifar10:10:kip", "table1.order: 'cifar10:10:kip' is not among the cells to run"),
    ("table1.pace", "idm=fast", "table1.pace: bad entry 'idm=fast'"),
    ("baseline.method", "kcenter", "baseline.method must be one of .*'whole'.* got 'kcenter'"),
    ("baseline.train_epochs", 0, "baseline.train_epochs must be an integer >= 1, got 0"),
])
def test_bad_values_are_named(field, value, message):
    c = _get("cifar10", "10")
    section, _, leaf = field.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ValueError, match=message):
        config_check.validate(c)



@pytest.mark.parametrize("first, later", [
    (("mesh_devices", -1), ("idm.iterations", 0)),  # run fields before idm.*
    (("idm.real_chunk_size", 0), ("idm.update_mode", "batched")),  # idm numbers before idm choices
    (("idm.ce_weight", -1.0), ("idm.fetch_net_num", 9)),  # idm choices before the queue
    (("idm.pool_epochs", -1), ("idm.dsa_strategy", "color_blur")),  # the pool before DSA
    (("idm.dsa_strategy", "color_blur"), ("data.resize", "squash")),  # idm.* before data.*
    (("data.train_sampling", "epochs"), ("eval.loop", "python")),  # data before eval
    (("eval.schedule", "cosine"), ("log_every", 0)),  # eval before the cadences
])
def test_the_first_bad_value_in_section_order_is_the_one_named(first, later):
    c = _get("cifar10", "10")
    for field, value in (later, first):
        section, _, leaf = field.rpartition(".")
        (c[section] if section else c)[leaf] = value
    with pytest.raises(ValueError, match=f"invalid config: .*{first[0]}"):
        config_check.validate(c)

def test_dm_method_without_preset_is_refused():
    c = _get("cifar10", "10")
    c.method = "dm"
    with pytest.raises(ValueError, match="method 'dm' needs idm.use_queue=False"):
        config_check.validate(c)


def test_config_argument_errors():
    with pytest.raises(ValueError, match="IPC must be >= 1, got 0"):
        base.parse_arg("0")
    with pytest.raises(ValueError, match="'idmx' is neither an IPC number, a method .* nor 'paper'"):
        base.parse_arg("10,idmx")
    assert base.parse_arg("") == (10, "idm", False) and base.parse_arg("1,dm") == (1, "dm", False)
    assert base.parse_arg("10,paper") == (10, "idm", True) and base.parse_arg("paper,1,dm") == (1, "dm", True)


def test_keep_lowest_ce_real_beyond_the_batch_is_refused_at_l1():
    c = _get("cifar10", "1")
    config_check.validate(c)  # 2560 of 5000
    c.idm.partition_factor, c.idm.batch_real = 1, 256
    with pytest.raises(ValueError, match=r"idm.keep_lowest_ce_real \(2560\) exceeds idm.batch_real \(256\)"):
        config_check.validate(c)
    # The DM preset drops the IDM-only branch (its batch is 256).
    dm = _get("cifar10", "1,dm")
    config_check.validate(dm)
    assert (dm.idm.keep_lowest_ce_real, dm.idm.ce_only_misclassified) == (0, False)


def _main(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_rejects_typo_and_bad_value_before_compute(tmp_path):
    typo = _main("--config=configs/quick.py", f"--workdir={tmp_path}/a", "--config.idm.lr_imgg=1")
    assert typo.returncode != 0 and "lr_imgg" in typo.stderr
    assert "Traceback" not in typo.stderr
    bad = _main("--config=configs/quick.py", f"--workdir={tmp_path}/b", "--config.ipc=0")
    assert bad.returncode == 2 and "ipc must be an integer >= 1, got 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    arg = _main("--config=configs/quick.py:0", f"--workdir={tmp_path}/d")
    assert arg.returncode == 2 and "IPC must be >= 1, got 0" in arg.stderr
    assert "Traceback" not in arg.stderr
    missing = _main("--config=configs/quick.py", f"--workdir={tmp_path}/c",
                    "--config.data.source=/nonexistent/cifar.tar.gz")
    assert missing.returncode == 2 and "/nonexistent/cifar.tar.gz" in missing.stderr
    assert not os.path.exists(tmp_path / "c" / "checkpoints")


def test_config_arguments_are_checked_in_our_words_before_absl():
    import main  # pylint: disable=g-import-not-at-top
    ok = ["main.py", "--config=configs/quick.py:1", "--config.idm.lr_img=0.1", "--workdir=w"]
    assert main.config_arg_problem(ok) is None
    assert main.config_arg_problem(["main.py", "--config", "configs/quick.py:0"]) == (
        "--config=configs/quick.py:0: IPC must be >= 1, got 0 (config argument '0')")
    assert main.config_arg_problem(["main.py", "--config=configs/quick.py", "--config.idm.lr_imgg=1"]) == (
        "--config.idm.lr_imgg: idm has no field 'lr_imgg'; did you mean 'lr_img'?")
    assert main.config_arg_problem(["main.py", "--config=configs/quick.py", "--config.sweeps.x=1"]).startswith(
        "--config.sweeps.x: the config has no field 'sweeps'")
    assert main.config_arg_problem(["main.py", "--config=configs/none.py"]) == "config file 'configs/none.py' not found"


def test_zero_iterations_in_a_mode_section_means_idm_iterations():
    c = _get("quick", "1")
    c.idm.iterations = 7
    assert presets.section_iterations(c, "continual") == presets.section_iterations(c, "sweep") == 7
    c.continual.iterations = 3
    assert (presets.section_iterations(c, "continual"), presets.section_iterations(c, "sweep")) == (3, 7)


def test_benchmarks_take_config_overrides_as_main_py_does():
    from benchmarks import common

    argv, overrides = common.split_config_overrides(
        ["--ipc=10", "--config.idm.class_batch=3", "--steps=2", "--config.eval.at_end=false",
         "--config.idm.lr_img=2", "--config.data.source=digits"])
    assert argv == ["--ipc=10", "--steps=2"] and len(overrides) == 4
    c = _get("cifar10", "10")
    common.apply_config_overrides(c, overrides)
    # Typed by the field, as absl types main.py's: an int, a bool, a float from "2", a string.
    assert (c.idm.class_batch, c.eval.at_end, c.idm.lr_img, c.data.source) == (3, False, 2.0, "digits")
    assert isinstance(c.idm.lr_img, float)
    with pytest.raises(SystemExit, match="--config.idm.class_bach: idm has no field 'class_bach'; "
                                         "did you mean 'class_batch'"):
        common.apply_config_overrides(c, ["--config.idm.class_bach=1"])
    with pytest.raises(SystemExit, match="--config.idm.class_batch=x: invalid literal for int"):
        common.apply_config_overrides(c, ["--config.idm.class_batch=x"])
    with pytest.raises(SystemExit, match="--config.idm.class_batch: expected --config.idm.class_batch=<value>"):
        common.split_config_overrides(["--config.idm.class_batch"])
    assert c.idm.class_batch == 3


def test_release_defaults_are_written_once_for_configs_and_signatures():
    import inspect

    from idm_jax import defaults, evaluate, loss, trainer

    c = base.get_config()
    ev = {f: c.eval[f] for f in ("num_seeds", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                                 "schedule")}
    assert ev == {"num_seeds": 5, "epochs": 1000, "batch_size": 256, "lr": 0.01, "momentum": 0.9,
                  "weight_decay": 5e-4, "schedule": "release"}  # the release's
    for fn in (trainer.train_networks, evaluate.train_and_evaluate):
        params = inspect.signature(fn).parameters
        assert {f: params[f].default for f in ev} == ev, fn.__name__
        assert params["dsa_strategy"].default == c.idm.dsa_strategy == defaults.DSA_STRATEGY
    assert inspect.signature(evaluate.train_and_evaluate).parameters["test_batch_size"].default == \
        c.eval.test_batch_size == 1000
    opts = loss.LossOptions()  # idm_loss's documented default options: the IDM config's
    assert (opts.partition_factor, opts.ce_weight, opts.real_chunk_size, opts.dsa_strategy) == (
        c.idm.partition_factor, c.idm.ce_weight, c.idm.real_chunk_size, c.idm.dsa_strategy) == (
        2, 0.5, 1024, "color_crop_cutout_flip_scale_rotate")
