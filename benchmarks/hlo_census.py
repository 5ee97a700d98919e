"""Which convolutions a platform's programs hold: a census of the lowered condensation step.

    python benchmarks/hlo_census.py --config=configs/cifar10.py:10 --platform=gpu
    python benchmarks/hlo_census.py --config=configs/quick.py:1 --platform=gpu \
        --config.idm.queue_train_impl=vmap            # the batched members: grouped convolutions

Lowers (traces to StableHLO, compiles nothing, runs nothing), with every "auto" choice resolved
as on --platform (idm_jax/backend.py: `defaults_for`), so an accelerator's programs can be read on a
CPU:

* step:            the whole condensation iteration (condense.make_step);
* queue_training:  the drawn queue members' K SGD steps (idm.queue_train_impl, idm.conv_impl);
* evaluation_step: one SGD step of the eval.num_seeds evaluation networks trained together
                   (eval.seed_parallel, eval.conv_impl), the first of eval.archs.

Prints JSON: for each program, `convolutions`, `grouped_convolutions` (feature_group_count > 1
or batch_group_count > 1: what `vmap` over different weights makes of a convolution, and what
CUDA runs far slower than a plain one) and the group counts seen, beside the resolved choices.
`--config.x=value` overrides work as in main.py. The dataset is read as the config says (for
its shapes and class sizes only).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402  (sets the CPU memory flag before JAX starts)
from idm_jax import backend  # noqa: E402
from idm_jax import config_files  # noqa: E402

_CONV = re.compile(r"stablehlo\.convolution\b")
_GROUPS = re.compile(r"(batch_group_count|feature_group_count)\s*=\s*(\d+)")


def convolution_census(hlo_text: str) -> dict:
    """Counts the convolutions of a StableHLO module's text.

    {"convolutions": n, "grouped_convolutions": g, "feature_group_counts": {count: n},
    "batch_group_counts": {count: n}}; a convolution is grouped when either count exceeds 1.
    """
    total, grouped = 0, 0
    counts = {"feature_group_count": collections.Counter(), "batch_group_count": collections.Counter()}
    for line in hlo_text.splitlines():
        if not _CONV.search(line):
            continue
        total += 1
        groups = {name: int(value) for name, value in _GROUPS.findall(line)}
        for name in counts:
            counts[name][groups.get(name, 1)] += 1
        grouped += any(v > 1 for v in groups.values())
    return {"convolutions": total, "grouped_convolutions": grouped,
            "feature_group_counts": {str(k): v for k, v in sorted(counts["feature_group_count"].items())},
            "batch_group_counts": {str(k): v for k, v in sorted(counts["batch_group_count"].items())}}


def lowered_programs(config, ds=None) -> dict:
    """{program name: StableHLO text} of the step, the queue training and one evaluation step,
    lowered with the "auto" choices of the platform in effect; plus "choices", the resolved
    switches. ds: the dataset (default: as the config says)."""
    import jax  # pylint: disable=g-import-not-at-top

    from idm_jax import condense, defaults, models, trainer  # pylint: disable=g-import-not-at-top
    from idm_jax import queue as queue_lib  # pylint: disable=g-import-not-at-top

    setup = condense.step_from_config(config, ds)
    s, state, data = setup.settings, setup.state, setup.data
    programs = {"step": setup.step.lower(state, data).as_text()}
    if s.use_queue:
        def queue_training(state, data):
            key = jax.random.PRNGKey(0)
            slots = queue_lib.sample(state.queue, key, s.fetch_net_num)
            inputs = condense.member_inputs(s, state.queue, slots, data, state.key, state.step)
            return queue_lib.train(state.queue, slots, condense.make_member_train_fn(s, data), key,
                                   s.queue_train_impl, inputs)
        programs["queue_training"] = jax.jit(queue_training).lower(state, data).as_text()
    ev = config.eval
    arch = models.parse_archs(ev.archs)[0]
    ds = setup.dataset
    model = models.get_model(arch, ds.num_classes, ds.image_shape[-1], backend.conv_impl(ev.conv_impl))
    images_per_class = int(config.ipc) * int(config.idm.partition_factor) ** 2
    programs["evaluation_step"] = trainer.lowered_train_step(
        model, ds.image_shape, num_seeds=int(ev.num_seeds), num_examples=images_per_class * ds.num_classes,
        batch_size=int(ev.batch_size), dsa_strategy=defaults.DSA_STRATEGY if ev.dsa else "",
        seed_parallel=str(ev.seed_parallel)).as_text()
    choices = {"idm.queue_train_impl": s.queue_train_impl, "idm.conv_impl": s.conv_impl,
               "idm.class_batch": s.class_batch, "unroll_loops": s.unroll_loops,
               "eval.seed_parallel": backend.seed_parallel(ev.seed_parallel),
               "eval.conv_impl": backend.conv_impl(ev.conv_impl), "eval.arch": arch}
    return {"choices": choices, "programs": programs}


def census(config, platform: str | None = None, ds=None) -> dict:
    """The census JSON of `config` with `platform`'s defaults (None: JAX's backend's)."""
    import jax  # pylint: disable=g-import-not-at-top

    platform = platform or jax.default_backend()
    with backend.defaults_for(platform):
        lowered = lowered_programs(config, ds)
    out = {"platform": platform, "lowered_on": jax.default_backend(), "jax": jax.__version__,
           "choices": lowered["choices"]}
    out.update({name: convolution_census(text) for name, text in lowered["programs"].items()})
    return out


def main(argv: list[str]) -> None:
    argv, overrides = common.split_config_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file[:arg], e.g. configs/cifar10.py:10")
    parser.add_argument("--platform", choices=backend.PLATFORMS, default=None,
                        help='whose defaults resolve every "auto" choice (default: JAX\'s backend)')
    args = parser.parse_args(argv)
    from idm_jax import config_check  # pylint: disable=g-import-not-at-top
    from idm_jax import run_io  # pylint: disable=g-import-not-at-top

    run_io.quiet_library_logs()
    try:
        config = config_files.load_config_file(*config_files.split_config_value(args.config))
        common.apply_config_overrides(config, overrides)
        config_check.validate(config)
        result = census(config, args.platform)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
