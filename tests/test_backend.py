"""backend.py: the one table of "auto" choices, per backend (the values each variant computes are
compared in test_condense.py and test_evaluate.py, on CPU with tiny shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import backend, config_check, models
from configs import quick


@pytest.mark.parametrize("platform, expected", [
    ("cpu", dict(conv="matmul", queue="map", seeds="map", loop="host", unroll=True)),
    ("gpu", dict(conv="xla", queue="map", seeds="map", loop="device", unroll=False)),
    ("tpu", dict(conv="xla", queue="map", seeds="map", loop="device", unroll=False)),
])
def test_auto_picks_the_variant_of_each_loop_per_backend(monkeypatch, platform, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert backend.on_cpu() == (platform == "cpu")
    got = dict(conv=backend.conv_impl("auto"), queue=backend.queue_train_impl("auto"),
               seeds=backend.seed_parallel("auto"), loop=backend.eval_loop("auto"),
               unroll=backend.unroll_loops())
    assert got == expected
    # An explicit choice is kept whatever the backend.
    assert backend.queue_train_impl("map") == "map" and backend.eval_loop("device") == "device"
    assert backend.seed_parallel("vmap") == "vmap" and backend.conv_impl("xla") == "xla"


def test_defaults_for_resolves_auto_as_on_another_platform_inside_the_block_only():
    native = backend.conv_impl("auto")
    with backend.defaults_for("gpu"):
        assert not backend.on_cpu() and not backend.unroll_loops()
        assert (backend.conv_impl("auto"), backend.eval_loop("auto")) == ("xla", "device")
        with backend.defaults_for("cpu"):  # nests; the inner block wins
            assert backend.conv_impl("auto") == "matmul" and backend.unroll_loops()
        assert backend.conv_impl("auto") == "xla"
    assert backend.conv_impl("auto") == native
    with pytest.raises(ValueError, match=r"unknown platform 'cuda'; valid: cpu, gpu, tpu"):
        with backend.defaults_for("cuda"):
            pass


def test_unknown_choices_name_the_value_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loop 'gpu'; valid: auto, device, host"):
        backend.eval_loop("gpu")
    with pytest.raises(ValueError, match=r"unknown seed_parallel 'pmap'; valid: auto, vmap, map"):
        backend.seed_parallel("pmap")
    with pytest.raises(ValueError, match=r"unknown conv_impl 'cudnn'"):
        models.get_model("ConvNet", 10, 3, conv_impl="cudnn")


def test_config_check_uses_the_same_lists():
    c = quick.get_config("1")
    c.idm.queue_train_impl = "pmap"
    with pytest.raises(ValueError, match=r"idm.queue_train_impl must be one of \('auto', 'vmap', 'map'\)"):
        config_check.validate(c)
    c = quick.get_config("1")
    c.eval.archs = "ConvNet,LeNet"
    with pytest.raises(ValueError, match=r"invalid config: eval.archs: unknown model 'LeNet'"):
        config_check.validate(c)


def test_cpu_memory_scheduler_flag_is_added_once_and_never_over_the_users_choice(monkeypatch):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)  # no GPU/TPU plugin
    env = {}
    assert backend.use_cpu_memory_scheduler(env) and env["XLA_FLAGS"] == backend.CPU_MEMORY_FLAG
    assert backend.use_cpu_memory_scheduler(env) and env["XLA_FLAGS"] == backend.CPU_MEMORY_FLAG  # once
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert backend.use_cpu_memory_scheduler(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + backend.CPU_MEMORY_FLAG
    users = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
    assert not backend.use_cpu_memory_scheduler(users)
    assert users["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    gpu = {"JAX_PLATFORMS": "cuda"}
    assert not backend.use_cpu_memory_scheduler(gpu) and "XLA_FLAGS" not in gpu
    # An accelerator plugin installed: left alone unless JAX_PLATFORMS forces the CPU.
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: name == "jax_cuda13_plugin")
    plugin = {}
    assert not backend.use_cpu_memory_scheduler(plugin) and "XLA_FLAGS" not in plugin
    forced = {"JAX_PLATFORMS": "cpu"}
    assert backend.use_cpu_memory_scheduler(forced) and forced["XLA_FLAGS"] == backend.CPU_MEMORY_FLAG


def test_sequenced_keeps_values_and_adds_the_dependency():
    value = {"x": jnp.arange(3.0), "key": jnp.array([7, 9], jnp.uint32)}
    out = jax.jit(backend.sequenced)(jnp.ones((2, 2)), value)
    np.testing.assert_array_equal(out["x"], value["x"])
    np.testing.assert_array_equal(out["key"], value["key"])
    assert out["key"].dtype == jnp.uint32
    # The result depends on `previous` (a NaN there reaches it): XLA cannot compute it earlier.
    poisoned = jax.jit(backend.sequenced)(jnp.array([jnp.nan]), {"x": jnp.arange(3.0)})
    assert np.isnan(np.asarray(poisoned["x"])).all()
