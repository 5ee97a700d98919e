"""The synthetic-set files: synthetic.npz (save, load, check; bare images+labels files) and synthetic.png.

`synthetic.npz` is the one format every part shares (condensation, coreset baselines,
evaluation). Its keys:

* ``images``            f32[N, H, W, C] pixel space, denormalized and clipped to [0, 1]
                        (for viewing and for other tools);
* ``images_normalized`` f32[N, H, W, C] the exact values the evaluator trains on
                        (synthetic images may leave [0, 1], so ``images`` alone would lose them);
* ``labels``            int32[N];
* ``mean``, ``std``     f32[C], the normalization of ``images_normalized``;
* ``class_names``       str[K];
* ``partition_factor``  int, l of the paper: the evaluator cuts each image into l x l pieces
                        (1 = use the images as they are; coresets);
* ``method``, ``dataset``  str;
* ``config_json``       str, the config that made the set as one flat JSON object
                        ({"idm.iterations": 20000, "ipc": 10, ...}; `config_json`, `recorded_config`).

`load_synthetic(path, dataset)` also reads a set made by another tool (the authors' release, DM):
an .npz of only ``images`` and ``labels``, pixel or normalized, NHWC or NCHW; the dataset supplies
the rest (docs/EVALUATE_ANY_SET.md). A published set (synthetic_sets/) may lack the derived
``images``, which is then recomputed from ``images_normalized``.

Files are written atomically (workdir.atomic_file: a temporary file in the same folder, then
`os.replace`), so a reader never sees a half-written file. results.json / results.md and the
paper's numbers live in idm_jax/results.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from idm_jax import data
from idm_jax import workdir as workdir_lib

REQUIRED_KEYS = ("images", "labels", "mean", "std", "class_names", "partition_factor",
                 "method", "dataset")


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
    """A labelled image set as stored in synthetic.npz (see the module docstring).

    images: f32[N, H, W, C] in [0, 1]; images_normalized: f32[N, H, W, C]; labels: int32[N];
    mean, std: f32[C].
    """

    images: np.ndarray
    images_normalized: np.ndarray
    labels: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    class_names: tuple[str, ...]
    partition_factor: int
    method: str
    dataset: str
    config_json: str = "{}"
    path: str = ""
    # METADATA_KEYS the file lacked, taken from the dataset it is scored on (a bare images+labels file)
    filled_from_dataset: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def ipc(self) -> int:
        """Images per class (the largest class count; the sets we write are balanced)."""
        return int(np.bincount(self.labels, minlength=self.num_classes).max()) if len(self.labels) else 0


# ----------------------------------------------------------------------------------------------
# synthetic.npz


def _check_set(where: str, images: np.ndarray, labels: np.ndarray, mean: np.ndarray,
               std: np.ndarray, num_classes: int, partition_factor: int) -> None:
    """Raises ValueError naming `where` (a file or function) when the arrays do not form a set."""
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be 4-D [N, H, W, C], got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{where}: labels must be 1-D with one label per image; got labels shape "
                         f"{labels.shape} for {images.shape[0]} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}) ({num_classes} class "
                         f"names), got range [{labels.min()}, {labels.max()}]")
    channels = images.shape[-1]
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(f"{where}: mean and std must have one value per channel ({channels}), "
                         f"got shapes {mean.shape} and {std.shape}")
    if not np.all(std > 0):
        raise ValueError(f"{where}: std must be positive, got {std.tolist()}")
    if partition_factor < 1:
        raise ValueError(f"{where}: partition_factor must be >= 1, got {partition_factor}")


def config_json(config: Any) -> str:
    """The ``config_json`` a synthetic.npz records, whichever mode wrote it: the config flat,
    {"idm.iterations": 20000, "ipc": 10, ...}."""
    return json.dumps(workdir_lib.flat(config))


def recorded_config(text: str) -> dict[str, Any]:
    """A set's ``config_json`` read back as the flat dict `config_json` writes. Coreset sets written
    before the layout was one hold the config nested ({"idm": {"iterations": ..}}): flattened
    here. {} when the text is no JSON object."""
    try:
        config = json.loads(text)
    except ValueError:
        return {}
    return workdir_lib.flat(config) if isinstance(config, Mapping) else {}


def save_synthetic(path: str, images_normalized: Any, labels: Any, *, mean: Sequence[float],
                   std: Sequence[float], class_names: Sequence[str], partition_factor: int,
                   method: str, dataset: str, config_json: str = "{}") -> str:
    """Writes a synthetic (or coreset) image set to `path` (.npz) atomically; returns `path`.

    images_normalized: f32[N, H, W, C] in the normalized space the evaluator uses;
    labels: int[N]; mean, std: [C]; class_names: K names; partition_factor: l >= 1.
    """
    images_normalized = np.asarray(images_normalized, np.float32)
    labels = np.asarray(labels)
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    class_names = [str(n) for n in class_names]
    _check_set(f"save_synthetic({path!r})", images_normalized, labels, mean, std,
               len(class_names), int(partition_factor))
    pixels = np.clip(data.renormalize(images_normalized, mean, std, 0.0, 1.0), 0.0, 1.0)
    arrays = {
        "images": pixels,
        "images_normalized": images_normalized,
        "labels": labels.astype(np.int32),
        "mean": mean,
        "std": std,
        "class_names": np.asarray(class_names, dtype=str),
        "partition_factor": np.asarray(int(partition_factor), np.int64),
        "method": np.asarray(str(method)),
        "dataset": np.asarray(str(dataset)),
        "config_json": np.asarray(str(config_json)),
    }
    with workdir_lib.atomic_file(path, needed_bytes=sum(a.nbytes for a in arrays.values())) as f:
        np.savez(f, **arrays)
    return path


def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, with errors that name the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"synthetic set {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"synthetic set {path!r} is a directory, expected an .npz file")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"synthetic set {path!r} is not a readable .npz file (corrupted or "
                         f"another format): {type(e).__name__}: {e}") from e
    except Exception as e:  # zlib.error and friends from a damaged member
        raise ValueError(f"synthetic set {path!r} is corrupted: {type(e).__name__}: {e}") from e


def _scalar(path: str, arrays: Mapping[str, np.ndarray], key: str, kind: type) -> Any:
    value = arrays[key]
    if value.ndim != 0:
        raise ValueError(f"synthetic set {path!r}: key {key!r} must be a scalar, got shape {value.shape}")
    try:
        return kind(value.item())
    except (TypeError, ValueError) as e:
        raise ValueError(f"synthetic set {path!r}: key {key!r} must be {kind.__name__}, "
                         f"got {value.item()!r}") from e


# A set made by another tool (the authors' release, DM, ...) may hold only `images` and `labels`:
# the dataset it is scored on supplies these keys (see docs/EVALUATE_ANY_SET.md).
METADATA_KEYS = ("mean", "std", "class_names", "partition_factor", "method", "dataset")
IMAGE_SPACES = ("pixel", "normalized")  # what a file's `images` array holds
LAYOUTS = ("auto", "NHWC", "NCHW")  # torch saves [N, C, H, W]
EXTERNAL_METHOD = "external"  # the method of a set whose file does not say
# Pixel images may overshoot [0, 1] a little (unclipped synthetic images); normalized CIFAR images
# reach about -2.4 and 0-255 values reach 255, so this is wide enough to tell them apart.
PIXEL_SLACK = 0.5


def _guess_layout(shape: tuple[int, ...], expected_hwc: tuple[int, int, int] | None, where: str) -> str:
    """NHWC or NCHW for images of `shape`, by the dataset's (H, W, C) when known, else by which
    axis holds 1 or 3 channels. Images fitting neither layout stay NHWC (the shape check names them)."""
    _, a, b, c = shape
    if expected_hwc is None:
        return "NCHW" if a in (1, 3) and c not in (1, 3) else "NHWC"
    fits_nhwc, fits_nchw = (a, b, c) == expected_hwc, (b, c, a) == expected_hwc
    if fits_nhwc and fits_nchw:  # a cube, H = W = C: the two orders differ in content, not in shape
        raise ValueError(f"{where}: images of shape {shape} fit both [N, H, W, C] and [N, C, H, W]; "
                         "say which (main.py --synthetic_layout=NHWC or NCHW)")
    return "NCHW" if fits_nchw and not fits_nhwc else "NHWC"


def _to_nhwc(images: np.ndarray, layout: str, expected_hwc: tuple[int, int, int] | None, where: str) -> np.ndarray:
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be 4-D [N, H, W, C] (or [N, C, H, W]), got shape {images.shape}")
    if layout == "auto":
        layout = _guess_layout(images.shape, expected_hwc, where)
    return np.ascontiguousarray(np.transpose(images, (0, 2, 3, 1))) if layout == "NCHW" else images


def _pixels(images: np.ndarray, where: str) -> np.ndarray:
    """[0, 1] pixels from uint8 (0-255) or float images, refusing floats that are not pixels."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    images = np.asarray(images, np.float32)
    lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
    if lo < -PIXEL_SLACK or hi > 1.0 + PIXEL_SLACK:
        raise ValueError(f"{where}: images span [{lo:.3g}, {hi:.3g}], not pixel values in [0, 1]; if they "
                         "are normalized with the dataset's mean and std, say so (main.py "
                         "--synthetic_space=normalized); 0-255 values: store them as uint8")
    return images


