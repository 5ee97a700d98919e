"""IDM condensation: the state pytree, the one jitted step, and its parts.

`CondenseState` (step, base PRNG key, synthetic set, model queue) is all
that changes during a run; `make_step` builds `step(state, data) -> (state,
metrics)`, jitted once with the state donated. The real data lives on the
device (`DeviceData`: uint8 images + per-class index tables), so real
batches are drawn inside the jit and the host only loops and logs.
Datasets too large for that (the 224x224 ImageNet subset, ~19 GB) stay on
the host, memory-mapped: `HostSampler` draws the same indices the device path
would (same keys, computed with jax on the CPU), gathers the images and feeds
them to the same step as a `HostBatch` (config data.on_device, see
`resolve_data_placement`).
The run loop (logging, checkpoints, outputs) lives in `idm_jax.runner`.

Several devices: `class_mesh` builds a 1-D mesh, `shard_state` splits the
synthetic set's class axis over it (everything else is replicated) and
`make_step(s, mesh)` runs the per-class loss and update under `shard_map`,
each device on its own classes; the queue training stays replicated.
Several processes (hosts): `idm_jax.distributed` builds the same mesh over all of them.
"""

from __future__ import annotations

import dataclasses
import functools
from concurrent import futures
from typing import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idm_jax import augment
from idm_jax import backend
from idm_jax import data as data_lib
from idm_jax import loss as loss_lib
from idm_jax import models
from idm_jax import pool as pool_lib
from idm_jax import queue as queue_lib
from idm_jax import trainer

Array = jax.Array
CLASS_AXIS = "classes"  # mesh axis the synthetic set's class axis is sharded over


@flax.struct.dataclass
class SynSet:
    """The learnable synthetic images and their SGD momentum buffer."""

    images: Array  # f32[classes, ipc, H, W, C], normalized pixel space
    momentum: Array  # f32[classes, ipc, H, W, C]
    labels: Array  # int32[classes], the class of each group


@flax.struct.dataclass
class CondenseState:
    step: Array  # int32[]: iterations done
    key: Array  # uint32[2]: base key; step t uses fold_in(key, t)
    syn: SynSet
    queue: queue_lib.ModelQueue | None  # None when the queue is off (DM)
    nonfinite_step: Array  # int32[]: first iteration whose loss was not finite, -1 if none
    # params of a pre-trained pool, leaves [pool_size, ...] (idm.pool_epochs > 0); None otherwise
    pool: object = None


@flax.struct.dataclass
class DeviceData:
    """Real training data on the device (never donated)."""

    images: Array  # uint8[N, H, W, C]
    labels: Array  # int32[N]
    class_table: Array  # int32[classes, max_count]: example indices per class
    class_counts: Array  # int32[classes]
    mean: Array  # f32[C]
    std: Array  # f32[C]


@flax.struct.dataclass
class HostBatch:
    """One iteration's real images, drawn on the host by `HostSampler` (data.on_device="host")."""

    real: Array  # uint8[classes, batch_real, H, W, C]: the matching batch of every class
    train_images: Array | None  # uint8[fetch_net_num, model_train_steps, batch_train, H, W, C]
    train_labels: Array | None  # int32[fetch_net_num, model_train_steps, batch_train]
    mean: Array  # f32[C]
    std: Array  # f32[C]


PLACEMENTS = ("auto", "device", "host")


def resolve_data_placement(on_device: str, ds: data_lib.ArrayDataset) -> str:
    """"device" or "host": where the step's real batches come from (config data.on_device).

    "auto": "host" when the train images are memory-mapped or larger than
    data.MEMMAP_BYTES (4 GiB; the 224x224 ImageNet subset is ~19 GB), else "device"
    (CIFAR-10: 150 MB, TinyImageNet 64x64: 1.2 GB).
    """
    if on_device not in PLACEMENTS:
        raise ValueError(f"data.on_device must be one of {PLACEMENTS}, got {on_device!r}")
    if on_device != "auto":
        return on_device
    large = isinstance(ds.train_images, np.memmap) or ds.train_images.nbytes > data_lib.MEMMAP_BYTES
    return "host" if large else "device"


