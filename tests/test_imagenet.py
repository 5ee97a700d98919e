"""The ImageNet-subset setting: config pins, 224 centre crop, the shipped class list, the
memory-mapped cache, host-fed real batches (same step as the device path) and queue model
augmentation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import imagenet_subset
from idm_jax import condense
from idm_jax import config_check
from idm_jax import data as data_lib
from idm_jax.data import decode
from idm_jax import queue as queue_lib
from idm_jax import runner
from helpers import tiny_config

WNIDS = ("n01000003", "n01000001", "n01000002")  # a list order that is not sorted


# --------------------------------------------------------------------------- #
# Config: docs/RELEASE.md#per-setting-table, ImageNet subset rows
# --------------------------------------------------------------------------- #


# IPC 50's command has no --aug: partition l = 1 (docs/RELEASE.md#per-setting-table, "ImageNet subset IPC 50").
@pytest.mark.parametrize("ipc, net_num, partition", [(1, 50, 2), (10, 50, 2), (50, 100, 1)])
def test_imagenet_subset_config_pins_the_release_row(ipc, net_num, partition):
    c = imagenet_subset.get_config(str(ipc))
    config_check.validate(c)
    assert c.ipc == ipc
    assert (c.data.image_size, c.data.resize, c.data.normalization, c.data.classes) == (
        224, "center_crop", "imagenet", "imagenet_subset")
    assert (c.model, c.eval.archs, c.eval.batch_size) == ("ConvNetD6", "ConvNetD6", 128)
    assert (c.idm.batch_real, c.idm.batch_train, c.idm.ce_weight, c.idm.net_generate_interval,
            c.idm.net_num, c.idm.meter_reset_interval) == (128, 128, 3.0, 50, net_num, 0)
    # Model augmentation is a paper-supplement option the release's command does not use.
    assert (c.idm.model_aug_lr_jitter, c.idm.model_aug_class_fraction) == (0.0, 1.0)
    # Release defaults everywhere else (embed_last 100 = the full last block, our only embedding).
    assert (c.idm.net_init_num, c.idm.train_net_num, c.idm.fetch_net_num, c.idm.model_train_steps,
            c.idm.lr_img, c.idm.momentum_img, c.idm.partition_factor, c.idm.iterations,
            c.idm.update_mode, c.idm.init, c.data.on_device) == (
        3, 1, 2, 10, 0.2, 0.5, partition, 20000, "per_class", "real", "auto")
    # The other release quirks are options, off (docs/RELEASE.md#imagenet-subset-quirks: plumbing and a bug).
    assert (c.data.class_sampling, c.data.train_sampling, c.idm.unnormalized) == ("random", "random", False)


@pytest.mark.parametrize("field, value, message", [
    ("idm.meter_reset_interval", -1, "idm.meter_reset_interval must be an integer >= 0"),
    ("idm.max_unrolled_queue_steps", -2, "idm.max_unrolled_queue_steps must be an integer >= 0 .* got -2"),
    ("idm.model_aug_lr_jitter", 1.5, "idm.model_aug_lr_jitter must be in \\[0, 1\\)"),
    ("idm.model_aug_class_fraction", 0.0, "idm.model_aug_class_fraction must be in \\(0, 1\\]"),
    ("data.resize", "squash", "data.resize must be one of .* got 'squash'"),
    ("data.on_device", "gpu", "data.on_device must be one of .* got 'gpu'"),
])
def test_bad_imagenet_knobs_are_named(field, value, message):
    c = imagenet_subset.get_config("10")
    section, leaf = field.split(".")
    c[section][leaf] = value
    with pytest.raises(ValueError, match=message):
        config_check.validate(c)


# --------------------------------------------------------------------------- #
# Data: 224 centre crop, class list, memory-mapped cache
# --------------------------------------------------------------------------- #


def _bands(h, w, edges):
    """uint8[h, w, 3]: red left of edges[0], green between, blue right of edges[1]."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :edges[0], 0] = 255
    img[:, edges[0]:edges[1], 1] = 255
    img[:, edges[1]:, 2] = 255
    return img


