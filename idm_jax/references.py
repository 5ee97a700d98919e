"""The two reference accuracies of DD-Ranking's scores, measured once and cached, and the scores.

For every evaluation architecture a set is scored with (`evaluate.evaluate_archs`), `add_scores`
puts beside its accuracy:

* the accuracy of ``ipc`` random real images per class (the set's IPC; `coresets.select_random`,
  unexpanded, as the quick demo's Random line) under the same evaluator and protocol;
* the accuracy of the whole real training set under that protocol, or a number given with its
  source (``eval.whole_data_accuracy`` and ``eval.whole_data_source``) when training on the whole
  set is too long for the machine (training sets over ``eval.whole_data_max_images`` are not
  trained here);
* HLR, IOR and LRS (`idm_jax.yardstick`).

Each measured reference is a JSON file under ``<cache>/references/`` (``<cache>``: data.cache_dir,
else $IDM_CACHE_DIR, else ~/.cache/idm_jax), named by a hash of everything its value depends on:
the dataset's content (`dataset_fingerprint`), the architecture, the IPC (random only), the
protocol (eval.num_seeds, epochs, batch_size, lr, momentum, weight_decay, dsa, schedule) and the
seed. A changed setting is another file, so it is measured again; the file holds its key, which
is checked when read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from idm_jax import coresets, data, evaluate, yardstick
from idm_jax import workdir as workdir_lib
from idm_jax.data import cache as data_cache

CACHE_VERSION = 1  # bump when a cached reference's meaning changes
PROTOCOL_FIELDS = ("num_seeds", "epochs", "batch_size", "lr", "momentum", "weight_decay", "dsa", "schedule")
# Keys of the reference evaluations: fixed per config.seed, independent of the run's iterations.
_RANDOM_STREAM, _WHOLE_STREAM = 0x5241, 0x5748


def cache_folder(cache_dir: str = "") -> str:
    """<data cache>/references: data.cache_dir, else $IDM_CACHE_DIR, else ~/.cache/idm_jax."""
    return os.path.join(data_cache.resolve_cache_dir(cache_dir or None), "references")


def dataset_fingerprint(dataset: Any) -> str:
    """A short hash of the dataset's content: name, shapes, every label, mean/std, and every
    ~512th train and test image."""
    h = hashlib.sha256()
    h.update(json.dumps({"name": dataset.name, "train": list(dataset.train_images.shape),
                         "test": list(dataset.test_images.shape),
                         "mean": np.asarray(dataset.mean, np.float32).round(6).tolist(),
                         "std": np.asarray(dataset.std, np.float32).round(6).tolist()}).encode())
    for a in (dataset.train_labels, dataset.test_labels,
              dataset.train_images[::max(1, len(dataset.train_images) // 512)],
              dataset.test_images[::max(1, len(dataset.test_images) // 512)]):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def reference_key(kind: str, dataset: Any, arch: str, eval_cfg: Any, *, seed: int,
                  ipc: int | None = None) -> dict[str, Any]:
    """Everything a reference accuracy depends on. kind: "random" (needs ipc) or "whole"."""
    if kind not in ("random", "whole"):
        raise ValueError(f"unknown reference kind {kind!r}; expected 'random' or 'whole'")
    protocol = {f: getattr(eval_cfg, f) for f in PROTOCOL_FIELDS}
    return {"version": CACHE_VERSION, "kind": kind, "dataset": str(dataset.name),
            "dataset_fingerprint": dataset_fingerprint(dataset), "arch": str(arch),
            "ipc": None if ipc is None else int(ipc), "seed": int(seed), "protocol": protocol}


def reference_path(folder: str, key: Mapping[str, Any]) -> str:
    """The cache file of `key`: <folder>/<dataset>_<kind>[_ipc<k>]_<arch>_<hash of the key>.json."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = "".join(ch if ch.isalnum() else "_" for ch in key["dataset"])
    ipc = f"_ipc{key['ipc']}" if key.get("ipc") is not None else ""
    return os.path.join(folder, f"{name}_{key['kind']}{ipc}_{key['arch']}_{digest}.json")


