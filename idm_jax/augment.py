"""Differentiable Siamese Augmentation (DSA) and partition-and-expansion.

Both transforms act on NHWC float32 batches that are already normalized per
channel, so "zero fill" means 0 in normalized space, as in the release.
Everything here is pure, jittable (strategy strings, flags and `DSAParams`
are static Python values) and differentiable with respect to the images.

DSA (docs/RELEASE.md#dsa): every call picks
ONE family uniformly from the strategy and applies it to the whole batch.
In Siamese mode (`per_image=False`) the family's random parameters are drawn
once, as scalars, so two batches of any sizes augmented with the same key get
the identical transform. In per-image mode every image draws its own.

Partition and expansion (docs/RELEASE.md#partition-and-expansion): cut each
image into factor x factor pieces and resize every piece back to full size
with bilinear interpolation (half-pixel centres, no antialiasing).

The per-family functions (`color`, `crop`, `cutout`, `flip`, `scale`,
`rotate`) take explicit parameters - a scalar shared by the batch or one
value per image - so they can be used and tested deterministically.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from idm_jax import defaults

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclasses.dataclass(frozen=True)
class DSAParams:
    """Strengths of the DSA families (the release's defaults).

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    crop_ratio: float = 0.125  # max integer shift = round(0.125 * side) = 4 px on 32x32
    cutout_ratio: float = 0.5  # cutout square side = round(0.5 * side) = 16 px on 32x32
    scale: float = 1.2  # sx, sy ~ U(1/scale, scale), independently
    rotate_degrees: float = 15.0  # angle ~ U(-rotate_degrees, rotate_degrees)
    brightness: float = 1.0  # added offset ~ (U(0, 1) - 0.5) * brightness
    saturation: float = 2.0  # saturation factor ~ U(0, 1) * saturation
    contrast: float = 0.5  # contrast factor ~ U(0, 1) + contrast


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Split a DSA strategy string into its families.

    "color_crop_flip" -> ("color", "crop", "flip"); "" or "none" -> ().
    A family listed twice is drawn twice as often, as in the release.
    """
    if not isinstance(strategy, str):
        raise ValueError(f"DSA strategy must be a string, got {strategy!r}")
    if strategy in ("", "none"):
        return ()
    families = tuple(strategy.split("_"))
    for family in families:
        if family not in FAMILIES:
            raise ValueError(
                f"unknown DSA family {family!r} in strategy {strategy!r}; "
                f"valid families: {', '.join(FAMILIES)} (joined with '_'), or 'none'"
            )
    return families


# ---------------------------------------------------------------------------
# Per-family transforms with explicit parameters.
# Every parameter is a scalar (shared by the batch) or an array of shape [N].
# ---------------------------------------------------------------------------


def _per_image(value: jax.Array | float, n: int, dtype=jnp.float32) -> jax.Array:
    """Broadcasts a scalar or [N] parameter to shape [N]."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (n,))


def _check_images(images: jax.Array) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC with 4 dimensions, got shape {images.shape}")


def color(
    images: jax.Array,
    brightness: jax.Array | float,
    saturation: jax.Array | float,
    contrast: jax.Array | float,
) -> jax.Array:
    """Brightness, then saturation, then contrast (the release's "color").

    images: f32[N, H, W, C]; each parameter: f32[] or f32[N].
      brightness: offset added to every value.
      saturation: x -> (x - mean over channels) * saturation + that mean, per pixel.
      contrast: x -> (x - mean over H, W, C) * contrast + that mean, per image.
    Returns f32[N, H, W, C].
    """
    _check_images(images)
    n = images.shape[0]
    b = _per_image(brightness, n)[:, None, None, None]
    s = _per_image(saturation, n)[:, None, None, None]
    c = _per_image(contrast, n)[:, None, None, None]
    x = images + b
    # Summing channel slices: XLA:CPU reduces a minor axis of size 3 slowly
    # (docs/RESULTS.md#xlacpu-behaviours-behind-the-cpu-defaults).
    pixel_mean = sum(x[..., i : i + 1] for i in range(x.shape[3])) / x.shape[3]
    x = (x - pixel_mean) * s + pixel_mean
    image_mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - image_mean) * c + image_mean


