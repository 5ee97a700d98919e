"""Train fresh networks from scratch on a labelled image set: the loop behind every evaluation.

Recipe (docs/RELEASE.md#evaluation-protocol and #release-details-that-change-numbers): SGD with lr 0.01,
momentum 0.9 and weight decay 5e-4 (added to the gradient, as torch's SGD does), batch 256,
cross-entropy, per-image DSA on every batch, 1000 epochs with lr x 0.1 half way.
`idm_jax.evaluate` runs this recipe and tests the networks on the real test split.

Release schedule (the default, ``schedule="release"``): the release runs passes 0..epochs
(epochs + 1 of them); after pass epochs // 2 + 1 it multiplies the lr by 0.1 and recreates the
optimizer, so the momentum buffer restarts from zero. For 1000 epochs: 502 passes at 0.01, then
499 at 0.001. ``schedule="paper"`` runs exactly `epochs` passes with the drop at epochs // 2
(also with a fresh momentum buffer).

Every epoch shuffles the set and visits it in ceil(N / batch) batches, the last one smaller
(as a PyTorch DataLoader does). N is static, so the full batches run in a `lax.scan` and the
remainder batch is one more step of its own static shape: exact for batch norm too (no padding
enters the batch statistics) and no compute is spent on padding.

The `num_seeds` networks' states are stacked on a leading axis. Two switches say how they run
(``"auto"`` picks by backend, see `idm_jax.backend`; a seed's randomness does not depend on them):

* ``seed_parallel``: ``"vmap"`` trains all seeds in one batched computation (the intended
  path on GPU/TPU, where small per-network batches leave the device idle); ``"map"`` one after
  another (CPU, where vmapped convolutions over different weights become grouped convolutions,
  far slower there: docs/RESULTS.md#evaluation-speed).
* ``loop``: ``"device"`` runs a chunk of epochs in one jitted call (`lax.fori_loop` over epochs
  with a traced count, so one compile serves every chunk; `lax.scan` over batches);
  ``"host"`` jits one step and loops in Python (CPU: a training step inside a device loop is
  slower there).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from idm_jax import augment, backend, defaults, models, progress
from idm_jax import data as data_lib

SCHEDULES = ("release", "paper")
LR_DECAY = 0.1


# ----------------------------------------------------------------------------------------------
# Schedule and batching (pure, host side)


def epoch_plan(epochs: int, schedule: str = "release") -> tuple[int, int]:
    """(number of passes over the data, index of the first pass at the decayed lr).

    release: epochs + 1 passes, decay after pass epochs // 2 + 1 (1000 -> (1001, 502));
    paper: epochs passes, decay at epochs // 2 (1000 -> (1000, 500)).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if schedule == "release":
        num_passes = int(epochs) + 1
        return num_passes, min(int(epochs) // 2 + 2, num_passes)
    if schedule == "paper":
        return int(epochs), max(1, int(epochs) // 2)
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def batch_plan(num_examples: int, batch_size: int) -> tuple[int, int, int]:
    """(full batches, their size, size of the last smaller batch or 0) of one epoch.

    400 examples in batches of 256 -> (1, 256, 144); 40 in batches of 256 -> (0, 256, 40).
    """
    if num_examples < 1:
        raise ValueError(f"cannot train on {num_examples} examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return num_examples // batch_size, batch_size, num_examples % batch_size


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """One shuffled epoch: (int32[F, batch_size] full batches, int32[R] last batch), F, R from
    `batch_plan`. Together they hold every index in range(num_examples) exactly once."""
    num_full, size, rest = batch_plan(num_examples, batch_size)
    perm = jax.random.permutation(key, num_examples).astype(jnp.int32)
    return perm[:num_full * size].reshape(num_full, size), perm[num_full * size:]


def over_seeds(fn, mode: str, *stacked):
    """fn applied to every slice of the `stacked` pytrees' leading (seed) axis.

    mode: "vmap"; "map" (lax.map, one seed after another); "single" (a stack of one seed,
    squeezed, so no batching rule touches the convolutions).
    """
    if mode == "vmap":
        return jax.vmap(fn)(*stacked)
    if mode == "single":
        out = fn(*jax.tree.map(lambda a: a[0], stacked))
        return jax.tree.map(lambda a: a[None], out)
    return jax.lax.map(lambda args: fn(*args), stacked)


# ----------------------------------------------------------------------------------------------
# Training state and the jitted pieces of an epoch


@flax.struct.dataclass
class NetState:
    """One network's training state (stacked over seeds on a leading axis while training).

    variables: {'params', ['batch_stats']}; opt_state: optax SGD state (momentum trace);
    last_correct / ever_correct: bool[N], the prediction on each training example at its last
    presentation / ever; forgets: int32[N], correct -> incorrect transitions between epochs
    (Toneva et al.'s forgetting events); loss_sum / correct_sum: over the latest epoch.
    """

    variables: Any
    opt_state: Any
    last_correct: jax.Array
    ever_correct: jax.Array
    forgets: jax.Array
    loss_sum: jax.Array
    correct_sum: jax.Array


def torch_sgd(lr: Any, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.SGD(lr, momentum, weight_decay): decay added to the gradient, then momentum.

    The optimizer of every network idm_jax trains: evaluation networks here, the model queue and
    pre-trained pools (condense.StepSettings.model_optimizer)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate=lr, momentum=momentum))


def to_float(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """uint8 pixels are normalized; float images are taken as already normalized."""
    if images.dtype == jnp.uint8:
        return data_lib.normalize(images, mean, std)
    return images.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a training run: the key of the compiled-function caches."""

    model: nn.Module
    num_examples: int
    batch_size: int
    dsa_strategy: str
    momentum: float
    weight_decay: float
    seed_mode: str  # "vmap" | "map" | "single" (see over_seeds)


def _train_step(spec: _Spec, data, lr, state: NetState, idx: jax.Array, key: jax.Array) -> NetState:
    """One SGD step of one network on the examples `idx`: int32[B] (per-image DSA, CE loss)."""
    images, labels, mean, std = data
    x = augment.dsa(to_float(images[idx], mean, std), key, spec.dsa_strategy, per_image=True)
    y = labels[idx]

    def loss_fn(params):
        logits, new_vars = models.apply_model(spec.model, {**state.variables, "params": params}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, new_vars)

    params = state.variables["params"]
    (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = torch_sgd(lr, spec.momentum, spec.weight_decay).update(
        grads, state.opt_state, params)
    correct = jnp.argmax(logits, -1) == y
    return state.replace(
        variables={**new_vars, "params": optax.apply_updates(params, updates)},
        opt_state=opt_state,
        last_correct=state.last_correct.at[idx].set(correct),
        loss_sum=state.loss_sum + loss * idx.shape[0],
        correct_sum=state.correct_sum + correct.sum())


def _begin_epoch(spec: _Spec, state: NetState, seed_key: jax.Array, p: jax.Array):
    """Pass p's batches (full int32[F, B], last int32[R]) and DSA keys [F + 1]; meters reset."""
    num_full = batch_plan(spec.num_examples, spec.batch_size)[0]
    perm_key, aug_key = jax.random.split(jax.random.fold_in(seed_key, p))
    full, last = epoch_batches(perm_key, spec.num_examples, spec.batch_size)
    state = state.replace(loss_sum=jnp.zeros(()), correct_sum=jnp.zeros((), jnp.int32))
    return state, full, last, jax.random.split(aug_key, num_full + 1)


def end_epoch(state: NetState, before: jax.Array) -> NetState:
    """Counts forgetting events: correct at the previous presentation, wrong at this one."""
    return state.replace(forgets=state.forgets + (before & ~state.last_correct),
                         ever_correct=state.ever_correct | state.last_correct)


@functools.lru_cache(maxsize=16)
def _device_chunk_fn(spec: _Spec):
    """jit(states, seed_keys, data, start, count, lr) -> states: passes start .. start+count-1
    of every seed on the device (lax.fori_loop with a traced count, so one compile serves all)."""
    num_full, _, rest = batch_plan(spec.num_examples, spec.batch_size)

    def one_seed(state, seed_key, data, start, count, lr):
        def epoch(p, state):
            before = state.last_correct
            state, full, last, keys = _begin_epoch(spec, state, seed_key, p)
            if num_full:
                state, _ = jax.lax.scan(lambda s, b: (_train_step(spec, data, lr, s, *b), None),
                                        state, (full, keys[:num_full]))
            if rest:
                state = _train_step(spec, data, lr, state, last, keys[num_full])
            return end_epoch(state, before)
        return jax.lax.fori_loop(start, start + count, epoch, state)

    @jax.jit
    def run(states, seed_keys, data, start, count, lr):
        return over_seeds(lambda s, k: one_seed(s, k, data, start, count, lr), spec.seed_mode,
                           states, seed_keys)
    return run


@functools.lru_cache(maxsize=16)
def _host_fns(spec: _Spec):
    """Jitted (begin, step, end) over stacked seeds, for a pass driven from Python."""

    @jax.jit
    def begin(states, seed_keys, p):
        fn = lambda s, k: _begin_epoch(spec, s, k, p)
        return over_seeds(fn, spec.seed_mode, states, seed_keys)

    @jax.jit
    def step(states, data, lr, idx, keys):
        fn = lambda s, i, k: _train_step(spec, data, lr, s, i, k)
        return over_seeds(fn, spec.seed_mode, states, idx, keys)

    @jax.jit
    def end(states, before):
        return over_seeds(end_epoch, spec.seed_mode, states, before)
    return begin, step, end


def lowered_train_step(model: nn.Module, image_shape: tuple[int, int, int], *, num_seeds: int,
                       num_examples: int, batch_size: int = defaults.EVAL_BATCH_SIZE,
                       dsa_strategy: str = defaults.DSA_STRATEGY, momentum: float = defaults.EVAL_MOMENTUM,
                       weight_decay: float = defaults.EVAL_WEIGHT_DECAY,
                       seed_parallel: str = "auto") -> jax.stages.Lowered:
    """One SGD step of `num_seeds` networks trained together, lowered (not compiled, not run):
    the program `train_networks` runs for every batch, for inspecting what XLA is given
    (benchmarks/hlo_census.py). Shapes only; "auto" resolves as `idm_jax.backend` says."""
    mode = backend.seed_parallel(seed_parallel)
    size = int(min(batch_size, num_examples))
    spec = _Spec(model, int(num_examples), size, dsa_strategy, float(momentum), float(weight_decay), mode)
    states = jax.eval_shape(_init_fn(model, tuple(image_shape), int(num_examples), spec.momentum,
                                     spec.weight_decay), jax.random.split(jax.random.PRNGKey(0), num_seeds))
    channels = image_shape[-1]
    data = (jax.ShapeDtypeStruct((num_examples, *image_shape), jnp.float32),
            jax.ShapeDtypeStruct((num_examples,), jnp.int32),
            jax.ShapeDtypeStruct((channels,), jnp.float32), jax.ShapeDtypeStruct((channels,), jnp.float32))
    idx = jax.ShapeDtypeStruct((num_seeds, size), jnp.int32)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.PRNGKey(0), num_seeds))
    return _host_fns(spec)[1].lower(states, data, jnp.float32(0.01), idx, keys)


def _run_passes_host(spec: _Spec, states, seed_keys, data, start: int, count: int, lr):
    """Passes start .. start+count-1 with the loop over batches in Python (backend.eval_loop)."""
    begin, step, end = _host_fns(spec)
    num_full, _, rest = batch_plan(spec.num_examples, spec.batch_size)
    for p in range(start, start + count):
        before = states.last_correct
        states, full, last, keys = begin(states, seed_keys, jnp.int32(p))
        for b in range(num_full):
            states = step(states, data, lr, full[:, b], keys[:, b])
        if rest:
            states = step(states, data, lr, last, keys[:, num_full])
        states = end(states, before)
    return states


@functools.lru_cache(maxsize=16)
def _init_fn(model: nn.Module, image_shape: tuple[int, int, int], num_examples: int,
             momentum: float, weight_decay: float):
    """jit(keys[S]) -> NetState stacked over S seeds, freshly initialised."""

    def init(key) -> NetState:
        variables = models.init_variables(model, key, image_shape)
        opt_state = torch_sgd(0.0, momentum, weight_decay).init(variables["params"])
        falses = jnp.zeros((num_examples,), bool)
        return NetState(variables=variables, opt_state=opt_state, last_correct=falses,
                        ever_correct=falses, forgets=jnp.zeros((num_examples,), jnp.int32),
                        loss_sum=jnp.zeros(()), correct_sum=jnp.zeros((), jnp.int32))

    return jax.jit(jax.vmap(init))


@functools.lru_cache(maxsize=16)
def _reset_optimizer_fn(momentum: float, weight_decay: float):
    """jit(params stacked over seeds) -> a fresh optimizer state (zero momentum) per seed."""
    return jax.jit(jax.vmap(torch_sgd(0.0, momentum, weight_decay).init))


# ----------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class TrainedNets:
    """Networks trained by `train_networks`, stacked over seeds.

    variables: pytree with leading axis S; forget_counts: int32[S, N] forgetting events per
    training example, with examples never classified correctly set to num_passes + 1 (Toneva et
    al. treat them as forgotten infinitely often); train_loss / train_accuracy: f32[S] over the
    last epoch (accuracy in %, on augmented batches); seconds: wall time including compilation;
    first_epoch_seconds: the first pass (carries the compilation); seconds_per_epoch: steady
    wall time of one pass of all seeds (NaN when there was only one pass).
    """

    variables: Any
    forget_counts: np.ndarray
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    seconds: float
    num_passes: int
    first_epoch_seconds: float = float("nan")
    seconds_per_epoch: float = float("nan")


def _check_training_set(images: Any, labels: Any, num_classes: int) -> tuple[Any, np.ndarray]:
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"training images must be [N, H, W, C], got shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"need one label per training image: labels {labels.shape}, images {images.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return images, labels.astype(np.int32)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def train_networks(model: nn.Module, images: Any, labels: Any, *, key: jax.Array,
                   num_seeds: int = defaults.EVAL_NUM_SEEDS, epochs: int = defaults.EVAL_EPOCHS,
                   batch_size: int = defaults.EVAL_BATCH_SIZE, lr: float = defaults.EVAL_LR,
                   momentum: float = defaults.EVAL_MOMENTUM, weight_decay: float = defaults.EVAL_WEIGHT_DECAY,
                   dsa_strategy: str = defaults.DSA_STRATEGY, mean: Any = None, std: Any = None,
                   seed_parallel: str = "auto", loop: str = "auto", schedule: str = defaults.EVAL_SCHEDULE,
                   log_every: int = 50,
                   name: str = "", seed_indices: Sequence[int] | None = None) -> TrainedNets:
    """Trains `num_seeds` freshly initialised copies of `model` on (images, labels).

    images: f32[N, H, W, C] already normalized, or uint8[N, H, W, C] normalized on the fly with
    mean, std: f32[C]; labels: int[N]. seed_parallel: "vmap" trains all seeds in one batched
    computation, "map" one after another; loop: "device" runs chunks of epochs inside one jitted
    call, "host" drives every step from Python (fast on CPU); "auto" picks by backend (backend.py). A seed's result
    does not depend on either choice. Progress (epoch, loss, s/epoch, ETA) is logged every
    `log_every` passes. seed_indices: train only these of the num_seeds networks (each as it
    is trained among all; the results hold them in this order), e.g. one process's share.
    """
    images, labels, mean, std = _training_inputs(images, labels, model.num_classes, mean, std,
                                                 num_seeds=num_seeds, dsa_strategy=dsa_strategy)
    mode, loop = backend.seed_parallel(seed_parallel), backend.eval_loop(loop)
    num_passes, decay_pass = epoch_plan(epochs, schedule)
    n = int(images.shape[0])
    # Host loop + map: each seed alone (a stack of one), so no loop wraps the step.
    seed_mode = "single" if (loop == "host" and mode == "map") else mode
    spec = _Spec(model, n, int(min(batch_size, n)), dsa_strategy, float(momentum),
                 float(weight_decay), seed_mode)
    image_shape = tuple(int(d) for d in images.shape[1:])
    init_keys, all_keys, num_seeds = picked_seed_keys(key, num_seeds, seed_indices)
    all_states = _init_fn(model, image_shape, n, spec.momentum, spec.weight_decay)(init_keys)
    data = (jnp.asarray(images), jnp.asarray(labels), mean, std)
    groups = [slice(s, s + 1) for s in range(num_seeds)] if seed_mode == "single" else [slice(0, num_seeds)]
    label = name or type(model).__name__
    total_passes = num_passes * len(groups)

    t0 = time.perf_counter()
    done, t_steady, passes_steady, first_seconds = 0, 0.0, 0, float("nan")
    finished = []
    for g, group in enumerate(groups):
        states = jax.tree.map(lambda a: a[group], all_states)
        seed_keys = all_keys[group]
        for phase_start, phase_end, phase_lr in ((0, decay_pass, lr), (decay_pass, num_passes, lr * LR_DECAY)):
            if phase_start >= phase_end:
                continue
            if phase_start > 0:  # the release recreates the optimizer: momentum restarts from zero
                states = states.replace(opt_state=_reset_optimizer_fn(spec.momentum, spec.weight_decay)(
                    states.variables["params"]))
            p = phase_start
            while p < phase_end:
                # The very first chunk is one pass: it carries the compilation, timed apart.
                count = 1 if done == 0 else min(log_every, phase_end - p)
                t = time.perf_counter()
                if loop == "device":
                    states = _device_chunk_fn(spec)(states, seed_keys, data, jnp.int32(p),
                                                    jnp.int32(count), jnp.float32(phase_lr))
                else:
                    states = _run_passes_host(spec, states, seed_keys, data, p, count, jnp.float32(phase_lr))
                loss = float(np.mean(np.asarray(states.loss_sum))) / n  # waits for the device
                dt = time.perf_counter() - t
                p, done = p + count, done + count
                if done == count:
                    first_seconds = dt
                    logging.info("%s: first epoch (compiling, unless cached) in %.3g s (%d seeds, %s, %s loop, "
                                 "%d images)", label, dt, num_seeds, mode, loop, n)
                    continue
                t_steady, passes_steady = t_steady + dt, passes_steady + count
                per_epoch = t_steady / passes_steady
                seeds_text = f" seed {g + 1}/{len(groups)}" if len(groups) > 1 else ""
                logging.info("%s:%s epoch %d/%d lr %.4g loss %.4f train acc %.1f%% | %s",
                             label, seeds_text, p, num_passes, phase_lr, loss,
                             float(np.mean(np.asarray(states.correct_sum))) / n * 100,
                             progress.speed_and_eta(1 / max(per_epoch, 1e-9), total_passes - done, "epoch"))
        finished.append(states)
    states = _stack(finished)
    seconds = time.perf_counter() - t0
    seconds_per_epoch = t_steady / passes_steady * len(groups) if passes_steady else float("nan")
    return _trained_nets(states, n, num_passes, seconds=seconds, first_epoch_seconds=first_seconds,
                         seconds_per_epoch=seconds_per_epoch)


def _training_inputs(images: Any, labels: Any, num_classes: int, mean: Any, std: Any, *, num_seeds: int,
                     dsa_strategy: str) -> tuple[Any, np.ndarray, jax.Array, jax.Array]:
    """train_networks' arguments checked (one line naming a bad one); mean/std f32[C] (0 / 1 if None)."""
    if isinstance(num_seeds, bool) or not isinstance(num_seeds, (int, np.integer)) or num_seeds < 1:
        raise ValueError(f"num_seeds must be a positive integer, got {num_seeds!r}")
    images, labels = _check_training_set(images, labels, num_classes)
    if images.dtype == np.uint8 and (mean is None or std is None):
        raise ValueError("uint8 training images need the dataset's mean and std to be normalized")
    augment.parse_strategy(dsa_strategy)  # fail early on a bad strategy
    channels = images.shape[-1]
    mean = jnp.asarray(np.zeros(channels) if mean is None else mean, jnp.float32)
    std = jnp.asarray(np.ones(channels) if std is None else std, jnp.float32)
    return images, labels, mean, std


def picked_seed_keys(key: jax.Array, num_seeds: int, seed_indices: Sequence[int] | None
                     ) -> tuple[jax.Array, jax.Array, int]:
    """(init keys, training keys, count) of the seeds to train: all num_seeds, or those picked.

    The keys are split for all num_seeds first, so a seed trains the same whichever others are picked.
    """
    init_key, train_key = jax.random.split(key)
    init_keys, all_keys = jax.random.split(init_key, num_seeds), jax.random.split(train_key, num_seeds)
    if seed_indices is not None:
        picked = np.asarray(seed_indices, np.int32).reshape(-1)
        if picked.size == 0 or picked.min() < 0 or picked.max() >= num_seeds:
            raise ValueError(f"seed_indices {list(seed_indices)} must be non-empty, within 0..{num_seeds - 1}")
        init_keys, all_keys, num_seeds = init_keys[picked], all_keys[picked], int(picked.size)
    return init_keys, all_keys, num_seeds


def _trained_nets(states: Any, n: int, num_passes: int, **timings: float) -> TrainedNets:
    """TrainedNets of the stacked final states; examples never classified correctly count
    num_passes + 1 forgetting events."""
    ever = np.asarray(states.ever_correct)
    forgets = np.where(ever, np.asarray(states.forgets), num_passes + 1).astype(np.int32)
    return TrainedNets(variables=states.variables, forget_counts=forgets,
                       train_loss=np.asarray(states.loss_sum) / n,
                       train_accuracy=np.asarray(states.correct_sum) / n * 100.0,
                       num_passes=num_passes, **timings)
