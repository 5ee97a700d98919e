"""Which real examples a step sees: per-class index tables and the on-device batch draws
(uniform per class, first-n of a class, shuffled passes, uniform over the whole set)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


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
