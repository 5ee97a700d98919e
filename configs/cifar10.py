"""CIFAR-10 (10 classes, 32x32x3).

Usage: --config=configs/cifar10.py:<ipc>[,dm], e.g. configs/cifar10.py:10 or
configs/cifar10.py:1,dm; add ",paper" for the paper's 5 condensations (runs=5).
Without ":<ipc>" the IPC is 10. The per-IPC rows are
the release's command table (docs/RELEASE.md#per-setting-table); every other field is
configs/base.py's default.
"""

import os

from configs.base import first_existing, make_config


def data_source() -> str:
  # Data outside the repository comes only through $IDM_CIFAR10 (docs/RUNNING.md) or
  # --config.data.source; without either, tfds downloads CIFAR-10.
  return first_existing([os.environ.get("IDM_CIFAR10", "")], "tfds:cifar10")


DATASET = {
    "data.source": data_source(),
    "data.normalization": "cifar10",
    "model": "ConvNet",
}

PER_IPC = {
    # keep_lowest_ce_real / ce_only_misclassified act only with idm.partition_factor=1 (the
    # release's IPC-1 branch without --aug, IDM_cifar10.py; the l = 1 ablation); inert at l = 2.
    1: {"idm.batch_real": 5000, "idm.ce_weight": 0.5, "idm.net_generate_interval": 5,
        "idm.keep_lowest_ce_real": 2560, "idm.ce_only_misclassified": True},
    10: {"idm.ce_weight": 0.5, "idm.net_generate_interval": 30},
    50: {"idm.ce_weight": 0.1, "idm.meter_reset_interval": 500},
}


def get_config(arg: str | None = None):
  return make_config(arg, DATASET, PER_IPC)
