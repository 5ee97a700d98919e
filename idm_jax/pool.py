"""Pre-trained pools (paper Sec. 5.3, Fig. 3): DM matched in networks trained E epochs on real data.

The paper pre-trains ConvNets on the whole CIFAR-100 training set for E = 10, 20, ..., 60 epochs
and runs DM with embedding networks drawn from those instead of fresh random ones. Here
`idm.pool_epochs = E > 0` (with the queue off) makes every iteration's matching network a
uniformly drawn member of a pool of `idm.pool_size` networks, each trained E epochs on the whole
real training set (plain SGD with the queue's hyperparameters idm.model_lr / model_momentum /
model_weight_decay / batch_train, no augmentation, learning rate x0.1 after E/2 epochs). The pool
is built once and cached under the data cache folder (`data.cache_dir`, else $IDM_CACHE_DIR, else
~/.cache/idm_jax) keyed by the dataset, network, E, size, seed and hyperparameters, so runs with
different seeds or budgets reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import flax.serialization
import jax
import numpy as np
from absl import logging

from idm_jax import data as data_lib
from idm_jax.data import cache as data_cache
from idm_jax import trainer
from idm_jax import models
from idm_jax import workdir as workdir_lib


def pool_fingerprint(ds: data_lib.ArrayDataset, model_name: str, epochs: int, size: int, seed: int,
                     hparams: dict[str, Any]) -> str:
    """A short hash of everything the pool's networks depend on."""
    h = hashlib.sha256()
    h.update(json.dumps({"dataset": ds.name, "model": model_name, "epochs": int(epochs),
                         "size": int(size), "seed": int(seed), "hparams": hparams,
                         "shape": list(ds.train_images.shape)}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(ds.train_labels).tobytes())
    h.update(np.ascontiguousarray(ds.train_images[:: max(1, len(ds.train_images) // 512)]).tobytes())
    return h.hexdigest()[:16]


def pool_path(cache_dir: str, ds: data_lib.ArrayDataset, model_name: str, epochs: int, size: int,
              seed: int, hparams: dict[str, Any]) -> str:
    """Where the pool of these settings is cached."""
    tag = pool_fingerprint(ds, model_name, epochs, size, seed, hparams)
    name = "".join(ch if ch.isalnum() else "_" for ch in ds.name)
    return os.path.join(data_cache.resolve_cache_dir(cache_dir or None),
                        "pools", f"{name}_{model_name}_{epochs}ep_{size}nets_seed{seed}_{tag}.msgpack")


def build_pool(ds: data_lib.ArrayDataset, model_name: str, *, epochs: int, size: int, seed: int,
               lr: float, momentum: float, weight_decay: float, batch_size: int) -> Any:
    """params of `size` networks trained `epochs` epochs on ds's training set, stacked: [size, ...]."""
    model = models.get_model(model_name, ds.num_classes, ds.channels)
    nets = trainer.train_networks(
        model, ds.train_images, ds.train_labels, key=jax.random.fold_in(jax.random.PRNGKey(seed), 17),
        num_seeds=size, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, dsa_strategy="", mean=ds.mean, std=ds.std, schedule="paper",
        name=f"pre-trained pool ({size} x {model_name}, {epochs} epochs)")
    logging.info("pre-trained pool: %d %s nets, %d epochs, train accuracy %.1f %% (mean) in %.0f s",
                 size, model_name, epochs, float(np.mean(nets.train_accuracy)), nets.seconds)
    return jax.device_get(nets.variables["params"])


def load_or_build(ds: data_lib.ArrayDataset, model_name: str, *, epochs: int, size: int, seed: int,
                  lr: float, momentum: float, weight_decay: float, batch_size: int,
                  cache_dir: str = "") -> Any:
    """The cached pool if present, else `build_pool` and cache it. Returns stacked params."""
    if epochs < 1 or size < 1:
        raise ValueError(f"a pre-trained pool needs epochs >= 1 and size >= 1, got {epochs} and {size}")
    hparams = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size}
    path = pool_path(cache_dir, ds, model_name, epochs, size, seed, hparams)
    if os.path.exists(path):
        with open(path, "rb") as f:
            params = flax.serialization.msgpack_restore(f.read())
        logging.info("pre-trained pool loaded from %s", path)
        return params
    params = build_pool(ds, model_name, epochs=epochs, size=size, seed=seed, lr=lr, momentum=momentum,
                        weight_decay=weight_decay, batch_size=batch_size)
    blob = flax.serialization.msgpack_serialize(params)
    with workdir_lib.atomic_file(path, needed_bytes=len(blob)) as f:  # a full disk: one line naming it
        f.write(blob)
    logging.info("pre-trained pool cached at %s", path)
    return params
