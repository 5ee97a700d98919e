"""How pixels become network inputs: per-channel statistics (named, inferred or computed) and
normalize / denormalize / renormalize."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Per-channel mean/std of [0, 1]-scaled images (docs/RELEASE.md#data-and-normalization).
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


def resolve_normalization(
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
