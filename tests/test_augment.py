"""Tests for idm_jax.augment: DSA families, Siamese/per-image draws, partition and expansion.

tests/data/grid_sample_reference.npz holds outputs of PyTorch 2.13.0 (CPU) on small
standard-normal images (NCHW there, stored NHWC): `images` [2, 8, 10, 3] and
`images12` [2, 12, 12, 3];
  rotate_out[i] = grid_sample(x, affine_grid(theta_i, x.shape)) with the defaults
    (bilinear, zeros, align_corners=False), theta_i = [[cos, -sin, 0], [sin, cos, 0]]
    at rotate_degrees[i]; scale_out[i] likewise with [[sx, 0, 0], [0, sy, 0]] = scales[i];
  partition2_out = the 4 quadrants of `images` (TL, BL, TR, BR) each through
    F.interpolate(size=(8, 10), mode="bilinear", align_corners=False), concatenated;
  partition3_out = the 9 4x4 blocks of `images12`, row by row, resized to 12x12 the same way;
  down2_out = F.interpolate(images, scale_factor=0.5, bilinear, align_corners=False);
  down3_out = `images12` resized to 4x4 the same way (no antialiasing in either).
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import augment, defaults

REFERENCE = pathlib.Path(__file__).parent / "data" / "grid_sample_reference.npz"
SINGLE_FAMILIES = augment.FAMILIES

# XLA compile time dominates these tests: every random-draw test goes through one jitted
# vmap over the same number of keys on the same image shape, so each (strategy, mode)
# compiles once and is shared.
NUM_KEYS = 96
KEYS = jax.random.split(jax.random.key(2024), NUM_KEYS)


def _dsa_over_keys(strategy: str, per_image: bool = False):
    return _dsa_over_keys_cached(strategy, per_image)  # one cache entry whatever the call style


@functools.lru_cache(maxsize=None)
def _dsa_over_keys_cached(strategy: str, per_image: bool):
    """jit(vmap over keys) of dsa for one strategy: (f32[N,H,W,C], keys[K]) -> f32[K, N, H, W, C]."""
    return jax.jit(jax.vmap(lambda x, k: augment.dsa(x, k, strategy, per_image=per_image), in_axes=(None, 0)))


@pytest.fixture(scope="module")
def probe():
    """Four distinct random 16x16x3 images (numpy RNG: no threefry to compile)."""
    return jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)


@pytest.fixture(scope="module")
def reference():
    return np.load(REFERENCE)


# --------------------------------------------------------------------------- strategy strings


def test_parse_strategy():
    assert augment.parse_strategy("color_crop_flip") == ("color", "crop", "flip")
    assert augment.parse_strategy(defaults.DSA_STRATEGY) == (
        "color", "crop", "cutout", "flip", "scale", "rotate")
    assert augment.parse_strategy("") == ()
    assert augment.parse_strategy("none") == ()


def test_unknown_strategy_raises_naming_it(probe):
    with pytest.raises(ValueError, match=r"'blur'.*valid families: color, crop"):
        augment.parse_strategy("color_blur")
    with pytest.raises(ValueError, match="'Flip'"):
        augment.dsa(probe, jax.random.key(0), "crop_Flip")


def test_empty_strategy_is_identity(probe):
    for strategy in ("", "none"):
        out = jax.jit(augment.dsa, static_argnames="strategy")(probe, jax.random.key(1), strategy=strategy)
        np.testing.assert_array_equal(out, probe)


def test_bad_rank_raises():
    with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
        augment.flip(jnp.zeros((16, 16, 3)), True)


# --------------------------------------------------------------------------- families, explicit parameters


def test_flip_values_and_twice_is_identity(probe):
    flipped = augment.flip(probe, True)
    np.testing.assert_array_equal(flipped[:, 3, 0], probe[:, 3, 15])
    np.testing.assert_array_equal(augment.flip(flipped, True), probe)
    mixed = augment.flip(probe, jnp.array([True, False, False, True]))
    np.testing.assert_array_equal(mixed[1:3], probe[1:3])
    np.testing.assert_array_equal(mixed[3], probe[3, :, ::-1])


def test_color_hand_computed():
    x = jnp.array([[[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]])  # [1, 1, 2, 3]
    # +1 -> [1,2,3],[4,5,6]; channel means 2, 5; saturation x2 -> [0,2,4],[3,5,7];
    # image mean 3.5; contrast x0.5 -> [1.75,2.75,3.75],[3.25,4.25,5.25]
    out = augment.color(x, 1.0, 2.0, 0.5)
    np.testing.assert_allclose(out, [[[[1.75, 2.75, 3.75], [3.25, 4.25, 5.25]]]], rtol=1e-6)
    gray = augment.color(x, 0.0, 0.0, 1.0)  # saturation 0: every pixel becomes its channel mean
    np.testing.assert_allclose(gray, [[[[1.0, 1.0, 1.0], [4.0, 4.0, 4.0]]]], rtol=1e-6)
    # Per-image parameters: image 0 only brightened, image 1 collapsed to its mean 2.5.
    two = jnp.concatenate([x, x])
    out2 = augment.color(two, jnp.array([0.5, 0.0]), jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(out2[0], x[0] + 0.5, rtol=1e-6)
    np.testing.assert_allclose(out2[1], np.full((1, 2, 3), 2.5), rtol=1e-6)


def test_crop_shifts_by_k_and_fills_zeros():
    x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
    out = augment.crop(x, 1, -2)[0, :, :, 0]  # down 1, left 2
    expected = [[0, 0, 0, 0], [3, 4, 0, 0], [7, 8, 0, 0], [11, 12, 0, 0]]
    np.testing.assert_array_equal(out, expected)
    # Per-image shifts on 32x32: pixel (10, 10) lands on (10 + dy, 10 + dx), k rows/cols of zeros.
    ones = jnp.ones((2, 32, 32, 1)).at[:, 10, 10].set(5.0)
    moved = augment.crop(ones, jnp.array([4, -3]), jnp.array([0, 2]))
    assert moved[0, 14, 10, 0] == 5.0 and moved[1, 7, 12, 0] == 5.0
    assert int((moved[0] == 0).sum()) == 4 * 32  # top 4 rows zero
    assert int((moved[1] == 0).sum()) == 3 * 32 + 2 * 32 - 3 * 2  # bottom 3 rows, left 2 cols


def test_cutout_zeroes_16x16_square_and_clips():
    ones = jnp.ones((3, 32, 32, 2))
    out = augment.cutout(ones, jnp.array([16, 0, 32]), jnp.array([16, 32, 5]))
    hole = np.ones((32, 32), bool)
    hole[8:24, 8:24] = False
    np.testing.assert_array_equal(out[0, :, :, 0] == 1.0, hole)
    assert int((out[0] == 0).sum()) == 16 * 16 * 2
    corner = np.ones((32, 32), bool)
    corner[0:8, 24:32] = False  # centre (0, 32): rows -8..7, cols 24..39, clipped
    np.testing.assert_array_equal(out[1, :, :, 1] == 1.0, corner)
    edge = np.ones((32, 32), bool)
    edge[24:32, 0:13] = False  # centre (32, 5): rows 24..39, cols -3..12, clipped
    np.testing.assert_array_equal(out[2, :, :, 0] == 1.0, edge)


def test_rotate_zero_and_scale_one_are_identity(probe):
    np.testing.assert_allclose(augment.rotate(probe, 0.0), probe, atol=1e-5)
    np.testing.assert_allclose(augment.scale(probe, 1.0, 1.0), probe, atol=1e-5)


def test_rotate_90_and_180_match_rot90(probe):
    # theta [[cos, -sin], [sin, cos]] at 90 degrees: out[y, x] = in[x, W-1-y] = rot90 (k=1).
    np.testing.assert_allclose(augment.rotate(probe, 90.0), jnp.rot90(probe, 1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(augment.rotate(probe, -90.0), jnp.rot90(probe, -1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(augment.rotate(probe, 180.0), probe[:, ::-1, ::-1], atol=1e-5)


def test_scale_up_samples_outside_with_zeros():
    # sx = sy = 2 samples normalized [-2, 2]: the outer ring comes from outside the image.
    ones = jnp.ones((1, 8, 8, 1))
    out = augment.scale(ones, 2.0, 2.0)[0, :, :, 0]
    # Output pixel 0 samples source coordinate ((2 * -0.875 + 1) * 8 - 1) / 2 = -3.5: both taps outside.
    assert float(out[0, 0]) == 0.0 and float(out[0, 4]) == 0.0
    # Source coordinate grows 2 px per output pixel: pixel 1 -> -1.5 (outside), 2 -> 0.5 (taps 0, 1), 5 -> 6.5.
    np.testing.assert_allclose(out[2:6, 2:6], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1, 1:7], 0.0, atol=1e-6)


def test_affine_matches_torch_grid_sample(reference):
    x = jnp.asarray(reference["images"])  # [2, 8, 10, 3], H != W
    for degrees, expected in zip(reference["rotate_degrees"], reference["rotate_out"]):
        np.testing.assert_allclose(augment.rotate(x, degrees), expected, atol=2e-5)
    for (sx, sy), expected in zip(reference["scales"], reference["scale_out"]):
        np.testing.assert_allclose(augment.scale(x, sx, sy), expected, atol=2e-5)


# --------------------------------------------------------------------------- random draws


def test_siamese_same_transform_for_batches_of_different_sizes(probe):
    both = jnp.concatenate([probe, probe[::-1]])  # 8 images, the first 4 are the probe
    out_probe = _dsa_over_keys(defaults.DSA_STRATEGY)(probe, KEYS)
    out_both = _dsa_over_keys(defaults.DSA_STRATEGY)(both, KEYS)
    np.testing.assert_allclose(out_both[:, :4], out_probe, atol=1e-6)
    changed = jnp.abs(out_probe - probe).max(axis=(1, 2, 3, 4)) > 1e-3
    assert int(changed.sum()) >= 0.8 * NUM_KEYS  # the test would be vacuous for identities


@pytest.mark.parametrize("family", SINGLE_FAMILIES)
def test_siamese_shares_and_per_image_draws_parameters(family, probe):
    same = jnp.broadcast_to(probe[:1], probe.shape)  # 4 identical images
    siamese = _dsa_over_keys(family, False)(same, KEYS)
    per_image = _dsa_over_keys(family, True)(same, KEYS)
    np.testing.assert_allclose(siamese, jnp.broadcast_to(siamese[:, :1], siamese.shape), atol=1e-6)
    # Per image: the 4 outputs differ for almost every key (flip: all 4 agree with prob 1/8).
    spread = jnp.abs(per_image - per_image[:, :1]).max(axis=(1, 2, 3, 4))
    assert int((spread > 1e-3).sum()) >= 0.75 * NUM_KEYS, family


def test_family_drawn_uniformly_from_strategy(probe):
    full = _dsa_over_keys(defaults.DSA_STRATEGY)(probe, KEYS)
    counts = {}
    for family in SINGLE_FAMILIES:
        single = _dsa_over_keys(family)(probe, KEYS)
        # dsa uses the same parameter key whatever the strategy, so the chosen family reproduces it.
        counts[family] = int(jnp.all(jnp.abs(full - single) < 1e-6, axis=(1, 2, 3, 4)).sum())
    assert sum(counts.values()) >= NUM_KEYS  # every key matched by its family (ties count twice)
    assert all(6 <= c <= 32 for c in counts.values()), counts  # expected 16 each


def test_random_crop_and_cutout_ranges(probe):
    ones = jnp.ones_like(probe)  # 16x16: max shift round(0.125 * 16) = 2, cutout side 8
    cropped = _dsa_over_keys("crop", True)(ones, KEYS)[..., 0].reshape(-1, 16, 16)
    zero_rows = (cropped == 0).all(axis=2).sum(axis=1)
    zero_cols = (cropped == 0).all(axis=1).sum(axis=1)
    # shifts in [-2, 2] per axis: 0..2 zero rows/cols, the extremes reached.
    assert set(np.unique(zero_rows)) == {0, 1, 2} == set(np.unique(zero_cols))
    cut = _dsa_over_keys("cutout", True)(ones, KEYS)[..., 0].reshape(-1, 16, 16)
    rows = (cut == 0).any(axis=2).sum(axis=1)
    cols = (cut == 0).any(axis=1).sum(axis=1)
    # centres 0..16 inclusive: 4 (centre 0 or 16) to 8 rows of the square remain.
    assert rows.min() == 4 and rows.max() == 8 and cols.min() == 4 and cols.max() == 8


@pytest.mark.parametrize("family", SINGLE_FAMILIES)
def test_gradients_finite_and_nonzero(family, probe):
    weights = jax.random.normal(jax.random.key(5), probe.shape)
    loss = lambda x: jnp.sum(augment.dsa(x, jax.random.key(2), family) * weights)
    grad = jax.jit(jax.grad(loss))(probe)
    assert grad.shape == probe.shape
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).max()) > 1e-3


# --------------------------------------------------------------------------- partition and expansion


def _quadrant_images():
    """Two 8x8x3 images, quadrant q of image n filled with colour 10n + q + [0, .1, .2].

    Quadrants numbered TL=0, TR=1, BL=2, BR=3 (row by row).
    """
    images = np.zeros((2, 8, 8, 3), np.float32)
    for n in range(2):
        for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            images[n, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 10 * n + q + np.array([0.0, 0.1, 0.2])
    return jnp.asarray(images)


def test_partition_quadrants_in_release_order():
    out, labels = augment.partition_expand(_quadrant_images(), jnp.array([3, 7]))
    assert out.shape == (8, 8, 8, 3)
    np.testing.assert_array_equal(labels, [3, 7, 3, 7, 3, 7, 3, 7])
    # Output order TL, BL, TR, BR = row-by-row quadrants 0, 2, 1, 3; grouped by piece.
    for piece, quadrant in enumerate([0, 2, 1, 3]):
        for n in range(2):
            expected = np.broadcast_to(10 * n + quadrant + np.array([0.0, 0.1, 0.2]), (8, 8, 3))
            np.testing.assert_allclose(out[2 * piece + n], expected, rtol=1e-6)


def test_partition_factor3_row_by_row_and_soft_labels():
    block = np.repeat(np.repeat(np.arange(9.0).reshape(3, 3), 3, axis=0), 3, axis=1)  # 9x9
    image = jnp.asarray(block, jnp.float32)[None, :, :, None]
    soft = jnp.array([[0.25, 0.75]])
    out, labels = augment.partition_expand(image, soft, factor=3)
    assert out.shape == (9, 9, 9, 1) and labels.shape == (9, 2)
    np.testing.assert_allclose(out[:, :, :, 0], np.arange(9.0)[:, None, None] * np.ones((9, 9)), rtol=1e-6)
    np.testing.assert_array_equal(labels, np.tile([[0.25, 0.75]], (9, 1)))


def test_partition_factor3_on_32x32_cuts_10_pixel_patches_and_drops_the_rest():
    # The release's l = 3 cut on CIFAR: patches of 32 // 3 = 10 pixels at rows/columns 0-9,
    # 10-19, 20-29; rows and columns 30-31 belong to no piece. Fill each 10x10 block with
    # 10 * block_row + block_col and the unused border with 99: every piece must come out
    # constant (bilinear resize of a constant patch), and 99 must never appear.
    index = np.minimum(np.arange(32) // 10, 3)  # 3 marks the unused rows/columns 30, 31
    rows, cols = np.meshgrid(index, index, indexing="ij")
    image = np.where((rows == 3) | (cols == 3), 99.0, 10.0 * rows + cols).astype(np.float32)
    out, _ = augment.partition_expand(jnp.asarray(image)[None, :, :, None], None, factor=3)
    assert out.shape == (9, 32, 32, 1)
    expected = [10.0 * r + c for r in range(3) for c in range(3)]  # row by row
    for piece, value in enumerate(expected):
        np.testing.assert_allclose(out[piece], value, atol=1e-5)
    assert augment._piece_bounds(32, 3) == [(0, 10), (10, 20), (20, 30)]
    assert augment._piece_bounds(32, 2) == [(0, 16), (16, 32)]


def test_partition_uneven_size_uses_floor_boundaries():
    # 5x7 image cut at row 5 // 2 = 2 and column 7 // 2 = 3.
    rows, cols = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
    image = jnp.asarray(10.0 * (rows >= 2) + (cols >= 3), jnp.float32)[None, :, :, None]
    out, labels = augment.partition_expand(image, None, factor=2)
    assert labels is None and out.shape == (4, 5, 7, 1)
    for piece, value in enumerate([0.0, 10.0, 1.0, 11.0]):  # TL, BL, TR, BR
        np.testing.assert_allclose(out[piece], value, atol=1e-6)


def test_partition_factor1_identity_and_bad_factor(probe):
    out, labels = augment.partition_expand(probe, jnp.arange(4), factor=1)
    np.testing.assert_array_equal(out, probe)
    np.testing.assert_array_equal(labels, jnp.arange(4))
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match=repr(bad)):
            augment.partition_expand(probe, factor=bad)
    with pytest.raises(ValueError, match="17 pixels into 18"):
        augment.partition_expand(jnp.zeros((1, 17, 17, 1)), factor=18)


def test_partition_and_downscale_match_torch_interpolate(reference):
    out2, _ = augment.partition_expand(jnp.asarray(reference["images"]), factor=2)
    np.testing.assert_allclose(out2, reference["partition2_out"], atol=1e-5)
    out3, _ = augment.partition_expand(jnp.asarray(reference["images12"]), factor=3)
    np.testing.assert_allclose(out3, reference["partition3_out"], atol=1e-5)
    # init_from_real downscales without antialiasing, like F.interpolate(scale_factor=0.5).
    x = jnp.asarray(reference["images"])  # 8x10 -> pieces of 4x5
    syn = augment.init_from_real(jnp.concatenate([x, x]), factor=2)  # real order x0, x1, x0, x1
    assert syn.shape == (1, 8, 10, 3)
    down = reference["down2_out"]
    np.testing.assert_allclose(syn[0, :4, :5], down[0], atol=1e-5)  # piece 0 TL = real 0
    np.testing.assert_allclose(syn[0, 4:, :5], down[1], atol=1e-5)  # piece 1 BL = real 1
    np.testing.assert_allclose(syn[0, :4, 5:], down[0], atol=1e-5)  # piece 2 TR = real 2
    np.testing.assert_allclose(syn[0, 4:, 5:], down[1], atol=1e-5)  # piece 3 BR = real 3
    syn3 = augment.init_from_real(jnp.repeat(jnp.asarray(reference["images12"][:1]), 9, axis=0), factor=3)
    np.testing.assert_allclose(syn3[0, 4:8, 8:12], reference["down3_out"][0], atol=1e-5)


@pytest.mark.parametrize("factor, side", [(2, 8), (3, 9)])
def test_init_from_real_then_partition_recovers_constant_images(factor, side):
    m, pieces = 2, factor * factor
    colours = jnp.arange(m * pieces * 3, dtype=jnp.float32).reshape(m * pieces, 1, 1, 3) / 7.0
    real = jnp.broadcast_to(colours, (m * pieces, side, side, 3))
    syn = augment.init_from_real(real, factor)
    assert syn.shape == (m, side, side, 3)
    expanded, _ = augment.partition_expand(syn, factor=factor)
    # piece-grouped order: expanded[p * m + i] is real image i * pieces + p
    order = [i * pieces + p for p in range(pieces) for i in range(m)]
    np.testing.assert_allclose(expanded, real[jnp.array(order)], rtol=1e-6)


def test_init_from_real_bad_count():
    with pytest.raises(ValueError, match="factor\\*\\*2 = 4 .* got 6"):
        augment.init_from_real(jnp.zeros((6, 8, 8, 3)), factor=2)
    np.testing.assert_array_equal(augment.init_from_real(jnp.ones((3, 4, 4, 1)), 1), jnp.ones((3, 4, 4, 1)))
