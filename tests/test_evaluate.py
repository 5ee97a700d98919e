"""The evaluation protocol: schedule, batching, SGD, seeds, execution modes, accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from helpers import tiny_config
from idm_jax import augment, data, evaluate, evaluate_set, measure, models, trainer

H = 16
MEAN, STD = np.array([0.5], np.float32), np.array([0.25], np.float32)


def _toy(n, seed):
    """4 flip/shift-robust classes of 16x16x1 images: bright top half, bright bottom half,
    bright everywhere, dark everywhere; plus noise. Returns normalized f32 images, uint8 copies
    (decoded with MEAN/STD they are the same images), labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.normal(0, 0.3, (n, H, H, 1)).astype(np.float32)
    x[y == 0, :H // 2] += 2.0
    x[y == 1, H // 2:] += 2.0
    x[y == 2] += 2.0
    x[y == 3] -= 2.0
    u8 = np.clip(np.round((x * STD + MEAN) * 255), 0, 255).astype(np.uint8)
    return x, u8, y.astype(np.int32)


TRAIN_X, _, TRAIN_Y = _toy(40, 0)
_, TEST_U8, TEST_Y = _toy(200, 1)
TOY_KW = dict(num_seeds=3, epochs=6, batch_size=16, test_batch_size=64)  # 40 = 16 + 16 + 8


@pytest.fixture(scope="module")
def toy_result():
    return evaluate.train_and_evaluate(TRAIN_X, TRAIN_Y, TEST_U8, TEST_Y, mean=MEAN, std=STD,
                                       arch="ConvNetD2", num_classes=4, key=jax.random.PRNGKey(0),
                                       **TOY_KW)


def test_reaches_high_accuracy_on_separable_toy_set(toy_result):
    assert toy_result["mean"] > 90.0
    assert min(toy_result["accuracies"]) > 85.0
    assert toy_result["num_train_images"] == 40 and toy_result["passes"] == 7


def test_seeds_are_different_networks_and_stats_are_numpy(toy_result):
    accs = toy_result["accuracies"]
    assert len(accs) == 3
    assert toy_result["mean"] == pytest.approx(np.mean(accs))
    assert toy_result["std"] == pytest.approx(np.std(accs))  # ddof 0, like the release
    # Each seed trained its own network: the last-epoch training losses all differ.
    losses = toy_result["train_loss"]
    assert len(set(np.round(losses, 7))) == 3


def test_trained_seeds_have_different_parameters_and_accuracy_counts_every_test_image():
    model = models.get_model("ConvNetD2", 4, 1)
    nets = trainer.train_networks(model, TRAIN_X, TRAIN_Y, key=jax.random.PRNGKey(0),
                                   num_seeds=3, epochs=1, batch_size=16)
    kernels = np.asarray(nets.variables["params"]["conv0"]["kernel"])
    assert kernels.shape == (3, 3, 3, 1, 128)
    assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[2])
    accs = measure.measure_accuracy(model, nets.variables, TEST_U8, TEST_Y, mean=MEAN, std=STD,
                                     test_batch_size=64)  # 200 = 3 x 64 + 8 padded
    for s in range(3):
        v = jax.tree.map(lambda a: a[s], nets.variables)
        logits, _ = models.apply_model(model, v, jnp.asarray((TEST_U8 / 255.0 - MEAN) / STD, jnp.float32),
                                       train=False)
        expected = np.mean(np.argmax(np.asarray(logits), -1) == TEST_Y) * 100
        assert accs[s] == pytest.approx(expected)
    assert nets.forget_counts.shape == (3, 40)


def test_learning_rate_schedule_values():
    # (passes, first pass at lr x 0.1): the release runs 1001 passes, 502 at lr then 499 at lr/10.
    assert trainer.epoch_plan(1000) == (1001, 502)
    assert trainer.epoch_plan(1000, "paper") == (1000, 500)
    assert trainer.epoch_plan(4) == (5, 4)
    assert trainer.epoch_plan(300) == (301, 152)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        trainer.epoch_plan(0)
    with pytest.raises(ValueError, match="unknown lr schedule 'cosine'"):
        trainer.epoch_plan(10, "cosine")


def test_epoch_batches_cover_every_example_once_with_smaller_last_batch():
    assert trainer.batch_plan(400, 256) == (1, 256, 144)
    assert trainer.batch_plan(40, 256) == (0, 256, 40)
    assert trainer.batch_plan(512, 256) == (2, 256, 0)
    full, last = trainer.epoch_batches(jax.random.PRNGKey(3), 400, 256)
    assert full.shape == (1, 256) and last.shape == (144,)
    np.testing.assert_array_equal(np.sort(np.concatenate([np.ravel(full), last])), np.arange(400))
    full2, _ = trainer.epoch_batches(jax.random.PRNGKey(4), 400, 256)
    assert not np.array_equal(full, full2)  # reshuffled every epoch


def test_optimizer_is_torch_sgd_with_weight_decay_in_the_gradient():
    # torch: d = g + wd * p; buf = d (first step) or m * buf + d; p -= lr * buf.
    lr, m, wd = 0.1, 0.9, 0.5
    tx = trainer.torch_sgd(lr, m, wd)
    p = jnp.array([2.0])
    state = tx.init(p)
    u, state = tx.update(jnp.array([1.0]), state, p)
    p = optax.apply_updates(p, u)  # d = 1 + 1 = 2; p = 2 - 0.2
    np.testing.assert_allclose(p, [1.8], rtol=1e-6)
    u, state = tx.update(jnp.array([1.0]), state, p)
    p = optax.apply_updates(p, u)  # d = 1 + 0.9 = 1.9; buf = 1.8 + 1.9 = 3.7; p = 1.8 - 0.37
    np.testing.assert_allclose(p, [1.43], rtol=1e-6)


# A tiny batch-norm ConvNet on 5 images in batches of 2, 2, 1, two passes (paper schedule,
# epochs=2: the second pass runs at lr x 0.1 with a fresh momentum buffer), per-image DSA.
TINY = models.ConvNet(num_classes=3, depth=1, width=8, norm="batch")
TINY_X = np.random.default_rng(5).normal(size=(5, 8, 8, 1)).astype(np.float32)
TINY_Y = np.array([0, 1, 2, 0, 1], np.int32)
TINY_KW = dict(key=jax.random.PRNGKey(7), num_seeds=2, epochs=2, batch_size=2, lr=0.1, momentum=0.9,
               weight_decay=5e-4, dsa_strategy="flip_cutout", schedule="paper")


@pytest.fixture(scope="module")
def tiny_ref():
    return trainer.train_networks(TINY, TINY_X, TINY_Y, seed_parallel="map", loop="host", **TINY_KW)


@jax.jit
def _hand_step(params, batch_stats, buf, x, y, key, lr):
    """torch-style SGD step written out: per-image DSA, CE, d = g + wd p, buf = m buf + d."""
    x = augment.dsa(x, key, TINY_KW["dsa_strategy"], per_image=True)

    def loss(p):
        logits, upd = TINY.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                 mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

    g, batch_stats = jax.grad(loss, has_aux=True)(params)
    buf = jax.tree.map(lambda b, gi, pi: TINY_KW["momentum"] * b + gi + TINY_KW["weight_decay"] * pi,
                       buf, g, params)
    return jax.tree.map(lambda pi, b: pi - lr * b, params, buf), batch_stats, buf


def test_training_replicates_the_protocol_step_by_step(tiny_ref):
    init_key, train_key = jax.random.split(TINY_KW["key"])
    for s in range(2):
        v = models.init_variables(TINY, jax.random.split(init_key, 2)[s], (8, 8, 1))
        params, batch_stats = v["params"], v["batch_stats"]
        seed_key = jax.random.split(train_key, 2)[s]
        for p, lr in ((0, 0.1), (1, 0.01)):
            buf = jax.tree.map(jnp.zeros_like, params)  # the optimizer is recreated at the lr drop
            perm_key, aug_key = jax.random.split(jax.random.fold_in(seed_key, p))
            full, last = trainer.epoch_batches(perm_key, 5, 2)
            batches = [np.asarray(b) for b in full] + [np.asarray(last)]
            assert [len(b) for b in batches] == [2, 2, 1]  # the last batch is smaller, not padded
            for idx, key in zip(batches, jax.random.split(aug_key, 3)):
                params, batch_stats, buf = _hand_step(params, batch_stats, buf, TINY_X[idx],
                                                      TINY_Y[idx], key, lr)
        got = jax.tree.map(lambda a: a[s], tiny_ref.variables)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     got, {"params": params, "batch_stats": batch_stats})
    bn = np.asarray(tiny_ref.variables["batch_stats"]["norm0"]["mean"])
    assert bn.shape == (2, 8) and np.abs(bn).max() > 1e-3  # running statistics were updated


