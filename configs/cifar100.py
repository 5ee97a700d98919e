"""CIFAR-100 (100 classes, 32x32x3).

Usage: --config=configs/cifar100.py:<ipc>[,dm], e.g. configs/cifar100.py:10 or
configs/cifar100.py:1,dm. Without ":<ipc>" the IPC is 10. The per-IPC rows are
the release's command table (docs/RELEASE.md#per-setting-table); every other field is
configs/base.py's default.
"""

import os

from configs.base import make_config


def data_source() -> str:
  return os.environ.get("IDM_CIFAR100", "tfds:cifar100")


DATASET = {
    "data.source": data_source(),
    "data.normalization": "cifar100",
    "model": "ConvNet",
}

PER_IPC = {
    1: {"idm.batch_real": 5000, "idm.ce_weight": 0.5, "idm.net_generate_interval": 5},
    10: {"idm.ce_weight": 0.1, "idm.model_train_steps": 50},
    50: {"idm.ce_weight": 0.1, "idm.meter_reset_interval": 500},
}


def get_config(arg: str | None = None):
  return make_config(arg, DATASET, PER_IPC)