def device_data(ds: data_lib.ArrayDataset) -> DeviceData:
    table, counts = data_lib.class_index_table(ds.train_labels, ds.num_classes)
    return DeviceData(
        images=jnp.asarray(ds.train_images), labels=jnp.asarray(ds.train_labels, jnp.int32),
        class_table=jnp.asarray(table), class_counts=jnp.asarray(counts),
        mean=jnp.asarray(ds.mean, jnp.float32), std=jnp.asarray(ds.std, jnp.float32))


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Everything static about the step (hashable), derived from a config."""

    num_classes: int
    ipc: int
    image_shape: tuple[int, int, int]
    model_name: str
    loss: loss_lib.LossOptions
    batch_real: int
    class_batch: int  # classes per vectorised chunk (memory bound)
    lr_img: float
    momentum_img: float
    per_class_update: bool
    use_queue: bool
    net_num: int
    net_init_num: int
    net_generate_interval: int
    train_net_num: int
    fetch_net_num: int
    model_train_steps: int
    batch_train: int
    model_lr: float
    model_momentum: float
    model_weight_decay: float
    meter_reset_interval: int
    queue_train_impl: str  # "vmap" | "map"
    # XLA:CPU runs gradients of convs inside a while loop 2-40x slower than
    # unrolled code (measured, jax 0.10): on CPU, loops over SGD steps and
    # class chunks are unrolled at trace time; on GPU/TPU they stay loops.
    unroll_loops: bool = False
    max_unrolled_queue_steps: int = 0  # with unroll_loops: unroll at most this many (0 = all)
    embedding: str = "last_block"  # models.EMBEDDINGS: what the matching loss compares
    # Pre-trained pool (idm_jax.pool, paper Fig. 3): with the queue off, match in a network
    # drawn from pool_size networks trained pool_epochs epochs on the real data (0 = off).
    pool_epochs: int = 0
    pool_size: int = 0
    pool_cache_dir: str = ""
    # Model augmentation of the queue (paper supplement; off: 0.0 and 1.0).
    model_aug_lr_jitter: float = 0.0
    model_aug_class_fraction: float = 1.0
    # The release's ImageNet-subset data plumbing (all off by default, see configs/base.py):
    class_sampling: str = "random"  # data.CLASS_SAMPLINGS: per-class real batches (and the init's images)
    train_sampling: str = "random"  # data.TRAIN_SAMPLINGS: the queue's training batches
    unnormalized: bool = False  # condense on [0, 1] images, not normalized ones

    @functools.cached_property
    def model(self):
        return models.get_model(self.model_name, self.num_classes, self.image_shape[-1])

    @property
    def model_augment(self) -> queue_lib.ModelAugment | None:
        """The queue's model augmentation, None when off."""
        if self.model_aug_lr_jitter == 0.0 and self.model_aug_class_fraction >= 1.0:
            return None
        return queue_lib.ModelAugment(self.num_classes, self.model_aug_lr_jitter,
                                      self.model_aug_class_fraction)

    def model_optimizer(self) -> optax.GradientTransformation:
        return trainer.torch_sgd(self.model_lr, self.model_momentum, self.model_weight_decay)


def settings_from_config(config, ds: data_lib.ArrayDataset) -> StepSettings:
    """Static step settings; batch sizes clipped to what the data holds."""
    idm = config.idm
    min_count = int(np.bincount(ds.train_labels, minlength=ds.num_classes).min())
    batch_real = min(idm.batch_real, min_count)
    # The low-CE real subset and the CE mask belong to the release's l = 1 branch only.
    without_partition = idm.partition_factor == 1
    keep_lowest = min(int(idm.get("keep_lowest_ce_real", 0)), batch_real) if without_partition else 0
    expanded = config.ipc * idm.partition_factor ** 2
    chunk = min(idm.batch_real, min_count, idm.real_chunk_size)
    class_batch = idm.class_batch or auto_class_batch(expanded + chunk, backend.on_cpu())
    impl = backend.queue_train_impl(idm.queue_train_impl)
    return StepSettings(
        num_classes=ds.num_classes, ipc=config.ipc, image_shape=ds.image_shape,
        model_name=config.model,
        loss=loss_lib.LossOptions(
            partition_factor=idm.partition_factor, dsa_strategy=idm.dsa_strategy,
            ce_weight=idm.ce_weight, use_ce=idm.use_ce, real_chunk_size=idm.real_chunk_size,
            keep_lowest_ce_real=keep_lowest,
            ce_only_misclassified=without_partition and bool(idm.get("ce_only_misclassified", False))),
        # The release takes a random subset of min(batch_real, class size).
        batch_real=batch_real,
        class_batch=min(class_batch, ds.num_classes),
        lr_img=idm.lr_img, momentum_img=idm.momentum_img,
        per_class_update=idm.update_mode == "per_class",
        use_queue=idm.use_queue, net_num=idm.net_num, net_init_num=idm.net_init_num,
        net_generate_interval=idm.net_generate_interval, train_net_num=idm.train_net_num,
        fetch_net_num=idm.fetch_net_num, model_train_steps=idm.model_train_steps,
        batch_train=min(idm.batch_train, len(ds.train_labels)),
        model_lr=idm.model_lr, model_momentum=idm.model_momentum,
        model_weight_decay=idm.model_weight_decay,
        meter_reset_interval=idm.meter_reset_interval, queue_train_impl=impl,
        unroll_loops=backend.unroll_loops(), max_unrolled_queue_steps=int(idm.max_unrolled_queue_steps),
        embedding=idm.embedding,
        pool_epochs=int(idm.pool_epochs),
        pool_size=int(idm.pool_size) if idm.pool_epochs else 0,
        pool_cache_dir=str(config.data.cache_dir),
        model_aug_lr_jitter=float(idm.model_aug_lr_jitter),
        model_aug_class_fraction=float(idm.model_aug_class_fraction),
        class_sampling=str(config.data.get("class_sampling", "random")),
        train_sampling=str(config.data.get("train_sampling", "random")),
        unnormalized=bool(idm.get("unnormalized", False)))


