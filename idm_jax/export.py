"""A set in the layouts other tools read: `main.py --mode=export` (docs/EVALUATE_ANY_SET.md).

From any set `main.py --mode=evaluate` scores (idm_jax's synthetic.npz, or an images+labels .npz
with the --synthetic_* flags) it writes, into the workdir, the images the evaluator trains on
(partitioned sets expanded: an IPC-10 CIFAR-10 set with l = 2 gives 400 images):

* ``imagefolder/<label:03d>_<class name>/<label:03d>_<index:05d>.png``: 8-bit PNGs of the pixels
  round(255 * clip(x, 0, 1)), x = the denormalized image; folder names sort in label order, so
  torchvision's ImageFolder (and DD-Ranking's ``image_path``) gives back the labels;
* ``ddranking/images.npy``: f32[N, C, H, W], the evaluator's input normalized as DD-Ranking
  normalizes the dataset's real images (`ddranking_normalization`: its CIFAR-10 statistics for
  CIFAR-10 and CIFAR-100, ImageNet's for TinyImageNet and ImageNet subsets; a dataset it does not
  know keeps the evaluator's), and ``ddranking/labels.npy``: int64[N] hard labels (DD-Ranking's
  ``image_tensor`` and ``hard_labels``); ``images.pt`` / ``labels.pt`` too when torch is installed
  (torch stays optional);
* ``export.json``: what was written, the normalizations, and what 8-bit rounding changes
  (`rounding_change`: values clipped, largest change in pixel levels and in normalized units).

A set stored with other statistics than the dataset's (the ImageNet subset's condensed unnormalized:
mean 0, std 1) is first renormalized to the dataset's, as --mode=evaluate does.

`write_torchvision_cifar` writes a CIFAR-10 / CIFAR-100 dataset in the layout torchvision's
CIFAR10 / CIFAR100 read (python pickle batches), so DD-Ranking can run offline on the same images
idm_jax reads (benchmarks/ddranking_score.py).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tempfile
from typing import Any

import numpy as np
from absl import logging

from idm_jax import data, evaluate, synthetic_file
from idm_jax import workdir as workdir_lib

IMAGEFOLDER, DDRANKING = "imagefolder", "ddranking"

# How DD-Ranking (pip ddranking 0.2.0, ddranking/utils/data.py get_dataset) normalizes each dataset's
# real images, keyed by data.infer_normalization's key: its name there, mean, std. It gives CIFAR-100
# CIFAR-10's statistics, not CIFAR-100's own, so a CIFAR-100 export is renormalized to those.
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DDRANKING_DATASETS = {
    "cifar10": ("CIFAR10", *_CIFAR10_STATS),
    "cifar100": ("CIFAR100", *_CIFAR10_STATS),
    "tinyimagenet": ("TinyImageNet", *_IMAGENET_STATS),
    "imagenet": ("ImageNet1K / ImageNette-style subsets", *_IMAGENET_STATS),
}


def evaluator_normalization(synset: synthetic_file.SyntheticSet, config: Any = None,
                            dataset: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The (mean, std) the evaluator feeds the network with: the dataset's, as --mode=evaluate
    renormalizes to. From `dataset` when loaded; else the statistics config.data.normalization
    names or the set's dataset name implies (data.NORMALIZATION); else (statistics computed from
    the train images) the set's own, which is how idm_jax stores them."""
    if dataset is not None:
        return np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
    named = config.data.normalization if config is not None else ""
    key = named or data.infer_normalization(synset.dataset)
    if key in data.NORMALIZATION and len(data.NORMALIZATION[key][0]) == synset.image_shape[-1]:
        mean, std = data.NORMALIZATION[key]
        return np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return np.asarray(synset.mean, np.float32), np.asarray(synset.std, np.float32)


def ddranking_normalization(dataset_name: str, channels: int, fallback: tuple[Any, Any]) -> dict[str, Any]:
    """{mean, std, source} of the ddranking/ arrays: DD-Ranking's statistics for the dataset
    (DDRANKING_DATASETS), else `fallback` (the evaluator's: DD-Ranking has no such dataset)."""
    key = data.infer_normalization(dataset_name)
    if key in DDRANKING_DATASETS and len(DDRANKING_DATASETS[key][1]) == channels:
        name, mean, std = DDRANKING_DATASETS[key]
        return {"mean": list(mean), "std": list(std),
                "source": f"DD-Ranking's normalization of {name} (ddranking 0.2.0, utils/data.py)"}
    return {"mean": np.asarray(fallback[0]).tolist(), "std": np.asarray(fallback[1]).tolist(),
            "source": f"the evaluator's (DD-Ranking has no dataset like {dataset_name!r})"}


