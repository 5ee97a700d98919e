"""Where one condensation iteration spends its time: each phase jitted and timed alone.

    python benchmarks/step_phases.py --ipc=10
    python benchmarks/step_phases.py --ipc=1 --config.idm.class_batch=3   # compare a setting (main.py's overrides)

Phases of the release's IDM iteration (configs/cifar10.py:<ipc>, real CIFAR-10):

* real embeddings:    per class, draw batch_real real images, Siamese DSA, the matching
                      net's mean embedding (no gradient), classes chunked as the step does
* synthetic gradient: per class, partition/expand + DSA of the synthetic images, loss and
                      its gradient w.r.t. the images, given the real mean embeddings
* queue training:     fetch_net_num queue members x model_train_steps SGD steps
* queue push + sample: the iteration's queue bookkeeping: meter reset, a fresh net pushed
                      (every net_generate_interval), the matching nets drawn
* full step:          condense.make_step (all of the above plus queue bookkeeping)

Each phase is compiled first and then timed --steps times (median, seconds). The sum of
the phases can exceed the full step: inside one program XLA overlaps and fuses them.
Prints one markdown table.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from idm_jax import condense  # noqa: E402
from idm_jax import loss as loss_lib  # noqa: E402
from idm_jax import queue as queue_lib  # noqa: E402


def phase_fns(s: condense.StepSettings):
    """{name: jitted fn(state, data, key)} for the phases of one iteration."""
    apply_fn = condense.make_apply_fn(s.model, s.embedding)
    params_shape = jax.eval_shape(lambda k: condense.make_init_fn(s)(k)[0], jax.random.PRNGKey(0))
    embedding_dim = jax.eval_shape(
        lambda p: apply_fn(p, jnp.zeros((1, *s.image_shape), jnp.float32))[0], params_shape).shape[-1]
    chunked = functools.partial(condense.map_in_chunks, chunk=s.class_batch, unroll=s.unroll_loops)

    def matching_params(state):
        return queue_lib.member(state.queue, jnp.asarray(0))

    def real_means(state, data, key):
        params = matching_params(state)

        def one(args):
            cls, k = args
            return condense.real_class_mean(s, params, apply_fn, data, cls, *jax.random.split(k))

        return chunked(one, (state.syn.labels, jax.random.split(key, s.num_classes)))

    def synthetic_grads(state, data, key):
        params = matching_params(state)

        def one(args):  # a zero real mean: same cost as the real one, no real forward
            images, cls, k = args
            real_mean = jnp.zeros(embedding_dim, jnp.float32)
            return jax.grad(lambda x: loss_lib.synthetic_class_loss(
                params, apply_fn, x, cls, real_mean, k, jnp.asarray(50.0), s.loss)[0])(images)

        return chunked(one, (state.syn.images, state.syn.labels, jax.random.split(key, s.num_classes)))

    def queue_training(state, data, key):
        slots = queue_lib.sample(state.queue, key, s.fetch_net_num)
        return queue_lib.train(state.queue, slots, condense.make_member_train_fn(s, data), key,
                               s.queue_train_impl).params

    def queue_push_sample(state, data, key):
        queue, nets, accs, _ = condense.matching_nets(s, state, key, condense.make_init_fn(s))
        return queue, nets, accs

    fns = {"real embeddings": real_means, "synthetic gradient": synthetic_grads}
    if s.use_queue:
        fns["queue training"] = queue_training
        fns["queue push + sample"] = queue_push_sample
    return {name: jax.jit(fn) for name, fn in fns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar10")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3)
    argv, overrides = common.split_config_overrides(sys.argv[1:])
    args = parser.parse_args(argv)
    config = importlib.import_module(f"configs.{args.config}").get_config(str(args.ipc))
    common.apply_config_overrides(config, overrides)
    ready = condense.step_from_config(config)
    s, data, state, step = ready.settings, ready.data, ready.state, ready.step
    key = jax.random.PRNGKey(1)

    rows = []
    for name, fn in phase_fns(s).items():
        rows.append((name, *common.first_and_median_seconds(lambda fn=fn: fn(state, data, key), args.steps)))
        print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    box = [state]

    def full():  # the step donates its state: feed each call the previous output
        box[0], metrics = step(box[0], data)
        return metrics

    rows.append(("full step", *common.first_and_median_seconds(full, args.steps)))
    dev = jax.devices()[0]
    total = rows[-1][2]
    print(f"\n{args.config} IPC {args.ipc}, class_batch {s.class_batch}, queue {s.queue_train_impl}; "
          f"{dev.platform} ({dev.device_kind}), {os.cpu_count()} cores, jax {jax.__version__}"
          f"{'; ' + ' '.join(overrides) if overrides else ''}\n")
    print("| phase | compile + 1st call (s) | s / call | share of the full step |")
    print("|---|---:|---:|---:|")
    for name, first, sec in rows:
        print(f"| {name} | {first:.1f} | {sec:.2f} | {100 * sec / total:.0f} % |")


if __name__ == "__main__":
    main()
