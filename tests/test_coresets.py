"""Coreset selection (random, herding, forgetting) on hand-made labels and features."""

import jax
import numpy as np
import pytest

from idm_jax import coresets

LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 2])


def test_random_picks_distinct_images_of_each_class():
    idx = coresets.select_random(jax.random.PRNGKey(0), LABELS, 3, 3)
    assert idx.shape == (9,)
    np.testing.assert_array_equal(LABELS[idx], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert len(set(idx.tolist())) == 9
    again = coresets.select_random(jax.random.PRNGKey(0), LABELS, 3, 3)
    np.testing.assert_array_equal(idx, again)
    draws = {tuple(coresets.select_random(jax.random.PRNGKey(k), LABELS, 3, 1)) for k in range(20)}
    assert len(draws) > 5  # different keys give different picks


def test_selection_errors_name_the_problem():
    with pytest.raises(ValueError, match="class 0 has 4 examples, fewer than the 5"):
        coresets.select_random(jax.random.PRNGKey(0), LABELS, 3, 5)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        coresets.select_random(jax.random.PRNGKey(0), LABELS, 3, 0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        coresets.select_random(jax.random.PRNGKey(0), LABELS, 2, 1)
    with pytest.raises(ValueError, match=r"features must be \[N, D\]"):
        coresets.select_herding(np.zeros((5, 2)), LABELS, 3, 1)
    with pytest.raises(ValueError, match="forget_counts"):
        coresets.select_forgetting(np.zeros(5), LABELS, 3, 1, jax.random.PRNGKey(0))


def test_herding_hand_example():
    # One class, 1-D features 0, 1, 2, 10 (mean 3.25).
    # k=1: closest single value to 3.25 is 2.  k=2: (2+0)/2=1, (2+1)/2=1.5, (2+10)/2=6 -> 1.5 (row 1).
    # k=3: (3+0)/3=1 (dist 2.25), (3+10)/3=4.33 (dist 1.08) -> 10 (row 3).
    feats = np.array([[0.0], [1.0], [2.0], [10.0]])
    np.testing.assert_array_equal(coresets.herding_order(feats, 3), [2, 1, 3])
    # Per class, global indices: class 1 = rows 1, 3 -> [5, 7] is closest-first.
    labels = np.array([0, 1, 0, 1])
    feats2 = np.array([[0.0, 0.0], [5.0, 5.0], [1.0, 1.0], [7.0, 7.0]])
    np.testing.assert_array_equal(coresets.select_herding(feats2, labels, 2, 2), [0, 2, 1, 3])


def test_herding_mean_is_closer_to_class_mean_than_random():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 200)
    feats = rng.normal(size=(600, 16)) + labels[:, None]
    ipc = 5
    herd = coresets.select_herding(feats, labels, 3, ipc)
    assert len(set(herd.tolist())) == 15
    np.testing.assert_array_equal(labels[herd], np.repeat(np.arange(3), ipc))
    for c in range(3):
        target = feats[labels == c].mean(0)
        herd_gap = np.linalg.norm(feats[herd[c * ipc:(c + 1) * ipc]].mean(0) - target)
        random_gaps = [np.linalg.norm(feats[coresets.select_random(jax.random.PRNGKey(k), labels, 3, ipc)
                                            [c * ipc:(c + 1) * ipc]].mean(0) - target) for k in range(10)]
        assert herd_gap < 0.5 * min(random_gaps)


def test_forgetting_picks_least_forgotten_with_random_ties():
    counts = np.array([3, 0, 1, 0, 2, 5])
    labels = np.array([0, 0, 0, 1, 1, 1])
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(coresets.select_forgetting(counts, labels, 2, 1, key), [1, 3])
    np.testing.assert_array_equal(coresets.select_forgetting(counts, labels, 2, 2, key), [1, 2, 3, 4])
    # Ties (all zero) are broken at random, never by position.
    ties = np.zeros(6, int)
    picks = {coresets.select_forgetting(ties, np.zeros(6, int), 1, 1, jax.random.PRNGKey(k))[0]
             for k in range(30)}
    assert len(picks) >= 4
