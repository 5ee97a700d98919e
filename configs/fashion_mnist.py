"""Fashion-MNIST (10 classes, 28x28x1); not in the release's table: CIFAR-10's values.

Usage: --config=configs/fashion_mnist.py:<ipc>[,dm], e.g. configs/fashion_mnist.py:10 or
configs/fashion_mnist.py:1,dm. Without ":<ipc>" the IPC is 10. The per-IPC rows are
the release's command table (docs/RELEASE.md#per-setting-table); every other field is
configs/base.py's default.
"""

import os

from configs import mnist
from configs.base import make_config


def data_source() -> str:
  return os.environ.get("IDM_FASHION_MNIST", "tfds:fashion_mnist")


DATASET = {
    "data.source": data_source(),
    "data.normalization": "fashion_mnist",
    "model": "ConvNet",
}

PER_IPC = mnist.PER_IPC  # the same release defaults as MNIST


def get_config(arg: str | None = None):
  return make_config(arg, DATASET, PER_IPC)
