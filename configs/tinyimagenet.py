"""TinyImageNet (200 classes, 64x64x3).

Data: a folder or archive of train/<class>/*.JPEG and val/<class>/*.JPEG (set
$IDM_TINYIMAGENET or --config.data.source).

Usage: --config=configs/tinyimagenet.py:<ipc>[,dm], e.g. configs/tinyimagenet.py:10 or
configs/tinyimagenet.py:1,dm. Without ":<ipc>" the IPC is 10. The per-IPC rows are
the release's command table (../shared/REFERENCE.md); every other field is
configs/base.py's default.
"""

import os

from configs.base import make_config


def _source() -> str:
  return os.environ.get("IDM_TINYIMAGENET", "tinyimagenet")


DATASET = {
    "data.source": _source(),
    "data.normalization": "tinyimagenet",
    "model": "ConvNetD4",
}

PER_IPC = {
    1: {"idm.ce_weight": 0.5},
    10: {"idm.ce_weight": 0.5, "idm.meter_reset_interval": 500},
    50: {"idm.ce_weight": 0.8, "idm.model_train_steps": 50, "idm.meter_reset_interval": 1000},
}


def get_config(arg: str | None = None):
  return make_config(arg, DATASET, PER_IPC)
