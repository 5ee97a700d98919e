"""The IDM/DM losses, the closed-form per-class momentum update and the ModelQueue.

Most tests use a linear "network" (embedding = flattened image, logits from a
fixed matrix) so values can be computed by hand and nothing heavy compiles.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import augment
from idm_jax import condense
from idm_jax import loss as loss_lib
from idm_jax import queue as queue_lib

H, W, C, K = 4, 4, 1, 3


def linear_apply(params, x):
    """Embedding = flattened image; logits = embedding @ params."""
    emb = x.reshape(x.shape[0], -1)
    return emb, emb @ params


PARAMS = jnp.asarray(np.random.default_rng(0).normal(size=(H * W * C, K)), jnp.float32)
NO_AUG = loss_lib.LossOptions(partition_factor=1, dsa_strategy="", ce_weight=0.5)


def _images(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_mmd_matches_hand_computation():
    syn = _images(1, (K, 2, H, W, C))
    real = _images(2, (K, 5, H, W, C))
    labels = jnp.arange(K)
    opts = loss_lib.LossOptions(partition_factor=1, dsa_strategy="", use_ce=False)
    total, parts = loss_lib.idm_loss(PARAMS, linear_apply, syn, labels, real, labels,
                                     jax.random.PRNGKey(0), 0.0, opts)
    s, r = np.asarray(syn).reshape(K, 2, -1), np.asarray(real).reshape(K, 5, -1)
    expected = ((r.mean(1) - s.mean(1)) ** 2).sum(-1)
    np.testing.assert_allclose(parts["mmd"], expected, rtol=1e-5)
    np.testing.assert_allclose(total, expected.sum(), rtol=1e-5)


def test_ce_term_is_weight_times_accuracy_percent_times_ce():
    syn = _images(3, (K, 2, H, W, C))
    real = _images(4, (K, 6, H, W, C))
    labels = jnp.arange(K)
    acc = 40.0  # percent, as the release's meter reports it
    total, parts = loss_lib.idm_loss(PARAMS, linear_apply, syn, labels, real, labels,
                                     jax.random.PRNGKey(0), acc, NO_AUG)
    logits = np.asarray(syn).reshape(K, 2, -1) @ np.asarray(PARAMS)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = np.array([-logp[k, :, k].mean() for k in range(K)])
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(total, np.sum(parts["mmd"]) + 0.5 * acc * ce.sum(), rtol=1e-5)


def test_loss_is_zero_when_synthetic_equals_real_with_dsa_and_partition():
    """Real batch = the expanded synthetic images: same Siamese DSA -> same mean embedding."""
    syn = _images(5, (K, 2, 8, 8, C))
    real = jax.vmap(lambda s: augment.partition_expand(s, None, 2)[0])(syn)
    labels = jnp.arange(K)
    opts = loss_lib.LossOptions(partition_factor=2, dsa_strategy="crop_flip_scale_rotate")
    apply_fn = lambda p, x: (x.reshape(x.shape[0], -1), jnp.zeros((x.shape[0], K)))
    total, parts = loss_lib.idm_loss(None, apply_fn, syn, labels, real, labels,
                                     jax.random.PRNGKey(7), 0.0, opts)
    np.testing.assert_allclose(parts["mmd"], 0.0, atol=1e-10)
    assert float(total) == pytest.approx(0.0, abs=1e-10)


def test_gradient_wrt_synthetic_images_is_finite_and_nonzero():
    syn = _images(6, (K, 2, 8, 8, C))
    real = _images(7, (K, 4, 8, 8, C))
    labels = jnp.arange(K)
    opts = loss_lib.LossOptions(partition_factor=2, ce_weight=0.5)
    params = jnp.asarray(np.random.default_rng(1).normal(size=(64, K)), jnp.float32)
    grad = jax.grad(lambda s: loss_lib.idm_loss(params, linear_apply, s, labels, real, labels,
                                                jax.random.PRNGKey(3), 50.0, opts)[0])(syn)
    assert grad.shape == syn.shape
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert bool(jnp.all(jnp.abs(grad).sum(axis=(1, 2, 3, 4)) > 0))  # every class moves


def test_dm_loss_equals_idm_without_partition_and_ce():
    syn = _images(8, (K, 2, H, W, C))
    real = _images(9, (K, 3, H, W, C))
    labels = jnp.arange(K)
    key = jax.random.PRNGKey(11)
    dm, _ = loss_lib.dm_loss(PARAMS, linear_apply, syn, labels, real, labels, key)
    idm, parts = loss_lib.idm_loss(
        PARAMS, linear_apply, syn, labels, real, labels, key, 77.0,
        loss_lib.LossOptions(partition_factor=1, use_ce=False))
    np.testing.assert_allclose(dm, idm, rtol=1e-6)
    np.testing.assert_allclose(dm, np.sum(parts["mmd"]), rtol=1e-6)


def test_real_chunking_gives_the_same_mean_embedding():
    real = _images(10, (12, 8, 8, C))
    key = jax.random.PRNGKey(2)
    emb = lambda p, x: (x.reshape(x.shape[0], -1), None)
    whole = loss_lib.mean_embedding(None, emb, real, key, loss_lib.LossOptions(real_chunk_size=12))
    chunked = loss_lib.mean_embedding(None, emb, real, key, loss_lib.LossOptions(real_chunk_size=5))
    np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-6)
    assert loss_lib.largest_divisor_at_most(5000, 1024) == 1000
    assert loss_lib.largest_divisor_at_most(7, 4) == 1


def test_loss_input_errors_name_the_problem():
    syn = _images(1, (K, 2, H, W, C))
    with pytest.raises(ValueError, match="partition_factor must be >= 1, got 0"):
        loss_lib.LossOptions(partition_factor=0)
    with pytest.raises(ValueError, match="same classes"):
        loss_lib.idm_loss(PARAMS, linear_apply, syn, jnp.arange(K), syn, jnp.arange(K) + 1,
                          jax.random.PRNGKey(0), 0.0, NO_AUG)
    with pytest.raises(ValueError, match=r"classes, n, H, W, C"):
        loss_lib.idm_loss(PARAMS, linear_apply, syn[0], jnp.arange(K), syn, jnp.arange(K),
                          jax.random.PRNGKey(0), 0.0, NO_AUG)


def test_per_class_closed_form_equals_sequential_torch_sgd():
    """The release: for each class c in order, grad of loss_c, one torch-SGD step on the
    whole tensor with one shared momentum buffer. Our vmapped closed form must agree."""
    lr, mu, classes = 0.2, 0.5, 4
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(classes, 3)).astype(np.float32)
    target = rng.normal(size=(classes, 3)).astype(np.float32)
    buf0 = rng.normal(size=(classes, 3)).astype(np.float32)  # momentum from earlier iterations
    # A nonlinear gradient, so where each class is when its step comes matters.
    grad_c = lambda xc, c: 2.0 * (xc - target_j[c]) * (1.0 + xc ** 2)

    target_j = jnp.asarray(target)
    x, buf = x0.copy(), buf0.copy()
    for c in range(classes):  # reference: sequential steps on the whole tensor
        g = np.zeros_like(x)
        g[c] = grad_c(x[c], c)
        buf = mu * buf + g
        x = x - lr * buf

    def one(xc, bc, c):
        grad_fn = lambda z: (grad_c(z, c), None)  # jnp-traceable: target[c] via jnp indexing
        return condense.momentum_sgd_update(xc, bc, grad_fn, lr, mu, c, classes - 1 - c)[:2]

    new_x, new_buf = jax.vmap(one)(jnp.asarray(x0), jnp.asarray(buf0), jnp.arange(classes))
    np.testing.assert_allclose(new_x, x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_buf, buf, rtol=1e-5, atol=1e-6)


def test_joint_update_is_one_momentum_step():
    x, b, g = jnp.ones(3), jnp.full(3, 2.0), jnp.full(3, 0.5)
    new_x, new_b, _ = condense.momentum_sgd_update(x, b, lambda z: (g, None), 1.0, 0.5, 0, 0)
    np.testing.assert_allclose(new_b, 0.5 * 2.0 + 0.5)
    np.testing.assert_allclose(new_x, 1.0 - 1.5)


# ---------------------------------------------------------------------------- queue
# A generic queue: each "network" is a scalar id plus a one-element optimizer state.

def _toy_init(key):
    return jax.random.uniform(key, ()), jnp.zeros(())


def test_queue_push_order_and_capacity():
    q = queue_lib.create(_toy_init, jax.random.PRNGKey(0), capacity=3, num_initial=2)
    assert int(q.size) == 2 and int(q.head) == 2
    np.testing.assert_array_equal(q.born, [0, 0, -1])
    push = jax.jit(lambda q, k, t: queue_lib.push(q, _toy_init, k, t))
    q = push(q, jax.random.PRNGKey(1), 5)
    np.testing.assert_array_equal(q.born, [0, 0, 5])
    assert int(q.size) == 3 and int(q.head) == 0
    new_param = _toy_init(jax.random.PRNGKey(2))[0]
    q = push(q, jax.random.PRNGKey(2), 9)  # full: overwrites the oldest (slot 0)
    np.testing.assert_array_equal(q.born, [9, 0, 5])
    assert float(q.params[0]) == pytest.approx(float(new_param))
    assert int(q.size) == 3 and int(q.head) == 1
    q = push(q, jax.random.PRNGKey(3), 12)
    np.testing.assert_array_equal(q.born, [9, 12, 5])
    # when=False (the step's iterations between pushes): every field exactly as it was
    skip = jax.jit(lambda q, k, t, w: queue_lib.push(q, _toy_init, k, t, when=w))
    kept = skip(q, jax.random.PRNGKey(4), 15, False)
    jax.tree.map(np.testing.assert_array_equal, kept, q)
    pushed = skip(q, jax.random.PRNGKey(4), 15, True)
    np.testing.assert_array_equal(pushed.born, [9, 12, 15])
    assert int(pushed.head) == 0 and int(pushed.size) == 3


def test_queue_sample_returns_distinct_occupied_slots():
    q = queue_lib.create(_toy_init, jax.random.PRNGKey(0), capacity=6, num_initial=3)
    sample = jax.jit(lambda k: queue_lib.sample(q, k, 2))
    seen = set()
    for i in range(40):
        slots = np.asarray(sample(jax.random.PRNGKey(i)))
        assert len(set(slots)) == 2 and set(slots) <= {0, 1, 2}
        seen.update(slots.tolist())
    assert seen == {0, 1, 2}


def test_queue_training_updates_members_and_meters_and_reset():
    q = queue_lib.create(_toy_init, jax.random.PRNGKey(0), capacity=4, num_initial=4)

    def train_fn(params, opt_state, key):  # "training": +1 to the param, 3 of 4 right
        return params + 1.0, opt_state + 1.0, jnp.asarray(3.0), jnp.asarray(4.0)

    before = np.asarray(q.params)
    for impl in ("vmap", "map"):
        q2 = queue_lib.train(q, jnp.array([1, 3]), train_fn, jax.random.PRNGKey(1), impl)
        np.testing.assert_allclose(q2.params, before + np.array([0, 1, 0, 1]))
        np.testing.assert_allclose(q2.opt_state, [0, 1, 0, 1])
        assert float(queue_lib.accuracy(q2, 1)) == pytest.approx(75.0)
        assert float(queue_lib.accuracy(q2, 0)) == 0.0  # untrained: 0, not the release's 100
    q2 = queue_lib.train(q2, jnp.array([1, 2]), lambda p, o, k: (p, o, jnp.asarray(0.0), jnp.asarray(4.0)),
                         jax.random.PRNGKey(2), "vmap")
    assert float(queue_lib.accuracy(q2, 1)) == pytest.approx(37.5)  # meters accumulate: 3/8
    assert float(queue_lib.accuracy(q2, 2)) == 0.0
    q3 = queue_lib.reset_meters(q2)
    assert float(queue_lib.accuracy(q3, 1)) == 0.0 and float(q3.seen.sum()) == 0.0
    with pytest.raises(ValueError, match="'lax'"):
        queue_lib.train(q, jnp.array([0]), train_fn, jax.random.PRNGKey(0), "lax")
    with pytest.raises(ValueError, match=r"net_init_num \(5\)"):
        queue_lib.create(_toy_init, jax.random.PRNGKey(0), capacity=4, num_initial=5)


def test_two_matching_nets_chain_two_closed_form_passes_like_the_release():
    """train_net_num = 2: the release loops net by net, and within each net class by class,
    one torch-SGD step on the whole tensor per (net, class), one momentum buffer throughout.
    Two closed-form passes (one per net, classes in parallel) must give the same result."""
    lr, mu, classes, nets = 0.2, 0.5, 3, 2
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(classes, 2)).astype(np.float32)
    targets = rng.normal(size=(nets, classes, 2)).astype(np.float32)  # a different loss per net
    buf0 = rng.normal(size=(classes, 2)).astype(np.float32)
    grad = lambda xc, t, c: 2.0 * (xc - targets_j[t, c]) * (1.0 + xc ** 2)
    targets_j = jnp.asarray(targets)

    x, buf = x0.copy(), buf0.copy()
    for t in range(nets):
        for c in range(classes):
            g = np.zeros_like(x)
            g[c] = grad(x[c], t, c)
            buf = mu * buf + g
            x = x - lr * buf

    new_x, new_buf = jnp.asarray(x0), jnp.asarray(buf0)
    for t in range(nets):
        def one(xc, bc, c, t=t):
            return condense.momentum_sgd_update(xc, bc, lambda z: (grad(z, t, c), None), lr, mu,
                                                c, classes - 1 - c)[:2]
        new_x, new_buf = jax.vmap(one)(new_x, new_buf, jnp.arange(classes))
    np.testing.assert_allclose(new_x, x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_buf, buf, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# The release's CIFAR-10 IPC-1 branch without partition (IDM_cifar10.py, `ipc == 1 and not aug`)
# --------------------------------------------------------------------------- #


def _log_softmax(logits):
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [12, 4])
def test_lowest_ce_filter_keeps_exactly_the_k_smallest_ce_real_images(chunk):
    real = _images(20, (12, H, W, C))
    label, keep = 1, 5
    opts = loss_lib.LossOptions(partition_factor=1, dsa_strategy="", keep_lowest_ce_real=keep,
                                real_chunk_size=chunk)
    got = loss_lib.mean_embedding(PARAMS, linear_apply, real, jax.random.PRNGKey(0), opts, label)
    flat = np.asarray(real).reshape(12, -1)
    ce = -_log_softmax(flat @ np.asarray(PARAMS))[:, label]
    lowest = np.argsort(ce)[:keep]
    np.testing.assert_allclose(got, flat[lowest].mean(0), rtol=1e-5, atol=1e-6)
    # Not the plain mean, and not the mean of the k highest: the filter is what changed it.
    assert np.abs(np.asarray(got) - flat.mean(0)).max() > 1e-3
    off = loss_lib.mean_embedding(PARAMS, linear_apply, real, jax.random.PRNGKey(0),
                                  loss_lib.LossOptions(partition_factor=1, dsa_strategy=""))
    np.testing.assert_allclose(off, flat.mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs the real images' class label"):
        loss_lib.mean_embedding(PARAMS, linear_apply, real, jax.random.PRNGKey(0), opts)
    with pytest.raises(ValueError, match="keep_lowest_ce_real must be >= 0 .* got -1"):
        loss_lib.LossOptions(keep_lowest_ce_real=-1)


def test_ce_only_misclassified_zeroes_the_ce_of_correctly_classified_images():
    syn = _images(21, (6, H, W, C))
    flat = np.asarray(syn).reshape(6, -1)
    logits = flat @ np.asarray(PARAMS)
    label = int(np.bincount(logits.argmax(-1), minlength=K).argmax())  # some right, some wrong
    wrong = logits.argmax(-1) != label
    assert 0 < wrong.sum() < 6
    ce = -_log_softmax(logits)[:, label]
    real_mean = jnp.zeros(H * W * C)
    opts = loss_lib.LossOptions(partition_factor=1, dsa_strategy="", ce_weight=0.5,
                                ce_only_misclassified=True)
    acc, key = 40.0, jax.random.PRNGKey(0)
    loss, parts = loss_lib.synthetic_class_loss(PARAMS, linear_apply, syn, label, real_mean, key, acc, opts)
    mmd = (flat.mean(0) ** 2).sum()
    np.testing.assert_allclose(loss, mmd + 0.5 * acc * (ce * wrong).mean(), rtol=1e-5)
    np.testing.assert_allclose(parts["ce"], ce.mean(), rtol=1e-5)  # the log shows the unmasked CE
    # Only correctly classified images: the CE term and its gradient vanish.
    right = syn[~wrong]
    loss_r, parts_r = loss_lib.synthetic_class_loss(PARAMS, linear_apply, right, label, real_mean, key, acc, opts)
    np.testing.assert_allclose(loss_r, parts_r["mmd"], rtol=1e-6)
    grad = jax.grad(lambda x: loss_lib.synthetic_class_loss(PARAMS, linear_apply, x, label, real_mean, key,
                                                            acc, opts)[0])(right)
    mmd_grad = jax.grad(lambda x: loss_lib.synthetic_class_loss(
        PARAMS, linear_apply, x, label, real_mean, key, acc, dataclasses.replace(opts, use_ce=False))[0])(right)
    np.testing.assert_allclose(grad, mmd_grad, rtol=1e-5, atol=1e-7)