def auto_class_batch(images_per_class: int, on_cpu: bool) -> int:
    """Classes updated together (vmapped) when idm.class_batch = 0.

    images_per_class: the expanded synthetic images plus one real chunk. On
    GPU/TPU: as many classes as about 4096 images allow (memory). On XLA:CPU
    one class at a time once a class alone fills a batch of 256: stacking
    classes into larger convolutions measured 1.35x slower per iteration at
    CIFAR-10 IPC 10 and 1.6x at IPC 1 (docs/RESULTS.md). Smaller classes
    (toy data, tests) stay stacked, which keeps the unrolled graph small.
    """
    if on_cpu and images_per_class >= 256:
        return 1
    return max(1, 4096 // images_per_class)


def real_images_per_iteration(s: StepSettings) -> int:
    """Real images one iteration reads: the matching batches plus the queue's training batches."""
    queue = s.fetch_net_num * s.model_train_steps * s.batch_train if s.use_queue else 0
    return s.batch_real * s.num_classes + queue



# ----------------------------------------------------------------------------
# Real batches: which images, in which pixel space


def pixel_stats(s: StepSettings, mean, std) -> tuple:
    """(mean, std) real uint8 images are normalized with in the step: the dataset's, or (0, 1)
    under idm.unnormalized (the release's ImageNet script condenses on [0, 1] images, so
    DSA's zero fill is black; its test set is normalized)."""
    if s.unnormalized:
        return jnp.zeros_like(jnp.asarray(mean, jnp.float32)), jnp.ones_like(jnp.asarray(std, jnp.float32))
    return mean, std


def normalize_real(s: StepSettings, images_uint8, mean, std) -> Array:
    return data_lib.normalize(images_uint8, *pixel_stats(s, mean, std))


def class_batch_indices(s: StepSettings, key: Array, table: Array, counts: Array, cls) -> Array:
    """int32[batch_real] train-set indices of class `cls`'s matching batch (data.class_sampling):
    a fresh random subset, or the first batch_real images in file order every time."""
    if s.class_sampling == "first":
        return data_lib.first_class_batch(table, cls, s.batch_real)
    return data_lib.sample_class_batch(key, table, counts, cls, s.batch_real)


_PASS_SALT = 0x9A55  # the shuffled passes' key, apart from the per-iteration keys


def queue_pass_indices(s: StepSettings, base_key: Array, num_examples: int, step) -> Array:
    """int32[fetch_net_num, model_train_steps, batch_train]: the queue's training batches of
    iteration `step` under data.train_sampling="passes".

    One walk through shuffled passes over the train set for the whole run (data.pass_batch);
    member m's k-th step takes batch (step * fetch_net_num + m) * model_train_steps + k, as the
    release's nets draw from one loader one after the other.
    """
    per_step = s.fetch_net_num * s.model_train_steps
    numbers = step * per_step + jnp.arange(per_step).reshape(s.fetch_net_num, s.model_train_steps)
    key = jax.random.fold_in(base_key, _PASS_SALT)
    draw = lambda b: data_lib.pass_batch(key, num_examples, s.batch_train, b)
    return jax.vmap(jax.vmap(draw))(numbers)


# ----------------------------------------------------------------------------
# Networks


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


# ----------------------------------------------------------------------------
# Synthetic set


INITS_FROM_REAL = ("real", "real_tiled", "real_whole")


def init_synset(s: StepSettings, ds: data_lib.ArrayDataset, seed: int, init: str) -> SynSet:
    """The starting synthetic images, one group of `ipc` per class.

    init: "real" packs l*l real images of the class, each downscaled to one piece, into every
    synthetic image (the release's CIFAR init with partition on; one real image when l = 1);
    "real_tiled" packs l*l downscaled copies of ONE real image (the release's ImageNet init,
    which calls its first-n sampler once per piece); "real_whole" starts every synthetic image
    as ONE full real image of its class whatever l is (the release's TinyImageNet script, whose
    partition branch is inverted); "noise" draws N(0, 1) in normalized space.
    The real images are random (seeded), or the first of each class in file order with
    data.class_sampling="first"; in [0, 1] pixels under idm.unnormalized.
    """
    shape = (s.num_classes, s.ipc) + s.image_shape
    if init == "noise":
        images = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
    elif init in INITS_FROM_REAL:
        factor = 1 if init == "real_whole" else s.loss.partition_factor
        copies = factor * factor if init == "real_tiled" else 1  # pieces cut from one real image
        needed = s.ipc * factor * factor // copies
        rng = np.random.default_rng(seed)
        groups = []
        for c in range(s.num_classes):
            pool = np.flatnonzero(ds.train_labels == c)  # file order
            if s.class_sampling == "first":
                idx = np.resize(pool, needed)  # the first `needed` (repeated if the class is smaller)
            else:  # classes smaller than needed reuse images (the release would fail)
                idx = rng.choice(pool, needed, replace=len(pool) < needed)
            real = normalize_real(s, ds.train_images[np.repeat(idx, copies)], ds.mean, ds.std)
            groups.append(augment.init_from_real(jnp.asarray(real), factor))
        images = jnp.stack(groups)
    else:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS_FROM_REAL + ('noise',)}")
    return SynSet(images=images.astype(jnp.float32), momentum=jnp.zeros(shape, jnp.float32),
                  labels=jnp.arange(s.num_classes, dtype=jnp.int32))


