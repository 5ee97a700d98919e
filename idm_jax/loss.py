"""The IDM and DM losses: pure, jittable, importable.

Both compare, class by class, the mean embedding of a real batch with the
mean embedding of the synthetic images of that class (MMD with a linear
kernel), after the same Siamese DSA transform on both sides. IDM adds
partition/expansion of the synthetic images and a cross-entropy regularizer
weighted by the matching network's training accuracy (in percent, as the
release does).

`apply_fn(params, images) -> (embedding, logits)` is the network; with a flax
module that is e.g.

    apply_fn = lambda p, x: model.apply({"params": p}, x,
                                        method="embed_and_logits")

Embeddings of real images never need a gradient (only the synthetic images
are optimised), so real batches are embedded under `stop_gradient` and in
chunks, which keeps memory bounded for the 5000-image IPC-1 batches.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idm_jax import augment, defaults

Array = jax.Array
ApplyFn = Callable[[object, Array], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Static options of the matching loss (hashable: safe as a jit static)."""

    partition_factor: int = defaults.PARTITION_FACTOR  # l: each image -> l*l pieces; 1 = off
    dsa_strategy: str = defaults.DSA_STRATEGY  # "" = no augmentation
    ce_weight: float = defaults.CE_WEIGHT  # lambda_reg; multiplied by accuracy in percent
    use_ce: bool = True
    real_chunk_size: int = defaults.REAL_CHUNK_SIZE  # real images per forward pass
    dsa_params: augment.DSAParams = augment.DSAParams()
    # The release's CIFAR-10 IPC-1 branch without partition (IDM_cifar10.py, `if args.ipc == 1
    # and not args.aug`): match only the k real images of the (augmented) batch whose CE under
    # the matching net is lowest (0 = all), and apply the CE term only to misclassified
    # synthetic images.
    keep_lowest_ce_real: int = 0
    ce_only_misclassified: bool = False

    def __post_init__(self):
        if self.partition_factor < 1:
            raise ValueError(f"partition_factor must be >= 1, got {self.partition_factor}")
        if self.real_chunk_size < 1:
            raise ValueError(f"real_chunk_size must be >= 1, got {self.real_chunk_size}")
        if self.keep_lowest_ce_real < 0:
            raise ValueError(f"keep_lowest_ce_real must be >= 0 (0 = all), got {self.keep_lowest_ce_real}")
        augment.parse_strategy(self.dsa_strategy)  # raises on an unknown family