def test_center_crop_keeps_the_middle_of_a_non_square_image():
    # 224 x 448 (H x W): no resize needed; the crop is columns 112..335 = the green band.
    out = decode.resize_one(_bands(224, 448, (112, 336)), 224, "center_crop")
    assert out.shape == (224, 224, 3)
    assert (out[..., 1] == 255).all() and (out[..., 0] == 0).all() and (out[..., 2] == 0).all()
    # 300 x 600: shorter side 300 -> 224, longer 600 -> 448, then the same crop. Only the
    # bilinear filter's reach blends the outermost columns.
    out = decode.resize_one(_bands(300, 600, (150, 450)), 224, "center_crop")
    assert out.shape == (224, 224, 3)
    assert (out[:, 2:-2, 1] == 255).all() and out[:, 2:-2, [0, 2]].max() == 0
    # Portrait 500 x 250 -> 448 x 224 and the central rows: rows 112..335 of the resized image.
    tall = np.swapaxes(_bands(250, 500, (125, 375)), 0, 1)
    out = decode.resize_one(tall, 224, "center_crop")
    assert (out[2:-2, :, 1] == 255).all() and out[2:-2, :, [0, 2]].max() == 0
    # Odd margin: 224 x 301 -> offset round(77 / 2) = 38 (as torchvision's CenterCrop).
    ramp = np.broadcast_to(np.arange(301, dtype=np.uint8)[None, :, None], (224, 301, 3)).copy()
    np.testing.assert_array_equal(decode.resize_one(ramp, 224, "center_crop")[0, :, 0], np.arange(38, 262) % 256)
    # "stretch" squashes the whole width in: all three bands survive.
    squashed = decode.resize_one(_bands(224, 448, (112, 336)), 224, "stretch")
    assert squashed[:, :50, 0].min() == 255 and squashed[:, -50:, 2].min() == 255


def test_shipped_class_list_is_the_release_subset():
    wnids = data_lib.load_class_list("imagenet_subset")
    assert len(wnids) == 100 and len(set(wnids)) == 100
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)
    assert (wnids[0], wnids[1], wnids[-1]) == ("n02486261", "n01692333", "n01641577")  # release order
    assert data_lib.load_class_list("a, b") == ("a", "b") and data_lib.load_class_list("") is None
    with pytest.raises(ValueError, match="repeats \\['a'\\]"):
        data_lib.load_class_list("a,b,a")
    with pytest.raises(FileNotFoundError, match="class list file '/no/such/list.txt'"):
        data_lib.load_class_list("/no/such/list.txt")