def momentum_sgd_update(x: Array, buf: Array, grad_fn, lr: float, mu: float,
                        steps_before: Array, steps_after: Array):
    """One SGD-with-momentum step on x inside a sequence of steps on other slices.

    The release steps the whole synthetic tensor once per class with one
    shared momentum buffer (torch SGD: buf = mu*buf + g; x -= lr*buf). A
    class's slice gets zero gradient on the other classes' steps, so it just
    coasts: before its own step it moves `steps_before` times, after it
    `steps_after` times. Since a class's loss reads only its own slice, the
    whole sequence is exact in closed form and all classes can run in
    parallel. steps_before = steps_after = 0 is the plain single step.
    Returns (new_x, new_buf, aux) where grad_fn(x) -> (grad, aux).
    """
    geo = lambda n: mu * (1.0 - mu ** n) / (1.0 - mu) if mu != 1.0 else n  # sum_{i=1..n} mu^i
    x = x - lr * geo(steps_before) * buf
    buf = mu ** steps_before * buf
    grad, aux = grad_fn(x)
    buf = mu * buf + grad
    x = x - lr * buf
    x = x - lr * geo(steps_after) * buf
    buf = mu ** steps_after * buf
    return x, buf, aux


# ----------------------------------------------------------------------------
# The step


def init_state(s: StepSettings, ds: data_lib.ArrayDataset, seed: int, init: str) -> CondenseState:
    k_queue, k_run = jax.random.split(jax.random.PRNGKey(seed))
    queue = None
    if s.use_queue:
        queue = queue_lib.create(make_init_fn(s), k_queue, s.net_num, s.net_init_num, s.model_augment)
    pool = None
    if s.pool_epochs:
        pool = jax.tree.map(jnp.asarray, pool_lib.load_or_build(
            ds, s.model_name, epochs=s.pool_epochs, size=s.pool_size, seed=seed, lr=s.model_lr,
            momentum=s.model_momentum, weight_decay=s.model_weight_decay, batch_size=s.batch_train,
            cache_dir=s.pool_cache_dir))
    return CondenseState(step=jnp.zeros((), jnp.int32), key=k_run,
                         syn=init_synset(s, ds, seed, init), queue=queue,
                         nonfinite_step=jnp.asarray(-1, jnp.int32), pool=pool)


