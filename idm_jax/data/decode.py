"""How image files become uint8 arrays of one size: PNG/JPEG decoding (threads), the resize
modes, and decoding whole splits into preallocated (in-memory or memory-mapped) arrays."""

from __future__ import annotations

import io
import logging
import os
from concurrent import futures
from typing import Any

import numpy as np
from PIL import Image

from idm_jax.data import cache

_log = logging.getLogger(__name__)

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# How images are brought to image_size x image_size: "stretch" resizes both sides (bilinear,
# aspect ratio not kept); "center_crop" resizes the shorter side to image_size (the longer
# to int(image_size * long / short), as torchvision's Resize(int)) and cuts the central
# square (offsets rounded as torchvision's CenterCrop): the ImageNet-subset protocol.
RESIZE_MODES = ("stretch", "center_crop")
_DECODE_THREADS = min(16, os.cpu_count() or 1)


def resize_images(images: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """Bilinear resize of uint8[N, H, W, C] to uint8[N, size, size, C] (PIL, per image)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([resize_one(img, size, mode) for img in images]) if len(images) else images[:, :size, :size]


def resize_one(image: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
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


def decode_image(data: bytes | str, name: str, mode: str | None) -> np.ndarray:
    """Decodes one PNG/JPEG (bytes or a path) to uint8[H, W, C]; mode None keeps its own."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            if mode is None:
                mode = "L" if img.mode in _GRAY_MODES else "RGB"
            array = np.asarray(img.convert(mode))
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {name!r}: {e}") from e
    return array[..., None] if array.ndim == 2 else array


def decode_splits(train, test, image_size: int | None, resize: str = "stretch",
                   cache_base: str | None = None, memmap: bool | None = None) -> dict[str, Any]:
    """Decodes both splits (threads) into preallocated uint8 arrays; labels = class index in order.

    Caches the result under cache_base (if given): one .npz, or memory-mapped .npy files when
    `memmap` is True (None: when the arrays exceed MEMMAP_BYTES), returned as memmaps.
    """
    first_name, first_data = train[0][1][0]
    first = decode_image(first_data, first_name, None)
    if image_size is not None:
        first = resize_one(first, image_size, resize)
    mode = "L" if first.shape[-1] == 1 else "RGB"  # the first image decides the channels
    total = sum(len(e) for split in (train, test) for _, e in split)
    if memmap is None:
        memmap = total * first.nbytes > cache.MEMMAP_BYTES
    if memmap and cache_base is None:
        raise ValueError("memory-mapped decoding needs a cache folder")
    _log.info("decoding %d images (%s)%s", total, "x".join(map(str, first.shape)),
              " into memory-mapped files" if memmap else "")
    sink = cache.MemmapCache(cache_base) if memmap else None
    allocate = sink.allocate if sink else (lambda key, shape, dtype: np.empty(shape, dtype))

    def decode_into(images, i, name, data):
        img = decode_image(data, name, mode)
        if image_size is not None:
            img = resize_one(img, image_size, resize)
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
        cache.write_cache(cache_base + ".npz", arrays)
    return arrays