def crop(images: jax.Array, dy: jax.Array | int, dx: jax.Array | int) -> jax.Array:
    """Translates by integer pixels with zero fill ("crop" of a zero-padded image).

    images: f32[N, H, W, C]; dy, dx: int[] or int[N].
    out[n, y, x] = images[n, y - dy, x - dx], or 0 where that lies outside:
    content moves down by dy and right by dx.
    """
    _check_images(images)
    n, h, w, _ = images.shape

    def shift_one(image, sy, sx):
        rows = jnp.arange(h) - sy
        cols = jnp.arange(w) - sx
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        moved = image[jnp.clip(rows, 0, h - 1)][:, jnp.clip(cols, 0, w - 1)]
        return jnp.where(inside[:, :, None], moved, 0.0)

    return jax.vmap(shift_one)(images, _per_image(dy, n, jnp.int32), _per_image(dx, n, jnp.int32))


def _ratio_size(side: int, ratio: float) -> int:
    # Round half up, as the release does (int(side * ratio + 0.5)).
    return int(side * ratio + 0.5)


def cutout(
    images: jax.Array, cy: jax.Array | int, cx: jax.Array | int, *, ratio: float = 0.5
) -> jax.Array:
    """Zeroes a rectangle of round(ratio * side) per axis centred at (cy, cx).

    images: f32[N, H, W, C]; cy, cx: int[] or int[N].
    With size s = round(ratio * H) the zeroed rows are cy - s//2 .. cy - s//2 + s - 1,
    clipped to the image (16x16 covering cy-8 .. cy+7 on 32x32 at ratio 0.5);
    columns likewise with W.
    """
    _check_images(images)
    n, h, w, _ = images.shape
    size_h, size_w = _ratio_size(h, ratio), _ratio_size(w, ratio)
    top = _per_image(cy, n, jnp.int32)[:, None] - size_h // 2
    left = _per_image(cx, n, jnp.int32)[:, None] - size_w // 2
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_rows = (rows >= top) & (rows < top + size_h)  # [N, H]
    in_cols = (cols >= left) & (cols < left + size_w)  # [N, W]
    hole = in_rows[:, :, None, None] & in_cols[:, None, :, None]
    return jnp.where(hole, 0.0, images)


def flip(images: jax.Array, do_flip: jax.Array | bool) -> jax.Array:
    """Horizontal (left-right) flip of the images where do_flip is true.

    images: f32[N, H, W, C]; do_flip: bool[] or bool[N].
    """
    _check_images(images)
    mask = _per_image(do_flip, images.shape[0], jnp.bool_)[:, None, None, None]
    return jnp.where(mask, images[:, :, ::-1, :], images)


def affine_sample(images: jax.Array, theta: jax.Array) -> jax.Array:
    """Warps images like PyTorch's affine_grid + grid_sample (bilinear, zeros, align_corners=False).

    images: f32[N, H, W, C]; theta: f32[2, 3] or f32[N, 2, 3], mapping OUTPUT
    normalized coordinates to INPUT ones: [x_in, y_in] = theta @ [x_out, y_out, 1],
    x along W and y along H. Pixel k sits at normalized (2k + 1) / W - 1, and a
    normalized value g samples pixel coordinate ((g + 1) W - 1) / 2. Each of the four
    bilinear taps that falls outside the image contributes 0 (zeros padding).
    Returns f32[N, H, W, C].
    """
    _check_images(images)
    n, h, w, _ = images.shape
    theta = jnp.broadcast_to(jnp.asarray(theta, jnp.float32), (n, 2, 3))
    x_out = (2.0 * jnp.arange(w, dtype=jnp.float32) + 1.0) / w - 1.0
    y_out = (2.0 * jnp.arange(h, dtype=jnp.float32) + 1.0) / h - 1.0
    x_out, y_out = x_out[None, :], y_out[:, None]  # broadcast to [H, W]

    def warp_one(image, t):
        x_in = t[0, 0] * x_out + t[0, 1] * y_out + t[0, 2]
        y_in = t[1, 0] * x_out + t[1, 1] * y_out + t[1, 2]
        coords = [((y_in + 1.0) * h - 1.0) / 2.0, ((x_in + 1.0) * w - 1.0) / 2.0]
        # JAX's 'constant' mode checks validity per tap, which is grid_sample's zeros padding.
        sample = lambda channel: ndimage.map_coordinates(channel, coords, order=1, mode="constant", cval=0.0)
        return jax.vmap(sample, in_axes=2, out_axes=2)(image)

    return jax.vmap(warp_one)(images, theta)


