"""benchmarks/hlo_census.py: the convolutions of the lowered programs, with a platform's defaults.

The accelerator defaults must hold no grouped convolution (vmap over different weights makes
them, and CUDA runs their backward pass far slower than a plain convolution's); lowering needs
no accelerator, so this runs on the CPU. Tiny settings (the digits, ConvNet-D2, IPC 1).
"""

import pytest

from benchmarks import hlo_census
from helpers import tiny_config

_TEXT = """
%1 = stablehlo.convolution(%a, %b) {batch_group_count = 1 : i64, feature_group_count = 1 : i64}
%2 = stablehlo.convolution(%a, %b) {batch_group_count = 1 : i64, feature_group_count = 2 : i64}
%3 = stablehlo.add %1, %2 : tensor<2xf32>
%4 = stablehlo.convolution(%a, %b) {batch_group_count = 5 : i64, feature_group_count = 1 : i64}
"""


def test_census_counts_convolutions_and_the_grouped_ones():
    got = hlo_census.convolution_census(_TEXT)
    assert got == {"convolutions": 3, "grouped_convolutions": 2,
                   "feature_group_counts": {"1": 2, "2": 1}, "batch_group_counts": {"1": 2, "5": 1}}
    assert hlo_census.convolution_census("%1 = stablehlo.add %a, %b")["convolutions"] == 0


def _census(digits, **fields):
    c = tiny_config()
    for key, value in fields.items():
        section, leaf = key.split("__")
        c[section][leaf] = value
    out = hlo_census.census(c, "gpu", ds=digits)
    assert out["platform"] == "gpu" and out["lowered_on"] == "cpu"
    return out


PROGRAMS = ("step", "queue_training", "evaluation_step")


def test_accelerator_defaults_hold_no_grouped_convolution(digits):
    out = _census(digits)
    assert out["choices"]["idm.queue_train_impl"] == "map" and out["choices"]["eval.seed_parallel"] == "map"
    assert out["choices"]["idm.conv_impl"] == "xla" and out["choices"]["unroll_loops"] is False
    for name in PROGRAMS:
        assert out[name]["convolutions"] > 0 and out[name]["grouped_convolutions"] == 0, (name, out[name])
    # ConvNet-D2 (2 conv layers): the queue's members train one after another, each step's
    # forward, input gradient (of the second layer only) and weight gradients: 2 x (2 + 1 + 2).
    assert out["queue_training"]["convolutions"] == 10
    assert out["evaluation_step"]["convolutions"] == 5  # one network's step, inside a lax.map over seeds


@pytest.mark.parametrize("conv_impl, grouped", [("xla", True), ("taps", False)])
def test_batched_members_group_their_convolutions_unless_written_as_matmuls(digits, conv_impl, grouped):
    out = _census(digits, idm__queue_train_impl="vmap", idm__conv_impl=conv_impl,
                  eval__seed_parallel="vmap", eval__conv_impl=conv_impl)
    for name in PROGRAMS:
        if grouped:  # every convolution of a vmapped network over its own weights is grouped
            assert out[name]["grouped_convolutions"] == 5, (name, out[name])
        else:  # "taps": no convolution at all, batched matmuls instead
            assert out[name]["convolutions"] == 0, (name, out[name])
