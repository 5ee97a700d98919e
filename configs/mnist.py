"""MNIST (10 classes, 28x28x1); not in the release's table: CIFAR-10's values.

Usage: --config=configs/mnist.py:<ipc>[,dm], e.g. configs/mnist.py:10 or
configs/mnist.py:1,dm. Without ":<ipc>" the IPC is 10. The per-IPC rows are
the release's command table (docs/RELEASE.md#per-setting-table); every other field is
configs/base.py's default.
"""

import os

from configs.base import make_config


def data_source() -> str:
  return os.environ.get("IDM_MNIST", "tfds:mnist")


DATASET = {
    "data.source": data_source(),
    "data.normalization": "mnist",
    "model": "ConvNet",
}

PER_IPC = {
    1: {"idm.ce_weight": 0.5, "idm.net_generate_interval": 5},
    10: {"idm.ce_weight": 0.5},
    50: {"idm.ce_weight": 0.1},
}


def get_config(arg: str | None = None):
  return make_config(arg, DATASET, PER_IPC)