def scale(images: jax.Array, sx: jax.Array | float, sy: jax.Array | float) -> jax.Array:
    """Affine scaling with theta [[sx, 0, 0], [0, sy, 0]] (see `affine_sample`).

    images: f32[N, H, W, C]; sx, sy: f32[] or f32[N]. sx > 1 samples a wider
    source region, so the content shrinks by 1/sx horizontally.
    """
    _check_images(images)
    n = images.shape[0]
    sx, sy = _per_image(sx, n), _per_image(sy, n)
    zero = jnp.zeros_like(sx)
    theta = jnp.stack([jnp.stack([sx, zero, zero], -1), jnp.stack([zero, sy, zero], -1)], -2)
    return affine_sample(images, theta)


def rotate(images: jax.Array, degrees: jax.Array | float) -> jax.Array:
    """Affine rotation with theta [[cos, -sin, 0], [sin, cos, 0]] (see `affine_sample`).

    images: f32[N, H, W, C]; degrees: f32[] or f32[N]. On a square image, 90 degrees
    gives out[y, x] = in[x, W - 1 - y], i.e. jnp.rot90(images, 1, axes=(1, 2)).
    """
    _check_images(images)
    angle = _per_image(degrees, images.shape[0]) * (math.pi / 180.0)
    cos, sin, zero = jnp.cos(angle), jnp.sin(angle), jnp.zeros_like(angle)
    theta = jnp.stack([jnp.stack([cos, -sin, zero], -1), jnp.stack([sin, cos, zero], -1)], -2)
    return affine_sample(images, theta)


# ---------------------------------------------------------------------------
# Random draws. Each family turns uniforms u: f32[..., 3] in [0, 1) into its
# parameters; u is f32[3] in Siamese mode (one draw for any batch) and f32[N, 3]
# per image. Drawing every parameter with one call keeps the number of threefry
# hashes, which dominate XLA compile time here, small.
# ---------------------------------------------------------------------------

_UNIFORMS_PER_DRAW = 3  # the most any family needs (color)


def _uniform_int(u: jax.Array, low: int, high: int) -> jax.Array:
    """Maps u ~ U[0, 1) to an integer uniform on low..high inclusive."""
    count = high - low + 1
    return low + jnp.minimum(jnp.floor(u * count), count - 1).astype(jnp.int32)


def _uniform(u: jax.Array, low: float, high: float) -> jax.Array:
    return low + u * (high - low)


def _random_color(images, u, params: DSAParams):
    brightness = (u[..., 0] - 0.5) * params.brightness
    saturation = u[..., 1] * params.saturation
    contrast = u[..., 2] + params.contrast
    return color(images, brightness, saturation, contrast)


def _random_crop(images, u, params: DSAParams):
    max_dy = _ratio_size(images.shape[1], params.crop_ratio)
    max_dx = _ratio_size(images.shape[2], params.crop_ratio)
    dy = _uniform_int(u[..., 0], -max_dy, max_dy)
    dx = _uniform_int(u[..., 1], -max_dx, max_dx)
    return crop(images, dy, dx)