def _normalized(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype == np.uint8:
        raise ValueError(f"{where}: uint8 images are pixels, not normalized values; drop "
                         "--synthetic_space=normalized")
    images = np.asarray(images, np.float32)
    if images.size and float(images.min()) >= 0.0:
        raise ValueError(f"{where}: images said to be normalized lie in [{float(images.min()):.3g}, "
                         f"{float(images.max()):.3g}] with no negative value: they look like pixel "
                         "values (drop --synthetic_space=normalized)")
    return images


def load_synthetic(path: str, dataset: Any = None, *, space: str = "pixel", layout: str = "auto",
                   partition_factor: int | None = None, method: str | None = None,
                   action: str = "use") -> SyntheticSet:
    """Reads and validates a synthetic set: a synthetic.npz written by `save_synthetic`, or (given
    `dataset`) any .npz holding `images` and `labels`. See `synthetic_from_arrays`.

    Raises FileNotFoundError when `path` is missing and ValueError (naming the file and the
    problem) when it is corrupted, lacks a key, or its arrays are inconsistent.
    """
    return synthetic_from_arrays(read_npz(path), path, dataset, space=space, layout=layout,
                                 partition_factor=partition_factor, method=method, action=action)


def synthetic_from_arrays(arrays: Mapping[str, np.ndarray], path: str, dataset: Any = None, *,
                          space: str = "pixel", layout: str = "auto", partition_factor: int | None = None,
                          method: str | None = None, action: str = "use") -> SyntheticSet:
    """A SyntheticSet from an .npz's arrays (`read_npz`); `path` names it in errors.

    dataset: an ArrayDataset (or anything with name, mean, std, class_names, image_shape) that
    supplies the METADATA_KEYS the file lacks: its mean/std and class names, partition factor 1,
    method "external", its name. Without it every key of REQUIRED_KEYS must be there.
    space: what `images` holds when the file has no `images_normalized`: "pixel" ([0, 1] floats, or
    uint8 0-255) or "normalized" (with the file's mean/std, else the dataset's).
    layout: "NHWC", "NCHW" or "auto" (by the dataset's image shape, else by the channel axis).
    partition_factor, method: override the file's (None: the file's, else 1 / "external").
    When ``images_normalized`` is absent it is computed from ``images`` and vice versa.
    action: what a set holding NaN or infinite values is refused for, in the error (check_finite).
    """
    where = f"synthetic set {path!r}"
    if space not in IMAGE_SPACES:
        raise ValueError(f"unknown image space {space!r}; expected one of {IMAGE_SPACES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown image layout {layout!r}; expected one of {LAYOUTS}")
    optional = METADATA_KEYS if dataset is not None else ()
    missing = [k for k in REQUIRED_KEYS if k not in arrays and k not in optional
               and not (k == "images" and "images_normalized" in arrays)]
    if missing:
        hint = ("; a file of only images and labels can be scored with main.py --mode=evaluate, which "
                "takes the rest from the dataset config" if "labels" not in missing and dataset is None else "")
        raise ValueError(f"{where} lacks key(s) {missing}; it has {sorted(arrays)}{hint}")
    filled = tuple(k for k in METADATA_KEYS if k not in arrays)
    mean = np.asarray(arrays["mean"] if "mean" in arrays else dataset.mean, np.float32).reshape(-1)
    std = np.asarray(arrays["std"] if "std" in arrays else dataset.std, np.float32).reshape(-1)
    class_names = tuple(str(n) for n in np.atleast_1d(
        arrays["class_names"] if "class_names" in arrays else dataset.class_names))
    if partition_factor is None:
        partition_factor = _scalar(path, arrays, "partition_factor", int) if "partition_factor" in arrays else 1
    expected = tuple(int(d) for d in dataset.image_shape) if dataset is not None else None
    stored = {k: _to_nhwc(np.asarray(arrays[k]), layout, expected, where)
              for k in ("images", "images_normalized") if k in arrays}
    labels = np.asarray(arrays["labels"])
    check_finite(where, {**stored, **{k: np.asarray(arrays[k]) for k in ("mean", "std") if k in arrays}},
                 action)
    first = next(iter(stored.values()))
    if expected is not None and first.shape[1:] != expected:
        raise ValueError(f"{where} has images of shape {first.shape[1:]} (H, W, C) but dataset "
                         f"{dataset.name!r} has {expected}")
    _check_set(where, first, labels, mean, std, len(class_names), int(partition_factor))
    if "images_normalized" in stored:
        if space == "normalized" and "images" in stored:
            raise ValueError(f"{where} holds images_normalized, so its `images` are pixels; drop "
                             "--synthetic_space=normalized")
        images_normalized = np.asarray(stored["images_normalized"], np.float32)
        if "images" in stored and stored["images"].shape != images_normalized.shape:
            raise ValueError(f"{where}: images_normalized has shape {images_normalized.shape} but "
                             f"images has {stored['images'].shape}")
        images = (np.asarray(stored["images"], np.float32) if "images" in stored else
                  np.clip(data.renormalize(images_normalized, mean, std, 0.0, 1.0), 0.0, 1.0))
    elif space == "pixel":
        images = _pixels(stored["images"], where)
        images_normalized = data.renormalize(images, 0.0, 1.0, mean, std)
    else:
        images_normalized = _normalized(stored["images"], where)
        images = np.clip(data.renormalize(images_normalized, mean, std, 0.0, 1.0), 0.0, 1.0)
    if method is None:
        method = _scalar(path, arrays, "method", str) if "method" in arrays else EXTERNAL_METHOD
    return SyntheticSet(
        images=images, images_normalized=images_normalized, labels=labels.astype(np.int32),
        mean=mean, std=std, class_names=class_names, partition_factor=int(partition_factor),
        method=str(method),
        dataset=_scalar(path, arrays, "dataset", str) if "dataset" in arrays else str(dataset.name),
        config_json=_scalar(path, arrays, "config_json", str) if "config_json" in arrays else "{}",
        path=str(path), filled_from_dataset=filled)


def nonfinite_counts(array: Any) -> tuple[int, int]:
    """(NaN count, infinite count) of an array; (0, 0) for integers and strings."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact):
        return 0, 0
    return int(np.isnan(array).sum()), int(np.isinf(array).sum())


def check_finite(where: str, arrays: Mapping[str, Any], action: str) -> None:
    """Raises ValueError naming `where`, every array holding NaN or infinite values with its
    counts, and the `action` refused (evaluate, export, publish, resume): such a set would train
    silently to chance accuracy, and a non-finite mean or std makes every image so."""
    problems = []
    for name, array in arrays.items():
        nan, inf = nonfinite_counts(array)
        if nan or inf:
            problems.append(f"{nan + inf} of {np.size(array)} values of {name!r} are not finite "
                            f"({nan} NaN, {inf} infinite)")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}; refusing to {action} it")


def check_compatible(synset: SyntheticSet, dataset: Any) -> None:
    """Raises ValueError when `synset` cannot be evaluated on `dataset` (an ArrayDataset).

    Compares image shape (H, W, C) and class count, naming both sides.
    """
    where = f"synthetic set {synset.path!r}" if synset.path else "synthetic set"
    data_shape = tuple(int(d) for d in dataset.image_shape)
    if synset.image_shape != data_shape:
        raise ValueError(f"{where} has images of shape {synset.image_shape} (H, W, C) but dataset "
                         f"{dataset.name!r} has {data_shape}")
    if synset.num_classes != int(dataset.num_classes):
        raise ValueError(f"{where} has {synset.num_classes} classes but dataset {dataset.name!r} "
                         f"has {dataset.num_classes}")


# ----------------------------------------------------------------------------------------------
# synthetic.png


def save_grid_png(path: str, images_pixel: Any, labels: Any, num_classes: int, *,
                  min_cell: int = 64, gap: int = 2) -> str:
    """Saves a grid with one row per class (images in label order) as a PNG; returns `path`.

    images_pixel: f32[N, H, W, C] in [0, 1] (C = 1 or 3); labels: int[N]. Cells are upscaled by
    an integer factor (nearest neighbour) to at least `min_cell` pixels so 8x8 digits are visible.
    """
    from PIL import Image  # pylint: disable=g-import-not-at-top

    images = np.asarray(images_pixel, np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"save_grid_png({path!r}): images must be [N, H, W, 1 or 3], got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"save_grid_png({path!r}): {labels.shape} labels for {images.shape[0]} images")
    if num_classes < 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"save_grid_png({path!r}): labels must lie in [0, {num_classes})")
    _, h, w, c = images.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    cols = max(1, int(np.bincount(labels, minlength=num_classes).max()) if labels.size else 1)
    cell_h, cell_w = h * scale + gap, w * scale + gap
    grid = np.ones((num_classes * cell_h - gap, cols * cell_w - gap, c), np.float32)
    for k in range(num_classes):
        for j, i in enumerate(np.flatnonzero(labels == k)):
            cell = np.repeat(np.repeat(images[i], scale, axis=0), scale, axis=1)
            grid[k * cell_h:k * cell_h + h * scale, j * cell_w:j * cell_w + w * scale] = cell
    pixels = np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    with workdir_lib.atomic_file(path) as f:
        image.save(f, format="PNG")
    return path
