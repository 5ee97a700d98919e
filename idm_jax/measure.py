"""Trained networks measured on given images: test accuracy (the evaluation's number) and
embeddings (herding, the consistency ratio).

Both take the networks `idm_jax.trainer.train_networks` returns (variables stacked over seeds for
`measure_accuracy`, one network's for `embed_images`) and run them in eval mode, in fixed-size
chunks so one compiled program serves every chunk.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idm_jax import backend, models, trainer


@functools.lru_cache(maxsize=16)
def _count_correct_fn(model: nn.Module, seed_mode: str):
    """jit(stacked variables, images[T, B, ...], labels[T, B], mask[T, B], mean, std) -> int[S]."""

    def one_seed(variables, images, labels, mask, mean, std):
        def chunk(total, batch):
            x, y, m = batch
            logits, _ = models.apply_model(model, variables, trainer.to_float(x, mean, std), train=False)
            return total + jnp.sum((jnp.argmax(logits, -1) == y) & m), None
        return jax.lax.scan(chunk, jnp.zeros((), jnp.int32), (images, labels, mask))[0]

    @jax.jit
    def run(stacked_variables, images, labels, mask, mean, std):
        fn = lambda v: one_seed(v, images, labels, mask, mean, std)
        return trainer.over_seeds(fn, seed_mode, stacked_variables)

    return run


@functools.lru_cache(maxsize=16)
def _embed_fn(model: nn.Module):
    @jax.jit
    def run(variables, images, mean, std):
        out, _ = models.apply_model(model, variables, trainer.to_float(images, mean, std), train=False,
                                    method="embed")
        return out
    return run


def measure_accuracy(model: nn.Module, stacked_variables: Any, test_images: Any, test_labels: Any, *,
                  mean: Any, std: Any, test_batch_size: int = 1000,
                  seed_parallel: str = "auto") -> np.ndarray:
    """Test accuracy in % of every seed's network over the whole test split: f64[S].

    test_images: uint8[M, H, W, C] (or normalized float); chunks of test_batch_size images,
    the last one padded and masked out.
    """
    test_images = np.asarray(test_images)
    test_labels = np.asarray(test_labels, np.int32)
    m = test_images.shape[0]
    if m == 0 or test_labels.shape != (m,):
        raise ValueError(f"need a non-empty test split with one label per image, got images "
                         f"{test_images.shape} and labels {test_labels.shape}")
    chunk = int(min(test_batch_size, m))
    num_chunks = math.ceil(m / chunk)
    pad = num_chunks * chunk - m
    images = np.concatenate([test_images, np.zeros((pad, *test_images.shape[1:]), test_images.dtype)])
    labels = np.concatenate([test_labels, np.zeros(pad, np.int32)])
    mask = np.arange(num_chunks * chunk) < m
    run = _count_correct_fn(model, backend.seed_parallel(seed_parallel))
    correct = run(stacked_variables, jnp.asarray(images.reshape(num_chunks, chunk, *images.shape[1:])),
                  jnp.asarray(labels.reshape(num_chunks, chunk)), jnp.asarray(mask.reshape(num_chunks, chunk)),
                  jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))
    return np.asarray(correct, np.float64) / m * 100.0


def embed_images(model: nn.Module, variables: Any, images: Any, *, mean: Any, std: Any,
                 batch_size: int = 1000) -> np.ndarray:
    """model.embed of every image with one network's variables (eval mode): f32[N, D].

    images: uint8[N, H, W, C] (normalized with mean, std) or normalized float.
    """
    images = np.asarray(images)
    run = _embed_fn(model)
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        if batch.shape[0] < batch_size and images.shape[0] > batch_size:  # keep one compiled shape
            pad = np.zeros((batch_size - batch.shape[0], *batch.shape[1:]), batch.dtype)
            padded = jnp.asarray(np.concatenate([batch, pad]))
            out.append(np.asarray(run(variables, padded, mean, std))[:batch.shape[0]])
        else:
            out.append(np.asarray(run(variables, jnp.asarray(batch), mean, std)))
    return np.concatenate(out).astype(np.float32)
