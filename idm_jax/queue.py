"""ModelQueue: IDM's pool of partially trained networks, as one pytree.

A fixed-capacity ring buffer: every leaf of `params` and `opt_state` carries
a leading member axis of length `capacity`. Pushing writes a freshly
initialised network at `head` (overwriting the oldest once the ring is
full); sampling draws distinct valid slots; training gathers the drawn
members, runs K SGD steps on each with `jax.vmap` (or `lax.map`) over
members, and scatters them back. Everything is jittable; there are no
Python lists of models and no host round-trips.

Model augmentation (paper supplement, ImageNet subset; off by default): each
network gets, when it is created, a learning-rate factor drawn uniformly from
[1 - lr_jitter, 1 + lr_jitter] and a random subset of the classes to train on
(`ModelAugment`); they are kept for its life in `lr_scale` / `class_mask` and
handed to the train function with the member.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from idm_jax import backend

Array = jax.Array
InitFn = Callable[[Array], Any]  # key -> (params, opt_state)
# (params, opt_state, key) -> (params, opt_state, correct, seen)
TrainFn = Callable[[Any, Any, Array], tuple[Any, Any, Array, Array]]


@flax.struct.dataclass
class ModelQueue:
    """Stacked networks. Leaves of params/opt_state: [capacity, ...]."""

    params: Any
    opt_state: Any
    correct: Array  # f32[capacity] training predictions that were right
    seen: Array  # f32[capacity] training predictions made (meter denominator)
    born: Array  # int32[capacity] iteration the member was pushed; -1 = empty
    size: Array  # int32[] members held
    head: Array  # int32[] slot the next push writes (the oldest when full)
    # Model augmentation (None when off): lr factor and trained classes of every member.
    lr_scale: Array | None = None  # f32[capacity], in [1 - lr_jitter, 1 + lr_jitter]
    class_mask: Array | None = None  # bool[capacity, classes], True = the member trains on it

    @property
    def capacity(self) -> int:
        return self.born.shape[0]


@dataclasses.dataclass(frozen=True)
class ModelAugment:
    """Model augmentation (paper supplement, Eq. 6): per-network lr factor and class subset.

    lr_jitter: each network's lr is model_lr * U(1 - lr_jitter, 1 + lr_jitter) (paper: 0.1).
    class_fraction: each network trains on round(class_fraction * num_classes) classes (at
    least 1), drawn uniformly without replacement; 1.0 = all classes.
    """

    num_classes: int
    lr_jitter: float = 0.0
    class_fraction: float = 1.0

    @property
    def num_subset_classes(self) -> int:
        return max(1, min(self.num_classes, int(round(self.class_fraction * self.num_classes))))

    def draw(self, key: Array) -> tuple[Array, Array]:
        """(lr_scale f32[], class_mask bool[num_classes]) of one new network."""
        k_lr, k_cls = jax.random.split(key)
        lr_scale = 1.0 + self.lr_jitter * jax.random.uniform(k_lr, (), minval=-1.0, maxval=1.0)
        picked = jax.lax.top_k(jax.random.uniform(k_cls, (self.num_classes,)), self.num_subset_classes)[1]
        return lr_scale, jnp.zeros(self.num_classes, bool).at[picked].set(True)


# The augmentation draw uses its own key, so the networks' initial weights do not change with it.
_AUG_SALT = 0x5EED


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def create(init_fn: InitFn, key: Array, capacity: int, num_initial: int,
           augment: ModelAugment | None = None) -> ModelQueue:
    """A queue of `capacity` slots, the first `num_initial` holding fresh networks.

    augment: model augmentation drawn for every slot (None: off, no lr_scale/class_mask).
    """
    if not 1 <= num_initial <= capacity:
        raise ValueError(f"need 1 <= net_init_num ({num_initial}) <= net_num ({capacity})")
    members = jax.vmap(init_fn)(jax.random.split(key, capacity))
    params, opt_state = members
    lr_scale = class_mask = None
    if augment is not None:
        lr_scale, class_mask = jax.vmap(augment.draw)(
            jax.random.split(jax.random.fold_in(key, _AUG_SALT), capacity))
    born = jnp.where(jnp.arange(capacity) < num_initial, 0, -1).astype(jnp.int32)
    return ModelQueue(
        params=params, opt_state=opt_state,
        correct=jnp.zeros(capacity, jnp.float32), seen=jnp.zeros(capacity, jnp.float32),
        born=born, size=jnp.asarray(num_initial, jnp.int32),
        head=jnp.asarray(num_initial % capacity, jnp.int32),
        lr_scale=lr_scale, class_mask=class_mask)


def _write(tree: Any, slot: Array, value: Any) -> Any:
    return jax.tree.map(lambda t, v: t.at[slot].set(v), tree, value)


def push(queue: ModelQueue, init_fn: InitFn, key: Array, step: Array,
         augment: ModelAugment | None = None, when: Array | bool = True) -> ModelQueue:
    """Adds a fresh network; when full, the oldest member is replaced.

    augment: must be given iff the queue was created with it; draws the new member's lr
    factor and class subset.
    when: a (traced) bool; False leaves the queue as it was. Jitted with a donated queue,
    this writes one member in place, where `lax.cond(when, push, ...)` would copy the
    whole queue (CIFAR-10: 244 MiB of temporaries).
    """
    params, opt_state = init_fn(key)
    slot = queue.head
    when = jnp.asarray(when)

    def write(tree, value):  # the new value at `slot` if `when`, else what is there
        return jax.tree.map(lambda t, v: t.at[slot].set(jnp.where(when, v, t[slot])), tree, value)

    if augment is not None:
        lr_scale, class_mask = augment.draw(jax.random.fold_in(key, _AUG_SALT))
        queue = queue.replace(lr_scale=write(queue.lr_scale, lr_scale),
                              class_mask=write(queue.class_mask, class_mask))
    return queue.replace(
        params=write(queue.params, params),
        opt_state=write(queue.opt_state, opt_state),
        correct=write(queue.correct, 0.0),
        seen=write(queue.seen, 0.0),
        born=write(queue.born, jnp.asarray(step, jnp.int32)),
        size=jnp.where(when, jnp.minimum(queue.size + 1, queue.capacity), queue.size),
        head=jnp.where(when, (slot + 1) % queue.capacity, slot))


def sample(queue: ModelQueue, key: Array, num: int) -> Array:
    """`num` distinct occupied slots, uniformly at random: int32[num].

    Requires num <= size (the queue starts with net_init_num >= num members;
    checked at config time).
    """
    scores = jax.random.uniform(key, (queue.capacity,))
    scores = jnp.where(queue.born >= 0, scores, -1.0)
    return jax.lax.top_k(scores, num)[1].astype(jnp.int32)


def member(queue: ModelQueue, slot: Array) -> Any:
    """The params of one member."""
    return jax.tree.map(lambda t: t[slot], queue.params)


def accuracy(queue: ModelQueue, slot: Array) -> Array:
    """Training accuracy of a member in percent; 0 before it was trained (or since a reset).

    As the release's torchnet meter: (1 - errors / seen) * 100, and 0 while nothing was seen.
    """
    seen = queue.seen[slot]
    return jnp.where(seen > 0, 100.0 * queue.correct[slot] / jnp.maximum(seen, 1.0), 0.0)


def reset_meters(queue: ModelQueue) -> ModelQueue:
    return queue.replace(correct=jnp.zeros_like(queue.correct), seen=jnp.zeros_like(queue.seen))


def train(queue: ModelQueue, slots: Array, train_fn: TrainFn, key: Array,
          impl: str = "vmap", member_inputs: Any = None) -> ModelQueue:
    """Trains the members at `slots` (int32[M]) with `train_fn`, all at once.

    member_inputs: None, or a pytree with leading axis M (e.g. real batches fed from the
    host, or the members' lr_scale / class_mask) handed to train_fn as a fourth argument,
    row m with the member at slots[m] and the m-th of jax.random.split(key, M).

    impl "vmap" batches members into one computation (fast on GPU/TPU);
    "map" runs them one after another (fast on CPU, where a vmapped
    convolution over different weights becomes a grouped one). "map" is a
    trace-time loop, not lax.map: XLA:CPU runs weight gradients inside a
    while loop far slower (docs/RESULTS.md#xlacpu-behaviours-behind-the-cpu-defaults), and M is small (2).
    """
    gather = lambda tree: jax.tree.map(lambda t: t[slots], tree)
    inputs = (gather(queue.params), gather(queue.opt_state), jax.random.split(key, slots.shape[0]))
    if member_inputs is not None:
        inputs += (member_inputs,)
    if impl == "vmap":
        params, opt_state, correct, seen = jax.vmap(train_fn)(*inputs)
    elif impl == "map":
        outputs = []
        for i in range(slots.shape[0]):
            member_args = jax.tree.map(lambda t, i=i: t[i], inputs)
            if outputs:  # one member after the other, not interleaved (memory)
                member_args = member_args[:2] + backend.sequenced(outputs[-1][0], member_args[2:])
            outputs.append(train_fn(*member_args))
        params, opt_state, correct, seen = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
    else:
        raise ValueError(f"unknown queue training impl {impl!r}; expected 'vmap' or 'map'")
    return queue.replace(
        params=_write(queue.params, slots, params),
        opt_state=_write(queue.opt_state, slots, opt_state),
        correct=queue.correct.at[slots].add(correct),
        seen=queue.seen.at[slots].add(seen))
