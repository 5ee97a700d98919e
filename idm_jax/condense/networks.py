"""The networks the step matches in: the loss's view of a model (embedding, logits), a fresh
queue member, and how a queue member trains on real batches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from idm_jax import data as data_lib
from idm_jax import models
from idm_jax import queue as queue_lib
from idm_jax.condense.real_data import DeviceData, HostBatch, normalize_real, queue_pass_indices
from idm_jax.condense.settings import StepSettings

Array = jax.Array


def make_apply_fn(model, embedding: str = "last_block"):
    """(params, images) -> (embedding, logits): the loss's view of a network.

    embedding (models.EMBEDDINGS): "last_block" = the flattened output of the last block (the
    release's published commands, `--embed_last 1000`); "before_last_pool" = the last block
    without its pooling (the release script's default `--embed_last -1`; ConvNet only).
    """
    if embedding not in models.EMBEDDINGS:
        raise ValueError(f"unknown embedding {embedding!r}; expected one of {models.EMBEDDINGS}")
    if embedding == "last_block":
        return lambda params, x: model.apply({"params": params}, x, method="embed_and_logits")
    if not isinstance(model, models.ConvNet):
        raise ValueError(f"embedding 'before_last_pool' needs a ConvNet, got {type(model).__name__}")
    return lambda params, x: model.apply({"params": params}, x, skip_last_pool=True,
                                         method="embed_and_logits")


def make_init_fn(s: StepSettings):
    """key -> (params, optimizer state) of a fresh queue member."""
    tx = s.model_optimizer()

    def init(key):
        params = models.init_variables(s.model, key, s.image_shape)["params"]
        return params, tx.init(params)

    return init


def make_member_train_fn(s: StepSettings, data: DeviceData | HostBatch):
    """(params, opt_state, key[, extras]) -> trained for K steps on random real batches.

    Plain supervised SGD without augmentation, as the release trains its
    queue; returns the correct/seen counts for the accuracy meter. extras (a
    dict, one member's row of queue.train's member_inputs) holds the member's
    "lr_scale" / "class_mask" under model augmentation and, for a HostBatch,
    its batches "images" uint8[K, B, H, W, C] / "labels" int32[K, B]. With a
    class subset, a step trains on the images of the member's classes within
    its batch_train-image batch (CE averaged over those; the meter counts them).
    """
    tx = s.model_optimizer()
    model = s.model
    aug = s.model_augment
    subset = aug is not None and aug.class_fraction < 1.0
    scale_lr = aug is not None and aug.lr_jitter > 0.0
    host = isinstance(data, HostBatch)
    passes = not host and s.train_sampling == "passes"  # indices given in extras["indices"]

    def ce_loss(params, x, y, w):
        logits = model.apply({"params": params}, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        if w is None:
            return ce.mean(), logits
        return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0), logits

    def sgd_step(extras, carry, inputs):
        params, opt_state, correct, seen = carry
        if host:
            x_u8, y = inputs
        else:
            idx = inputs if passes else data_lib.sample_batch(inputs, data.labels.shape[0], s.batch_train)
            x_u8, y = data.images[idx], data.labels[idx]
        x = normalize_real(s, x_u8, data.mean, data.std)
        w = extras["class_mask"][y].astype(jnp.float32) if subset else None
        (_, logits), grads = jax.value_and_grad(ce_loss, has_aux=True)(params, x, y, w)
        updates, opt_state = tx.update(grads, opt_state, params)
        if scale_lr:  # SGD: scaling the update scales the lr (momentum and decay included)
            updates = jax.tree.map(lambda u: u * extras["lr_scale"], updates)
        hit = jnp.argmax(logits, -1) == y
        if subset:
            correct, seen = correct + jnp.sum(w * hit), seen + jnp.sum(w)
        else:
            correct = correct + jnp.sum(hit)
        return (optax.apply_updates(params, updates), opt_state, correct, seen), None

    def train(params, opt_state, key, extras=None):
        extras = extras or {}
        if host:
            steps = (extras["images"], extras["labels"])
        else:
            steps = extras["indices"] if passes else jax.random.split(key, s.model_train_steps)
        zero = jnp.zeros((), jnp.float32 if subset else jnp.int32)
        (params, opt_state, correct, seen), _ = jax.lax.scan(
            functools.partial(sgd_step, extras), (params, opt_state, zero, jnp.zeros((), jnp.float32)),
            steps, unroll=queue_steps_unrolled(s))
        if not subset:
            seen = jnp.asarray(s.model_train_steps * s.batch_train, jnp.float32)
        return params, opt_state, correct.astype(jnp.float32), seen

    return train


def member_inputs(s: StepSettings, queue: queue_lib.ModelQueue, slots: Array,
                  data: DeviceData | HostBatch, base_key: Array | None = None, step=None):
    """queue.train's member_inputs for the members at `slots` (see make_member_train_fn), or None.

    base_key, step: the run's key and the iteration, needed under data.train_sampling="passes".
    """
    extras = {}
    if s.model_augment is not None:
        extras.update(lr_scale=queue.lr_scale[slots], class_mask=queue.class_mask[slots])
    if isinstance(data, HostBatch):
        extras.update(images=data.train_images, labels=data.train_labels)
    elif s.train_sampling == "passes":
        extras.update(indices=queue_pass_indices(s, base_key, data.labels.shape[0], step))
    return extras or None


def queue_steps_unrolled(s: StepSettings) -> int:
    """How many of a queue network's SGD steps are unrolled per trip of their loop.

    On CPU all of them by default: XLA:CPU trains slower in a loop over blocks of unrolled steps
    than with every step unrolled. idm.max_unrolled_queue_steps caps it for memory and compile
    time, at that cost in speed (figures for CIFAR-100 IPC 10: docs/RESULTS.md#where-the-memory-went);
    on GPU/TPU the steps stay a loop.
    """
    if not s.unroll_loops:
        return 1
    cap = s.max_unrolled_queue_steps
    return min(s.model_train_steps, cap) if cap > 0 else s.model_train_steps