def _matching_nets(s: StepSettings, state: CondenseState, key: Array, init_fn):
    """(queue, params, accs, seen): the train_net_num networks the loss is matched in, this step.

    params is a list of parameter trees; accs f32[train_net_num] their training accuracies in
    percent and seen f32[train_net_num] the images their meters counted (0: untrained):
    distinct random queue members (as the release draws them), or fresh random (or pool)
    networks (accuracy 0) when the queue is off.
    """
    queue = state.queue
    if not s.use_queue:
        keys = [key] if s.train_net_num == 1 else list(jax.random.split(key, s.train_net_num))
        if state.pool is not None:  # uniformly drawn pre-trained networks (paper Fig. 3)
            nets = [jax.tree.map(lambda t, k=k: t[jax.random.randint(k, (), 0, s.pool_size)], state.pool)
                    for k in keys]
        else:
            nets = [init_fn(k)[0] for k in keys]
        zeros = jnp.zeros((s.train_net_num,), jnp.float32)
        return None, nets, zeros, zeros
    k_push, k_pick = jax.random.split(key)
    if s.meter_reset_interval:  # 0 = never (the release's ImageNet script)
        reset = (state.step > 0) & (state.step % s.meter_reset_interval == 0)
        queue = jax.lax.cond(reset, queue_lib.reset_meters, lambda q: q, queue)
    queue = queue_lib.push(queue, init_fn, k_push, state.step, s.model_augment,
                           when=state.step % s.net_generate_interval == 0)
    slots = queue_lib.sample(queue, k_pick, s.train_net_num)
    params = [queue_lib.member(queue, slots[t]) for t in range(s.train_net_num)]
    accs = jnp.stack([queue_lib.accuracy(queue, slots[t]) for t in range(s.train_net_num)])
    return queue, params, accs, queue.seen[slots]


# Unrolling more class chunks than this makes compile time and compile memory grow with the
# class count (CIFAR-100 IPC 10 on CPU: > 6 GiB and > 10 minutes to compile) for little speed:
# the class loop only needs conv input gradients, which XLA:CPU runs fast inside a while loop
# (CIFAR-10 IPC 10: 20.0-20.2 s per iteration as lax.map, 19.4 s unrolled, same values).
MAX_UNROLLED_CHUNKS = 10


def queue_steps_unrolled(s: StepSettings) -> int:
    """How many of a queue network's SGD steps are unrolled per trip of their loop.

    On CPU all of them by default: a loop over blocks of 10 unrolled steps trains 1.6x slower on
    XLA:CPU (50 steps at CIFAR shapes: 62.9 s against 38.2 s, jax 0.10). idm.max_unrolled_queue_steps
    caps it for memory (CIFAR-100 IPC 10, 50 steps, capped at 10: peak 4.4 -> 2.6 GiB, compile
    122 -> 22 s); on GPU/TPU the steps stay a loop.
    """
    if not s.unroll_loops:
        return 1
    cap = s.max_unrolled_queue_steps
    return min(s.model_train_steps, cap) if cap > 0 else s.model_train_steps


def chunks_unrolled(n: int, chunk: int, unroll: bool) -> bool:
    """Whether map_in_chunks unrolls n elements taken `chunk` at a time (else lax.map / vmap)."""
    return unroll and -(-n // chunk) <= MAX_UNROLLED_CHUNKS


def map_in_chunks(fn, inputs, chunk: int, *, unroll: bool):
    """fn mapped over the leading axis, `chunk` elements vectorised at a time.

    Bounds memory like lax.map(batch_size=chunk). With unroll (and at most
    MAX_UNROLLED_CHUNKS chunks; more run as lax.map), the chunks are
    a trace-time loop (no while loop; one chunk is plain vmap), each chunk
    `backend.sequenced` after the previous one, so one chunk's activations are
    alive at a time.
    """
    n = jax.tree.leaves(inputs)[0].shape[0]
    if not chunks_unrolled(n, chunk, unroll):
        return jax.lax.map(fn, inputs, batch_size=chunk) if chunk < n else jax.vmap(fn)(inputs)
    outputs = []
    for i in range(0, n, chunk):
        part = jax.tree.map(lambda x, i=i: x[i:i + chunk], inputs)
        outputs.append(jax.vmap(fn)(backend.sequenced(outputs[-1], part) if outputs else part))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outputs)


# ----------------------------------------------------------------------------
# Several devices: the class axis of the synthetic set is sharded


def class_mesh(num_devices: int, num_classes: int) -> Mesh | None:
    """A 1-D mesh (axis CLASS_AXIS) of local devices, or None for one device.

    num_devices 0 picks the most local devices that divide num_classes
    evenly (10 classes on 8 GPUs -> 5); an explicit count must divide it.
    """
    available = jax.local_devices()
    if num_devices < 0 or num_devices > len(available):
        raise ValueError(f"mesh_devices={num_devices}, but this process sees "
                         f"{len(available)} device(s) ({available[0].platform}); use 0..{len(available)}")
    if num_devices == 0:
        num_devices = max(d for d in range(1, len(available) + 1) if num_classes % d == 0)
    elif num_classes % num_devices:
        raise ValueError(f"mesh_devices={num_devices} does not divide the {num_classes} classes; "
                         "pick a divisor or 0 (automatic)")
    if num_devices == 1:
        return None
    return Mesh(np.asarray(available[:num_devices]), (CLASS_AXIS,))


