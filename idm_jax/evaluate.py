"""The paper's evaluation protocol: which networks, how many seeds, which schedule, what result.

Train `num_seeds` freshly initialised networks per architecture on a (synthetic) image set with
`idm_jax.trainer` (SGD, DSA, the release's schedule), test each on the whole real test split,
and report accuracy mean and std (ddof 0) over the seeds (REFERENCE.md, "Evaluation protocol").
`evaluate_archs` runs it for every architecture of `config.eval` (cross-architecture
generalization); `run_evaluation` is `main.py --mode=evaluate`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from idm_jax import augment, backend, data, export, measure, models, trainer
from idm_jax import results as results_lib

def train_and_evaluate(images: Any, labels: Any, test_images: Any, test_labels: Any, *, mean: Any,
                       std: Any, arch: str, num_classes: int, key: jax.Array, num_seeds: int = 5,
                       epochs: int = 1000, batch_size: int = 256, lr: float = 0.01,
                       momentum: float = 0.9, weight_decay: float = 5e-4,
                       dsa_strategy: str = augment.DEFAULT_STRATEGY, test_batch_size: int = 1000,
                       seed_parallel: str = "auto", loop: str = "auto",
                       schedule: str = "release", log_every: int = 50,
                       seed_indices: Sequence[int] | None = None) -> dict[str, Any]:
    """The paper's protocol: train `num_seeds` fresh `arch` networks on (images, labels), test them.

    images: f32[N, H, W, C] normalized (or uint8, normalized with mean/std); labels: int[N];
    test_images: uint8[M, H, W, C]; test_labels: int[M]; mean, std: f32[C].
    Returns {accuracies: [% per seed], mean, std (np.std, ddof 0), train_seconds,
    test_seconds, epochs, passes, num_seeds, arch, num_train_images, seed_parallel, loop,
    schedule, dsa_strategy, train_loss, train_accuracy}. See `train_networks` for seed_parallel
    and loop, `epoch_plan` for schedule; seed_indices: only these seeds (see train_networks).
    """
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    channels = int(images.shape[-1]) if np.ndim(images) == 4 else 0
    model = models.get_model(arch, num_classes, channels or 1)
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


def _cfg(eval_cfg: Mapping[str, Any], name: str, default: Any) -> Any:
    return eval_cfg.get(name, default) if hasattr(eval_cfg, "get") else getattr(eval_cfg, name, default)


def evaluate_archs(images: Any, labels: Any, dataset: Any, eval_cfg: Mapping[str, Any], *,
                   archs: Sequence[str], key: jax.Array, partition_factor: int,
                   epochs: int | None = None,
                   seeds_of: Mapping[str, Sequence[int]] | None = None) -> dict[str, dict[str, Any]]:
    """Cross-architecture evaluation: {arch: train_and_evaluate result} for every arch.

    images: f32[N, H, W, C] normalized with dataset.mean/std (or uint8); labels: int[N];
    dataset: an ArrayDataset (its test split is the test set); eval_cfg: `config.eval`;
    partition_factor: each image is cut into l x l pieces first (l = 1: as is), so an IPC-10
    CIFAR-10 set with l = 2 trains on 400 images. epochs overrides eval_cfg.epochs (periodic
    evaluation during condensation uses fewer). seeds_of: {arch: seed indices} trains only
    those networks (archs without any are left out; see distributed.evaluate_archs).
    """
    archs = models.parse_archs(archs)
    if partition_factor > 1 and np.asarray(images).dtype == np.uint8:
        raise ValueError("partition needs normalized float images, got uint8 (pass "
                         "normalize(images, mean, std))")
    if partition_factor > 1:
        images, labels = augment.partition_expand(jnp.asarray(images, jnp.float32),
                                                  jnp.asarray(labels), partition_factor)
    elif partition_factor < 1:
        raise ValueError(f"partition_factor must be >= 1, got {partition_factor}")
    strategy = augment.DEFAULT_STRATEGY if _cfg(eval_cfg, "dsa", True) else ""
    results = {}
    for i, arch in enumerate(archs):
        seeds = None if seeds_of is None else list(seeds_of.get(arch, []))
        if seeds is not None and not seeds:
            continue
        results[arch] = train_and_evaluate(
            images, labels, dataset.test_images, dataset.test_labels, mean=dataset.mean,
            std=dataset.std, arch=arch, num_classes=dataset.num_classes,
            key=jax.random.fold_in(key, i),
            num_seeds=int(_cfg(eval_cfg, "num_seeds", 5)),
            epochs=int(epochs if epochs is not None else _cfg(eval_cfg, "epochs", 1000)),
            batch_size=int(_cfg(eval_cfg, "batch_size", 256)), lr=float(_cfg(eval_cfg, "lr", 0.01)),
            momentum=float(_cfg(eval_cfg, "momentum", 0.9)),
            weight_decay=float(_cfg(eval_cfg, "weight_decay", 5e-4)), dsa_strategy=strategy,
            test_batch_size=int(_cfg(eval_cfg, "test_batch_size", 1000)),
            seed_parallel=str(_cfg(eval_cfg, "seed_parallel", "auto")),
            loop=str(_cfg(eval_cfg, "loop", "auto")),
            schedule=str(_cfg(eval_cfg, "schedule", "release")), seed_indices=seeds)
        r = results[arch]
        logging.info("%s: test accuracy %.2f ± %.2f %% over %d seeds (%s) in %.0f s", arch,
                     r["mean"], r["std"], r["num_seeds"],
                     ", ".join(f"{a:.2f}" for a in r["accuracies"]), r["train_seconds"])
    return results



def run_evaluation(config: Any, workdir: str, synthetic_path: str, *, space: str = "pixel",
                   layout: str = "auto", partition_factor: int | None = None,
                   method: str | None = None) -> dict[str, Any]:
    """main.py --mode=evaluate: scores a synthetic set with every arch in config.eval.archs.

    synthetic_path: a synthetic.npz of idm_jax, or any .npz holding `images` and `labels` (a set
    made by the authors' release or by DM); what such a file lacks comes from config.data's
    dataset (see export.synthetic_from_arrays for space, layout, partition_factor and method).
    Checks that the set fits the dataset, trains and tests, writes workdir/results.json and
    results.md, and returns the results dict.
    """
    archs = models.parse_archs(config.eval.archs)
    arrays = export.read_npz(synthetic_path)  # a missing or broken file fails before the data loads
    dataset = data.load_config_dataset(config)
    synset = export.synthetic_from_arrays(arrays, synthetic_path, dataset, space=space, layout=layout,
                                          partition_factor=partition_factor, method=method)
    export.check_compatible(synset, dataset)
    if synset.filled_from_dataset:
        logging.info("%s has no %s: taken from dataset %s (mean %s, std %s, partition factor %d, "
                     "method %r)", synthetic_path, ", ".join(synset.filled_from_dataset), dataset.name,
                     np.round(synset.mean, 4).tolist(), np.round(synset.std, 4).tolist(),
                     synset.partition_factor, synset.method)
    elif tuple(synset.class_names) != tuple(dataset.class_names):
        logging.warning("class names of %s %s differ from dataset %s's %s", synthetic_path,
                        synset.class_names, dataset.name, dataset.class_names)
    images = data.renormalize(synset.images_normalized, synset.mean, synset.std, dataset.mean, dataset.std)
    key = jax.random.PRNGKey(int(config.seed))
    archs_results = evaluate_archs(images, synset.labels, dataset, config.eval, archs=archs,
                                   key=key, partition_factor=synset.partition_factor)
    extra = {"filled_from_dataset": list(synset.filled_from_dataset)} if synset.filled_from_dataset else {}
    results = results_lib.results_record(
        method=synset.method, dataset=dataset.name, ipc=synset.ipc,
        partition_factor=synset.partition_factor, num_images=synset.labels.shape[0],
        train_arch=config.model, synthetic=os.path.abspath(synthetic_path), **extra, archs=archs_results)
    return results_lib.finish_results(workdir, results)