def _random_cutout(images, u, params: DSAParams):
    h, w = images.shape[1:3]
    # Centres 0..side inclusive for an even square side (0..side-1 for odd), as the release.
    size_h, size_w = _ratio_size(h, params.cutout_ratio), _ratio_size(w, params.cutout_ratio)
    cy = _uniform_int(u[..., 0], 0, h - size_h % 2)
    cx = _uniform_int(u[..., 1], 0, w - size_w % 2)
    return cutout(images, cy, cx, ratio=params.cutout_ratio)


def _random_flip(images, u, params: DSAParams):
    del params
    return flip(images, u[..., 0] < 0.5)


def _random_scale(images, u, params: DSAParams):
    low, high = 1.0 / params.scale, params.scale
    return scale(images, _uniform(u[..., 0], low, high), _uniform(u[..., 1], low, high))


def _random_rotate(images, u, params: DSAParams):
    limit = params.rotate_degrees
    return rotate(images, _uniform(u[..., 0], -limit, limit))


_RANDOM_FAMILY: dict[str, Callable] = {
    "color": _random_color,
    "crop": _random_crop,
    "cutout": _random_cutout,
    "flip": _random_flip,
    "scale": _random_scale,
    "rotate": _random_rotate,
}


def dsa(
    images: jax.Array,
    key: jax.Array,
    strategy: str = defaults.DSA_STRATEGY,
    *,
    per_image: bool = False,
    params: DSAParams = DSAParams(),
) -> jax.Array:
    """Differentiable Siamese Augmentation, one family per call (the release's mode "S").

    images: f32[N, H, W, C] (normalized); key: a PRNG key.
    strategy: families joined by '_' (see `parse_strategy`); none -> identity.
    per_image=False (Siamese): one family and ONE parameter draw for the whole
      batch, independent of N, so dsa(real, k) and dsa(syn, k) apply the same transform.
    per_image=True: one family per call, parameters drawn for each image.
    The parameter draw does not depend on the strategy: with the same key, a strategy
    that picks family f applies exactly what strategy "f" alone applies.
    Jittable with strategy, per_image and params static. Returns f32[N, H, W, C].
    """
    families = parse_strategy(strategy)
    _check_images(images)
    if not families:
        return images
    family_key, param_key = jax.random.split(key)
    shape = (images.shape[0],) if per_image else ()
    u = jax.random.uniform(param_key, shape + (_UNIFORMS_PER_DRAW,))
    branches = [lambda x, u, f=_RANDOM_FAMILY[name]: f(x, u, params) for name in families]
    if len(branches) == 1:
        return branches[0](images, u)
    choice = _uniform_int(jax.random.uniform(family_key), 0, len(branches) - 1)
    return jax.lax.switch(choice, branches, images, u)


# ---------------------------------------------------------------------------
# Partition and expansion.
# ---------------------------------------------------------------------------


def _check_factor(factor: int) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"partition factor must be an integer >= 1, got {factor!r}")


