"""--mode=export: an ImageFolder of PNGs and DD-Ranking's NCHW arrays of what the evaluator trains on."""

import json
import os
import sys
import types

import jax
import numpy as np
import pytest

from configs import quick
from idm_jax import augment, coresets, data, evaluate, export, synthetic_file


@pytest.fixture(scope="module")
def digits():
    return data.load_config_dataset(quick.get_config("2"))


@pytest.fixture(scope="module")
def digit_set(digits, tmp_path_factory):
    """A partitioned set as IDM initialises one (l = 2): each of 2 images per class packs 4 real
    digits downscaled to 8x8 (80 images to train on), two pixels pushed outside [0, 1] as synthetic
    images may be."""
    idx = coresets.select_random(jax.random.PRNGKey(3), digits.train_labels, digits.num_classes, 8)
    real = np.asarray(data.normalize(digits.train_images[idx], digits.mean, digits.std))
    small = real.reshape(20, 4, 8, 2, 8, 2, 1).mean(axis=(3, 5))  # [stored image, quadrant, 8, 8, 1]
    images = np.concatenate([np.concatenate([small[:, 0], small[:, 1]], 2),
                             np.concatenate([small[:, 2], small[:, 3]], 2)], 1)
    idx = idx[::4]
    images[0, 0, 0, 0] = (1.2 - digits.mean[0]) / digits.std[0]
    images[1, 0, 0, 0] = (-0.1 - digits.mean[0]) / digits.std[0]
    path = synthetic_file.save_synthetic(str(tmp_path_factory.mktemp("set") / "synthetic.npz"), images,
                                         digits.train_labels[idx], mean=digits.mean, std=digits.std,
                                         class_names=digits.class_names, partition_factor=2, method="random",
                                         dataset=digits.name)
    return synthetic_file.load_synthetic(path)


@pytest.fixture(scope="module")
def exported(digit_set, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export"))
    return out, export.export_set(digit_set, out)


def test_imagefolder_has_every_expanded_image_in_label_order(digit_set, exported):
    out, record = exported
    folder = os.path.join(out, "imagefolder")
    classes = sorted(os.listdir(folder))
    assert classes == [export.class_folder(c, n, 10) for c, n in enumerate(digit_set.class_names)]
    assert classes[0] == "000_0" and classes[9] == "009_9"
    assert [len(os.listdir(os.path.join(folder, c))) for c in classes] == [8] * 10  # 2 images x 2 x 2 pieces
    assert record["exported_images"] == 80 and record["stored_images"] == 20
    assert record["imagefolder"]["images_per_class_folder"] == dict.fromkeys(classes, 8)


def test_png_values_are_the_rounded_pixels_of_the_evaluator_input(digit_set, exported):
    out, record = exported
    images, labels = export.evaluator_inputs(digit_set)
    expected = np.asarray(augment.partition_expand(digit_set.images_normalized, None, 2)[0])
    np.testing.assert_array_equal(images, expected)
    u8, png_labels, _ = export.read_imagefolder(os.path.join(out, "imagefolder"))
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
    images, labels = export.evaluator_inputs(digit_set)
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
    written = export.write_ddranking(str(tmp_path), np.zeros((3, 4, 4, 2), np.float32), np.arange(3))
    assert written == ["images.npy", "labels.npy", "images.pt", "labels.pt"]
    assert (tmp_path / "images.pt").read_bytes() == b"pt"
    assert tensors[0].shape == (3, 2, 4, 4) and tensors[1].dtype == np.int64


def test_export_mode_of_a_bare_images_labels_file(digits, tmp_path):
    x = np.random.default_rng(0).random((20, 16, 16, 1)).astype(np.float32)
    np.savez(tmp_path / "bare.npz", images=x, labels=np.repeat(np.arange(10), 2))
    c = quick.get_config("2")
    record = export.run_export(c, str(tmp_path / "out"), str(tmp_path / "bare.npz"))
    assert record["exported_images"] == 20 and record["partition_factor"] == 1
    assert record["rounding_change"]["clipped_fraction"] == 0.0
    assert record["rounding_change"]["max_change_levels"] <= 0.5 + 1e-3
    u8, labels, _ = export.read_imagefolder(str(tmp_path / "out" / "imagefolder"))
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
    u8, labels, _ = export.read_imagefolder(os.path.join(out, "imagefolder"))
    png = score(np.asarray(data.normalize(u8, digits.mean, digits.std)), labels, 1)
    print(f"round trip: set {original['mean']:.2f} ± {original['std']:.2f}, .npy {npy['mean']:.2f} ± "
          f"{npy['std']:.2f}, PNG {png['mean']:.2f} ± {png['std']:.2f}")
    assert npy["accuracies"] == pytest.approx(original["accuracies"], abs=1e-6)  # the same input
    spread = max(original["std"], png["std"], 1.0)
    assert abs(png["mean"] - original["mean"]) <= 3 * spread


def _set(dataset, mean, std, images_normalized, labels=None, classes=10):
    labels = np.arange(len(images_normalized)) % classes if labels is None else labels
    return synthetic_file.SyntheticSet(
        images=np.clip(images_normalized * np.float32(std) + np.float32(mean), 0, 1),
        images_normalized=np.asarray(images_normalized, np.float32), labels=np.asarray(labels, np.int32),
        mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32),
        class_names=tuple(str(k) for k in range(classes)), partition_factor=1, method="idm", dataset=dataset)


