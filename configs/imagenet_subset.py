"""ImageNet subset (100 classes) at 64x64 with ConvNet-D6, as the release runs it.

Data: a folder or archive of train/<class>/* and val/<class>/* (set
$IDM_IMAGENET_SUBSET or --config.data.source).

Usage: --config=configs/imagenet_subset.py:<ipc>[,dm], e.g. configs/imagenet_subset.py:10 or
configs/imagenet_subset.py:1,dm. Without ":<ipc>" the IPC is 10. The per-IPC rows are
the release's command table (../shared/REFERENCE.md); every other field is
configs/base.py's default.
"""

import os

from configs.base import make_config


def _source() -> str:
  return os.environ.get("IDM_IMAGENET_SUBSET", "imagenet_subset")


DATASET = {
    "data.source": _source(),
    "data.normalization": "imagenet",
    "model": "ConvNetD6",
    "data.image_size": 64,
    "idm.batch_real": 128,
    "idm.ce_weight": 3.0,
    "idm.net_generate_interval": 50,
    "idm.net_num": 50,
    "idm.batch_train": 128,
}

PER_IPC = {
    1: {},
    10: {},
    50: {},
}


def get_config(arg: str | None = None):
  return make_config(arg, DATASET, PER_IPC)
