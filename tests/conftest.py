"""Tests compile as the command line does: on CPU, XLA schedules for memory (idm_jax/backend.py).

Data outside the repository reaches the tests as it reaches a run, only through $IDM_CIFAR10
(docs/RUNNING.md#where-the-data-comes-from); unset, the tests that need real CIFAR-10 skip.
"""

import pytest

from idm_jax import backend

backend.use_cpu_memory_scheduler()


@pytest.fixture(scope="session")
def digits():
    """The embedded digits dataset (16x16, 10 classes), loaded once per test process."""
    from idm_jax import data  # pylint: disable=g-import-not-at-top  (after the scheduler flag)
    return data.load_dataset("digits")
