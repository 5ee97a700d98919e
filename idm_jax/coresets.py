"""Coreset selection: which real training images stand in for the whole set.

* random:     `ipc` training images per class, uniformly without replacement;
* herding:    greedy mean matching in the embedding of a network trained on the real data
              (Welling 2009; Chen et al. 2010): per class, repeatedly add the image that brings
              the running mean of the chosen embeddings closest to the class mean;
* forgetting: the examples forgotten least often while a network trains on the real data
              (Toneva et al. 2019; a forgetting event is a correct -> incorrect change of an
              example's prediction between consecutive epochs; examples never learned count as
              forgotten most often). Ties are broken at random.

`--mode=baseline` (idm_jax/baselines.py) writes and scores them; continual learning's Random
memory and DD-Ranking's random-real reference (idm_jax/references.py) draw `select_random`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from idm_jax import measure, models, trainer

CORESETS = ("random", "herding", "forgetting")
# --mode=baseline's choices: a coreset, or the evaluation networks trained on the whole set.
BASELINES = CORESETS + ("whole",)


def _class_indices(labels: Any, num_classes: int, ipc: int) -> list[np.ndarray]:
    """Indices of every class's examples; raises when a class has fewer than `ipc`."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if isinstance(ipc, bool) or not isinstance(ipc, (int, np.integer)) or ipc < 1:
        raise ValueError(f"images per class must be a positive integer, got {ipc!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for c, idx in enumerate(per_class):
        if idx.size < ipc:
            raise ValueError(f"class {c} has {idx.size} examples, fewer than the {ipc} images per class asked for")
    return per_class


def select_random(key: jax.Array, labels: Any, num_classes: int, ipc: int) -> np.ndarray:
    """`ipc` distinct random indices per class, class by class: int64[num_classes * ipc].

    labels: int[N]. Class c's picks are entries [c * ipc, (c + 1) * ipc).
    """
    picks = []
    for c, idx in enumerate(_class_indices(labels, num_classes, ipc)):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, c), idx.size))
        picks.append(idx[order[:ipc]])
    return np.concatenate(picks).astype(np.int64)


def herding_order(features: np.ndarray, count: int) -> np.ndarray:
    """Greedy herding of one class: int64[count] row indices of `features`: f[n, D].

    Step k adds the unused row that makes the mean of the k chosen rows closest (L2) to the mean
    of all rows.
    """
    feats = np.asarray(features, np.float64)
    target = feats.mean(axis=0)
    chosen: list[int] = []
    running = np.zeros_like(target)
    available = np.ones(feats.shape[0], bool)
    for k in range(1, count + 1):
        dist = np.sum((target - (running + feats) / k) ** 2, axis=1)
        dist[~available] = np.inf
        i = int(np.argmin(dist))
        chosen.append(i)
        available[i] = False
        running += feats[i]
    return np.asarray(chosen, np.int64)


def select_herding(features: Any, labels: Any, num_classes: int, ipc: int) -> np.ndarray:
    """Herding per class (see `herding_order`): int64[num_classes * ipc], class by class.

    features: f32[N, D] embeddings of the training images; labels: int[N].
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != np.asarray(labels).shape[0]:
        raise ValueError(f"features must be [N, D] with one row per label, got {features.shape} "
                         f"for {np.asarray(labels).shape[0]} labels")
    picks = [idx[herding_order(features[idx], ipc)]
             for idx in _class_indices(labels, num_classes, ipc)]
    return np.concatenate(picks).astype(np.int64)


def select_forgetting(forget_counts: Any, labels: Any, num_classes: int, ipc: int, key: jax.Array) -> np.ndarray:
    """Per class, the `ipc` examples forgotten least often.

    forget_counts: int[N] forgetting events per example; labels: int[N]; ties are broken by a
    random order drawn from `key`. Returns int64[num_classes * ipc], class by class.
    """
    counts = np.asarray(forget_counts)
    if counts.shape != np.asarray(labels).shape:
        raise ValueError(f"forget_counts {counts.shape} must match labels {np.asarray(labels).shape}")
    picks = []
    for c, idx in enumerate(_class_indices(labels, num_classes, ipc)):
        tiebreak = np.asarray(jax.random.uniform(jax.random.fold_in(key, c), (idx.size,)))
        order = np.lexsort((tiebreak, counts[idx]))  # last key is the primary one
        picks.append(idx[order[:ipc]])
    return np.concatenate(picks).astype(np.int64)


def _feature_network(config: Any, dataset: Any, key: jax.Array) -> tuple[Any, trainer.TrainedNets]:
    """One config.model network trained on the whole real training set, no augmentation,
    for config.baseline.train_epochs epochs (lr x 0.1 half way)."""
    model = models.get_model(config.model, dataset.num_classes, dataset.channels)
    nets = trainer.train_networks(
        model, dataset.train_images, dataset.train_labels, key=key, num_seeds=1,
        epochs=int(config.baseline.train_epochs), batch_size=int(config.eval.batch_size),
        lr=float(config.eval.lr), momentum=float(config.eval.momentum),
        weight_decay=float(config.eval.weight_decay), dsa_strategy="", mean=dataset.mean,
        std=dataset.std, seed_parallel="auto", loop=str(config.eval.loop),
        schedule="paper", name=f"{config.model} (baseline features)")
    return model, nets


def select_coreset(method: str, config: Any, dataset: Any, key: jax.Array) -> tuple[np.ndarray, dict]:
    """Indices of the `method` coreset (config.ipc per class) and facts about how it was chosen."""
    ipc, k = int(config.ipc), dataset.num_classes
    if method == "random":
        return select_random(key, dataset.train_labels, k, ipc), {}
    net_key, pick_key = jax.random.split(key)
    model, nets = _feature_network(config, dataset, net_key)
    info = {"feature_net": str(config.model), "feature_net_epochs": int(config.baseline.train_epochs),
            "feature_net_train_accuracy": float(nets.train_accuracy[0]),
            "feature_net_seconds": float(nets.seconds)}
    if method == "herding":
        variables = jax.tree.map(lambda a: a[0], nets.variables)
        features = measure.embed_images(model, variables, dataset.train_images, mean=dataset.mean,
                                         std=dataset.std)
        return select_herding(features, dataset.train_labels, k, ipc), info
    return select_forgetting(nets.forget_counts[0], dataset.train_labels, k, ipc, pick_key), info