def test_a_cifar100_export_carries_ddranking_normalization(tmp_path):
    """DD-Ranking normalizes CIFAR-100 with CIFAR-10's statistics: the arrays are renormalized to
    those, the PNGs keep the pixels."""
    c100_mean, c100_std = data.NORMALIZATION["cifar100"]
    pixels = np.full((100, 4, 4, 3), 0.5, np.float32)
    pixels[0, 0, 0] = (0.0, 0.25, 1.0)
    synset = _set("cifar100-jpeg", c100_mean, c100_std, (pixels - c100_mean) / np.float32(c100_std), classes=100)
    record = export.export_set(synset, str(tmp_path))
    x = np.load(tmp_path / "ddranking" / "images.npy")
    # (0.5 - 0.4914) / 0.2023 = 0.042511, (0.0 - 0.4914) / 0.2023 = -2.429066, (1 - 0.4465) / 0.2010 = 2.753731
    assert x[1, 0, 0, 0] == pytest.approx(0.042511, abs=1e-5)
    assert x[0, :, 0, 0] == pytest.approx([-2.429066, (0.25 - 0.4822) / 0.1994, 2.753731], abs=1e-5)
    assert record["ddranking"]["mean"] == [0.4914, 0.4822, 0.4465]
    assert record["ddranking"]["std"] == [0.2023, 0.1994, 0.2010]
    assert record["ddranking"]["normalization"] == ("DD-Ranking's normalization of CIFAR100 "
                                                    "(ddranking 0.2.0, utils/data.py)")
    assert record["mean"] == pytest.approx(list(c100_mean))  # the evaluator's: CIFAR-100's own
    saved = json.load(open(tmp_path / "export.json"))
    assert saved["ddranking"]["normalization"].startswith("DD-Ranking's normalization of CIFAR100")
    u8, _, _ = export.read_imagefolder(str(tmp_path / "imagefolder"))
    assert u8[0, 0, 0].tolist() == [0, 64, 255] and u8[1, 0, 0].tolist() == [128, 128, 128]


def test_a_set_stored_unnormalized_is_renormalized_as_evaluate_does(tmp_path):
    """The ImageNet subset condenses [0, 1] images (stored with mean 0, std 1): the evaluator, and so
    the export, sees them under ImageNet's statistics."""
    pixels = np.random.default_rng(1).random((10, 4, 4, 3)).astype(np.float32)
    synset = _set("imagenet_subset", [0, 0, 0], [1, 1, 1], pixels)
    record = export.export_set(synset, str(tmp_path))
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    images, _ = export.evaluator_inputs(synset, mean, std)
    np.testing.assert_allclose(images, (pixels - mean) / std, atol=1e-5)
    x = np.load(tmp_path / "ddranking" / "images.npy")
    np.testing.assert_allclose(x, ((pixels - mean) / std).transpose(0, 3, 1, 2), atol=1e-5)
    assert record["mean"] == pytest.approx(mean.tolist()) and record["stored_mean"] == [0.0, 0.0, 0.0]
    assert record["rounding_change"]["max_change_levels"] <= 0.5 + 1e-3  # the PNGs are the same pixels
    u8, _, _ = export.read_imagefolder(str(tmp_path / "imagefolder"))
    np.testing.assert_array_equal(np.sort(u8.ravel()), np.sort(np.round(pixels * 255).astype(np.uint8).ravel()))


