"""Configs: the release's per-IPC table, the DM preset, and errors before compute."""

import importlib
import os
import subprocess
import sys

import pytest

from configs import base
from idm_jax import config_check

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


def test_release_table_values():
    # ../shared/REFERENCE.md, "Per-setting values from the release's command list".
    c1, c10, c50 = _get("cifar10", "1"), _get("cifar10", "10"), _get("cifar10", "50")
    assert (c1.idm.batch_real, c1.idm.ce_weight, c1.idm.net_generate_interval) == (5000, 0.5, 5)
    assert (c10.idm.batch_real, c10.idm.ce_weight, c10.idm.net_generate_interval) == (256, 0.5, 30)
    assert (c50.idm.ce_weight, c50.idm.meter_reset_interval) == (0.1, 500)
    assert _get("cifar10").ipc == 10 and _get("cifar10").model == "ConvNet"
    c = _get("cifar100", "10")
    assert (c.idm.ce_weight, c.idm.model_train_steps) == (0.1, 50)
    t50 = _get("tinyimagenet", "50")
    assert (t50.model, t50.idm.ce_weight, t50.idm.model_train_steps, t50.idm.meter_reset_interval) == (
        "ConvNetD4", 0.8, 50, 1000)
    im = _get("imagenet_subset", "10")
    assert (im.model, im.data.image_size, im.idm.batch_real, im.idm.ce_weight, im.idm.net_num,
            im.idm.net_generate_interval, im.idm.batch_train) == ("ConvNetD6", 224, 128, 3.0, 50, 50, 128)
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
])
def test_bad_values_are_named(field, value, message):
    c = _get("cifar10", "10")
    section, _, leaf = field.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ValueError, match=message):
        config_check.validate(c)


def test_dm_method_without_preset_is_refused():
    c = _get("cifar10", "10")
    c.method = "dm"
    with pytest.raises(ValueError, match="method 'dm' needs idm.use_queue=False"):
        config_check.validate(c)


def test_config_argument_errors():
    with pytest.raises(ValueError, match="IPC must be >= 1, got 0"):
        base.parse_arg("0")
    with pytest.raises(ValueError, match="'idmx' is neither an IPC number nor a method"):
        base.parse_arg("10,idmx")
    assert base.parse_arg("") == (10, "idm") and base.parse_arg("1,dm") == (1, "dm")


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
