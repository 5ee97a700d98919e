"""What each kind of source yields as split arrays: scikit-learn's digits, a tfds dataset, or a
folder/archive (listed, decoded and cached by the neighbouring modules)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from idm_jax.data import cache, decode, listing
from idm_jax.errors import MissingDependency

_log = logging.getLogger(__name__)

DIGITS_SIZE = 16  # the 8x8 digits are upsampled so ConvNet-2/3 pooling has room
_DIGITS_TRAIN_FRACTION = (4, 5)  # first 80% of every class (in dataset order) is train


# --------------------------------------------------------------------------- #
# "digits": scikit-learn's embedded 8x8 digits
# --------------------------------------------------------------------------- #


def load_digits_splits(size: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits  # lazy: scikit-learn imports are slow

    digits = load_digits()
    # Pixel values are 0..16; map 16 -> 255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    images = decode.resize_images(images, size)
    labels = digits.target.astype(np.int32)
    is_train = np.zeros(len(labels), bool)
    num, den = _DIGITS_TRAIN_FRACTION
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)  # dataset order
        is_train[idx[: len(idx) * num // den]] = True
    return dict(
        train_images=images[is_train],
        train_labels=labels[is_train],
        test_images=images[~is_train],
        test_labels=labels[~is_train],
        class_names=tuple(str(c) for c in digits.target_names),
    )


# --------------------------------------------------------------------------- #
# "tfds:<name>"
# --------------------------------------------------------------------------- #


def load_tfds(name: str, data_dir: str | None) -> dict[str, Any]:
    try:
        import tensorflow_datasets as tfds  # lazy: heavy, and only this source needs it
    except ImportError as e:
        raise MissingDependency(
            f"loading 'tfds:{name}' needs tensorflow-datasets: pip install tensorflow-datasets "
            "(and tensorflow for most datasets: pip install 'idm_jax[tf]')"
        ) from e
    try:
        return _read_tfds(tfds, name, data_dir)
    except ModuleNotFoundError as e:
        if e.name == "tensorflow" or str(e.name).startswith("tensorflow."):
            raise MissingDependency(
                f"reading 'tfds:{name}' needs TensorFlow: pip install 'idm_jax[tf]' (or pip install tensorflow)"
            ) from e
        # tensorflow-datasets 4.9.x imports importlib_resources without declaring it
        # (tensorflow/datasets#11212); pyproject.toml lists it, a --no-deps install may lack it.
        raise MissingDependency(
            f"'tfds:{name}': tensorflow-datasets needs the package {e.name!r}, which is not installed: "
            f"pip install {str(e.name).replace('_', '-')}"
        ) from e


def _read_tfds(tfds, name: str, data_dir: str | None) -> dict[str, Any]:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"unknown tfds dataset {name!r} (source 'tfds:{name}'); see tfds.list_builders() "
            "for names such as cifar10, cifar100, mnist, fashion_mnist"
        ) from e
    kwargs = {}
    manual_dir = os.environ.get("IDM_TFDS_MANUAL_DIR")
    if manual_dir:  # offline: tfds prepares the dataset from files placed there
        kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(**kwargs)
    except OSError as e:  # no network, a refused download (requests' errors are OSErrors too)
        cause = " ".join(str(e).split())[:160]
        raise OSError(
            f"could not download or prepare 'tfds:{name}' ({type(e).__name__}: {cause}); offline, set "
            "data.source to a folder or archive of the images, or put tfds's downloads in IDM_TFDS_MANUAL_DIR"
        ) from e
    splits = builder.info.splits
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test_split is None:
        raise ValueError(
            f"tfds dataset {name!r} needs a 'train' and a 'test' (or 'validation') split, has {sorted(splits)}"
        )
    arrays = {}
    for split, key in (("train", "train"), (test_split, "test")):
        ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
        images, labels = tfds.as_numpy(ds)
        arrays[f"{key}_images"] = _as_nhwc_uint8(np.asarray(images), f"tfds:{name}/{split}")
        arrays[f"{key}_labels"] = np.asarray(labels).astype(np.int32)
    arrays["class_names"] = tuple(builder.info.features["label"].names)
    return arrays


def _as_nhwc_uint8(images: np.ndarray, what: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 images [N, H, W, C], got {images.dtype}{list(images.shape)}")
    return images


# --------------------------------------------------------------------------- #
# Folders and archives of <split>/<class>/<image>
# --------------------------------------------------------------------------- #


def load_image_tree(path: str, image_size: int | None, cache_dir: str, *, resize: str = "stretch",
                     classes: tuple[str, ...] | None = None, memmap: bool | None = None) -> dict[str, Any]:
    """Decodes a folder/archive (or reads its cache) into split arrays and class names."""
    cache_base = os.path.join(cache_dir, f"decoded-{cache.fingerprint(path, image_size, resize, classes)}")
    cached = cache.read_cache(cache_base)
    if cached is not None:
        _log.info("loaded %s from cache %s", path, cache_base)
        return cached
    files = listing.list_archive(path) if os.path.isfile(path) else listing.list_folder(path, classes)
    train, test = listing.select_splits(files, path, classes)
    return decode.decode_splits(train, test, image_size, resize, cache_base, memmap)