def state_shardings(state: CondenseState, mesh: Mesh):
    """NamedShardings for `state`: SynSet leaves split on the class axis, the rest replicated."""
    split, whole = NamedSharding(mesh, PartitionSpec(CLASS_AXIS)), NamedSharding(mesh, PartitionSpec())
    syn = jax.tree.map(lambda _: split, state.syn)
    rest = jax.tree.map(lambda _: whole, state.replace(syn=None))
    return rest.replace(syn=syn)


def shard_state(state: CondenseState, mesh: Mesh | None) -> CondenseState:
    """Places `state` on the mesh (a no-op without one)."""
    return state if mesh is None else jax.device_put(state, state_shardings(state, mesh))


def replicate(tree, mesh: Mesh | None):
    """Copies `tree` (e.g. DeviceData) to every device of the mesh (a no-op without one)."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def real_class_mean(s: StepSettings, params, apply_fn, data: DeviceData | HostBatch, cls: Array,
                    sample_key: Array, dsa_key: Array) -> Array:
    """Mean embedding f32[D] of batch_real real images of class `cls` after Siamese DSA.

    DeviceData: the images are drawn here with sample_key (`class_batch_indices`); HostBatch:
    they were drawn on the host the same way (HostSampler) and arrive as data.real[cls].
    """
    if isinstance(data, HostBatch):
        real = normalize_real(s, data.real[cls], data.mean, data.std)
    else:
        idx = class_batch_indices(s, sample_key, data.class_table, data.class_counts, cls)
        real = normalize_real(s, data.images[idx], data.mean, data.std)
    return loss_lib.mean_embedding(params, apply_fn, real, dsa_key, s.loss, cls)


def _update_synset(s: StepSettings, syn: SynSet, params, acc, key: Array,
                   data: DeviceData, apply_fn, mesh: Mesh | None = None):
    """Per-class loss, gradient and momentum-SGD update, mapped over classes."""
    k_real, k_dsa = jax.random.split(key)
    classes = syn.labels
    real_keys = jax.random.split(k_real, s.num_classes)
    dsa_keys = jax.random.split(k_dsa, s.num_classes)
    if s.per_class_update:
        before = jnp.arange(s.num_classes)
        after = s.num_classes - 1 - before
    else:
        before = after = jnp.zeros(s.num_classes, jnp.int32)

    def one_class(params, acc, data, args):
        images, buf, cls, k_r, k_d, n_before, n_after = args
        real_mean = real_class_mean(s, params, apply_fn, data, cls, k_r, k_d)

        def grad_fn(x):
            (value, parts), grad = jax.value_and_grad(loss_lib.synthetic_class_loss, argnums=2,
                                                      has_aux=True)(
                params, apply_fn, x, cls, real_mean, k_d, acc, s.loss)
            return grad, (value, parts)

        return momentum_sgd_update(images, buf, grad_fn, s.lr_img, s.momentum_img, n_before, n_after)

    def local_classes(params, acc, data, inputs):  # a chunk above the local count = all of them
        return map_in_chunks(functools.partial(one_class, params, acc, data), inputs,
                             s.class_batch, unroll=s.unroll_loops)

    if mesh is not None:  # each device updates its own classes; no communication
        split = PartitionSpec(CLASS_AXIS)
        # check_vma off: the custom-VJP conv (models.conv_impl="matmul") returns a per-device
        # kernel cotangent for the replicated params, which is never used (grad is w.r.t. images).
        local_classes = jax.shard_map(local_classes, mesh=mesh, check_vma=False,
                                      in_specs=(PartitionSpec(),) * 3 + (split,), out_specs=split)
    inputs = (syn.images, syn.momentum, classes, real_keys, dsa_keys, before, after)
    images, momentum, (losses, parts) = local_classes(params, acc, data, inputs)
    metrics = {"loss": losses.mean(), "mmd": parts["mmd"].mean(), "ce": parts["ce"].mean()}
    return syn.replace(images=images, momentum=momentum), metrics


def iteration_keys(base_key: Array, step) -> tuple[Array, Array, Array]:
    """(k_net, k_syn, k_train) of iteration `step`: the matching net, the synthetic update
    (real batches + DSA), the queue training. HostSampler derives its indices from the same."""
    k_net, k_syn, k_train = jax.random.split(jax.random.fold_in(base_key, step), 3)
    return k_net, k_syn, k_train


@functools.lru_cache(maxsize=8)
def make_step(s: StepSettings, mesh: Mesh | None = None):
    """The jitted condensation step: (state, data) -> (state, metrics). State is donated.

    data: DeviceData (real batches drawn inside the step) or HostBatch (drawn by HostSampler);
    each traces its own program.

    Cached per settings (and mesh), so runs in one process (tests, sweeps,
    resumes) share one compilation. With a mesh, pass a `shard_state` state
    and `replicate`d data; the returned state keeps those shardings.
    """
    apply_fn = make_apply_fn(s.model, s.embedding)
    init_fn = make_init_fn(s)

    def step(state: CondenseState, data: DeviceData | HostBatch):
        k_net, k_syn, k_train = iteration_keys(state.key, state.step)
        queue, nets, accs, seens = _matching_nets(s, state, k_net, init_fn)
        # Several matching nets (train_net_num > 1): as the release, one pass of per-class
        # steps per net, net after net, on the same momentum buffer; the loss metric is the
        # sum over nets of the class-mean loss (the release's printed loss).
        syn, metrics = state.syn, None
        for t, params in enumerate(nets):
            k_t = k_syn if t == 0 else jax.random.fold_in(k_syn, t)
            syn, m = _update_synset(s, syn, params, accs[t], k_t, data, apply_fn, mesh)
            metrics = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
        acc, seen = accs.mean(), seens.min()
        if s.use_queue:
            if s.unroll_loops:  # after the synthetic update, not beside it (memory)
                k_train = backend.sequenced(syn.images, k_train)
            slots = queue_lib.sample(queue, k_train, s.fetch_net_num)
            queue = queue_lib.train(queue, slots, make_member_train_fn(s, data), k_train,
                                    s.queue_train_impl,
                                    member_inputs(s, queue, slots, data, state.key, state.step))
            metrics["queue_acc"] = jnp.mean(jax.vmap(lambda i: queue_lib.accuracy(queue, i))(slots))
            metrics["queue_size"] = queue.size
        metrics["match_acc"] = acc
        metrics["match_seen"] = seen
        new = state.replace(step=state.step + 1, syn=syn, queue=queue)
        # A non-finite loss freezes the state at the last good iteration; the
        # host sees nonfinite_step >= 0 and stops without checkpointing garbage.
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.isfinite(syn.images))
        ok = finite & (state.nonfinite_step < 0)
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        new = new.replace(nonfinite_step=jnp.where(
            (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step))
        if mesh is not None:  # same shardings out as in: no resharding, no recompilation
            new = jax.lax.with_sharding_constraint(new, state_shardings(new, mesh))
        return new, metrics

    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def make_multi_step(s: StepSettings, steps: int, mesh: Mesh | None = None):
    """`steps` iterations in one jitted call (idm.steps_per_dispatch): (state, data) -> (state,
    metrics), each metric stacked over the iterations (leading axis `steps`). State is donated.

    The body is `make_step`'s program, run `steps` times by a lax.scan, so the values are those
    of `steps` single calls; the host dispatches and waits once per `steps` iterations instead of
    once per iteration. On CPU (s.unroll_loops) the iterations are unrolled: XLA:CPU runs conv
    gradients inside a while loop slowly (backend.py). DeviceData only: a HostBatch holds one
    iteration's real images.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps per dispatch must be an integer >= 1, got {steps!r}")
    one = make_step(s, mesh)

    def multi(state: CondenseState, data: DeviceData):
        if isinstance(data, HostBatch):
            raise ValueError(f"{steps} steps per dispatch need the real data on the device "
                             "(data.on_device=device); a HostBatch holds one iteration's images")
        return jax.lax.scan(lambda st, _: one(st, data), state, None, length=steps,
                            unroll=steps if s.unroll_loops else 1)

    return jax.jit(multi, donate_argnums=0)