def evaluator_inputs(synset: synthetic_file.SyntheticSet, mean: Any = None,
                     std: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """What the evaluator trains on: (f32[N * l * l, H, W, C] normalized, int32[N * l * l] labels),
    the set's images renormalized to (mean, std) (default: the set's own) and cut into l x l
    pieces, each resized back (`evaluate.training_set`), as --mode=evaluate does."""
    images = synset.images_normalized
    if mean is not None:
        images = data.renormalize(images, synset.mean, synset.std, mean, std)
    images, labels = evaluate.training_set(images, synset.labels, synset.partition_factor)
    return np.asarray(images, np.float32), np.asarray(labels, np.int32)


def to_uint8(images_normalized: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """Normalized images -> uint8 pixels round(255 * clip(x, 0, 1)), x the denormalized image."""
    pixels = data.renormalize(np.asarray(images_normalized, np.float32), mean, std, 0.0, 1.0)
    return np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def rounding_change(images_normalized: np.ndarray, images_uint8: np.ndarray, mean: Any, std: Any) -> dict[str, Any]:
    """What storing `images_normalized` as `images_uint8` (to_uint8) changes, measured.

    Returns the fraction of values outside [0, 1] (clipped), the largest and mean change in pixel
    levels (1/255), and the largest change in normalized units.
    """
    pixels = data.renormalize(np.asarray(images_normalized, np.float32), mean, std, 0.0, 1.0)
    back = images_uint8.astype(np.float32) / 255.0
    diff = np.abs(back - pixels) * 255.0
    back_normalized = data.renormalize(back, 0.0, 1.0, mean, std)
    clipped = (pixels < 0.0) | (pixels > 1.0)
    return {"values": int(pixels.size), "clipped_fraction": float(clipped.mean()),
            "max_change_levels": float(diff.max(initial=0.0)), "mean_change_levels": float(diff.mean()),
            "max_change_levels_unclipped": float(diff[~clipped].max(initial=0.0)),
            "max_change_normalized": float(np.abs(back_normalized - images_normalized).max(initial=0.0))}


def class_folder(label: int, name: str, num_classes: int) -> str:
    """'<label, zero-padded>_<name>': the names sort in label order (ImageFolder assigns labels by
    sorted folder name)."""
    width = max(3, len(str(num_classes - 1)))
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "class"
    return f"{label:0{width}d}_{safe}"


def _replace_dir(tmp: str, final: str) -> None:
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_imagefolder(folder: str, images_uint8: np.ndarray, labels: np.ndarray,
                      class_names: Any) -> dict[str, int]:
    """One PNG per image under folder/<class_folder>/ (the folder is replaced whole); {folder: count}.

    images_uint8: uint8[N, H, W, C] (C = 1 or 3); labels: int[N].
    """
    from PIL import Image  # pylint: disable=g-import-not-at-top

    class_names = list(class_names)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.")
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from a shared group
    counts: dict[str, int] = {}
    try:
        for c, name in enumerate(class_names):
            sub = class_folder(c, name, len(class_names))
            os.makedirs(os.path.join(tmp, sub))
            counts[sub] = 0
        for i, (image, label) in enumerate(zip(images_uint8, np.asarray(labels))):
            sub = class_folder(int(label), class_names[int(label)], len(class_names))
            pil = (Image.fromarray(image[..., 0], mode="L") if image.shape[-1] == 1
                   else Image.fromarray(image, mode="RGB"))
            pil.save(os.path.join(tmp, sub, f"{int(label):03d}_{i:05d}.png"), format="PNG")
            counts[sub] += 1
        _replace_dir(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and workdir_lib.is_disk_full(e):
            needed = imagefolder_bytes(images_uint8, len(class_names))
            kept = (f"the previous {os.path.basename(folder)}/ is intact" if os.path.isdir(folder)
                    else "no PNG was left behind")
            raise workdir_lib.no_space(f"the {len(images_uint8)} PNGs of {os.path.basename(folder)}/", folder,
                                       needed, kept=kept) from None
        raise
    return counts


def imagefolder_bytes(images_uint8: np.ndarray, num_classes: int, block: int = 4096) -> int:
    """About what write_imagefolder needs on disk: PNG compresses, but a synthetic image may not, so
    each file's raw pixels and header, rounded up to whole blocks, plus a block per class folder."""
    per_file = -(-(images_uint8[0].nbytes + 200) // block) * block if len(images_uint8) else 0
    return per_file * len(images_uint8) + block * num_classes


def read_imagefolder(folder: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder back as (uint8[N, H, W, C], int32[N] labels, class folder names), labels by
    sorted folder name as torchvision assigns them, files in sorted order."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    images, labels = [], []
    for label, sub in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, sub))):
            with Image.open(os.path.join(folder, sub, f)) as im:
                a = np.asarray(im)
            images.append(a[..., None] if a.ndim == 2 else a)
            labels.append(label)
    if not images:
        raise ValueError(f"image folder {folder!r} holds no images")
    return np.stack(images), np.asarray(labels, np.int32), classes


def write_ddranking(folder: str, images_normalized: np.ndarray, labels: np.ndarray) -> list[str]:
    """DD-Ranking's tensors: images f32[N, C, H, W] (normalized, as given) and labels int64[N] as
    .npy, and as .pt when torch is installed. Returns the file names written."""
    nchw = np.ascontiguousarray(np.transpose(np.asarray(images_normalized, np.float32), (0, 3, 1, 2)))
    labels = np.asarray(labels, np.int64)
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, array in (("images", nchw), ("labels", labels)):
        with workdir_lib.atomic_file(os.path.join(folder, f"{name}.npy"), needed_bytes=array.nbytes) as f:
            np.save(f, array)
        written.append(f"{name}.npy")
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
        return written
    for name, array in (("images", nchw), ("labels", labels)):
        with workdir_lib.atomic_file(os.path.join(folder, f"{name}.pt"), needed_bytes=array.nbytes) as f:
            torch.save(torch.from_numpy(array.copy()), f)
        written.append(f"{name}.pt")
    return written


def export_set(synset: synthetic_file.SyntheticSet, out_dir: str, config: Any = None,
               dataset: Any = None) -> dict[str, Any]:
    """Writes `synset` in every layout (module docstring) under out_dir; returns export.json's record.

    config / dataset: where the evaluator's normalization comes from (`evaluator_normalization`).
    """
    mean, std = evaluator_normalization(synset, config, dataset)
    images, labels = evaluator_inputs(synset, mean, std)
    u8 = to_uint8(images, mean, std)
    theirs = ddranking_normalization(synset.dataset, images.shape[-1], (mean, std))
    counts = write_imagefolder(os.path.join(out_dir, IMAGEFOLDER), u8, labels, synset.class_names)
    written = write_ddranking(os.path.join(out_dir, DDRANKING),
                              data.renormalize(images, mean, std, theirs["mean"], theirs["std"]), labels)
    record = {
        "set": synset.path, "method": synset.method, "dataset": synset.dataset,
        "partition_factor": synset.partition_factor, "stored_images": int(len(synset.labels)),
        "ipc": synset.ipc, "exported_images": int(len(labels)),
        "image_shape_nhwc": list(images.shape[1:]), "mean": mean.tolist(), "std": std.tolist(),
        "stored_mean": np.asarray(synset.mean).tolist(), "stored_std": np.asarray(synset.std).tolist(),
        "class_names": list(synset.class_names),
        IMAGEFOLDER: {"folder": IMAGEFOLDER, "images_per_class_folder": counts},
        DDRANKING: {"folder": DDRANKING, "files": written, "labels": "int64[N]",
                    "images": "f32[N, C, H, W] normalized with ddranking.mean / ddranking.std",
                    "mean": theirs["mean"], "std": theirs["std"], "normalization": theirs["source"]},
        "rounding_change": rounding_change(images, u8, mean, std),
    }
    text = json.dumps(record, indent=2).encode() + b"\n"
    with workdir_lib.atomic_file(os.path.join(out_dir, "export.json"), needed_bytes=len(text)) as f:
        f.write(text)
    return record


def run_export(config: Any, workdir: str, synthetic_path: str, *, space: str = "pixel",
               layout: str = "auto", partition_factor: int | None = None,
               method: str | None = None) -> dict[str, Any]:
    """main.py --mode=export: reads the set as --mode=evaluate does and writes it with `export_set`.

    The dataset of config.data is loaded only when the file lacks some of synthetic_file.METADATA_KEYS
    (a bare images+labels file); it then also checks that the set fits it.
    """
    arrays = synthetic_file.read_npz(synthetic_path)
    dataset = None
    if any(k not in arrays for k in synthetic_file.METADATA_KEYS):
        dataset = data.load_config_dataset(config)
    synset = synthetic_file.synthetic_from_arrays(arrays, synthetic_path, dataset, space=space, layout=layout,
                                                  partition_factor=partition_factor, method=method, action="export")
    if dataset is not None:
        synthetic_file.check_compatible(synset, dataset)
    record = export_set(synset, workdir, config, dataset)
    r = record["rounding_change"]
    logging.info("exported %d images (%d stored, partition l=%d) of %s to %s: %s/ (PNGs), %s/ (%s); "
                 "8-bit PNGs clip %.4f %% of the values and change them by at most %.2f pixel levels "
                 "(%.2f where not clipped); the %s/ arrays carry %s", record["exported_images"],
                 record["stored_images"], synset.partition_factor, synthetic_path, workdir, IMAGEFOLDER, DDRANKING,
                 ", ".join(record[DDRANKING]["files"]), 100 * r["clipped_fraction"], r["max_change_levels"],
                 r["max_change_levels_unclipped"], DDRANKING, record[DDRANKING]["normalization"])
    return record


# ----------------------------------------------------------------------------------------------
# A CIFAR dataset in torchvision's offline layout (for DD-Ranking's real images)

TORCHVISION_CIFAR = {  # classes -> (folder, train files, test file, meta file, label key, names key)
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
         "labels", "label_names"),
    100: ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


def cifar_rows(images_uint8: np.ndarray) -> np.ndarray:
    """uint8[N, 32, 32, 3] -> uint8[N, 3072]: each row the red plane, then green, then blue (row-major),
    as CIFAR's python batches store an image."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"CIFAR batches hold uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def write_torchvision_cifar(root: str, train_images: np.ndarray, train_labels: np.ndarray,
                            test_images: np.ndarray, test_labels: np.ndarray, class_names: Any) -> str:
    """Writes a 10- or 100-class dataset under root/ as torchvision's CIFAR10 / CIFAR100 read it
    (pickled dicts of `data` uint8[N, 3072] and labels; CIFAR-10's train split in 5 batches).
    Returns the folder written. The files are not the originals: torchvision's md5 check fails,
    so they are read with its integrity check skipped (benchmarks/ddranking_score.py)."""
    class_names = [str(n) for n in class_names]
    if len(class_names) not in TORCHVISION_CIFAR:
        raise ValueError(f"torchvision's CIFAR layouts hold 10 or 100 classes, not {len(class_names)}")
    folder, train_files, test_file, meta_file, label_key, names_key = TORCHVISION_CIFAR[len(class_names)]
    out = os.path.join(root, folder)
    parts = np.array_split(np.arange(len(train_labels)), len(train_files))
    batches = [(name, train_images[idx], train_labels[idx]) for name, idx in zip(train_files, parts)]
    batches.append((test_file, test_images, test_labels))
    for name, images, labels in batches:
        entry = {"batch_label": name, label_key: [int(k) for k in labels], "data": cifar_rows(images)}
        _write_pickle(os.path.join(out, name), entry)
    _write_pickle(os.path.join(out, meta_file), {names_key: class_names})
    return out


class _PortablePickler(pickle.Pickler):
    """Pickles arrays as numpy.ndarray(shape, dtype, bytes): numpy 2 pickles them naming
    numpy._core, which the numpy 1 of a torch environment cannot load; this loads under both."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            return np.ndarray, (obj.shape, obj.dtype.str, np.ascontiguousarray(obj).tobytes())
        return NotImplemented


def portable_pickle(obj: Any) -> bytes:
    """`obj` pickled (protocol 2, as CIFAR's own files) with its arrays readable by numpy 1 and 2."""
    buffer = io.BytesIO()
    _PortablePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _write_pickle(path: str, obj: Any) -> None:
    blob = portable_pickle(obj)
    with workdir_lib.atomic_file(path, needed_bytes=len(blob)) as f:
        f.write(blob)