def test_vmap_and_device_loop_give_the_same_networks(tiny_ref):
    """The GPU/TPU path (vmap over seeds, epochs on the device) is the same computation as the
    CPU path (one seed at a time, steps driven from Python)."""
    other = trainer.train_networks(TINY, TINY_X, TINY_Y, seed_parallel="vmap", loop="device", **TINY_KW)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 tiny_ref.variables, other.variables)
    np.testing.assert_array_equal(tiny_ref.forget_counts, other.forget_counts)


def test_seeds_batched_with_matmul_convs_give_the_same_networks(tiny_ref):
    """Seeds trained together by vmap over convs written as matmuls (conv_impl "taps": no grouped
    convolution) are the seeds trained one after another with the CPU's convs."""
    taps = TINY.clone(conv_impl="taps")
    other = trainer.train_networks(taps, TINY_X, TINY_Y, seed_parallel="vmap", loop="host", **TINY_KW)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 tiny_ref.variables, other.variables)
    np.testing.assert_array_equal(tiny_ref.forget_counts, other.forget_counts)


def test_forgetting_events_are_correct_to_incorrect_transitions():
    state = trainer.NetState(variables={}, opt_state=(), forgets=jnp.array([0, 2, 0, 1]),
                              last_correct=jnp.array([True, False, True, False]),
                              ever_correct=jnp.array([False, True, False, True]),
                              loss_sum=jnp.zeros(()), correct_sum=jnp.zeros((), jnp.int32))
    before = jnp.array([True, True, False, False])
    out = trainer.end_epoch(state, before)
    np.testing.assert_array_equal(out.forgets, [0, 3, 0, 1])  # only example 1 went right -> wrong
    np.testing.assert_array_equal(out.ever_correct, [True, True, True, True])