def test_a_dataset_ddranking_lacks_keeps_the_evaluators_normalization(digit_set):
    theirs = export.ddranking_normalization("digits", 1, (digit_set.mean, digit_set.std))
    assert theirs["mean"] == pytest.approx(digit_set.mean.tolist())
    assert "has no dataset like 'digits'" in theirs["source"]


def test_export_of_a_non_finite_set_is_refused_and_writes_nothing(tmp_path):
    x = np.random.default_rng(0).random((20, 16, 16, 1)).astype(np.float32)
    x[0, 0, 0, 0], x[1, 1, 1, 0] = np.nan, np.inf
    np.savez(tmp_path / "bad.npz", images=x, labels=np.repeat(np.arange(10), 2))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"2 of 5120 values of 'images' are not finite \(1 NaN, 1 infinite\); "
                                         r"refusing to export it$"):
        export.run_export(quick.get_config("2"), str(out), str(tmp_path / "bad.npz"))
    assert os.listdir(out) == []


def _read_like_torchvision(folder, files, label_key):
    """torchvision's CIFAR10.__init__: pickle.load(latin1), vstack, reshape to NCHW, transpose to NHWC."""
    import pickle
    data_rows, targets = [], []
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data_rows.append(entry["data"])
        targets.extend(entry[label_key])
    return np.vstack(data_rows).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1)), targets


