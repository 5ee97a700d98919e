"""--mode=baseline: the coreset baselines of the paper's Table 1, and whole-dataset training.

* random, herding, forgetting: the coreset chosen by `idm_jax.coresets` (see there);
* whole:      the evaluation network trained on the whole training set (results only).

Each coreset is written with `synthetic_file.save_synthetic(..., partition_factor=1, method=<name>)`, so
the evaluator scores it exactly like a condensed set.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from idm_jax import config_check, coresets, data, evaluate, models, synthetic_file
from idm_jax import results as results_lib


def run_baseline(config: Any, workdir: str) -> dict[str, Any]:
    """main.py --mode=baseline: config.baseline.method at config.ipc images per class.

    Coresets are saved as workdir/synthetic.npz (+ synthetic.png) and evaluated with every arch
    in config.eval.archs; "whole" trains those archs on the whole training set. Writes
    results.json / results.md and returns the results dict.
    """
    config_check.validate(config)  # baseline.method among them
    method = str(config.baseline.method)
    archs = models.parse_archs(config.eval.archs)
    dataset = data.load_config_dataset(config)
    key = jax.random.PRNGKey(int(config.seed))
    select_key, eval_key = jax.random.split(key)
    os.makedirs(workdir, exist_ok=True)
    if method == "whole":
        logging.info("whole-dataset training: %d images, %d epochs, %d seeds per arch",
                     len(dataset.train_labels), config.eval.epochs, config.eval.num_seeds)
        ipc, num_images, extra = None, len(dataset.train_labels), {}
        images, labels = dataset.train_images, dataset.train_labels  # uint8: normalized per batch
    else:
        t = time.perf_counter()
        idx, info = coresets.select_coreset(method, config, dataset, select_key)
        ipc, num_images = int(config.ipc), len(idx)
        labels = dataset.train_labels[idx].astype(np.int32)
        images = np.asarray(data.normalize(dataset.train_images[idx], dataset.mean, dataset.std))
        path = synthetic_file.save_synthetic(
            os.path.join(workdir, "synthetic.npz"), images, labels, mean=dataset.mean,
            std=dataset.std, class_names=dataset.class_names, partition_factor=1, method=method,
            dataset=dataset.name, config_json=synthetic_file.config_json(config))
        synthetic_file.save_grid_png(os.path.join(workdir, "synthetic.png"),
                                     dataset.train_images[idx].astype(np.float32) / 255.0, labels,
                                     dataset.num_classes)
        logging.info("%s coreset: %d images per class -> %s (%.1f s)", method, config.ipc, path,
                     time.perf_counter() - t)
        extra = dict(synthetic=os.path.abspath(path), selected_indices=idx.tolist(),
                     selection_seconds=time.perf_counter() - t, **info)
    archs_results = evaluate.evaluate_archs(images, labels, dataset, config.eval, archs=archs,
                                            key=eval_key, partition_factor=1)
    return results_lib.finish_results(workdir, results_lib.results_record(
        method=method, dataset=dataset.name, ipc=ipc, partition_factor=1, num_images=num_images,
        train_arch=config.model, archs=archs_results, **extra))
