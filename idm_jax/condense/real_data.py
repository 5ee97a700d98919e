"""Where the step's real images come from and in which pixel space: `DeviceData` (the whole
train set on the device) or `HostBatch` (one iteration's images from the host), the rule that
picks one (data.on_device), and the index draws both share."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from idm_jax import data as data_lib
from idm_jax.condense.settings import StepSettings

Array = jax.Array


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


PASS_SALT = 0x9A55  # the shuffled passes' key, apart from the per-iteration keys


def queue_pass_indices(s: StepSettings, base_key: Array, num_examples: int, step) -> Array:
    """int32[fetch_net_num, model_train_steps, batch_train]: the queue's training batches of
    iteration `step` under data.train_sampling="passes".

    One walk through shuffled passes over the train set for the whole run (data.pass_batch);
    member m's k-th step takes batch (step * fetch_net_num + m) * model_train_steps + k, as the
    release's nets draw from one loader one after the other.
    """
    per_step = s.fetch_net_num * s.model_train_steps
    numbers = step * per_step + jnp.arange(per_step).reshape(s.fetch_net_num, s.model_train_steps)
    key = jax.random.fold_in(base_key, PASS_SALT)
    draw = lambda b: data_lib.pass_batch(key, num_examples, s.batch_train, b)
    return jax.vmap(jax.vmap(draw))(numbers)