def read_cached(path: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result cached in `path` when it exists and was made for `key`, else None."""
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)):
        return None
    return entry.get("result")


def write_cached(path: str, key: Mapping[str, Any], result: Mapping[str, Any]) -> None:
    """Stores `result` for `key` in `path` atomically."""
    text = json.dumps({"key": key, "result": result}, indent=1).encode() + b"\n"
    with workdir_lib.atomic_file(path, needed_bytes=len(text)) as f:
        f.write(text)


def _evaluate_one(images: Any, labels: Any, dataset: Any, config: Any, arch: str, key: jax.Array) -> dict:
    return evaluate.evaluate_archs(images, labels, dataset, config.eval, archs=[arch], key=key,
                                   partition_factor=1)[arch]


def random_real_accuracy(config: Any, dataset: Any, arch: str, ipc: int) -> tuple[dict[str, Any], str, bool]:
    """`ipc` random real images per class trained and tested as a set: (result, cache file, from cache).

    result: `evaluate.train_and_evaluate`'s dict. The draw and the networks' keys come from
    config.seed alone, so every set of a dataset and IPC is compared with the same images.
    """
    key = reference_key("random", dataset, arch, config.eval, seed=int(config.seed), ipc=ipc)
    path = reference_path(cache_folder(config.data.cache_dir), key)
    cached = read_cached(path, key)
    if cached is not None:
        return cached, path, True
    select_key, eval_key = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _RANDOM_STREAM))
    idx = coresets.select_random(select_key, dataset.train_labels, dataset.num_classes, int(ipc))
    images = np.asarray(data.normalize(dataset.train_images[idx], dataset.mean, dataset.std))
    labels = dataset.train_labels[idx].astype(np.int32)
    logging.info("random-real reference: %d random real images per class, %s (cached in %s)", ipc, arch, path)
    result = _evaluate_one(images, labels, dataset, config, arch, eval_key)
    write_cached(path, key, result)
    return result, path, False


def whole_data_accuracy(config: Any, dataset: Any, arch: str) -> tuple[dict[str, Any] | None, str]:
    """The whole training set's accuracy under config.eval: (result or None, its source).

    In order: the number given by eval.whole_data_accuracy (source: eval.whole_data_source), the
    cache, a training run when the training set has at most eval.whole_data_max_images images
    (then cached); else (None, why).
    """
    given = float(config.eval.whole_data_accuracy)
    if given > 0:
        return {"mean": given, "std": None}, f"given: {config.eval.whole_data_source}"
    key = reference_key("whole", dataset, arch, config.eval, seed=int(config.seed))
    path = reference_path(cache_folder(config.data.cache_dir), key)
    cached = read_cached(path, key)
    if cached is not None:
        return cached, f"measured here (cached: {path})"
    n, limit = len(dataset.train_labels), int(config.eval.whole_data_max_images)
    if n > limit:
        return None, (f"not measured: the training set has {n} images, over eval.whole_data_max_images="
                      f"{limit}; give it with --config.eval.whole_data_accuracy=<%> "
                      f"--config.eval.whole_data_source=<where>, or raise the limit")
    logging.info("whole-data reference: %s on all %d training images (cached in %s)", arch, n, path)
    result = _evaluate_one(dataset.train_images, dataset.train_labels, dataset, config, arch,
                           jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _WHOLE_STREAM))
    write_cached(path, key, result)
    return result, f"measured here (cached: {path})"


def add_scores(config: Any, dataset: Any, results: dict[str, Any]) -> dict[str, Any]:
    """Adds DD-Ranking's references and scores to `results` (a results.json record) and returns it.

    For every arch of results["archs"], at IPC results["ipc"]: results["scores"][arch] (with
    eval.scores) and, with eval.compare_random, results["random_reference"][arch] (the random-real
    evaluation, shown as a row of the accuracy table). Nothing is added for a record without an
    IPC (the whole dataset) or when both switches are off.
    """
    ipc = results.get("ipc")
    if ipc is None or not (config.eval.scores or config.eval.compare_random):
        return results
    w = float(config.eval.scores_weight)
    for arch, r in results["archs"].items():
        rnd, rnd_path, hit = random_real_accuracy(config, dataset, arch, int(ipc))
        if config.eval.compare_random:
            results.setdefault("random_reference", {})[arch] = rnd
        if not config.eval.scores:
            continue
        whole, source = whole_data_accuracy(config, dataset, arch)
        entry = {"accuracy": r["mean"], "accuracy_std": r["std"],
                 "random_real": rnd["mean"], "random_real_std": rnd["std"],
                 "random_real_seeds": rnd.get("num_seeds"), "random_real_ipc": int(ipc),
                 "random_real_source": f"{'cached' if hit else 'measured here, cached'}: {rnd_path}",
                 "whole_data": None if whole is None else whole["mean"],
                 "whole_data_std": None if whole is None else whole.get("std"),
                 "whole_data_source": source if whole is not None else None,
                 **yardstick.scores(r["mean"], rnd["mean"], None if whole is None else whole["mean"], w)}
        if whole is None:
            entry["note"] = f"HLR and LRS need the whole-data accuracy: {source}"
        results.setdefault("scores", {})[arch] = entry
        logging.info("%s: %.2f %% vs random real images %.2f %% (IOR %+.2f pp) vs whole data %s -> %s", arch,
                     r["mean"], rnd["mean"], entry["ior_pp"],
                     "unknown" if whole is None else f"{whole['mean']:.2f} % (HLR {entry['hlr_pp']:+.2f} pp)",
                     "LRS unknown" if entry["lrs"] is None else f"LRS {entry['lrs']:.4f}")
    return results