# ----------------------------------------------------------------------------
# Real batches from the host (data.on_device = "host")


def plan_indices(s: StepSettings, class_table: Array, class_counts: Array, num_examples: int,
                 base_key: Array, step) -> tuple[Array, Array | None]:
    """The train-set indices iteration `step` reads: (int32[classes, batch_real],
    int32[fetch_net_num, model_train_steps, batch_train] or None without a queue).

    Exactly the draws the step makes with DeviceData (same keys, same functions), so a
    HostBatch of these images reproduces the device path.
    """
    _, k_syn, k_train = iteration_keys(base_key, step)
    k_real = jax.random.split(k_syn)[0]  # as _update_synset splits k_syn
    draw = lambda k, c: class_batch_indices(s, k, class_table, class_counts, c)
    real = jax.vmap(draw)(jax.random.split(k_real, s.num_classes), jnp.arange(s.num_classes))
    if not s.use_queue:
        return real, None
    if s.train_sampling == "passes":
        return real, queue_pass_indices(s, base_key, num_examples, step)
    # As queue.train splits k_train over members and the member's train fn over its steps.
    member = lambda km: jax.vmap(lambda k: data_lib.sample_batch(k, num_examples, s.batch_train))(
        jax.random.split(km, s.model_train_steps))
    return real, jax.vmap(member)(jax.random.split(k_train, s.fetch_net_num))


