"""Dataset sources -> host arrays ready for the device, plus on-device sampling.

`load_dataset(source)` turns one of three kinds of source into an
`ArrayDataset` (uint8 NHWC images, int32 labels, class names, per-channel
mean/std):

* ``"digits"``: scikit-learn's 8x8 digits (ships inside the package, no
  network), upsampled to 16x16, one channel, 10 classes.
* ``"tfds:<name>"``: a tensorflow_datasets dataset (cifar10, cifar100, mnist,
  fashion_mnist, ...) with its normal download, or its manual_dir offline.
* a folder or ``.tar.gz``/``.tgz``/``.tar`` archive laid out as
  ``[<top>/]<split>/<class>/<image>.(png|jpg|jpeg)``; decoded arrays are cached
  as one .npz so the second load takes seconds. ``classes`` picks (and orders)
  a subset of the class folders, e.g. "imagenet_subset": the 100 ImageNet
  classes of IDM's release, shipped as package data. Decoded datasets larger
  than `MEMMAP_BYTES` are cached as memory-mapped .npy files instead and come
  back as read-only memmaps, so a 224x224 ImageNet subset (~19 GB) never has
  to fit in RAM.

The real data then lives on the device as uint8 together with per-class
index tables (`class_index_table`), so the jitted step draws its own real
batches (`sample_class_batch`, `sample_batch`) and normalizes them
(`normalize`) without host round-trips.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent import futures
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

_log = logging.getLogger(__name__)

# Per-channel mean/std of [0, 1]-scaled images (REFERENCE.md, "Data").
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # also ImageNet subsets
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
}
# `normalization=COMPUTED` forces statistics computed from the train images.
COMPUTED = "train"

DIGITS_SIZE = 16  # the 8x8 digits are upsampled so ConvNet-2/3 pooling has room
_DIGITS_TRAIN_FRACTION = (4, 5)  # first 80% of every class (in dataset order) is train

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_TEST_SPLITS = ("test", "val", "valid")  # first one present is the test split
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_CACHE_VERSION = 2  # bump when the cached arrays' meaning changes
_HASHED_BYTES = 1 << 20  # an archive's cache key hashes its first and last MiB (and its size)
# How images are brought to image_size x image_size: "stretch" resizes both sides (bilinear,
# aspect ratio not kept); "center_crop" resizes the shorter side to image_size (the longer
# to int(image_size * long / short), as torchvision's Resize(int)) and cuts the central
# square (offsets rounded as torchvision's CenterCrop): the ImageNet-subset protocol.
RESIZE_MODES = ("stretch", "center_crop")
# Named class lists shipped with the package (files of one class folder name per line).
CLASS_LISTS = {"imagenet_subset": "imagenet_subset_classes.txt"}
# Decoded folder datasets larger than this are cached as memory-mapped .npy files (and served
# to the condensation step from the host, see condense.resolve_data_placement).
MEMMAP_BYTES = 4 << 30
_DECODE_THREADS = min(16, os.cpu_count() or 1)
_LAYOUT = "[<top>/]<split>/<class>/<image>.(png|jpg|jpeg) with splits train and test (or val/valid)"
_ACCEPTED_SOURCES = (
    '"digits" (embedded scikit-learn digits), "tfds:<name>" (e.g. "tfds:cifar10"), '
    f"or a path to a folder or .tar.gz/.tgz/.tar archive laid out as {_LAYOUT}"
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
        name, arrays = "digits", _load_digits(image_size or DIGITS_SIZE)
    elif source.startswith("tfds:"):
        name = source[len("tfds:"):]
        arrays = _load_tfds(name, data_dir=cache_dir or os.environ.get("TFDS_DATA_DIR"))
        if image_size is not None:
            arrays = {**arrays, **{k: _resize(arrays[k], image_size, resize)
                                   for k in ("train_images", "test_images")}}
    else:
        path = os.path.abspath(os.path.expanduser(source))
        if not os.path.exists(path):
            if _looks_like_path(source):
                raise FileNotFoundError(f"dataset path {source!r} does not exist (resolved to {path})")
            raise ValueError(
                f"unknown dataset source {source!r} (did you mean 'tfds:{source}'?): expected {_ACCEPTED_SOURCES}"
            )
        if os.path.isfile(path) and not path.lower().endswith(_ARCHIVE_SUFFIXES):
            raise ValueError(
                f"dataset file {source!r} is not a .tar.gz/.tgz/.tar archive: expected {_ACCEPTED_SOURCES}"
            )
        name = _source_stem(path)
        arrays = _load_image_tree(path, image_size, _cache_dir(cache_dir), resize=resize,
                                  classes=class_list, memmap=memmap)

    mean, std = _resolve_normalization(normalization, name, arrays["train_images"])
    return ArrayDataset(name=name, mean=mean, std=std, **arrays)


def load_config_dataset(config: Any):
    """The dataset named by config.data (empty strings / 0 mean 'default').

    data.on_device="host" also asks for a memory-mapped cache (large sets are memory-mapped
    whatever it says, see data.MEMMAP_BYTES).
    """
    d = config.data
    return load_dataset(d.source, normalization=d.normalization or None,
                             image_size=d.image_size or None, cache_dir=d.cache_dir or None,
                             resize=d.get("resize", "stretch"), classes=d.get("classes", "") or None,
                             memmap=True if d.get("on_device", "auto") == "host" else None)


def infer_normalization(name: str) -> str | None:
    """Maps a dataset name to a key of NORMALIZATION, or None if nothing matches."""
    key = name.lower().replace("-", "").replace("_", "")
    # Order matters: "cifar100" contains "cifar10", "tinyimagenet" contains
    # "imagenet", "fashionmnist" contains "mnist".
    for needle, norm in (
        ("cifar100", "cifar100"),
        ("cifar10", "cifar10"),
        ("tiny", "tinyimagenet"),
        ("imagenet", "imagenet"),
        ("fashion", "fashion_mnist"),
        ("mnist", "mnist"),
    ):
        if needle in key:
            return norm
    return None


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of uint8[N, H, W, C] images scaled to [0, 1].

    Returns:
      (mean f32[C], std f32[C]), computed exactly from per-channel 256-bin
      histograms (chunked, so large datasets need no float copy).
    """
    flat = images.reshape(-1, images.shape[-1])
    hist = np.zeros((flat.shape[1], 256), np.int64)
    chunk = 1 << 20
    for start in range(0, len(flat), chunk):
        block = flat[start:start + chunk]
        for c in range(flat.shape[1]):
            hist[c] += np.bincount(block[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = max(len(flat), 1)
    mean = hist @ values / n
    var = np.maximum(hist @ values**2 / n - mean**2, 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def _resolve_normalization(
    normalization: str | None, name: str, train_images: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    key = infer_normalization(name) if normalization is None else normalization
    channels = train_images.shape[-1]
    if key is None or key == COMPUTED:
        return channel_stats(train_images)
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[key])
    if mean.shape[0] != channels:
        if normalization is None:  # inferred key does not fit (e.g. grayscale "imagenet" folder)
            return channel_stats(train_images)
        raise ValueError(
            f"normalization {key!r} has {mean.shape[0]} channel(s) but dataset {name!r} has {channels}"
        )
    return mean, std


def _looks_like_path(source: str) -> bool:
    return (
        os.sep in source
        or "/" in source
        or source.startswith((".", "~"))
        or source.lower().endswith(_ARCHIVE_SUFFIXES)
    )


def _source_stem(path: str) -> str:
    base = os.path.basename(path.rstrip(os.sep))
    for suffix in _ARCHIVE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _cache_dir(cache_dir: str | None) -> str:
    return cache_dir or os.environ.get("IDM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "idm_jax")


def _resize(images: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """Bilinear resize of uint8[N, H, W, C] to uint8[N, size, size, C] (PIL, per image)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([_resize_one(img, size, mode) for img in images]) if len(images) else images[:, :size, :size]


def _resize_one(image: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """uint8[H, W, C] -> uint8[size, size, C], by `mode` (see RESIZE_MODES)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if mode == "center_crop":
        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        scaled = (size, int(size * long / short))  # (short side, long side)
        new_h, new_w = scaled if h <= w else scaled[::-1]
        if (new_h, new_w) != (h, w):
            pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        out = np.asarray(pil)[top:top + size, left:left + size]
    else:
        out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


def load_class_list(classes: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The class folder names `classes` stands for (see load_dataset), or None for all.

    "imagenet_subset" -> the 100 WordNet ids of IDM's ImageNet subset, in the release's order.
    """
    if classes is None or (isinstance(classes, str) and not classes.strip()):
        return None
    if isinstance(classes, str):
        spec = classes.strip()
        if spec in CLASS_LISTS:
            text = resources.files("idm_jax").joinpath(CLASS_LISTS[spec]).read_text()
            names = _class_lines(text)
        elif os.path.isfile(os.path.expanduser(spec)):
            with open(os.path.expanduser(spec)) as f:
                names = _class_lines(f.read())
        elif _looks_like_path(spec) and "," not in spec:
            raise FileNotFoundError(f"class list file {spec!r} does not exist; data.classes takes "
                                    f"{', '.join(map(repr, CLASS_LISTS))}, a file or comma-separated names")
        else:
            names = [n.strip() for n in spec.split(",") if n.strip()]
    else:
        names = [str(n).strip() for n in classes]
    if not names:
        raise ValueError(f"class list {classes!r} names no classes")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"class list {classes!r} repeats {repeated}")
    return tuple(names)


def _class_lines(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


# --------------------------------------------------------------------------- #
# "digits": scikit-learn's embedded 8x8 digits
# --------------------------------------------------------------------------- #


def _load_digits(size: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits  # lazy: scikit-learn imports are slow

    digits = load_digits()
    # Pixel values are 0..16; map 16 -> 255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    images = _resize(images, size)
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


def _load_tfds(name: str, data_dir: str | None) -> dict[str, Any]:
    try:
        import tensorflow_datasets as tfds  # lazy: heavy, and only this source needs it
    except ImportError as e:
        raise ImportError(
            f"loading 'tfds:{name}' needs tensorflow-datasets: pip install tensorflow-datasets "
            "(and tensorflow for most datasets: pip install 'idm_jax[tf]')"
        ) from e
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
    builder.download_and_prepare(**kwargs)
    splits = builder.info.splits
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test_split is None:
        raise ValueError(
            f"tfds dataset {name!r} needs a 'train' and a 'test' (or 'validation') split, has {sorted(splits)}"
        )
    try:
        arrays = {}
        for split, key in (("train", "train"), (test_split, "test")):
            ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
            images, labels = tfds.as_numpy(ds)
            arrays[f"{key}_images"] = _as_nhwc_uint8(np.asarray(images), f"tfds:{name}/{split}")
            arrays[f"{key}_labels"] = np.asarray(labels).astype(np.int32)
    except ModuleNotFoundError as e:
        if e.name != "tensorflow" and not str(e.name).startswith("tensorflow."):
            raise
        raise ImportError(
            f"reading 'tfds:{name}' needs TensorFlow: pip install 'idm_jax[tf]' (or pip install tensorflow)"
        ) from e
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

# A listing: every directory (as a tuple of path parts) and every image file
# (parts -> bytes for archive members, or a filesystem path for folders).
_Listing = tuple[set[tuple[str, ...]], dict[tuple[str, ...], "bytes | str"]]


def _load_image_tree(path: str, image_size: int | None, cache_dir: str, *, resize: str = "stretch",
                     classes: tuple[str, ...] | None = None, memmap: bool | None = None) -> dict[str, Any]:
    """Decodes a folder/archive (or reads its cache) into split arrays and class names."""
    cache_base = os.path.join(cache_dir, f"decoded-{_fingerprint(path, image_size, resize, classes)}")
    cached = _read_cache(cache_base)
    if cached is not None:
        _log.info("loaded %s from cache %s", path, cache_base)
        return cached
    listing = _list_archive(path) if os.path.isfile(path) else _list_folder(path, classes)
    train, test = _select_splits(listing, path, classes)
    return _decode_splits(train, test, image_size, resize, cache_base, memmap)


def _fingerprint(path: str, image_size: int | None, resize: str = "stretch",
                 classes: tuple[str, ...] | None = None) -> str:
    """Hash of what determines the decoded arrays, independent of where the source lies.

    An archive is keyed by its content: its size and a hash of its first and last
    MiB, so one archive under two paths shares one cache entry. A folder is keyed
    by every file's relative path, size and modification time (of the listed classes).
    The options (image size, resize mode, class list) are part of the key.
    """
    if os.path.isfile(path):
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(_HASHED_BYTES))
            if size > _HASHED_BYTES:
                f.seek(max(size - _HASHED_BYTES, _HASHED_BYTES))
                digest.update(f.read())
        stamp: Any = [size, digest.hexdigest()]
    else:  # a folder's own mtime misses edits inside it: stamp every file (of the listed classes)
        stamp = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(_keep_dirs(path, root, dirs, classes))
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                stamp.append([os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns])
    options = [image_size]
    if resize != "stretch" or classes is not None:
        options += [resize, list(classes or ())]
    blob = json.dumps([_CACHE_VERSION, *options, stamp]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _keep_dirs(top: str, root: str, dirs: list[str], classes: tuple[str, ...] | None) -> list[str]:
    """Subfolders of `root` (under `top`) worth walking: with a class list, a split's class
    folders not in it are skipped (ImageNet: 100 of 1000 classes are read)."""
    if classes is None or root == top or os.path.basename(root) not in ("train",) + _TEST_SPLITS:
        return list(dirs)
    wanted = set(classes)
    return [d for d in dirs if d in wanted]


_ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_cache(cache_base: str) -> dict[str, Any] | None:
    """Arrays cached under cache_base: a folder of .npy files (memory-mapped) or cache_base.npz."""
    try:
        if os.path.isdir(cache_base):
            arrays = {k: np.load(os.path.join(cache_base, f"{k}.npy"), mmap_mode="r") for k in _ARRAY_KEYS}
            with open(os.path.join(cache_base, "class_names.json")) as f:
                arrays["class_names"] = tuple(json.load(f))
            return arrays
        if not os.path.exists(cache_base + ".npz"):
            return None
        with np.load(cache_base + ".npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAY_KEYS}
            arrays["class_names"] = tuple(str(s) for s in z["class_names"])
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        _log.warning("ignoring unreadable cache %s (%s); decoding again", cache_base, e)
        return None


def _write_cache(cache_file: str, arrays: Mapping[str, Any]) -> None:
    """Writes the arrays as one .npz atomically: a killed run leaves no partial cache file."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache_file), prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{**arrays, "class_names": np.asarray(arrays["class_names"], dtype=str)})
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shared cache should be readable
        os.replace(tmp, cache_file)
        tmp = None
        _log.info("cached decoded images in %s", cache_file)
    except OSError as e:  # an unwritable cache only costs speed
        _log.warning("could not write cache %s: %s", cache_file, e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


class _MemmapCache:
    """Decodes straight into .npy files in a temporary folder, renamed to cache_base when complete
    (a killed run leaves no partial cache); the arrays then come back as read-only memmaps."""

    def __init__(self, cache_base: str):
        self.base = cache_base
        try:
            os.makedirs(os.path.dirname(cache_base), exist_ok=True)
            self.tmp = tempfile.mkdtemp(dir=os.path.dirname(cache_base), prefix=".tmp-")
        except OSError as e:
            raise ValueError(f"a dataset this large is decoded into memory-mapped files, but the cache "
                             f"folder {os.path.dirname(cache_base)!r} is not writable ({e}); set "
                             "data.cache_dir (or $IDM_CACHE_DIR) to a writable folder with room") from e

    def allocate(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.lib.format.open_memmap(os.path.join(self.tmp, f"{key}.npy"), mode="w+", dtype=dtype,
                                         shape=shape)

    def finish(self, arrays: dict[str, Any]) -> dict[str, Any]:
        for k in _ARRAY_KEYS:
            arrays[k].flush()
        with open(os.path.join(self.tmp, "class_names.json"), "w") as f:
            json.dump(list(arrays["class_names"]), f)
        os.chmod(self.tmp, 0o755)
        os.replace(self.tmp, self.base)
        _log.info("cached decoded images (memory-mapped .npy) in %s", self.base)
        return _read_cache(self.base)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _is_hidden(parts: Iterable[str]) -> bool:
    # Skips .DS_Store, AppleDouble "._x.jpg" files and macOS "__MACOSX" folders.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def _list_folder(path: str, classes: tuple[str, ...] | None = None) -> _Listing:
    dirs: set[tuple[str, ...]] = set()
    files: dict[tuple[str, ...], bytes | str] = {}
    for root, subdirs, names in os.walk(path):
        subdirs[:] = _keep_dirs(path, root, subdirs, classes)  # ImageNet: skip the 900 classes not listed
        rel = os.path.relpath(root, path)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        if _is_hidden(parts):
            continue
        dirs.update(parts + (d,) for d in subdirs if not _is_hidden((d,)))
        files.update({parts + (n,): os.path.join(root, n) for n in names if _is_image(n) and not _is_hidden((n,))})
    return dirs, files


def _list_archive(path: str) -> _Listing:
    """Reads a tar archive in one streaming pass (no extraction, no seeking in gzip)."""
    dirs: set[tuple[str, ...]] = set()
    files: dict[tuple[str, ...], bytes | str] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                if not parts or _is_hidden(parts):
                    continue
                if member.isdir():
                    dirs.add(parts)
                elif member.isfile() and _is_image(parts[-1]):
                    files[parts] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"cannot read archive {path!r}: {e}") from e
    for parts in files:  # tar files need not list parent directories
        dirs.update(parts[:i] for i in range(1, len(parts)))
    return dirs, files


def _select_splits(listing: _Listing, source: str, classes: tuple[str, ...] | None = None):
    """Finds the train and test split of a listing and checks its classes.

    classes: keep only these class folders, in this order (each must exist in both splits;
    other folders are ignored); None: every class folder, sorted.

    Returns:
      (train, test): each a list over classes of (class name,
      [(file display name, bytes | path), ...] in sorted file order).
    """
    dirs, files = listing
    if not files:
        raise ValueError(f"no images (.png/.jpg/.jpeg) found in {source!r}; expected layout {_LAYOUT}")
    tops = sorted({d[:-1] for d in dirs if len(d) <= 2 and d[-1] == "train"})
    if not tops:
        raise ValueError(f"{source!r}: split folder 'train' is missing; expected layout {_LAYOUT}")
    if len(tops) > 1 and () not in tops:
        raise ValueError(f"{source!r}: several 'train' folders {['/'.join(t + ('train',)) for t in tops]}")
    top = tops[0]  # sorted: the top level () wins over a nested <top>/train
    test_name = next((s for s in _TEST_SPLITS if top + (s,) in dirs), None)
    if test_name is None:
        where = "/".join(top) or "the top level"
        raise ValueError(
            f"{source!r}: split folder 'test' is missing next to 'train' in {where} "
            f"(also accepted: {', '.join(repr(s) for s in _TEST_SPLITS[1:])}); expected layout {_LAYOUT}"
        )

    def split_classes(split: str):
        prefix = top + (split,)
        names = sorted(d[-1] for d in dirs if len(d) == len(prefix) + 1 and d[:-1] == prefix)
        loose = sum(1 for parts in files if len(parts) == len(prefix) + 1 and parts[:-1] == prefix)
        hint = (f" ({loose} images lie directly in {'/'.join(prefix)}/: sort them into one folder per class, "
                "e.g. ImageNet's val images into val/<wnid>/)" if loose else "")
        if classes is not None:
            absent = [c for c in classes if c not in names]
            if absent:
                shown = ", ".join(absent[:5]) + (f", ... ({len(absent)} of {len(classes)})" if len(absent) > 5 else "")
                raise ValueError(f"{source!r}: split {split!r} lacks class folder(s) {shown} of the class "
                                 f"list{hint}; expected layout {_LAYOUT}")
            names = list(classes)
        if not names:
            raise ValueError(f"{source!r}: split {split!r} has no class folders{hint}; expected layout {_LAYOUT}")
        by_class = {c: [] for c in names}
        for parts, data in files.items():
            if len(parts) == len(prefix) + 2 and parts[: len(prefix)] == prefix and parts[-2] in by_class:
                # Errors name the file: its path, or archive:member.
                shown = data if isinstance(data, str) else f"{source}:{'/'.join(parts)}"
                by_class[parts[-2]].append((shown, data))
        for c, entries in by_class.items():
            if not entries:
                raise ValueError(
                    f"{source!r}: class {c!r} in split {split!r} has no images (.png/.jpg/.jpeg)"
                )
            entries.sort(key=lambda e: e[0])
        return list(by_class.items())

    train, test = split_classes("train"), split_classes(test_name)
    train_names, test_names = [c for c, _ in train], [c for c, _ in test]
    if train_names != test_names:
        missing = sorted(set(train_names) - set(test_names))
        extra = sorted(set(test_names) - set(train_names))
        raise ValueError(
            f"{source!r}: classes of split {test_name!r} differ from 'train': "
            f"missing from {test_name!r}: {missing}, not in 'train': {extra}"
        )
    return train, test


def _decode_image(data: bytes | str, name: str, mode: str | None) -> np.ndarray:
    """Decodes one PNG/JPEG (bytes or a path) to uint8[H, W, C]; mode None keeps its own."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            if mode is None:
                mode = "L" if img.mode in _GRAY_MODES else "RGB"
            array = np.asarray(img.convert(mode))
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {name!r}: {e}") from e
    return array[..., None] if array.ndim == 2 else array


def _decode_splits(train, test, image_size: int | None, resize: str = "stretch",
                   cache_base: str | None = None, memmap: bool | None = None) -> dict[str, Any]:
    """Decodes both splits (threads) into preallocated uint8 arrays; labels = class index in order.

    Caches the result under cache_base (if given): one .npz, or memory-mapped .npy files when
    `memmap` is True (None: when the arrays exceed MEMMAP_BYTES), returned as memmaps.
    """
    first_name, first_data = train[0][1][0]
    first = _decode_image(first_data, first_name, None)
    if image_size is not None:
        first = _resize_one(first, image_size, resize)
    mode = "L" if first.shape[-1] == 1 else "RGB"  # the first image decides the channels
    total = sum(len(e) for split in (train, test) for _, e in split)
    if memmap is None:
        memmap = total * first.nbytes > MEMMAP_BYTES
    if memmap and cache_base is None:
        raise ValueError("memory-mapped decoding needs a cache folder")
    _log.info("decoding %d images (%s)%s", total, "x".join(map(str, first.shape)),
              " into memory-mapped files" if memmap else "")
    sink = _MemmapCache(cache_base) if memmap else None
    allocate = sink.allocate if sink else (lambda key, shape, dtype: np.empty(shape, dtype))

    def decode_into(images, i, name, data):
        img = _decode_image(data, name, mode)
        if image_size is not None:
            img = _resize_one(img, image_size, resize)
        elif img.shape != first.shape:
            raise ValueError(
                f"image {name!r} is {img.shape[0]}x{img.shape[1]} (HxW) but {first_name!r} is "
                f"{first.shape[0]}x{first.shape[1]}; pass image_size=<int> to resize all images"
            )
        images[i] = img

    arrays: dict[str, Any] = {"class_names": tuple(c for c, _ in train)}
    try:
        with futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:  # PIL decodes without the GIL
            for key, split in (("train", train), ("test", test)):
                n = sum(len(e) for _, e in split)
                images = allocate(f"{key}_images", (n,) + first.shape, np.uint8)
                labels = allocate(f"{key}_labels", (n,), np.int32)
                jobs, i = [], 0
                for label, (_, entries) in enumerate(split):
                    labels[i:i + len(entries)] = label
                    jobs += [pool.submit(decode_into, images, i + j, name, data)
                             for j, (name, data) in enumerate(entries)]
                    i += len(entries)
                for job in jobs:
                    job.result()  # re-raises a decoding error
                arrays[f"{key}_images"], arrays[f"{key}_labels"] = images, labels
    except BaseException:
        if sink:
            sink.abort()
        raise
    if sink:
        return sink.finish(arrays)
    if cache_base is not None:
        _write_cache(cache_base + ".npz", arrays)
    return arrays


# --------------------------------------------------------------------------- #
# Per-class index tables and on-device sampling
# --------------------------------------------------------------------------- #


def class_index_table(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of every class's examples, as a padded table.

    Args:
      labels: int[N] in [0, num_classes).
      num_classes: number of classes.

    Returns:
      (table int32[num_classes, max_count], counts int32[num_classes]):
      table[c, :counts[c]] are the indices of class c in increasing order;
      entries past counts[c] are -1.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"label {int(bad)} is outside [0, {num_classes})")
    counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
    table = np.full((num_classes, max(int(counts.max(initial=0)), 1)), -1, np.int32)
    order = np.argsort(labels, kind="stable")  # class-major, dataset order inside a class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(labels)) - np.repeat(starts, counts)
    table[labels[order], position] = order
    return table, counts


def check_batch_size(counts: np.ndarray, batch_size: int) -> None:
    """Raises ValueError unless every class has at least batch_size examples.

    `sample_class_batch` cannot check this inside jit: with too few examples it
    would return padding (-1) indices.
    """
    counts = np.asarray(counts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    smallest = int(np.argmin(counts))
    if batch_size > counts[smallest]:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {int(counts[smallest])} examples of class {smallest}; "
            "use a smaller batch (sampling is without replacement)"
        )


@functools.partial(jax.jit, static_argnames=("batch_size",))
def sample_class_batch(
    key: jax.Array, table: jax.Array, counts: jax.Array, cls: jax.Array | int, batch_size: int
) -> jax.Array:
    """Draws batch_size distinct example indices of class `cls`, uniformly.

    Args:
      key: PRNG key.
      table, counts: from `class_index_table` (int32[K, max_count], int32[K]).
      cls: class index (may be traced, e.g. under vmap over classes).
      batch_size: static; must be <= counts[cls] (see `check_batch_size`),
        otherwise padding indices (-1) are returned.

    Returns:
      int32[batch_size] dataset indices, in random order.
    """
    row = table[cls]
    # Uniform scores, padding can never be picked: top_k of i.i.d. scores is a
    # uniform random subset without replacement.
    scores = jax.random.uniform(key, row.shape)
    scores = jnp.where(jnp.arange(row.shape[0]) < counts[cls], scores, -jnp.inf)
    _, picked = jax.lax.top_k(scores, batch_size)
    return row[picked]


# How real batches are chosen (config data.class_sampling / data.train_sampling).
CLASS_SAMPLINGS = ("random", "first")
TRAIN_SAMPLINGS = ("random", "passes")


def first_class_batch(table: jax.Array, cls: jax.Array | int, batch_size: int) -> jax.Array:
    """The first batch_size example indices of class `cls` in dataset order: int32[batch_size].

    Dataset order inside a class is file order (folder sources sort a class's files by
    name, as torchvision's ImageFolder does), so this is the release's ImageNet
    `class_sample(c, n)`, which returns `cls_idx[c][:n]` on every call. batch_size must be
    <= counts[cls] (`check_batch_size`); cls may be traced.
    """
    return table[cls][:batch_size]


def pass_batch(key: jax.Array, num_examples: int, batch_size: int, batch_number: jax.Array | int) -> jax.Array:
    """Batch `batch_number` of a walk through shuffled passes over range(num_examples): int32[batch_size].

    Pass p (batches p*P .. p*P + P - 1, P = num_examples // batch_size) is the permutation
    drawn with fold_in(key, p), cut into consecutive slices: the release's ImageNet queue
    loader (a repeated BatchSampler over a SubsetRandomSampler). The last
    num_examples % batch_size examples of a pass are skipped, where that loader yields them
    as one short batch (a jitted step needs one batch shape). Sizes are static.
    """
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"batch_size {batch_size} must be in [1, num_examples={num_examples}]")
    per_pass = num_examples // batch_size
    order = jax.random.permutation(jax.random.fold_in(key, batch_number // per_pass), num_examples)
    start = (batch_number % per_pass) * batch_size
    return jax.lax.dynamic_slice_in_dim(order, start, batch_size).astype(jnp.int32)


def sample_batch(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """Draws batch_size distinct indices from range(num_examples), uniformly.

    Both sizes are static Python ints. Returns int32[batch_size].
    """
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size {batch_size} must be in [1, num_examples={num_examples}] (sampling is without replacement)"
        )
    return _sample_batch(key, num_examples, batch_size)


@functools.partial(jax.jit, static_argnames=("num_examples", "batch_size"))
def _sample_batch(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    scores = jax.random.uniform(key, (num_examples,))
    return jax.lax.top_k(scores, batch_size)[1].astype(jnp.int32)


def normalize(images_uint8: jax.Array | np.ndarray, mean: Any, std: Any) -> jax.Array:
    """uint8[..., C] pixels -> f32[..., C] as (x / 255 - mean) / std, per channel."""
    x = jnp.asarray(images_uint8, jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def denormalize(images: jax.Array | np.ndarray, mean: Any, std: Any) -> jax.Array:
    """Inverse of `normalize`: f32[..., C] -> [0, 1]-scale pixels (not clipped)."""
    return jnp.asarray(images, jnp.float32) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def renormalize(images: np.ndarray, from_mean: Any, from_std: Any, to_mean: Any, to_std: Any) -> np.ndarray:
    """Images normalized with (from_mean, from_std) -> the same pixels under (to_mean, to_std): f32.

    The host-side (numpy) twin of `normalize` / `denormalize` for float images:
    (0, 1) -> (mean, std) normalizes [0, 1] pixels, (mean, std) -> (0, 1) gives them back
    (unclipped). Statistics that agree to np.allclose's tolerance return the images as they are.
    """
    from_mean, from_std = np.asarray(from_mean, np.float32), np.asarray(from_std, np.float32)
    to_mean, to_std = np.asarray(to_mean, np.float32), np.asarray(to_std, np.float32)
    if np.allclose(from_mean, to_mean) and np.allclose(from_std, to_std):
        return np.asarray(images, np.float32)
    return ((np.asarray(images, np.float32) * from_std + from_mean - to_mean) / to_std).astype(np.float32)