DM_OPTIONS = LossOptions(partition_factor=1, ce_weight=0.0, use_ce=False)


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (chunk size with no remainder)."""
    for d in range(min(n, max(limit, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


def mean_embedding(params, apply_fn: ApplyFn, images: Array, key: Array,
                   opts: LossOptions, label: Array | int | None = None) -> Array:
    """Mean embedding of one class's real images after Siamese DSA.

    images: f32[B, H, W, C] -> f32[D]. No gradient flows back. Because the
    Siamese transform draws one parameter set per call, augmenting chunk by
    chunk with the same key gives exactly the transform of the whole batch.
    With opts.keep_lowest_ce_real = k > 0, the mean is over the k augmented images
    whose CE against `label` (their class) is lowest.
    """
    chunk = largest_divisor_at_most(images.shape[0], opts.real_chunk_size)
    chunks = images.reshape((-1, chunk) + images.shape[1:])
    if opts.keep_lowest_ce_real:
        if label is None:
            raise ValueError("keep_lowest_ce_real needs the real images' class label")
        return _lowest_ce_mean_embedding(params, apply_fn, chunks, key, opts, label)

    def chunk_sum(x):
        x = augment.dsa(x, key, opts.dsa_strategy, params=opts.dsa_params)
        emb, _ = apply_fn(params, x)
        return emb.sum(axis=0)

    sums = jax.lax.map(chunk_sum, chunks)
    return jax.lax.stop_gradient(sums.sum(axis=0) / images.shape[0])


def _lowest_ce_mean_embedding(params, apply_fn: ApplyFn, chunks: Array, key: Array,
                              opts: LossOptions, label) -> Array:
    """Mean embedding f32[D] of the keep_lowest_ce_real images of `chunks` with the lowest CE."""

    def chunk_outputs(x):
        x = augment.dsa(x, key, opts.dsa_strategy, params=opts.dsa_params)
        emb, logits = apply_fn(params, x)
        labels = jnp.full((x.shape[0],), label, jnp.int32)
        return emb, optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    emb, ce = jax.lax.map(chunk_outputs, chunks)
    emb, ce = emb.reshape((-1,) + emb.shape[2:]), ce.reshape(-1)
    keep = min(opts.keep_lowest_ce_real, ce.shape[0])
    kept = jax.lax.top_k(-ce, keep)[1]
    return jax.lax.stop_gradient(emb[kept].mean(axis=0))


def synthetic_class_loss(params, apply_fn: ApplyFn, syn_images: Array, label: Array,
                         real_mean: Array, key: Array, acc: Array,
                         opts: LossOptions) -> tuple[Array, dict[str, Array]]:
    """Loss of one class given its real mean embedding.

    syn_images: f32[ipc, H, W, C]; label: int32[]; real_mean: f32[D];
    acc: f32[] the network's training accuracy in percent (0-100).
    Returns (loss, {"mmd": ..., "ce": ...}).
    """
    expanded, _ = augment.partition_expand(syn_images, None, opts.partition_factor)
    expanded = augment.dsa(expanded, key, opts.dsa_strategy, params=opts.dsa_params)
    emb, logits = apply_fn(params, expanded)
    mmd = jnp.sum((real_mean - emb.mean(axis=0)) ** 2)
    if not opts.use_ce:
        return mmd, {"mmd": mmd, "ce": jnp.zeros_like(mmd)}
    labels = jnp.full((logits.shape[0],), label, jnp.int32)
    ce_each = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ce = ce_each.mean()  # reported unmasked, as the release prints it
    if opts.ce_only_misclassified:  # correctly classified images add no CE (and no gradient)
        ce_term = jnp.mean(jnp.where(jnp.argmax(logits, -1) != label, ce_each, 0.0))
    else:
        ce_term = ce
    return mmd + opts.ce_weight * acc * ce_term, {"mmd": mmd, "ce": ce}


def class_loss(params, apply_fn: ApplyFn, syn_images: Array, label: Array,
               real_images: Array, key: Array, acc: Array,
               opts: LossOptions) -> tuple[Array, dict[str, Array]]:
    """IDM loss of one class: real f32[B,H,W,C] against synthetic f32[ipc,H,W,C]."""
    real_mean = mean_embedding(params, apply_fn, real_images, key, opts, label)
    return synthetic_class_loss(params, apply_fn, syn_images, label, real_mean, key, acc, opts)


ACCURACY_SCALES = ("percent", "fraction")


def _accuracy_percent(value: Array | float, scale: str) -> Array:
    """The matching net's training accuracy in percent, checked where it is concrete.

    The release multiplies the CE term by the accuracy in PERCENT (0-100), so 0.5 passed for
    50 % would shrink the term 100x: with scale "percent", a concrete value strictly between
    0 and 1 is refused (pass 50.0, or scale "fraction" to pass 0.5); values outside [0, 100]
    are refused too. Traced values (inside jit) are not checked.
    """
    if scale not in ACCURACY_SCALES:
        raise ValueError(f"accuracy_scale must be one of {ACCURACY_SCALES}, got {scale!r}")
    if not isinstance(value, jax.core.Tracer):
        v = float(np.asarray(value))  # not jnp: under jit that would stage even a Python float
        top = 1.0 if scale == "fraction" else 100.0
        if not 0.0 <= v <= top:
            raise ValueError(f"train_accuracy_percent must lie in [0, {top:g}] ({scale}), got {v!r}")
        if scale == "percent" and 0.0 < v < 1.0:
            raise ValueError(
                f"train_accuracy_percent={v!r} looks like a fraction; the CE weight uses percent "
                f"(e.g. 50.0 for 50 %), or pass accuracy_scale='fraction'")
    value = jnp.asarray(value, jnp.float32)
    return value * 100.0 if scale == "fraction" else value


def idm_loss(params, apply_fn: ApplyFn, syn_images: Array, syn_labels: Array,
             real_images: Array, real_labels: Array, key: Array,
             train_accuracy_percent: Array | float,
             opts: LossOptions = LossOptions(), *,
             accuracy_scale: str = "percent") -> tuple[Array, dict[str, Array]]:
    """The IDM loss summed over classes: exactly what the condensation step differentiates.

    For each class c: Siamese DSA with key_c = split(key, G)[c] on the real batch and on the
    partitioned/expanded synthetic images, then `class_loss` = squared distance of the mean
    embeddings + ce_weight * accuracy * CE. The jitted step (`condense.update_synset`)
    computes the same per-class terms from the same two functions (`mean_embedding` for the
    real side, `synthetic_class_loss` for the synthetic side, which is `class_loss` split so
    the real mean is computed once outside the gradient); tests/test_loss_queue.py checks
    that both paths give the same value and gradient.

    Args:
      params: the matching network's parameters.
      apply_fn: (params, images) -> (embedding f32[N, D], logits f32[N, K]).
      syn_images: f32[G, ipc, H, W, C] synthetic images, grouped by class.
      syn_labels: int32[G] the class of each group.
      real_images: f32[G, B, H, W, C] real images, same class order.
      real_labels: int32[G] must equal syn_labels (checked when concrete).
      key: PRNG key; each class gets its own Siamese DSA draw.
      train_accuracy_percent: the network's training accuracy in PERCENT (0-100), as the
        release weights the CE term (0 for a network not trained yet).
      opts: LossOptions.
      accuracy_scale: "percent" (default) or "fraction" (then pass 0-1).
    Returns:
      (loss, {"mmd": f32[G], "ce": f32[G]}) with loss the sum over classes.
    """
    _check_groups(syn_images, syn_labels, real_images, real_labels)
    acc = _accuracy_percent(train_accuracy_percent, accuracy_scale)
    keys = jax.random.split(key, syn_images.shape[0])
    losses, parts = jax.vmap(
        lambda s, y, r, k: class_loss(params, apply_fn, s, y, r, k, acc, opts)
    )(syn_images, syn_labels, real_images, keys)
    return losses.sum(), parts


def dm_loss(params, apply_fn: ApplyFn, syn_images: Array, syn_labels: Array,
            real_images: Array, real_labels: Array, key: Array,
            opts: LossOptions = DM_OPTIONS) -> tuple[Array, dict[str, Array]]:
    """The DM loss: IDM without partition and without the CE regularizer."""
    opts = dataclasses.replace(opts, partition_factor=1, use_ce=False, ce_weight=0.0)
    return idm_loss(params, apply_fn, syn_images, syn_labels, real_images, real_labels,
                    key, 0.0, opts)


def _check_groups(syn_images, syn_labels, real_images, real_labels) -> None:
    if syn_images.ndim != 5 or real_images.ndim != 5:
        raise ValueError(
            "expected class-grouped images f32[classes, n, H, W, C]; got synthetic "
            f"{syn_images.shape} and real {real_images.shape}")
    if syn_images.shape[0] != real_images.shape[0] or syn_images.shape[2:] != real_images.shape[2:]:
        raise ValueError(
            f"synthetic {syn_images.shape} and real {real_images.shape} must have the "
            "same number of class groups and the same image shape")
    if syn_labels.shape != (syn_images.shape[0],) or real_labels.shape != syn_labels.shape:
        raise ValueError(
            f"labels must be int[classes]: got synthetic {syn_labels.shape}, real {real_labels.shape}")
    if isinstance(syn_labels, jax.core.Tracer) or isinstance(real_labels, jax.core.Tracer):
        return  # traced: nothing to compare at trace time
    # Compared on the host: concrete labels closed over by a jitted caller must not be traced.
    if not np.array_equal(np.asarray(syn_labels), np.asarray(real_labels)):
        raise ValueError("real_labels and syn_labels must list the same classes in the same order")