class HostSampler:
    """Feeds the step HostBatches gathered on the host from (memory-mapped) uint8 arrays.

    For datasets that do not fit on the device (the 224x224 ImageNet subset): indices come
    from `plan_indices` (jax on the CPU, the device path's draws), images from
    ds.train_images in a few threads (sorted reads, kind to a memmap), and the next
    iteration's batch is prepared while the current one runs. Peak host memory: two
    iterations' images (ImageNet subset IPC 10: 2 x (12,800 + 2,560) x 150 KB = 4.6 GB).
    """

    def __init__(self, s: StepSettings, ds: data_lib.ArrayDataset, base_key, mesh: Mesh | None = None,
                 threads: int = 8):
        self.s, self.ds, self.mesh = s, ds, mesh
        table, counts = data_lib.class_index_table(ds.train_labels, ds.num_classes)
        data_lib.check_batch_size(counts, s.batch_real)
        cpu = jax.local_devices(backend="cpu")[0]
        self._args = jax.device_put((jnp.asarray(table), jnp.asarray(counts),
                                     jnp.asarray(np.asarray(base_key))), cpu)
        self._plan = jax.jit(functools.partial(plan_indices, s), static_argnums=2)
        self._num_examples = len(ds.train_labels)
        self._labels = np.asarray(ds.train_labels, np.int32)
        self._mean, self._std = np.asarray(ds.mean, np.float32), np.asarray(ds.std, np.float32)
        self._threads = threads
        self._pool = futures.ThreadPoolExecutor(threads)

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        table, counts, key = self._args
        real, train = self._plan(table, counts, self._num_examples, key, step)
        return np.asarray(real), None if train is None else np.asarray(train)

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        flat = idx.reshape(-1)
        out = np.empty((flat.size,) + self.ds.image_shape, np.uint8)

        def copy(part):
            order = part[np.argsort(flat[part], kind="stable")]
            out[order] = self.ds.train_images[flat[order]]

        list(self._pool.map(copy, np.array_split(np.arange(flat.size), self._threads)))
        return out.reshape(idx.shape + self.ds.image_shape)

    def batch(self, step: int) -> HostBatch:
        """The HostBatch of iteration `step`, on the device (replicated over `mesh`)."""
        real_idx, train_idx = self.indices(step)
        batch = HostBatch(
            real=self._gather(real_idx),
            train_images=None if train_idx is None else self._gather(train_idx),
            train_labels=None if train_idx is None else self._labels[train_idx],
            mean=self._mean, std=self._std)
        if self.mesh is None:
            return jax.device_put(batch)
        return replicate(batch, self.mesh)

    def batches(self, start: int, stop: int) -> Iterator[HostBatch]:
        """HostBatches of iterations start .. stop-1, each prepared while the previous one runs."""
        with futures.ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(self.batch, start) if start < stop else None
            for step in range(start, stop):
                current = pending.result()
                pending = ahead.submit(self.batch, step + 1) if step + 1 < stop else None
                yield current

    def close(self) -> None:
        self._pool.shutdown()


def synthetic_arrays(state: CondenseState) -> tuple[np.ndarray, np.ndarray]:
    """(images f32[classes*ipc, H, W, C] normalized, labels int32[classes*ipc]).

    With classes on several processes (idm_jax.distributed) the set is gathered first: a
    collective, so every process must call this.
    """
    images = host_array(state.syn.images)
    k, ipc = images.shape[:2]
    labels = np.repeat(host_array(state.syn.labels), ipc).astype(np.int32)
    return images.reshape((k * ipc,) + images.shape[2:]), labels


def host_array(x: Array) -> np.ndarray:
    """x as one numpy array on this host, gathered from the other processes if they hold parts."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
