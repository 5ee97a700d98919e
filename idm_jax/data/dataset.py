"""What a loaded dataset is and how a source spec (or config.data) becomes one: `ArrayDataset`,
`load_dataset`, `load_config_dataset`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from idm_jax.data.cache import resolve_cache_dir
from idm_jax.data.decode import RESIZE_MODES, resize_images
from idm_jax.data.listing import ARCHIVE_SUFFIXES, LAYOUT, looks_like_path, load_class_list
from idm_jax.data.normalization import COMPUTED, NORMALIZATION, resolve_normalization
from idm_jax.data.sources import DIGITS_SIZE, load_digits_splits, load_image_tree, load_tfds

_ACCEPTED_SOURCES = (
    '"digits" (embedded scikit-learn digits), "tfds:<name>" (e.g. "tfds:cifar10"), '
    f"or a path to a folder or .tar.gz/.tgz/.tar archive laid out as {LAYOUT}"
)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no scalar ==
class ArrayDataset:
    """A whole image classification dataset as host numpy arrays.

    Attributes:
      name: dataset name (tfds name, folder/archive stem, or "digits").
      train_images: uint8[N, H, W, C].
      train_labels: int32[N], values in [0, num_classes).
      test_images: uint8[M, H, W, C].
      test_labels: int32[M].
      class_names: the name of every class, indexed by label.
      mean: f32[C], per-channel mean of [0, 1]-scaled images used by `normalize`.
      std: f32[C], per-channel standard deviation, same scale.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        for split, images, labels in (
            ("train", self.train_images, self.train_labels),
            ("test", self.test_images, self.test_labels),
        ):
            if images.ndim != 4 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{self.name}: {split} images must be [N, H, W, C] with N labels, "
                    f"got images {images.shape} and labels {labels.shape}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.train_images.shape[1:])

    @property
    def channels(self) -> int:
        return self.train_images.shape[-1]


# --------------------------------------------------------------------------- #
# load_dataset
# --------------------------------------------------------------------------- #


def load_dataset(
    source: str,
    *,
    normalization: str | None = None,
    image_size: int | None = None,
    cache_dir: str | None = None,
    resize: str = "stretch",
    classes: str | Sequence[str] | None = None,
    memmap: bool | None = None,
) -> ArrayDataset:
    """Loads a dataset spec into host arrays.

    Args:
      source: "digits", "tfds:<name>", or a path to a folder or .tar.gz/.tgz/.tar
        archive laid out as [<top>/]<split>/<class>/<image>.(png|jpg|jpeg).
      normalization: a key of `NORMALIZATION`, or "train" to compute the
        statistics from the train images. None infers the key from the dataset
        name ("cifar100", "cifar10", "tiny", "imagenet", "fashion", "mnist") and
        falls back to the train images' statistics.
      image_size: resize every image to image_size x image_size (bilinear);
        None keeps the native size (16 for digits).
      cache_dir: where decoded folder/archive arrays are cached (default: env
        IDM_CACHE_DIR or ~/.cache/idm_jax); for tfds it is the data_dir
        (default: env TFDS_DATA_DIR or tfds' own default).
      resize: one of RESIZE_MODES, how image_size is reached ("stretch" or
        "center_crop": shorter side to image_size, then the central square).
      classes: folder/archive sources only: the class folders to keep, in label
        order - a name of CLASS_LISTS (e.g. "imagenet_subset"), a path to a text
        file (one name per line, '#' comments), a comma-separated string or a
        sequence of names. None or "" keeps every class folder, sorted.
      memmap: folder/archive sources only: cache the decoded arrays as .npy files
        and return read-only memmaps (True), one in-memory .npz (False), or by
        size (None: memmaps above MEMMAP_BYTES).

    Returns:
      An ArrayDataset with uint8[N, H, W, C] images and int32 labels.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"unknown dataset source {source!r}: expected {_ACCEPTED_SOURCES}")
    if normalization is not None and normalization != COMPUTED and normalization not in NORMALIZATION:
        raise ValueError(
            f"unknown normalization {normalization!r}: expected one of "
            f"{sorted(NORMALIZATION)}, {COMPUTED!r} (statistics of the train images) or None (infer)"
        )
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        image_size = int(image_size)  # also a JSON-able cache key
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}: expected one of {RESIZE_MODES}")
    class_list = load_class_list(classes)
    if class_list is not None and (source == "digits" or source.startswith("tfds:")):
        raise ValueError(f"a class list ({classes!r}) applies to folder/archive sources only, "
                         f"not {source!r}")

    if source == "digits":
        name, arrays = "digits", load_digits_splits(image_size or DIGITS_SIZE)
    elif source.startswith("tfds:"):
        name = source[len("tfds:"):]
        arrays = load_tfds(name, data_dir=cache_dir or os.environ.get("TFDS_DATA_DIR"))
        if image_size is not None:
            arrays = {**arrays, **{k: resize_images(arrays[k], image_size, resize)
                                   for k in ("train_images", "test_images")}}
    else:
        path = os.path.abspath(os.path.expanduser(source))
        if not os.path.exists(path):
            if looks_like_path(source):
                raise FileNotFoundError(f"dataset path {source!r} does not exist (resolved to {path})")
            raise ValueError(
                f"unknown dataset source {source!r} (did you mean 'tfds:{source}'?): expected {_ACCEPTED_SOURCES}"
            )
        if os.path.isfile(path) and not path.lower().endswith(ARCHIVE_SUFFIXES):
            raise ValueError(
                f"dataset file {source!r} is not a .tar.gz/.tgz/.tar archive: expected {_ACCEPTED_SOURCES}"
            )
        name = _source_stem(path)
        arrays = load_image_tree(path, image_size, resolve_cache_dir(cache_dir), resize=resize,
                                  classes=class_list, memmap=memmap)

    mean, std = resolve_normalization(normalization, name, arrays["train_images"])
    return ArrayDataset(name=name, mean=mean, std=std, **arrays)


def load_config_dataset(config: Any):
    """The dataset named by config.data (empty strings / 0 mean 'default').

    data.on_device="host" also asks for a memory-mapped cache (large sets are memory-mapped
    whatever it says, see data.MEMMAP_BYTES).
    """
    d = config.data
    return load_dataset(d.source, normalization=d.normalization or None,
                             image_size=d.image_size or None, cache_dir=d.cache_dir or None,
                             resize=d.resize, classes=d.classes or None,
                             memmap=True if d.on_device == "host" else None)


def _source_stem(path: str) -> str:
    base = os.path.basename(path.rstrip(os.sep))
    for suffix in ARCHIVE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base
