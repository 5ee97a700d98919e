"""The paper's evaluation protocol: which networks, how many seeds, which schedule, what result.

Train `num_seeds` freshly initialised networks per architecture on a (synthetic) image set with
`idm_jax.trainer` (SGD, DSA, the release's schedule), test each on the whole real test split,
and report accuracy mean and std (ddof 0) over the seeds (docs/RELEASE.md, evaluation protocol).
`evaluate_archs` runs it for every architecture of `config.eval` (cross-architecture
generalization), its networks spread over the processes of a multi-process run;
`idm_jax.evaluate_set` is `main.py --mode=evaluate`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from idm_jax import augment, backend, defaults, distributed, measure, models, trainer


def train_and_evaluate(images: Any, labels: Any, test_images: Any, test_labels: Any, *, mean: Any,
                       std: Any, arch: str, num_classes: int, key: jax.Array,
                       num_seeds: int = defaults.EVAL_NUM_SEEDS, epochs: int = defaults.EVAL_EPOCHS,
                       batch_size: int = defaults.EVAL_BATCH_SIZE, lr: float = defaults.EVAL_LR,
                       momentum: float = defaults.EVAL_MOMENTUM, weight_decay: float = defaults.EVAL_WEIGHT_DECAY,
                       dsa_strategy: str = defaults.DSA_STRATEGY,
                       test_batch_size: int = defaults.EVAL_TEST_BATCH_SIZE,
                       seed_parallel: str = "auto", loop: str = "auto", conv_impl: str = "auto",
                       schedule: str = defaults.EVAL_SCHEDULE, log_every: int = 50,
                       seed_indices: Sequence[int] | None = None) -> dict[str, Any]:
    """The paper's protocol: train `num_seeds` fresh `arch` networks on (images, labels), test them.

    images: f32[N, H, W, C] normalized (or uint8, normalized with mean/std); labels: int[N];
    test_images: uint8[M, H, W, C]; test_labels: int[M]; mean, std: f32[C].
    Returns {accuracies: [% per seed], mean, std (np.std, ddof 0), train_seconds,
    test_seconds, epochs, passes, num_seeds, arch, num_train_images, seed_parallel, loop,
    schedule, dsa_strategy, train_loss, train_accuracy}. See `train_networks` for seed_parallel
    and loop, `models.get_model` for conv_impl, `epoch_plan` for schedule; seed_indices: only these
    seeds (see train_networks).
    """
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    channels = int(images.shape[-1]) if np.ndim(images) == 4 else 0
    model = models.get_model(arch, num_classes, channels or 1, conv_impl=backend.conv_impl(conv_impl))
    mode = backend.seed_parallel(seed_parallel)
    nets = trainer.train_networks(model, images, labels, key=key, num_seeds=num_seeds, epochs=epochs,
                          batch_size=batch_size, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, dsa_strategy=dsa_strategy, mean=mean,
                          std=std, seed_parallel=mode, loop=loop, schedule=schedule, log_every=log_every,
                          name=arch, seed_indices=seed_indices)
    t = time.perf_counter()
    accs = measure.measure_accuracy(model, nets.variables, test_images, test_labels, mean=mean, std=std,
                         test_batch_size=test_batch_size, seed_parallel=mode)
    test_seconds = time.perf_counter() - t
    return {
        "arch": arch,
        "accuracies": [float(a) for a in accs],
        "mean": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "num_seeds": int(num_seeds if seed_indices is None else len(seed_indices)),
        "epochs": int(epochs),
        "passes": int(nets.num_passes),
        "schedule": schedule,
        "num_train_images": int(images.shape[0]),
        "train_seconds": float(nets.seconds),
        "first_epoch_seconds": float(nets.first_epoch_seconds),
        "seconds_per_epoch": float(nets.seconds_per_epoch),
        "test_seconds": float(test_seconds),
        "seed_parallel": mode,
        "loop": backend.eval_loop(loop),
        "dsa_strategy": dsa_strategy,
        "train_loss": [float(x) for x in nets.train_loss],
        "train_accuracy": [float(x) for x in nets.train_accuracy],
    }


def evaluate_archs(images: Any, labels: Any, dataset: Any, eval_cfg: Any, *,
                   archs: Sequence[str], key: jax.Array, partition_factor: int,
                   epochs: int | None = None,
                   seeds_of: Mapping[str, Sequence[int]] | None = None) -> dict[str, dict[str, Any]]:
    """Cross-architecture evaluation: {arch: train_and_evaluate result} for every arch.

    images: f32[N, H, W, C] normalized with dataset.mean/std (or uint8); labels: int[N];
    dataset: an ArrayDataset (its test split is the test set); eval_cfg: `config.eval`;
    partition_factor: each image is cut into l x l pieces first (l = 1: as is), so an IPC-10
    CIFAR-10 set with l = 2 trains on 400 images. epochs overrides eval_cfg.epochs (periodic
    evaluation during condensation uses fewer). seeds_of: {arch: seed indices} trains only
    those networks (archs without any are left out).

    With several processes (and no seeds_of), the archs x seeds networks are dealt round-robin
    over them (`evaluation_tasks`), each trained with the key it has in a one-process run, and
    the gathered parts merged: every process returns the same, one-process result.
    """
    archs = models.parse_archs(archs)
    if seeds_of is None and distributed.multi_process():
        seeds_per_process = [evaluation_tasks(archs, int(eval_cfg.num_seeds), p, jax.process_count())
                             for p in range(jax.process_count())]
        mine = seeds_per_process[jax.process_index()]
        logging.info("evaluating %s of the %d x %d networks on this process",
                     {a: s for a, s in mine.items() if s}, len(archs), eval_cfg.num_seeds)
        part = evaluate_archs(images, labels, dataset, eval_cfg, archs=archs, key=key,
                              partition_factor=partition_factor, epochs=epochs, seeds_of=mine)
        return merge_evaluations(distributed.gather_objects(part), seeds_per_process, archs)
    images, labels = training_set(images, labels, partition_factor)
    strategy = defaults.DSA_STRATEGY if eval_cfg.dsa else ""
    results = {}
    for i, arch in enumerate(archs):
        seeds = None if seeds_of is None else list(seeds_of.get(arch, []))
        if seeds is not None and not seeds:
            continue
        results[arch] = train_and_evaluate(
            images, labels, dataset.test_images, dataset.test_labels, mean=dataset.mean,
            std=dataset.std, arch=arch, num_classes=dataset.num_classes,
            key=jax.random.fold_in(key, i), num_seeds=int(eval_cfg.num_seeds),
            epochs=int(epochs if epochs is not None else eval_cfg.epochs),
            batch_size=int(eval_cfg.batch_size), lr=float(eval_cfg.lr),
            momentum=float(eval_cfg.momentum), weight_decay=float(eval_cfg.weight_decay),
            dsa_strategy=strategy, test_batch_size=int(eval_cfg.test_batch_size),
            seed_parallel=str(eval_cfg.seed_parallel), loop=str(eval_cfg.loop),
            conv_impl=str(eval_cfg.conv_impl), schedule=str(eval_cfg.schedule), seed_indices=seeds)
        r = results[arch]
        logging.info("%s: test accuracy %.2f ± %.2f %% over %d seeds (%s) in %.0f s", arch,
                     r["mean"], r["std"], r["num_seeds"],
                     ", ".join(f"{a:.2f}" for a in r["accuracies"]), r["train_seconds"])
    return results


def training_set(images: Any, labels: Any, partition_factor: int) -> tuple[Any, Any]:
    """What the evaluator trains on: each image cut into l x l pieces, each resized back
    (partition factor l; l = 1: the images as given). images: f32[N, H, W, C] normalized (or
    uint8 when l = 1); returns (images, labels) with N * l * l rows."""
    if partition_factor < 1:
        raise ValueError(f"partition_factor must be >= 1, got {partition_factor}")
    if partition_factor == 1:
        return images, labels
    if np.asarray(images).dtype == np.uint8:
        raise ValueError("partition needs normalized float images, got uint8 (pass "
                         "normalize(images, mean, std))")
    return augment.partition_expand(jnp.asarray(images, jnp.float32), jnp.asarray(labels), partition_factor)


def evaluation_tasks(archs: Sequence[str], num_seeds: int, process: int,
                     processes: int) -> dict[str, list[int]]:
    """{arch: seed indices} this process trains: the archs x seeds networks dealt round-robin."""
    tasks = [(a, s) for a in archs for s in range(num_seeds)]
    mine: dict[str, list[int]] = {a: [] for a in archs}
    for i, (a, s) in enumerate(tasks):
        if i % processes == process:
            mine[a].append(s)
    return mine


def merge_evaluations(parts: Sequence[dict[str, dict[str, Any]]], seeds_of: Sequence[dict[str, list[int]]],
                      archs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One evaluate_archs result from the processes' partial ones (each holding some seeds)."""
    per_seed = ("accuracies", "train_loss", "train_accuracy")
    out = {}
    for a in archs:
        rows = [(seeds[a], part[a]) for part, seeds in zip(parts, seeds_of) if seeds.get(a)]
        order = np.argsort([s for seeds, _ in rows for s in seeds], kind="stable")
        merged = dict(rows[0][1])
        for k in per_seed:
            values = [v for _, r in rows for v in r[k]]
            merged[k] = [values[i] for i in order]
        accs = np.asarray(merged["accuracies"], np.float64)
        merged.update(mean=float(accs.mean()), std=float(accs.std()), num_seeds=len(accs),
                      train_seconds=float(sum(r["train_seconds"] for _, r in rows)),
                      test_seconds=float(sum(r["test_seconds"] for _, r in rows)),
                      processes=len(rows))
        out[a] = merged
    return out
