"""What is static about the condensation step: `StepSettings` (hashable, one per compiled
program) built from a config and a dataset, and the batch sizes derived from it."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import optax

from idm_jax import backend
from idm_jax import data as data_lib
from idm_jax import loss as loss_lib
from idm_jax import models
from idm_jax import queue as queue_lib
from idm_jax import trainer


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
    conv_impl: str = "auto"  # models.CONV_IMPLS (settings_from_config resolves "auto")
    # XLA:CPU runs gradients of convs inside a while loop far slower than
    # unrolled code (docs/RESULTS.md#xlacpu-behaviours-behind-the-cpu-defaults): on CPU, loops over SGD steps and
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
        return models.get_model(self.model_name, self.num_classes, self.image_shape[-1], self.conv_impl)

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
    keep_lowest = min(int(idm.keep_lowest_ce_real), batch_real) if without_partition else 0
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
            ce_only_misclassified=without_partition and bool(idm.ce_only_misclassified)),
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
        conv_impl=backend.conv_impl(idm.conv_impl),
        unroll_loops=backend.unroll_loops(), max_unrolled_queue_steps=int(idm.max_unrolled_queue_steps),
        embedding=idm.embedding,
        pool_epochs=int(idm.pool_epochs),
        pool_size=int(idm.pool_size) if idm.pool_epochs else 0,
        pool_cache_dir=str(config.data.cache_dir),
        model_aug_lr_jitter=float(idm.model_aug_lr_jitter),
        model_aug_class_fraction=float(idm.model_aug_class_fraction),
        class_sampling=str(config.data.class_sampling),
        train_sampling=str(config.data.train_sampling),
        unnormalized=bool(idm.unnormalized))


def auto_class_batch(images_per_class: int, on_cpu: bool) -> int:
    """Classes updated together (vmapped) when idm.class_batch = 0.

    images_per_class: the expanded synthetic images plus one real chunk. On
    GPU/TPU: as many classes as about 4096 images allow (memory). On XLA:CPU
    one class at a time once a class alone fills a batch of 256: stacking
    classes into larger convolutions is slower per image there than one class
    at a time (docs/RESULTS.md#condensation-speed). Smaller classes
    (toy data, tests) stay stacked, which keeps the unrolled graph small.
    """
    if on_cpu and images_per_class >= 256:
        return 1
    return max(1, 4096 // images_per_class)


def real_images_per_iteration(s: StepSettings) -> int:
    """Real images one iteration reads: the matching batches plus the queue's training batches."""
    queue = s.fetch_net_num * s.model_train_steps * s.batch_train if s.use_queue else 0
    return s.batch_real * s.num_classes + queue
