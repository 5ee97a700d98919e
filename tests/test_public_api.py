"""The library face: `import idm_jax` exports, the docs/LIBRARY.md example runs as written, and the
public idm_loss is what the condensation step differentiates (value and gradient)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import idm_jax
from configs import quick
from idm_jax import condense
from idm_jax import data as data_lib
from idm_jax import loss as loss_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_public_names_resolve_to_the_modules_objects():
    from idm_jax import augment, evaluate, models, queue, runner  # pylint: disable=g-import-not-at-top
    assert idm_jax.idm_loss is loss_lib.idm_loss and idm_jax.LossOptions is loss_lib.LossOptions
    assert idm_jax.get_model is models.get_model and idm_jax.dsa is augment.dsa
    assert idm_jax.partition_expand is augment.partition_expand and idm_jax.ModelQueue is queue.ModelQueue
    assert idm_jax.train_and_evaluate is evaluate.train_and_evaluate
    assert idm_jax.run_condensation is runner.run_condensation
    assert set(idm_jax.__all__) <= set(dir(idm_jax))
    for name in idm_jax.__all__:
        assert getattr(idm_jax, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'idm_lsos'"):
        idm_jax.idm_lsos  # pylint: disable=pointless-statement


def test_library_page_loss_example_runs_as_written():
    page = open(os.path.join(ROOT, "docs", "LIBRARY.md")).read()  # linked from the README
    assert "docs/LIBRARY.md" in open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert "from idm_jax import" in code
    namespace = {}
    exec(compile(code, "docs/LIBRARY.md", "exec"), namespace)  # pylint: disable=exec-used
    assert np.isfinite(float(namespace["value"])) and float(namespace["value"]) > 0
    assert namespace["grad"].shape == (10, 2, 32, 32, 3)


def _linear_apply(params, x):
    flat = x.reshape(x.shape[0], -1)
    return flat @ params["w"], flat @ params["v"]


def test_accuracy_given_as_a_fraction_is_refused_unless_said_so():
    params = {"w": jnp.eye(12)[:, :4], "v": jnp.ones((12, 3)) / 12}
    syn, real = jnp.ones((3, 1, 2, 2, 3)), jnp.zeros((3, 5, 2, 2, 3))
    labels = jnp.arange(3)
    opts = loss_lib.LossOptions(partition_factor=1, dsa_strategy="")
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="0.5 looks like a fraction"):
        loss_lib.idm_loss(params, _linear_apply, syn, labels, real, labels, key, 0.5, opts)
    with pytest.raises(ValueError, match=r"must lie in \[0, 100\]"):
        loss_lib.idm_loss(params, _linear_apply, syn, labels, real, labels, key, 150.0, opts)
    percent, _ = loss_lib.idm_loss(params, _linear_apply, syn, labels, real, labels, key, 50.0, opts)
    fraction, _ = loss_lib.idm_loss(params, _linear_apply, syn, labels, real, labels, key, 0.5, opts,
                                    accuracy_scale="fraction")
    assert float(fraction) == pytest.approx(float(percent), rel=1e-6)


def test_idm_loss_is_what_the_step_differentiates():
    """One joint step from zero momentum moves the images by -lr * gradient, and reports the
    class-mean loss: both must equal idm_loss on the same net, real batches and DSA key."""
    ds = data_lib.load_dataset("digits")
    c = quick.get_config("1")
    c.idm.batch_real, c.idm.update_mode, c.idm.lr_img = 8, "joint", 0.1
    s = condense.settings_from_config(c, ds)
    data = condense.device_data(ds)
    syn = condense.init_synset(s, ds, 0, "real")
    params = condense.make_init_fn(s)(jax.random.PRNGKey(3))[0]
    apply_fn = condense.make_apply_fn(s.model)
    key, acc = jax.random.PRNGKey(7), jnp.float32(40.0)
    new, metrics = jax.jit(lambda syn: condense.update_synset(s, syn, params, acc, key, data, apply_fn))(syn)

    # The same draws by hand: the step splits its key into real-sampling and DSA keys.
    k_real, k_dsa = jax.random.split(key)
    real_keys = jax.random.split(k_real, s.num_classes)
    idx = jnp.stack([data_lib.sample_class_batch(real_keys[k], data.class_table, data.class_counts, k,
                                                 s.batch_real) for k in range(s.num_classes)])
    real = data_lib.normalize(data.images[idx], data.mean, data.std)
    value, grad = jax.jit(jax.value_and_grad(lambda x: loss_lib.idm_loss(
        params, apply_fn, x, syn.labels, real, syn.labels, k_dsa, acc, s.loss)[0]))(syn.images)
    assert float(metrics["loss"]) == pytest.approx(float(value) / s.num_classes, rel=1e-5)
    step_grad = (np.asarray(syn.images) - np.asarray(new.images)) / s.lr_img
    np.testing.assert_allclose(step_grad, grad, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(grad).max()) > 1e-4