def make_imagenet_tree(root, classes, extra=("n09999999",), size=(80, 64), n_train=6, n_val=2,
                       flat_val=False):
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (or loose val images), non-square
    (size = (W, H)), a distinct noisy pattern per class."""
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(tuple(classes) + tuple(extra)):
        for split, n in (("train", n_train), ("val", n_val)):
            folder = root / split if (split == "val" and flat_val) else root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array([60 * c % 256, 255 - 50 * c % 256, 40 + 30 * c], np.float64)
                img = np.clip(base + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{wnid}_{i:04d}.JPEG", quality=95)
    return root


def test_class_list_picks_listed_folders_in_list_order(tmp_path):
    root = make_imagenet_tree(tmp_path / "imnet", WNIDS)
    listed = ",".join(WNIDS)
    ds = data_lib.load_dataset(str(root), classes=listed, image_size=32, resize="center_crop",
                               normalization="imagenet", cache_dir=str(tmp_path / "cache"))
    assert ds.class_names == WNIDS and ds.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [6, 6, 6])
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [2, 2, 2])
    # Label 0 is the first listed class (n01000003, generated as class 0), not the sorted first.
    everything = data_lib.load_dataset(str(root), image_size=32, resize="center_crop",
                                       cache_dir=str(tmp_path / "cache"))
    assert everything.class_names == tuple(sorted(WNIDS + ("n09999999",)))
    first = everything.class_names.index(WNIDS[0])
    np.testing.assert_array_equal(ds.train_images[:6], everything.train_images[everything.train_labels == first])


def test_missing_classes_and_flat_val_are_named(tmp_path):
    root = make_imagenet_tree(tmp_path / "imnet", WNIDS[:2], extra=())
    with pytest.raises(ValueError, match="split 'train' lacks class folder\\(s\\) n01000002 of the class list"):
        data_lib.load_dataset(str(root), classes=",".join(WNIDS), cache_dir=str(tmp_path / "c"))
    flat = make_imagenet_tree(tmp_path / "flat", WNIDS, extra=(), flat_val=True)
    with pytest.raises(ValueError, match="split 'val' lacks .*6 images lie directly in val/: sort them"):
        data_lib.load_dataset(str(flat), classes=",".join(WNIDS), image_size=32, cache_dir=str(tmp_path / "c"))


def test_memmap_cache_matches_in_memory_arrays(tmp_path, monkeypatch):
    root = make_imagenet_tree(tmp_path / "imnet", WNIDS, extra=())
    kw = dict(classes=",".join(WNIDS), image_size=32, resize="center_crop", normalization="imagenet")
    in_memory = data_lib.load_dataset(str(root), cache_dir=str(tmp_path / "c1"), memmap=False, **kw)
    mapped = data_lib.load_dataset(str(root), cache_dir=str(tmp_path / "c2"), memmap=True, **kw)
    assert isinstance(mapped.train_images, np.memmap) and not mapped.train_images.flags.writeable
    for k in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(mapped, k), getattr(in_memory, k))
    (folder,) = [p for p in (tmp_path / "c2").iterdir()]
    assert folder.is_dir() and json.loads((folder / "class_names.json").read_text()) == list(WNIDS)
    monkeypatch.setattr(data_lib.decode, "decode_splits", lambda *a, **k: pytest.fail("decoded again"))
    again = data_lib.load_dataset(str(root), cache_dir=str(tmp_path / "c2"), **kw)
    assert isinstance(again.train_images, np.memmap) and again.class_names == WNIDS


def test_data_placement_rule(monkeypatch):
    ds = data_lib.load_dataset("digits")
    assert condense.resolve_data_placement("auto", ds) == "device"
    assert condense.resolve_data_placement("host", ds) == "host"
    monkeypatch.setattr(data_lib, "MEMMAP_BYTES", ds.train_images.nbytes - 1)
    assert condense.resolve_data_placement("auto", ds) == "host"
    with pytest.raises(ValueError, match="data.on_device must be one of .* got 'tpu'"):
        condense.resolve_data_placement("tpu", ds)


# --------------------------------------------------------------------------- #
# Host-fed real batches: the same step as the device path
# --------------------------------------------------------------------------- #


def _device_and_host_steps(s, ds, state, iterations):
    """`iterations` steps from `state` with real batches drawn on the device and, from a copy, on
    the host (HostSampler); returns ((device state, last metrics), (host state, last metrics))."""
    step = condense.make_step(s)
    device_state, host_state = state, jax.tree.map(jnp.copy, state)
    sampler = condense.HostSampler(s, ds, jax.device_get(host_state.key))
    data = condense.device_data(ds)
    batches = sampler.batches(0, iterations)
    for _ in range(iterations):
        device_state, m_device = step(device_state, data)
        host_state, m_host = step(host_state, next(batches))
    batches.close()
    sampler.close()
    return (device_state, m_device), (host_state, m_host)


@pytest.mark.slow  # compiles several steps: 9-29 s on 2 cores (README, Test)
def test_host_batches_give_the_same_steps_as_device_sampling():
    ds = data_lib.load_dataset("digits")
    c = tiny_config()
    c.idm.meter_reset_interval = 0  # never: the release's ImageNet setting
    c.idm.net_generate_interval = 10  # one push (iteration 0), so no trained member is replaced
    s = condense.settings_from_config(c, ds)
    device_state = condense.init_state(s, ds, 0, "real")
    sampler = condense.HostSampler(s, ds, jax.device_get(device_state.key))
    real_idx, train_idx = sampler.indices(0)
    sampler.close()
    assert real_idx.shape == (10, 8) and train_idx.shape == (2, 2, 16)
    for cls, row in enumerate(real_idx):  # each class's batch: distinct images of that class
        assert len(set(row)) == 8 and (ds.train_labels[row] == cls).all()
    (device_state, m_device), (host_state, m_host) = _device_and_host_steps(s, ds, device_state, 4)
    np.testing.assert_allclose(np.asarray(host_state.syn.images), np.asarray(device_state.syn.images),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(host_state.queue.params), jax.tree.leaves(device_state.queue.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(host_state.queue.seen), np.asarray(device_state.queue.seen))
    assert float(m_host["loss"]) == pytest.approx(float(m_device["loss"]), rel=1e-5)
    # Meters never reset (tiny_config's would at iteration 3): 4 iterations x 2 nets x 2 steps x 16.
    assert float(device_state.queue.seen.sum()) == 4 * 2 * 2 * 16


def _imagenet_test_config(root, tmp_path, image_size, model, iterations=2):
    c = imagenet_subset.get_config("1")
    c.data.source, c.data.classes, c.data.image_size = str(root), ",".join(WNIDS), image_size
    c.data.cache_dir, c.data.on_device = str(tmp_path / "cache"), "host"
    c.model = c.eval.archs = model
    c.idm.iterations, c.idm.batch_real, c.idm.batch_train = iterations, 4, 8
    c.idm.model_train_steps, c.idm.net_num = 2, 4
    c.eval.epochs, c.eval.num_seeds, c.eval.test_batch_size = 2, 2, 6
    c.log_every = c.checkpoint_every = 1
    return c


@pytest.mark.slow  # compiles several steps: 9-29 s on 2 cores (README, Test)
def test_imagenet_path_end_to_end_through_the_host_sampler(tmp_path):
    # The ImageNet config on a tiny folder (3 listed classes + 1 extra, non-square JPEGs),
    # centre-cropped to 32x32 with ConvNet-D2 to stay cheap; the 224/ConvNet-6 run is `slow`.
    root = make_imagenet_tree(tmp_path / "imnet", WNIDS)
    c = _imagenet_test_config(root, tmp_path, 32, "ConvNetD2")
    summary = runner.run_condensation(c, str(tmp_path / "run"))
    assert summary["data_placement"] == "host" and summary["step"] == 2
    res = summary["results"]
    assert res["archs"]["ConvNetD2"]["num_train_images"] == 3 * 1 * 4  # IPC 1, partition 2x2
    with np.load(summary["synthetic"]) as z:
        assert z["images"].shape == (3, 32, 32, 3) and tuple(z["class_names"]) == WNIDS


@pytest.mark.slow
def test_imagenet_224_convnet6_end_to_end(tmp_path):
    root = make_imagenet_tree(tmp_path / "imnet", WNIDS, size=(300, 240), n_train=5)
    c = _imagenet_test_config(root, tmp_path, 224, "ConvNetD6")
    summary = runner.run_condensation(c, str(tmp_path / "run"))
    assert summary["data_placement"] == "host" and summary["step"] == 2
    assert 0.0 <= summary["results"]["archs"]["ConvNetD6"]["mean"] <= 100.0
    with np.load(summary["synthetic"]) as z:
        assert z["images"].shape == (3, 224, 224, 3)


# --------------------------------------------------------------------------- #
# Model augmentation (paper supplement)
# --------------------------------------------------------------------------- #


def _toy_init(key):
    return {"w": jax.random.normal(key, (3,))}, ()


def test_model_augmentation_draws_per_network_lr_and_class_subsets():
    aug = queue_lib.ModelAugment(num_classes=10, lr_jitter=0.1, class_fraction=0.3)
    q = queue_lib.create(_toy_init, jax.random.PRNGKey(0), capacity=6, num_initial=3, augment=aug)
    scales, masks = np.asarray(q.lr_scale), np.asarray(q.class_mask)
    assert ((scales >= 0.9) & (scales <= 1.1)).all() and len(set(scales.round(6))) == 6
    assert masks.shape == (6, 10) and (masks.sum(1) == 3).all()
    assert len({tuple(m) for m in masks}) > 1  # different subsets
    pushed = queue_lib.push(q, _toy_init, jax.random.PRNGKey(5), 7, aug)
    assert int(np.asarray(pushed.class_mask[3]).sum()) == 3 and 0.9 <= float(pushed.lr_scale[3]) <= 1.1
    assert not np.array_equal(np.asarray(pushed.class_mask[3]), masks[3])
    # The same key gives the same weights with or without augmentation; off = no extra fields.
    plain = queue_lib.create(_toy_init, jax.random.PRNGKey(0), capacity=6, num_initial=3)
    np.testing.assert_array_equal(np.asarray(plain.params["w"]), np.asarray(q.params["w"]))
    assert plain.lr_scale is None and plain.class_mask is None
    assert queue_lib.ModelAugment(100, class_fraction=0.001).num_subset_classes == 1


def test_member_training_uses_its_lr_factor_and_only_its_classes():
    ds = data_lib.load_dataset("digits")
    c = tiny_config()
    c.idm.model_train_steps = 1
    c.idm.model_aug_lr_jitter, c.idm.model_aug_class_fraction = 0.1, 0.3
    s = condense.settings_from_config(c, ds)
    assert s.model_augment is not None and s.model_augment.num_subset_classes == 3
    data = condense.device_data(ds)
    train = jax.jit(condense.make_member_train_fn(s, data))
    params, opt_state = condense.make_init_fn(s)(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    mask = jnp.zeros(10, bool).at[jnp.array([0, 4, 7])].set(True)
    out = {f: train(params, opt_state, key, {"lr_scale": jnp.float32(f), "class_mask": mask}) for f in (1.0, 1.1)}
    # One SGD step from zero momentum: the update scales with the lr factor.
    for a, b, p in zip(*(jax.tree.leaves(out[f][0]) for f in (1.0, 1.1)), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(b - p), 1.1 * np.asarray(a - p), rtol=1e-3, atol=1e-6)
    # The meter counts only the batch's images of classes 0, 4 and 7.
    idx = data_lib.sample_batch(jax.random.split(key, 1)[0], len(ds.train_labels), s.batch_train)
    in_subset = np.isin(ds.train_labels[np.asarray(idx)], [0, 4, 7]).sum()
    assert float(out[1.0][3]) == in_subset and 0 <= float(out[1.0][2]) <= in_subset
    # All classes in the mask = plain training (same loss, same counts).
    full = train(params, opt_state, key, {"lr_scale": jnp.float32(1.0), "class_mask": jnp.ones(10, bool)})
    assert float(full[3]) == s.batch_train
    # A batch without any of the member's classes adds nothing to its meter.
    none = train(params, opt_state, key, {"lr_scale": jnp.float32(1.0), "class_mask": jnp.zeros(10, bool)})
    assert float(none[3]) == 0.0


@pytest.mark.slow  # compiles several steps: 9-29 s on 2 cores (README, Test)
def test_condensation_step_runs_with_model_augmentation():
    ds = data_lib.load_dataset("digits")
    c = tiny_config()
    c.idm.model_aug_lr_jitter, c.idm.model_aug_class_fraction = 0.1, 0.5
    s = condense.settings_from_config(c, ds)
    state = condense.init_state(s, ds, 0, "real")
    assert (np.asarray(state.queue.class_mask).sum(1) == 5).all()
    state, m = condense.make_step(s)(state, condense.device_data(ds))
    assert np.isfinite(float(m["loss"])) and int(state.step) == 1
    # Each trained member saw only images of its 5 classes: fewer than 2 steps x 16 in all.
    assert 0 < float(state.queue.seen.sum()) < 2 * 2 * 16


# --------------------------------------------------------------------------- #
# The release's ImageNet-subset quirks, as options (docs/RELEASE.md#imagenet-subset-quirks)
# --------------------------------------------------------------------------- #


def test_first_files_sampling_follows_file_order(tmp_path):
    # Files written in reverse name order with one grey level each: the first n of a class are
    # the n smallest names (torchvision's ImageFolder sorts them; the release's cls_idx[c][:n]).
    for split in ("train", "val"):
        for c, wnid in enumerate(WNIDS):
            folder = tmp_path / "tree" / split / wnid
            folder.mkdir(parents=True)
            for i in reversed(range(5)):
                Image.fromarray(np.full((8, 8, 3), 10 * i + c, np.uint8)).save(folder / f"img_{i}.png")
    ds = data_lib.load_dataset(str(tmp_path / "tree"), classes=",".join(WNIDS), cache_dir=str(tmp_path / "c"))
    table, counts = data_lib.class_index_table(ds.train_labels, ds.num_classes)
    for c in range(3):
        idx = np.asarray(data_lib.first_class_batch(jnp.asarray(table), c, 3))
        np.testing.assert_array_equal(ds.train_images[idx, 0, 0, 0], [c, 10 + c, 20 + c])


def _quirk_settings(**changes):
    ds = data_lib.load_dataset("digits")
    c = tiny_config()
    c.data.class_sampling, c.data.train_sampling = "first", "passes"
    for k, v in changes.items():
        section, leaf = k.split(".")
        c[section][leaf] = v
    return ds, c, condense.settings_from_config(c, ds)


def test_first_n_sampling_returns_the_same_first_images_every_iteration():
    ds, _, s = _quirk_settings()
    table, counts = data_lib.class_index_table(ds.train_labels, ds.num_classes)
    sampler = condense.HostSampler(s, ds, np.asarray(jax.random.PRNGKey(0)))
    for step in (0, 7):
        real, _ = sampler.indices(step)
        np.testing.assert_array_equal(real, table[:, :s.batch_real])  # indices [0..n) of each class
        for c in (0, 9):  # the device path's choice (the step calls class_batch_indices)
            np.testing.assert_array_equal(
                condense.class_batch_indices(s, jax.random.PRNGKey(step), table, counts, c), table[c, :8])
    sampler.close()
    random_s = condense.settings_from_config(tiny_config(), ds)
    assert not np.array_equal(condense.class_batch_indices(random_s, jax.random.PRNGKey(1), table, counts, 0),
                              table[0, :8])


def test_queue_batches_walk_shuffled_passes():
    key, n, b = jax.random.PRNGKey(3), 50, 8  # 6 batches per pass, 2 examples skipped per pass
    walk = np.stack([np.asarray(data_lib.pass_batch(key, n, b, i)) for i in range(12)])
    for p in range(2):
        one_pass = walk[6 * p:6 * p + 6].reshape(-1)
        expected = np.asarray(jax.random.permutation(jax.random.fold_in(key, p), n))[:48]
        np.testing.assert_array_equal(one_pass, expected)  # consecutive slices of one permutation
        assert len(set(one_pass)) == 48
    assert not np.array_equal(np.sort(walk[:6].reshape(-1)), np.sort(walk[6:].reshape(-1)))
    with pytest.raises(ValueError, match="batch_size 60 must be in \\[1, num_examples=50\\]"):
        data_lib.pass_batch(key, n, 60, 0)
    # Iteration t, member m, step k takes batch (t * 2 + m) * 2 + k of the run's walk.
    ds, _, s = _quirk_settings()
    base = jax.random.PRNGKey(5)
    got = np.asarray(condense.queue_pass_indices(s, base, len(ds.train_labels), 3))
    walk_key = jax.random.fold_in(base, condense.PASS_SALT)
    for m in range(2):
        for k in range(2):
            np.testing.assert_array_equal(
                got[m, k], data_lib.pass_batch(walk_key, len(ds.train_labels), 16, (3 * 2 + m) * 2 + k))
    sampler = condense.HostSampler(s, ds, np.asarray(base))
    np.testing.assert_array_equal(sampler.indices(3)[1], got)  # the host path feeds the same batches
    sampler.close()


def test_tiled_init_is_2x2_downscales_of_one_first_real_image():
    ds, _, s = _quirk_settings()
    syn = condense.init_synset(s, ds, seed=0, init="real_tiled")
    real = np.asarray(data_lib.normalize(ds.train_images, ds.mean, ds.std))
    halved = real.reshape(-1, 8, 2, 8, 2, 1).mean(axis=(2, 4))  # bilinear 16 -> 8, no antialias
    for c in range(10):
        first = np.flatnonzero(ds.train_labels == c)[0]  # data.class_sampling="first": file order
        image = np.asarray(syn.images[c, 0])
        for r in (0, 8):
            for q in (0, 8):
                np.testing.assert_allclose(image[r:r + 8, q:q + 8], halved[first], atol=1e-5)
    # "real" with first files packs 4 different (the first 4) images instead.
    packed = np.asarray(condense.init_synset(s, ds, seed=0, init="real").images)
    firsts = np.flatnonzero(ds.train_labels == 0)[:4]
    np.testing.assert_allclose(packed[0, 0, 8:, :8], halved[firsts[1]], atol=1e-5)  # piece 1 = bottom-left


def test_unnormalized_condensation_uses_0_1_pixels_and_exports_them_as_such(tmp_path):
    ds, c, s = _quirk_settings(**{"idm.unnormalized": True, "idm.init": "real_whole"})
    syn = condense.init_synset(s, ds, seed=0, init="real_whole")
    for cls in (0, 4):
        first = np.flatnonzero(ds.train_labels == cls)[0]
        np.testing.assert_allclose(syn.images[cls, 0], ds.train_images[first] / 255.0, atol=1e-6)
    x = condense.normalize_real(s, ds.train_images[:2], ds.mean, ds.std)
    np.testing.assert_allclose(x, ds.train_images[:2] / 255.0, atol=1e-6)
    state = condense.CondenseState(step=jnp.int32(0), key=jax.random.PRNGKey(0), syn=syn, queue=None,
                                   nonfinite_step=jnp.int32(-1))
    path = runner.export_synthetic(str(tmp_path), state, ds, s, c)
    with np.load(path) as z:  # the file says its pixels are [0, 1] ones (mean 0, std 1)
        np.testing.assert_allclose(z["mean"], [0.0])
        np.testing.assert_allclose(z["std"], [1.0])
        first = np.flatnonzero(ds.train_labels == 0)[0]
        np.testing.assert_allclose(z["images"][0], ds.train_images[first] / 255.0, atol=1e-6)
    normalized = condense.settings_from_config(tiny_config(), ds)
    np.testing.assert_allclose(condense.normalize_real(normalized, ds.train_images[:2], ds.mean, ds.std),
                               data_lib.normalize(ds.train_images[:2], ds.mean, ds.std), atol=1e-6)


@pytest.mark.slow
def test_release_loader_quirks_host_and_device_give_the_same_steps():
    ds, c, s = _quirk_settings(**{"idm.unnormalized": True, "idm.init": "real_tiled"})
    (device_state, m_device), (host_state, m_host) = _device_and_host_steps(
        s, ds, condense.init_state(s, ds, 0, "real_tiled"), 2)
    np.testing.assert_allclose(np.asarray(host_state.syn.images), np.asarray(device_state.syn.images),
                               rtol=1e-5, atol=1e-5)
    assert float(m_host["loss"]) == pytest.approx(float(m_device["loss"]), rel=1e-5)
