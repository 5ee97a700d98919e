"""Tests for idm_jax.data: loaders, caching, error messages, sampling helpers."""

import os
import re
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from idm_jax import data
from idm_jax.data import cache as data_cache
from idm_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The CIFAR-10 archive through $IDM_CIFAR10, as configs/cifar10.py reads it; without it the test skips.
CIFAR_ARCHIVE = Path(os.environ.get("IDM_CIFAR10") or "IDM_CIFAR10 unset")

# Toy tree: classes written in unsorted order; labels must follow sorted order.
CLASSES = ("cat", "ant", "bee")
SORTED = ("ant", "bee", "cat")
N_TRAIN, N_TEST = 4, 2


def colour(split: str, cls: str, i: int) -> tuple[int, int, int]:
    """A distinct constant RGB colour for every image of the toy tree."""
    c = SORTED.index(cls)
    return (40 * c + 10 * i + (5 if split == "test" else 0), 100 + 7 * i, 250 - 30 * c)


def make_tree(root: Path, *, test_split: str = "test", test_ext: str = ".png", size=(8, 8)) -> Path:
    """Writes root/{train,<test_split>}/<class>/NNN.<ext> constant-colour images (size = (W, H))."""
    for split, n, ext in (("train", N_TRAIN, ".png"), (test_split, N_TEST, test_ext)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                col = colour("test" if split == test_split else split, cls, i)
                Image.new("RGB", size, col).save(folder / f"{i:03d}{ext}")
    return root


def expected_arrays(split: str, n: int):
    """(images uint8[n*3, 8, 8, 3], labels) of the toy tree in loader order (sorted class, file)."""
    images = np.stack(
        [np.full((8, 8, 3), colour(split, cls, i), np.uint8) for cls in SORTED for i in range(n)]
    )
    labels = np.repeat(np.arange(len(SORTED), dtype=np.int32), n)
    return images, labels


def make_archive(src: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=arcname)
    return dest


@pytest.fixture
def toy_tree(tmp_path) -> Path:
    return make_tree(tmp_path / "toy")


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #


def test_digits_shapes_split_and_range(digits):
    from sklearn.datasets import load_digits

    target = load_digits().target
    ds = digits
    assert ds.name == "digits"
    assert ds.image_shape == (16, 16, 1) and ds.channels == 1 and ds.num_classes == 10
    assert ds.class_names == tuple(str(i) for i in range(10))
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert len(ds.train_images) + len(ds.test_images) == 1797
    # Class counts 178, 182, 177, ... -> floor(80%) in train: 142, 145, 141, ...
    counts = np.bincount(target)
    np.testing.assert_array_equal(np.bincount(ds.train_labels), counts * 4 // 5)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), counts - counts * 4 // 5)
    assert len(ds.train_images) == 1433 and len(ds.test_images) == 364
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255


def test_digits_split_keeps_dataset_order(digits):
    # 2x bilinear upsampling (half-pixel centres) preserves every image's mean,
    # so the mean of image k identifies which source digit it came from.
    from sklearn.datasets import load_digits

    raw = load_digits()
    src_means = raw.images.reshape(len(raw.images), -1).mean(1) * 255 / 16
    first80 = np.zeros(len(raw.target), bool)
    for c in range(10):
        idx = np.flatnonzero(raw.target == c)
        first80[idx[: len(idx) * 4 // 5]] = True
    for images, labels, mask in (
        (digits.train_images, digits.train_labels, first80),
        (digits.test_images, digits.test_labels, ~first80),
    ):
        np.testing.assert_array_equal(labels, raw.target[mask])
        np.testing.assert_allclose(images.reshape(len(images), -1).mean(1), src_means[mask], atol=0.5)


def test_digits_normalization_is_computed_from_train(digits):
    x = digits.train_images.astype(np.float64) / 255
    assert digits.mean.dtype == np.float32 and digits.mean.shape == (1,)
    np.testing.assert_allclose(digits.mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(digits.std, x.std(axis=(0, 1, 2)), rtol=1e-6)
    assert 0.2 < digits.mean[0] < 0.4 and 0.2 < digits.std[0] < 0.45


# --------------------------------------------------------------------------- #
# folders and archives
# --------------------------------------------------------------------------- #


def assert_is_toy(ds, name):
    assert ds.name == name
    assert ds.class_names == SORTED
    assert ds.image_shape == (8, 8, 3)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = expected_arrays(split, n)
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), labels)
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), images)  # PNG: exact


def test_folder_loads_labels_order_and_pixels(toy_tree, tmp_path):
    ds = data.load_dataset(str(toy_tree), cache_dir=str(tmp_path / "cache"))
    assert_is_toy(ds, "toy")
    # "toy" matches no known name: statistics come from the train images.
    x = ds.train_images.astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-6)


