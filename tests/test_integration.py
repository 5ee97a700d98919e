"""Slow end-to-end checks (`pytest -m slow`): IDM must beat Random on the digits."""

import numpy as np
import pytest

from configs import quick
from idm_jax import baselines
from idm_jax import runner


def _eval_settings(c):
    c.eval.epochs = 300
    c.eval.num_seeds = 3
    c.eval.test_batch_size = 364
    return c


@pytest.mark.slow
def test_idm_ipc1_beats_random_ipc1_on_digits(tmp_path):
    idm = _eval_settings(quick.get_config("1"))
    idm.idm.iterations = 100
    summary = runner.run_condensation(idm, str(tmp_path / "idm"))
    idm_acc = summary["results"]["archs"][idm.eval.archs]

    rnd = _eval_settings(quick.get_config("1"))
    rnd.baseline.method = "random"
    rnd_acc = baselines.run_baseline(rnd, str(tmp_path / "random"))["archs"][rnd.eval.archs]

    print(f"IDM IPC1 {idm_acc['mean']:.1f} ± {idm_acc['std']:.1f} vs "
          f"Random IPC1 {rnd_acc['mean']:.1f} ± {rnd_acc['std']:.1f}")
    assert len(idm_acc["accuracies"]) == 3 and len(set(np.round(idm_acc["accuracies"], 4))) > 1
    # A clear margin: 10 points over the mean of three seeds each.
    assert idm_acc["mean"] >= rnd_acc["mean"] + 10.0
