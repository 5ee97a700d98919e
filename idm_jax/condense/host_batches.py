"""Real batches from the host (data.on_device = "host"): the indices an iteration reads, drawn
exactly as the device path draws them, and `HostSampler`, which gathers those images from
(memory-mapped) host arrays ahead of the step."""

from __future__ import annotations

import functools
from concurrent import futures
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from idm_jax import data as data_lib
from idm_jax.condense.real_data import HostBatch, class_batch_indices, queue_pass_indices
from idm_jax.condense.settings import StepSettings
from idm_jax.condense.sharding import replicate
from idm_jax.condense.step import iteration_keys

Array = jax.Array


def plan_indices(s: StepSettings, class_table: Array, class_counts: Array, num_examples: int,
                 base_key: Array, step) -> tuple[Array, Array | None]:
    """The train-set indices iteration `step` reads: (int32[classes, batch_real],
    int32[fetch_net_num, model_train_steps, batch_train] or None without a queue).

    Exactly the draws the step makes with DeviceData (same keys, same functions), so a
    HostBatch of these images reproduces the device path.
    """
    _, k_syn, k_train = iteration_keys(base_key, step)
    k_real = jax.random.split(k_syn)[0]  # as update_synset splits k_syn
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
