"""--mode=export: an ImageFolder of PNGs and DD-Ranking's NCHW arrays of what the evaluator trains on."""

import json
import os
import sys
import types

import jax
import numpy as np
import pytest

from configs import quick
from idm_jax import augment, baselines, data, evaluate, export, set_formats


@pytest.fixture(scope="module")
def digits():
    return data.load_config_dataset(quick.get_config("2"))


@pytest.fixture(scope="module")
def digit_set(digits, tmp_path_factory):
    """A partitioned set as IDM initialises one (l = 2): each of 2 images per class packs 4 real
    digits downscaled to 8x8 (80 images to train on), two pixels pushed outside [0, 1] as synthetic
    images may be."""
    idx = baselines.select_random(jax.random.PRNGKey(3), digits.train_labels, digits.num_classes, 8)
    real = np.asarray(data.normalize(digits.train_images[idx], digits.mean, digits.std))
    small = real.reshape(20, 4, 8, 2, 8, 2, 1).mean(axis=(3, 5))  # [stored image, quadrant, 8, 8, 1]
    images = np.concatenate([np.concatenate([small[:, 0], small[:, 1]], 2),
                             np.concatenate([small[:, 2], small[:, 3]], 2)], 1)
    idx = idx[::4]
    images[0, 0, 0, 0] = (1.2 - digits.mean[0]) / digits.std[0]
    images[1, 0, 0, 0] = (-0.1 - digits.mean[0]) / digits.std[0]
    path = export.save_synthetic(str(tmp_path_factory.mktemp("set") / "synthetic.npz"), images,
                                 digits.train_labels[idx], mean=digits.mean, std=digits.std,
                                 class_names=digits.class_names, partition_factor=2, method="random",
                                 dataset=digits.name)
    return export.load_synthetic(path)


@pytest.fixture(scope="module")
def exported(digit_set, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export"))
    return out, set_formats.export_set(digit_set, out)


def test_imagefolder_has_every_expanded_image_in_label_order(digit_set, exported):
    out, record = exported
    folder = os.path.join(out, "imagefolder")
    classes = sorted(os.listdir(folder))
    assert classes == [set_formats.class_folder(c, n, 10) for c, n in enumerate(digit_set.class_names)]
    assert classes[0] == "000_0" and classes[9] == "009_9"
    assert [len(os.listdir(os.path.join(folder, c))) for c in classes] == [8] * 10  # 2 images x 2 x 2 pieces
    assert record["exported_images"] == 80 and record["stored_images"] == 20
    assert record["imagefolder"]["images_per_class_folder"] == dict.fromkeys(classes, 8)


def test_png_values_are_the_rounded_pixels_of_the_evaluator_input(digit_set, exported):
    out, record = exported
    images, labels = set_formats.evaluator_inputs(digit_set)
    expected = np.asarray(augment.partition_expand(digit_set.images_normalized, None, 2)[0])
    np.testing.assert_array_equal(images, expected)
    u8, png_labels, _ = set_formats.read_imagefolder(os.path.join(out, "imagefolder"))
    order = np.lexsort((np.arange(len(labels)), labels))  # files are sorted by class, then index
    np.testing.assert_array_equal(png_labels, labels[order])
    pixels = images * digit_set.std + digit_set.mean
    np.testing.assert_array_equal(u8, np.round(255 * np.clip(pixels, 0, 1)).astype(np.uint8)[order])
    r = record["rounding_change"]
    assert r["clipped_fraction"] > 0 and r["max_change_levels_unclipped"] <= 0.5 + 1e-3
    assert r["max_change_levels"] == pytest.approx(0.2 * 255, abs=0.01)  # the pixel pushed to 1.2
    assert json.load(open(os.path.join(out, "export.json")))["rounding_change"] == r


def test_ddranking_arrays_are_nchw_normalized_evaluator_input(digit_set, exported):
    out, record = exported
    images, labels = set_formats.evaluator_inputs(digit_set)
    x = np.load(os.path.join(out, "ddranking", "images.npy"))
    y = np.load(os.path.join(out, "ddranking", "labels.npy"))
    assert x.dtype == np.float32 and x.shape == (80, 1, 16, 16) and y.dtype == np.int64
    np.testing.assert_array_equal(x, images.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, labels)
    assert record["ddranking"]["files"] == ["images.npy", "labels.npy"]  # no torch here


def test_pt_files_when_torch_is_installed(monkeypatch, tmp_path):
    tensors = []
    fake = types.SimpleNamespace(from_numpy=lambda a: ("tensor", a),
                                 save=lambda obj, f: (tensors.append(obj[1]), f.write(b"pt")))
    monkeypatch.setitem(sys.modules, "torch", fake)
    written = set_formats.write_ddranking(str(tmp_path), np.zeros((3, 4, 4, 2), np.float32), np.arange(3))
    assert written == ["images.npy", "labels.npy", "images.pt", "labels.pt"]
    assert (tmp_path / "images.pt").read_bytes() == b"pt"
    assert tensors[0].shape == (3, 2, 4, 4) and tensors[1].dtype == np.int64


def test_export_mode_of_a_bare_images_labels_file(digits, tmp_path):
    x = np.random.default_rng(0).random((20, 16, 16, 1)).astype(np.float32)
    np.savez(tmp_path / "bare.npz", images=x, labels=np.repeat(np.arange(10), 2))
    c = quick.get_config("2")
    record = set_formats.run_export(c, str(tmp_path / "out"), str(tmp_path / "bare.npz"))
    assert record["exported_images"] == 20 and record["partition_factor"] == 1
    assert record["rounding_change"]["clipped_fraction"] == 0.0
    assert record["rounding_change"]["max_change_levels"] <= 0.5 + 1e-3
    u8, labels, _ = set_formats.read_imagefolder(str(tmp_path / "out" / "imagefolder"))
    np.testing.assert_array_equal(u8, np.round(x * 255).astype(np.uint8))


@pytest.mark.slow
def test_round_trip_scores_the_same(digits, digit_set, exported):
    """Score the set, its .npy export and its PNG export with the same evaluator and keys."""
    out, _ = exported
    cfg = quick.get_config("2").eval
    cfg.epochs, cfg.num_seeds = 30, 2
    key = jax.random.PRNGKey(0)

    def score(images, labels, factor):
        return evaluate.evaluate_archs(images, labels, digits, cfg, archs=["ConvNetD2"], key=key,
                                       partition_factor=factor)["ConvNetD2"]

    original = score(digit_set.images_normalized, digit_set.labels, 2)
    x = np.load(os.path.join(out, "ddranking", "images.npy")).transpose(0, 2, 3, 1)
    npy = score(x, np.load(os.path.join(out, "ddranking", "labels.npy")).astype(np.int32), 1)
    u8, labels, _ = set_formats.read_imagefolder(os.path.join(out, "imagefolder"))
    png = score(np.asarray(data.normalize(u8, digits.mean, digits.std)), labels, 1)
    print(f"round trip: set {original['mean']:.2f} ± {original['std']:.2f}, .npy {npy['mean']:.2f} ± "
          f"{npy['std']:.2f}, PNG {png['mean']:.2f} ± {png['std']:.2f}")
    assert npy["accuracies"] == pytest.approx(original["accuracies"], abs=1e-6)  # the same input
    spread = max(original["std"], png["std"], 1.0)
    assert abs(png["mean"] - original["mean"]) <= 3 * spread