def test_evaluate_archs_partitions_first():
    cfg = base.get_config().eval  # every eval field, with its default
    cfg.update(dict(num_seeds=3, epochs=1, batch_size=16, lr=0.01, momentum=0.9, weight_decay=5e-4,
                    dsa=True, test_batch_size=64))
    dataset = type("D", (), dict(test_images=TEST_U8, test_labels=TEST_Y, mean=MEAN, std=STD,
                                 num_classes=4))()
    out = evaluate.evaluate_archs(TRAIN_X[:10], TRAIN_Y[:10], dataset, cfg, archs="ConvNetD2",
                                  key=jax.random.PRNGKey(0), partition_factor=2)
    assert list(out) == ["ConvNetD2"]
    assert out["ConvNetD2"]["num_train_images"] == 40 and out["ConvNetD2"]["passes"] == 2
    assert len(out["ConvNetD2"]["accuracies"]) == 3


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'LeNet' in 'ConvNet, LeNet'"):
        models.parse_archs("ConvNet, LeNet")
    assert models.parse_archs(" ConvNet,AlexNet ,") == ["ConvNet", "AlexNet"]
    model = TINY
    with pytest.raises(ValueError, match=r"one label per training image"):
        trainer.train_networks(model, TINY_X, TINY_Y[:4], key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        trainer.train_networks(model, TINY_X[0], TINY_Y, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        trainer.train_networks(model, TINY_X, TINY_Y + 1, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown seed_parallel 'pmap'"):
        trainer.train_networks(model, TINY_X, TINY_Y, key=jax.random.PRNGKey(0), seed_parallel="pmap")
    with pytest.raises(ValueError, match="unknown loop 'gpu'"):
        trainer.train_networks(model, TINY_X, TINY_Y, key=jax.random.PRNGKey(0), loop="gpu")
    with pytest.raises(ValueError, match="num_seeds must be a positive integer, got 0"):
        trainer.train_networks(model, TINY_X, TINY_Y, key=jax.random.PRNGKey(0), num_seeds=0)
    with pytest.raises(ValueError, match="unknown DSA family 'blur'"):
        trainer.train_networks(model, TINY_X, TINY_Y, key=jax.random.PRNGKey(0), dsa_strategy="blur")
    with pytest.raises(ValueError, match="mean and std"):
        trainer.train_networks(model, (TINY_X > 0).astype(np.uint8), TINY_Y, key=jax.random.PRNGKey(0))


def test_renormalize_keeps_pixels():
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 1)).astype(np.float32)
    y = data.renormalize(x, [0.5], [0.25], [0.1], [0.5])
    np.testing.assert_allclose(y * 0.5 + 0.1, x * 0.25 + 0.5, atol=1e-6)
    np.testing.assert_array_equal(data.renormalize(x, [0.5], [0.25], [0.5], [0.25]), x)  # same stats: as is
    # (0, 1) <-> (mean, std) is the pixel <-> normalized conversion of synthetic_file's npz.
    np.testing.assert_allclose(data.renormalize(x, 0.0, 1.0, [0.5], [0.25]), (x - 0.5) / 0.25, rtol=1e-6)




def test_run_evaluation_scores_a_bare_torch_layout_set_like_its_own_format(tmp_path):
    """A set saved as the authors' release saves it (normalized, [N, C, H, W], only images and
    labels) scores exactly as the same set in idm_jax's synthetic.npz."""
    from idm_jax import synthetic_file

    c = tiny_config(sets={"eval.dsa": False})  # the digits; plumbing test: skip DSA's compile time
    ds = data.load_config_dataset(c)
    idx = np.concatenate([np.flatnonzero(ds.train_labels == k)[:2] for k in range(10)])
    normalized = np.asarray(data.normalize(ds.train_images[idx], ds.mean, ds.std), np.float32)
    labels = ds.train_labels[idx]
    full = synthetic_file.save_synthetic(str(tmp_path / "full.npz"), normalized, labels, mean=ds.mean, std=ds.std,
                                         class_names=ds.class_names, partition_factor=1, method="dm", dataset=ds.name)
    bare = tmp_path / "release.npz"
    np.savez(bare, images=np.transpose(normalized, (0, 3, 1, 2)), labels=labels.astype(np.int64))
    ours = evaluate_set.run_evaluation(c, str(tmp_path / "ours"), full)
    theirs = evaluate_set.run_evaluation(c, str(tmp_path / "theirs"), str(bare), space="normalized", method="dm")
    assert theirs["archs"]["ConvNetD2"]["accuracies"] == ours["archs"]["ConvNetD2"]["accuracies"]
    assert (theirs["method"], theirs["partition_factor"], theirs["ipc"], theirs["num_images"]) == ("dm", 1, 2, 20)
    assert theirs["filled_from_dataset"] == ["mean", "std", "class_names", "partition_factor", "method", "dataset"]
    assert "filled_from_dataset" not in ours
    # Pixel space by default: the same normalized file is refused with one line naming its values.
    with pytest.raises(ValueError, match=r"release.npz': images span \[-.*--synthetic_space=normalized"):
        evaluate_set.run_evaluation(c, str(tmp_path / "bad"), str(bare))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        evaluate_set.run_evaluation(c, str(tmp_path / "bad"), str(tmp_path / "nope.npz"))


def test_picked_seeds_get_the_keys_they_have_among_all_seeds():
    key = jax.random.PRNGKey(3)
    init_all, train_all, n_all = trainer.picked_seed_keys(key, 4, None)
    init_picked, train_picked, n_picked = trainer.picked_seed_keys(key, 4, [2, 0])
    assert (n_all, n_picked) == (4, 2) and init_all.shape == (4, 2)
    np.testing.assert_array_equal(init_picked, init_all[np.array([2, 0])])
    np.testing.assert_array_equal(train_picked, train_all[np.array([2, 0])])
    _, train_key = jax.random.split(key)
    np.testing.assert_array_equal(train_all, jax.random.split(train_key, 4))
    with pytest.raises(ValueError, match=r"seed_indices \[4\] must be non-empty, within 0..3"):
        trainer.picked_seed_keys(key, 4, [4])