@pytest.mark.parametrize("classes", [10, 100])
def test_torchvision_cifar_layout_reads_back_the_same_images(tmp_path, classes):
    rng = np.random.default_rng(classes)
    train = rng.integers(0, 256, (2 * classes, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (classes, 32, 32, 3), dtype=np.uint8)
    train_labels, test_labels = np.arange(2 * classes) % classes, np.arange(classes)[::-1]
    names = [f"class{k}" for k in range(classes)]
    folder = export.write_torchvision_cifar(str(tmp_path), train, train_labels, test, test_labels, names)
    tv_folder, train_files, test_file, meta, label_key, names_key = export.TORCHVISION_CIFAR[classes]
    assert folder == str(tmp_path / tv_folder)
    assert sorted(os.listdir(folder)) == sorted(train_files + [test_file, meta])
    images, labels = _read_like_torchvision(folder, train_files, label_key)
    np.testing.assert_array_equal(images, train)
    assert labels == train_labels.tolist()
    images, labels = _read_like_torchvision(folder, [test_file], label_key)
    np.testing.assert_array_equal(images, test)
    assert labels == test_labels.tolist()
    import pickle
    assert pickle.load(open(os.path.join(folder, meta), "rb"), encoding="latin1")[names_key] == names
    # numpy 2 pickles arrays naming numpy._core, which numpy 1 (torch environments) lacks
    assert b"_core" not in open(os.path.join(folder, test_file), "rb").read()
    # one image's row: its red plane first, as CIFAR stores it
    assert export.cifar_rows(train[:1])[0, :1024].tolist() == train[0, :, :, 0].ravel().tolist()
    with pytest.raises(ValueError, match="10 or 100 classes, not 7"):
        export.write_torchvision_cifar(str(tmp_path), train, train_labels, test, test_labels, names[:7])


def _ddranking_python() -> str | None:
    """A Python that imports ddranking: this one, else $IDM_DDRANKING_PYTHON (a separate torch venv)."""
    import importlib.util
    import subprocess
    if importlib.util.find_spec("ddranking") is not None:
        return sys.executable
    other = os.environ.get("IDM_DDRANKING_PYTHON", "")
    if other and subprocess.run([other, "-c", "import ddranking"], capture_output=True).returncode == 0:
        return other
    return None


@pytest.mark.slow
def test_ddrankings_own_evaluator_scores_an_export(tmp_path):
    """DD-Ranking's LabelRobustScoreHard (its code, unchanged but for the two workarounds of
    benchmarks/ddranking_score.py) scores a --mode=export of one real CIFAR-10 image per class, at the
    smallest setting it accepts: 10 epochs, one evaluation, 20 train and 20 test images per class."""
    import subprocess
    python = _ddranking_python()
    if python is None:
        pytest.skip("ddranking is not importable here and $IDM_DDRANKING_PYTHON names no Python that imports it")
    if not os.environ.get("IDM_CIFAR10"):
        pytest.skip("$IDM_CIFAR10 (the CIFAR-10 archive) is not set")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(repo, "benchmarks", "ddranking_score.py")
    from configs import cifar10
    config = cifar10.get_config("1")
    ds = data.load_config_dataset(config)
    out = subprocess.run([sys.executable, script, "cifar", "--config=configs/cifar10.py", f"--out={tmp_path / 'data'}",
                          "--train_per_class=20", "--test_per_class=20"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    idx = np.asarray([np.flatnonzero(ds.train_labels == c)[0] for c in range(10)])
    real = np.asarray(data.normalize(ds.train_images[idx], ds.mean, ds.std))
    npz = synthetic_file.save_synthetic(str(tmp_path / "real1.npz"), real, ds.train_labels[idx], mean=ds.mean,
                                        std=ds.std, class_names=ds.class_names, partition_factor=1,
                                        method="random", dataset=ds.name)
    export.run_export(config, str(tmp_path / "export"), npz)
    out = subprocess.run([python, script, "score", f"--export={tmp_path / 'export'}", f"--data={tmp_path / 'data'}",
                          "--ipc=1", "--epochs=10", "--num_eval=1", "--real_batch_size=64",
                          f"--out={tmp_path / 'scores'}"], cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.load(open(tmp_path / "scores" / "scores.json"))
    acc, got = record["accuracies"], record["ddranking"]
    assert all(len(v) == 1 and 0.0 <= v[0] <= 100.0 for v in acc.values()), acc
    # its HLR and IOR are differences of the accuracies it logged, in percentage points
    assert got["hard_label_recovery_mean"] == pytest.approx(acc["full"][0] - acc["syn"][0])
    assert got["improvement_over_random_mean"] == pytest.approx(acc["syn"][0] - acc["random"][0])
    # its LRS is the formula on those points; ours on fractions is the same formula on points / 100
    hlr, ior = got["hard_label_recovery_mean"], got["improvement_over_random_mean"]
    from idm_jax import yardstick
    assert got["label_robust_score_mean"] == pytest.approx(yardstick.lrs_ddranking_code(ior, hlr))
    assert record["lrs_of_fractions"] == pytest.approx(yardstick.lrs(ior / 100, hlr / 100))
    assert record["settings"]["normalization"].startswith("DD-Ranking's normalization of CIFAR10")
    rows = open(tmp_path / "scores" / "obj_scores.csv").read().splitlines()
    assert rows[0] == "hard_label_recovery,improvement_over_random,lrs" and len(rows) == 2  # saved despite its bug


def test_a_full_disk_while_writing_the_pngs_names_the_folder_and_the_space(tmp_path, monkeypatch):
    import errno
    from PIL import Image
    from idm_jax import workdir as workdir_lib
    images = np.zeros((10, 32, 32, 3), np.uint8)
    folder = str(tmp_path / "imagefolder")
    export.write_imagefolder(folder, images[:2], np.arange(2), [str(k) for k in range(10)])
    before = sorted(os.listdir(folder))

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(workdir_lib.NoSpaceError) as e:
        export.write_imagefolder(folder, images, np.arange(10), [str(k) for k in range(10)])
    # 10 files of 3072 pixels + header in one 4096-byte block each, and 10 class folders: 81.9 kB
    assert str(e.value).startswith(f"no space left on the device to write the 10 PNGs of imagefolder/ in {tmp_path} "
                                   "(needs about 81.9 kB, ")
    assert "; the previous imagefolder/ is intact. Free some space" in str(e.value)
    assert sorted(os.listdir(folder)) == before and sorted(os.listdir(tmp_path)) == ["imagefolder"]