def test_archive_loads_identically_to_folder(toy_tree, tmp_path):
    folder = data.load_dataset(str(toy_tree), cache_dir=str(tmp_path / "c1"))
    archive = make_archive(toy_tree, tmp_path / "toy.tar.gz", arcname="toy")  # with a <top>/ folder
    packed = data.load_dataset(str(archive), cache_dir=str(tmp_path / "c2"))
    assert_is_toy(packed, "toy")
    for field in ("train_images", "train_labels", "test_images", "test_labels", "mean", "std"):
        np.testing.assert_array_equal(getattr(packed, field), getattr(folder, field))
    # No <top>/ folder, and a plain .tar: same result.
    flat = tmp_path / "flat.tar"
    with tarfile.open(flat, "w") as tar:
        for split in ("train", "test"):
            tar.add(toy_tree / split, arcname=split)
    assert_is_toy(data.load_dataset(str(flat), cache_dir=str(tmp_path / "c3")), "flat")


def test_jpeg_val_split_and_hidden_files(tmp_path):
    root = make_tree(tmp_path / "toy", test_split="val", test_ext=".JPG")
    (root / "train" / "ant" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "ant" / "._000.png").write_bytes(b"AppleDouble junk")
    (root / "train" / "notes.txt").write_text("ignored")
    ds = data.load_dataset(str(root), cache_dir=str(tmp_path / "cache"))
    images, labels = expected_arrays("test", N_TEST)
    np.testing.assert_array_equal(ds.test_labels, labels)
    # JPEG of a constant colour decodes to nearly that colour.
    np.testing.assert_allclose(ds.test_images.astype(int), images.astype(int), atol=4)
    np.testing.assert_array_equal(ds.train_images, expected_arrays("train", N_TRAIN)[0])


