"""The jitted condensation step and its pieces: the matching networks, the per-class loss and
momentum-SGD update (mapped over class chunks, sharded over a mesh), the queue training, and
several iterations per dispatch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from idm_jax import backend
from idm_jax import loss as loss_lib
from idm_jax import queue as queue_lib
from idm_jax.condense.networks import make_apply_fn, make_init_fn, make_member_train_fn, member_inputs
from idm_jax.condense.real_data import DeviceData, HostBatch, class_batch_indices, normalize_real
from idm_jax.condense.settings import StepSettings
from idm_jax.condense.sharding import CLASS_AXIS, state_shardings
from idm_jax.condense.state import CondenseState, SynSet

Array = jax.Array


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


def matching_nets(s: StepSettings, state: CondenseState, key: Array, init_fn):
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
# class count (a fully unrolled CIFAR-100 step did not finish compiling, docs/RESULTS.md#where-the-memory-went)
# for little speed: the class loop only needs conv input gradients, which XLA:CPU runs fast
# inside a while loop (about as fast as unrolled, same values:
# docs/RESULTS.md#xlacpu-behaviours-behind-the-cpu-defaults).
MAX_UNROLLED_CHUNKS = 10


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


def update_synset(s: StepSettings, syn: SynSet, params, acc, key: Array,
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
        queue, nets, accs, seens = matching_nets(s, state, k_net, init_fn)
        # Several matching nets (train_net_num > 1): as the release, one pass of per-class
        # steps per net, net after net, on the same momentum buffer; the loss metric is the
        # sum over nets of the class-mean loss (the release's printed loss).
        syn, metrics = state.syn, None
        for t, params in enumerate(nets):
            k_t = k_syn if t == 0 else jax.random.fold_in(k_syn, t)
            syn, m = update_synset(s, syn, params, accs[t], k_t, data, apply_fn, mesh)
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
