"""What changes during a run: `CondenseState` (step, key, synthetic set, queue, pool), how it
starts (`init_synset`, `init_state`), and the synthetic set read back to the host."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from idm_jax import augment
from idm_jax import data as data_lib
from idm_jax import pool as pool_lib
from idm_jax import queue as queue_lib
from idm_jax.condense.networks import make_init_fn
from idm_jax.condense.real_data import normalize_real
from idm_jax.condense.settings import StepSettings

Array = jax.Array


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
