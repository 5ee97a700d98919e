"""`main.py --mode=evaluate`: score any images+labels set with the paper's evaluation protocol.

A mode above the library: it reads a set file (idm_jax.synthetic_file), loads its dataset, runs
`evaluate.evaluate_archs` and writes results.json / results.md (idm_jax.results).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging

from idm_jax import data, models, references, synthetic_file
from idm_jax import results as results_lib
from idm_jax.evaluate import evaluate_archs


def run_evaluation(config: Any, workdir: str, synthetic_path: str, *, space: str = "pixel",
                   layout: str = "auto", partition_factor: int | None = None,
                   method: str | None = None) -> dict[str, Any]:
    """main.py --mode=evaluate: scores a synthetic set with every arch in config.eval.archs.

    synthetic_path: a synthetic.npz of idm_jax, or any .npz holding `images` and `labels` (a set
    made by the authors' release or by DM); what such a file lacks comes from config.data's
    dataset (see synthetic_file.synthetic_from_arrays for space, layout, partition_factor and method).
    Checks that the set fits the dataset, trains and tests, writes workdir/results.json and
    results.md, and returns the results dict.
    """
    archs = models.parse_archs(config.eval.archs)
    arrays = synthetic_file.read_npz(synthetic_path)  # a missing or broken file fails before the data loads
    dataset = data.load_config_dataset(config)
    synset = synthetic_file.synthetic_from_arrays(arrays, synthetic_path, dataset, space=space, layout=layout,
                                                  partition_factor=partition_factor, method=method, action="evaluate")
    synthetic_file.check_compatible(synset, dataset)
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
    references.add_scores(config, dataset, results)  # random-real / whole-data accuracy, HLR, IOR, LRS
    return results_lib.finish_results(workdir, results)
