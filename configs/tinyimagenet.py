"""TinyImageNet (200 classes, 64x64x3), as the release's IDM_tiny.py runs it.

Data: a folder or archive of train/<class>/*.JPEG and val/<class>/*.JPEG (set
$IDM_TINYIMAGENET or --config.data.source).

The release matches AND evaluates with its `--model ConvNet`, which is always
depth 3: on 64x64 the embedding is 128 x 8 x 8 = 8192 values. With partition
on, its init is one full real image per synthetic image (the script's
partition branch is inverted), so `idm.init = "real_whole"` here. Named
options for DM's setting instead: `--config.model=ConvNetD4
--config.eval.archs=ConvNetD4` (depth 4, 2048-value embedding) and
`--config.idm.init=real` (l*l downscaled real images packed per image).

Usage: --config=configs/tinyimagenet.py:<ipc>[,dm], e.g. configs/tinyimagenet.py:10 or
configs/tinyimagenet.py:1,dm. Without ":<ipc>" the IPC is 10. The per-IPC rows are
the release's command table (docs/RELEASE.md#per-setting-table); every other field is
configs/base.py's default.
"""

import os

from configs.base import make_config


def data_source() -> str:
  return os.environ.get("IDM_TINYIMAGENET", "tinyimagenet")


DATASET = {
    "data.source": data_source(),
    "data.normalization": "tinyimagenet",
    "model": "ConvNet",  # depth 3 on 64x64 (release); ConvNetD4 is DM's choice
    "eval.archs": "ConvNet",
    "idm.init": "real_whole",  # the release's inverted partition branch
}

PER_IPC = {
    1: {"idm.ce_weight": 0.5},
    10: {"idm.ce_weight": 0.5, "idm.meter_reset_interval": 500},
    50: {"idm.ce_weight": 0.8, "idm.model_train_steps": 50, "idm.meter_reset_interval": 1000},
}


def get_config(arg: str | None = None):
  return make_config(arg, DATASET, PER_IPC)