def _piece_bounds(side: int, factor: int) -> list[tuple[int, int]]:
    """Start/stop of each of `factor` pieces along a side, as the release cuts them.

    factor 2: [0, side // 2) and [side // 2, side) (the release's halves; on an odd side
    the second is one pixel larger). factor >= 3: pieces of side // factor pixels from 0,
    i.e. [i * p, (i + 1) * p) with p = side // factor; the last side - factor * p rows or
    columns belong to no piece (the release's l = 3 cut: 10-pixel patches on 32x32,
    rows 30 and 31 unused).
    """
    if factor == 2:
        bounds = [(0, side // 2), (side // 2, side)]
    else:
        p = side // factor
        bounds = [(i * p, (i + 1) * p) for i in range(factor)]
    if any(stop <= start for start, stop in bounds):
        raise ValueError(f"cannot cut a side of {side} pixels into {factor} pieces")
    return bounds


def piece_order(factor: int) -> list[tuple[int, int]]:
    """(row, column) of each piece in output order.

    factor 2: top-left, bottom-left, top-right, bottom-right (the release's order);
    any other factor: row by row (the release's factor-3 order).
    """
    _check_factor(factor)
    if factor == 2:
        return [(0, 0), (1, 0), (0, 1), (1, 1)]
    return [(r, c) for r in range(factor) for c in range(factor)]


def _resize_bilinear(images: jax.Array, height: int, width: int) -> jax.Array:
    # Half-pixel centres without antialiasing = F.interpolate(bilinear, align_corners=False).
    n, _, _, c = images.shape
    return jax.image.resize(images, (n, height, width, c), method="linear", antialias=False)


def _tile_labels(labels: jax.Array | None, reps: int) -> jax.Array | None:
    if labels is None:
        return None
    labels = jnp.asarray(labels)
    return jnp.tile(labels, (reps,) + (1,) * (labels.ndim - 1))


def partition_expand(
    images: jax.Array, labels: jax.Array | None = None, factor: int = 2
) -> tuple[jax.Array, jax.Array | None]:
    """Cuts each image into factor x factor pieces and resizes each back to H x W.

    images: f32[N, H, W, C]; labels: [N, ...] or None.
    Returns (f32[N * factor**2, H, W, C], labels tiled to [N * factor**2, ...] or None),
    grouped by piece: all images' piece #0 first, then piece #1, ... in `piece_order`.
    Pieces are cut as the release cuts them (see `_piece_bounds`: halves for factor 2,
    patches of H // factor pixels for factor >= 3, the remainder unused). Resizing is
    bilinear with half-pixel centres, no antialias.
    factor 1 returns the inputs unchanged.
    """
    _check_factor(factor)
    _check_images(images)
    if factor == 1:
        return images, labels
    _, h, w, _ = images.shape
    rows, cols = _piece_bounds(h, factor), _piece_bounds(w, factor)
    pieces = [
        _resize_bilinear(images[:, rows[r][0] : rows[r][1], cols[c][0] : cols[c][1]], h, w)
        for r, c in piece_order(factor)
    ]
    return jnp.concatenate(pieces, axis=0), _tile_labels(labels, factor * factor)


def init_from_real(real_images: jax.Array, factor: int = 2) -> jax.Array:
    """Packs factor**2 downscaled real images of one class into each synthetic image.

    real_images: f32[M * factor**2, H, W, C]. Returns f32[M, H, W, C] where piece p
    (in `piece_order`) of synthetic image i is real image i * factor**2 + p, resized
    bilinearly WITHOUT antialiasing to the piece's size. Hence
    partition_expand(init_from_real(x))[p * M + i] approximates x[i * factor**2 + p].
    Pixels outside every piece (factor >= 3 on sides not divisible by it) stay 0.
    factor 1 returns the images unchanged.
    """
    _check_factor(factor)
    _check_images(real_images)
    pieces_per_image = factor * factor
    total, h, w, c = real_images.shape
    if total % pieces_per_image:
        raise ValueError(
            f"init_from_real needs a multiple of factor**2 = {pieces_per_image} real images, got {total}"
        )
    if factor == 1:
        return real_images
    m = total // pieces_per_image
    rows, cols = _piece_bounds(h, factor), _piece_bounds(w, factor)
    grouped = real_images.reshape(m, pieces_per_image, h, w, c)
    out = jnp.zeros((m, h, w, c), real_images.dtype)
    for p, (r, col) in enumerate(piece_order(factor)):
        (top, bottom), (left, right) = rows[r], cols[col]
        small = _resize_bilinear(grouped[:, p], bottom - top, right - left)
        out = out.at[:, top:bottom, left:right].set(small)
    return out


__all__ = (
    "DSAParams",
    "FAMILIES",
    "affine_sample",
    "color",
    "crop",
    "cutout",
    "dsa",
    "flip",
    "init_from_real",
    "parse_strategy",
    "partition_expand",
    "piece_order",
    "rotate",
    "scale",
)