def test_grayscale_first_image_decides_channels(tmp_path):
    root = tmp_path / "gray"
    for split in ("train", "test"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            Image.new("L", (6, 6), 10 + c).save(root / split / cls / "0.png")
            # RGB grey (v, v, v) converts to luminance v exactly.
            Image.new("RGB", (6, 6), (90 + c,) * 3).save(root / split / cls / "1.png")
    ds = data.load_dataset(str(root), cache_dir=str(tmp_path / "cache"))
    assert ds.image_shape == (6, 6, 1)
    np.testing.assert_array_equal(ds.train_images[:, 0, 0, 0], [10, 90, 11, 91])
    np.testing.assert_array_equal(ds.train_labels, [0, 0, 1, 1])


def test_image_size_resizes_and_allows_mixed_sizes(toy_tree, tmp_path):
    Image.new("RGB", (9, 8), colour("train", "bee", 0)).save(toy_tree / "train" / "bee" / "000.png")
    ds = data.load_dataset(str(toy_tree), image_size=4, cache_dir=str(tmp_path / "cache"))
    assert ds.image_shape == (4, 4, 3)
    # Bilinear resizing keeps constant images constant.
    images, _ = expected_arrays("train", N_TRAIN)
    np.testing.assert_array_equal(ds.train_images, images[:, :4, :4])


def no_decoding(*args, **kwargs):
    raise AssertionError("decoded although a cache exists")


def test_second_load_uses_cache(toy_tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    archive = make_archive(toy_tree, tmp_path / "toy.tar.gz", arcname="toy")
    first = data.load_dataset(str(archive), cache_dir=str(cache))
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("decoded-") and files[0].endswith(".npz")  # no tmp left

    monkeypatch.setattr(data.decode, "decode_image", no_decoding)
    assert_is_toy(data.load_dataset(str(archive), cache_dir=str(cache)), "toy")
    # The key is the content, not the path or the time: a copy elsewhere (another
    # name, a newer mtime) reuses the entry, and no second file is written.
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "toy-copy.tar.gz"
    copy.write_bytes(archive.read_bytes())
    os.utime(copy, ns=(0, os.stat(archive).st_mtime_ns + 10**9))
    assert_is_toy(data.load_dataset(str(copy), cache_dir=str(cache)), "toy-copy")
    assert sorted(p.name for p in cache.iterdir()) == files
    # A different image_size or different content must not reuse that cache.
    with pytest.raises(AssertionError, match="decoded although"):
        data.load_dataset(str(archive), image_size=4, cache_dir=str(cache))
    make_tree(tmp_path / "other", size=(4, 4))
    changed = make_archive(tmp_path / "other", tmp_path / "toy.tar.gz", arcname="toy")
    with pytest.raises(AssertionError, match="decoded although"):
        data.load_dataset(str(changed), cache_dir=str(cache))
    assert_is_toy(first, "toy")


def test_archive_key_reads_only_its_ends(tmp_path):
    """The key hashes the size and the first and last MiB: a change at the end is seen."""
    big = tmp_path / "big.tar"
    payload = bytearray(os.urandom(3 * data_cache.HASHED_BYTES))
    big.write_bytes(payload)
    key = data_cache.fingerprint(str(big), None)
    payload[-1] ^= 1  # last MiB
    big.write_bytes(payload)
    assert data_cache.fingerprint(str(big), None) != key
    assert data_cache.fingerprint(str(big), 8) != data_cache.fingerprint(str(big), None)


def test_folder_cache_notices_changed_files(toy_tree, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    data.load_dataset(str(toy_tree), cache_dir=cache)
    monkeypatch.setattr(data.decode, "decode_image", no_decoding)
    data.load_dataset(str(toy_tree), cache_dir=cache)  # unchanged: cache hit
    Image.new("RGB", (8, 8), (1, 2, 3)).save(toy_tree / "train" / "ant" / "999.png")
    with pytest.raises(AssertionError, match="decoded although"):
        data.load_dataset(str(toy_tree), cache_dir=cache)


def test_corrupt_cache_is_rebuilt(toy_tree, tmp_path):
    cache = tmp_path / "cache"
    data.load_dataset(str(toy_tree), cache_dir=str(cache))
    (cache_file,) = cache.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # as if truncated
    assert_is_toy(data.load_dataset(str(toy_tree), cache_dir=str(cache)), "toy")
    assert np.load(cache_file)["train_images"].shape == (12, 8, 8, 3)  # rewritten whole


# --------------------------------------------------------------------------- #
# normalization
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "name, key",
    [
        ("cifar10-jpeg", "cifar10"),
        ("CIFAR-100", "cifar100"),
        ("cifar_100_png", "cifar100"),
        ("tiny-imagenet-200", "tinyimagenet"),
        ("imagenet_subset_100", "imagenet"),
        ("fashion_mnist", "fashion_mnist"),
        ("mnist", "mnist"),
        ("digits", None),
    ],
)
def test_infer_normalization(name, key):
    assert data.infer_normalization(name) == key


def test_normalization_from_name_and_explicit_key(toy_tree, tmp_path):
    archive = make_archive(toy_tree, tmp_path / "my-cifar10.tar.gz", arcname="x")
    ds = data.load_dataset(str(archive), cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(ds.mean, np.float32([0.4914, 0.4822, 0.4465]))
    np.testing.assert_array_equal(ds.std, np.float32([0.2023, 0.1994, 0.2010]))
    ds = data.load_dataset(str(archive), normalization="imagenet", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(ds.std, np.float32([0.229, 0.224, 0.225]))
    ds = data.load_dataset(str(archive), normalization="train", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_allclose(ds.mean, (ds.train_images / 255).mean(axis=(0, 1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="'mnist' has 1 channel"):
        data.load_dataset(str(archive), normalization="mnist", cache_dir=str(tmp_path / "cache"))


def test_channel_stats_hand_computed():
    images = np.zeros((2, 1, 2, 2), np.uint8)
    images[0, 0, :, 0] = 255  # channel 0: values 255, 255, 0, 0
    images[:, 0, :, 1] = 51  # channel 1: constant 0.2
    mean, std = data.channel_stats(images)
    np.testing.assert_allclose(mean, [0.5, 0.2], rtol=1e-6)
    np.testing.assert_allclose(std, [0.5, 0.0], atol=1e-6)


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


def test_unknown_source_string():
    with pytest.raises(ValueError, match=r"'cifar10'.*tfds:<name>"):
        data.load_dataset("cifar10")


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "data.tar.gz"
    with pytest.raises(FileNotFoundError, match="data.tar.gz"):
        data.load_dataset(str(missing))


def test_non_archive_file(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(ValueError, match="data.zip"):
        data.load_dataset(str(f))


def test_unknown_normalization_key(digits):
    with pytest.raises(ValueError, match="'cifar-10'"):
        data.load_dataset("digits", normalization="cifar-10")


def test_empty_class_folder(toy_tree, tmp_path):
    (toy_tree / "test" / "dog").mkdir()
    (toy_tree / "train" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(toy_tree / "train" / "dog" / "0.png")
    with pytest.raises(ValueError, match=r"class 'dog' in split 'test' has no images"):
        data.load_dataset(str(toy_tree), cache_dir=str(tmp_path / "cache"))
    # Same in an archive, where the empty folder is only a directory entry.
    archive = make_archive(toy_tree, tmp_path / "toy.tgz", arcname="toy")
    with pytest.raises(ValueError, match=r"class 'dog' in split 'test' has no images"):
        data.load_dataset(str(archive), cache_dir=str(tmp_path / "cache"))


def test_mismatched_image_sizes(toy_tree, tmp_path):
    Image.new("RGB", (9, 8)).save(toy_tree / "train" / "bee" / "002.png")  # W=9, H=8
    with pytest.raises(ValueError, match=r"bee/002\.png.*8x9.*8x8.*image_size="):
        data.load_dataset(str(toy_tree), cache_dir=str(tmp_path / "cache"))


def test_missing_splits(toy_tree, tmp_path):
    test_dir = toy_tree / "test"
    test_dir.rename(toy_tree / "elsewhere")
    with pytest.raises(ValueError, match="split folder 'test' is missing"):
        data.load_dataset(str(toy_tree), cache_dir=str(tmp_path / "cache"))
    (toy_tree / "train").rename(toy_tree / "training")
    with pytest.raises(ValueError, match="split folder 'train' is missing"):
        data.load_dataset(str(toy_tree), cache_dir=str(tmp_path / "cache"))


def test_test_classes_must_match(toy_tree, tmp_path):
    (toy_tree / "test" / "bee").rename(toy_tree / "test" / "bees")
    with pytest.raises(ValueError, match=r"missing from 'test': \['bee'\].*not in 'train': \['bees'\]"):
        data.load_dataset(str(toy_tree), cache_dir=str(tmp_path / "cache"))


def test_no_images_found(tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        data.load_dataset(str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))


def test_undecodable_image(toy_tree, tmp_path):
    (toy_tree / "train" / "ant" / "001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"ant/001\.png"):
        data.load_dataset(str(toy_tree), cache_dir=str(tmp_path / "cache"))


# --------------------------------------------------------------------------- #
# tfds (offline only: the builder is faked)
# --------------------------------------------------------------------------- #


def test_tfds_unknown_name(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def builder(name, data_dir=None):
        raise tfds.core.registered.DatasetNotFoundError(f"Dataset {name} not found. <long list>")

    monkeypatch.setattr(tfds, "builder", builder)
    with pytest.raises(ValueError, match="unknown tfds dataset 'cifar11'"):
        data.load_dataset("tfds:cifar11")


def test_tfds_loads_via_builder_with_validation_fallback(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)
    splits = {
        "train": (rng.integers(0, 256, (6, 5, 5), dtype=np.uint8), np.array([0, 1, 2, 0, 1, 2], np.int64)),
        "validation": (rng.integers(0, 256, (3, 5, 5), dtype=np.uint8), np.array([2, 1, 0], np.int64)),
    }
    calls = {}

    class FakeBuilder:
        info = types.SimpleNamespace(
            splits={"train": None, "validation": None},
            features={"label": types.SimpleNamespace(names=["x", "y", "z"])},
        )

        def download_and_prepare(self, download_config=None):
            calls["manual_dir"] = download_config.manual_dir if download_config else None

        def as_dataset(self, split, batch_size, as_supervised):
            assert batch_size == -1 and as_supervised
            return split

    def builder(name, data_dir=None):
        calls["name"], calls["data_dir"] = name, data_dir
        return FakeBuilder()

    monkeypatch.setattr(tfds, "builder", builder)
    monkeypatch.setattr(tfds, "as_numpy", lambda split: splits[split])
    monkeypatch.setenv("IDM_TFDS_MANUAL_DIR", str(tmp_path / "manual"))
    ds = data.load_dataset("tfds:mnist", cache_dir=str(tmp_path / "tfds"))
    assert calls == {"name": "mnist", "data_dir": str(tmp_path / "tfds"), "manual_dir": str(tmp_path / "manual")}
    assert ds.name == "mnist" and ds.class_names == ("x", "y", "z")
    np.testing.assert_array_equal(ds.train_images[..., 0], splits["train"][0])  # [N,H,W] -> [N,H,W,1]
    np.testing.assert_array_equal(ds.test_labels, [2, 1, 0])
    assert ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.mean, np.float32([0.1307]))  # inferred from the tfds name


def test_tfds_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(errors.MissingDependency, match="pip install tensorflow-datasets"):
        data.load_dataset("tfds:cifar10")


def _tfds_builder_failing_with(monkeypatch, exception):
    tfds = pytest.importorskip("tensorflow_datasets")

    class Builder:
        def download_and_prepare(self, download_config=None):
            raise exception

    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())


def test_tfds_offline_download_is_one_line_naming_the_source_and_the_offline_ways(monkeypatch):
    cause = ("HTTPSConnectionPool(host='www.cs.toronto.edu', port=443): Max retries exceeded with url: "
             "/~kriz/cifar-100-binary.tar.gz (Caused by NameResolutionError(...))")
    _tfds_builder_failing_with(monkeypatch, ConnectionError(cause))  # requests' own is an OSError too
    with pytest.raises(OSError) as raised:
        data.load_dataset("tfds:cifar100")
    message = str(raised.value)
    assert message.startswith("could not download or prepare 'tfds:cifar100' (ConnectionError: HTTPSConnectionPool")
    assert "IDM_TFDS_MANUAL_DIR" in message and "\n" not in message


@pytest.mark.parametrize("missing, install", [("importlib_resources", "pip install importlib-resources"),
                                              ("tensorflow", "pip install 'idm_jax[tf]'")])
def test_tfds_undeclared_or_optional_package_is_named(monkeypatch, missing, install):
    # tensorflow-datasets 4.9.10 imports importlib_resources without declaring it (tensorflow/datasets#11212).
    _tfds_builder_failing_with(monkeypatch, ModuleNotFoundError(f"No module named '{missing}'", name=missing))
    with pytest.raises(errors.MissingDependency, match=re.escape(install)):
        data.load_dataset("tfds:cifar100")


def test_installed_tfds_finds_every_package_it_imports():
    """pyproject.toml lists what tensorflow-datasets imports but does not declare."""
    pytest.importorskip("tensorflow_datasets")
    import importlib_resources.abc  # noqa: F401  (tfds's dataset_builder needs it to download)


def test_main_reports_a_missing_tfds_in_one_line(tmp_path):
    blocker = tmp_path / "site" / "tensorflow_datasets"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "main.py", "--config=configs/quick.py", f"--workdir={tmp_path}/run",
                          "--config.data.source=tfds:cifar10"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "error: loading 'tfds:cifar10' needs tensorflow-datasets: pip install tensorflow-datasets" in out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- #
# index tables, sampling, normalization
# --------------------------------------------------------------------------- #


def test_class_index_table_hand_made():
    table, counts = data.class_index_table(np.array([2, 0, 1, 0, 2, 2]), num_classes=4)
    np.testing.assert_array_equal(counts, [2, 1, 3, 0])
    np.testing.assert_array_equal(table, [[1, 3, -1], [2, -1, -1], [0, 4, 5], [-1, -1, -1]])
    assert table.dtype == np.int32 and counts.dtype == np.int32
    with pytest.raises(ValueError, match="label 4"):
        data.class_index_table(np.array([0, 4]), num_classes=3)


@pytest.fixture(scope="module")
def table_counts():
    labels = np.array([0, 1, 2, 1, 0, 1, 2, 1, 1, 0, 2, 1])  # counts 3, 6, 3
    table, counts = data.class_index_table(labels, 3)
    return labels, jnp.asarray(table), jnp.asarray(counts)


def test_sample_class_batch_distinct_and_in_class(table_counts):
    labels, table, counts = table_counts
    keys = jax.random.split(jax.random.key(0), 300)
    # Traced class index under vmap, as inside the condensation step; lax.map
    # over keys because vmapping threefry over 300 keys compiles slowly on CPU.
    per_class = jax.vmap(lambda k, c: data.sample_class_batch(k, table, counts, c, 3), in_axes=(None, 0))
    draws = np.asarray(jax.jit(lambda ks: jax.lax.map(lambda k: per_class(k, jnp.arange(3)), ks))(keys))
    assert draws.shape == (300, 3, 3)
    for c in range(3):
        d = draws[:, c]
        assert (labels[d] == c).all()  # never padding (-1), always the class
        assert all(len(set(row)) == 3 for row in d)
    # Class 1 (6 examples, 3 drawn): each index is picked with probability 1/2.
    freq = np.bincount(draws[:, 1].ravel(), minlength=len(labels))[labels == 1] / 300
    np.testing.assert_allclose(freq, 0.5, atol=0.12)
    # batch_size == count: a permutation of the whole class.
    full = data.sample_class_batch(keys[0], table, counts, 0, 3)
    assert sorted(np.asarray(full).tolist()) == [0, 4, 9]


def test_check_batch_size(table_counts):
    _, _, counts = table_counts
    data.check_batch_size(counts, 3)
    with pytest.raises(ValueError, match="batch_size 4 exceeds the 3 examples of class 0"):
        data.check_batch_size(counts, 4)


def test_sample_batch():
    idx = np.asarray(data.sample_batch(jax.random.key(1), 10, 10))
    assert sorted(idx.tolist()) == list(range(10))
    idx = np.asarray(jax.jit(lambda k: data.sample_batch(k, 50, 20))(jax.random.key(2)))
    assert idx.shape == (20,) and len(set(idx.tolist())) == 20 and idx.min() >= 0 and idx.max() < 50
    with pytest.raises(ValueError, match="batch_size 11"):
        data.sample_batch(jax.random.key(0), 10, 11)


def test_normalize_denormalize():
    mean, std = np.float32([0.5, 0.25]), np.float32([0.25, 0.5])
    x = np.array([[[[255, 0], [51, 128]]]], np.uint8)  # [1, 1, 2, 2]
    z = data.normalize(x, mean, std)
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z[0, 0, 0], [2.0, -0.5], rtol=1e-6)  # (1-.5)/.25, (0-.25)/.5
    back = jax.jit(data.denormalize)(jax.jit(data.normalize)(x, mean, std), mean, std)
    np.testing.assert_allclose(back, x / 255.0, atol=1e-6)


def test_array_dataset_checks_shapes():
    images = np.zeros((2, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match="train images"):
        data.ArrayDataset("x", images, np.zeros(3, np.int32), images, np.zeros(2, np.int32),
                          ("a",), np.zeros(1, np.float32), np.ones(1, np.float32))


# --------------------------------------------------------------------------- #
# the real CIFAR-10 archive
# --------------------------------------------------------------------------- #


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason=f"no CIFAR-10 archive ({CIFAR_ARCHIVE}): set IDM_CIFAR10")
def test_cifar10_archive():
    ds = data.load_dataset(str(CIFAR_ARCHIVE))  # default cache dir: later runs take seconds
    assert ds.name == "cifar10-jpeg"
    assert ds.train_images.shape == (50_000, 32, 32, 3) and ds.test_images.shape == (10_000, 32, 32, 3)
    assert ds.class_names == (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    )
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
    np.testing.assert_array_equal(ds.mean, np.float32(data.NORMALIZATION["cifar10"][0]))
    np.testing.assert_array_equal(ds.std, np.float32(data.NORMALIZATION["cifar10"][1]))
    # Real photos, not padding: the measured mean is close to the published one.
    mean, _ = data.channel_stats(ds.train_images)
    np.testing.assert_allclose(mean, ds.mean, atol=0.01)
