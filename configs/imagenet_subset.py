"""ImageNet subset (100 classes) at 224x224 with ConvNet-6, as the release runs it.

Data: an ImageNet folder (or archive) with train/<wnid>/*.JPEG and val/<wnid>/*
(the validation images sorted into one folder per class, as torchvision's
ImageNet and most copies keep them); set $IDM_IMAGENET or --config.data.source.
Only the release's 100 classes (idm_jax/imagenet_subset_classes.txt, in its
order) are read; a folder holding just those 100 works too. Images: shorter
side resized to 224, then the central 224x224 crop. The decoded train set
(~130k images, ~19 GB uint8) is cached as memory-mapped .npy files and real
batches are drawn on the host (data.on_device "auto" -> "host"), so it runs on
one 80 GB GPU; the cache needs ~20 GB of disk (data.cache_dir).

Usage: --config=configs/imagenet_subset.py:<ipc>[,dm], e.g. configs/imagenet_subset.py:10 or
configs/imagenet_subset.py:1,dm. Without ":<ipc>" the IPC is 10. The per-IPC rows are
the release's command table (docs/RELEASE.md#per-setting-table); every other field is
configs/base.py's default.

IPC 50 is the release's command without --aug: no partition/expansion (l = 1), each
synthetic image starts as one whole real image, and the evaluation trains on the
unexpanded 5,000 images (docs/RELEASE.md#per-setting-table, "ImageNet subset IPC 50").

Release quirks (docs/RELEASE.md#imagenet-subset-quirks): its accuracy meters are never
reset (idm.meter_reset_interval 0, reproduced). Options, off by default (data plumbing
and a bug, not the method the paper describes): data.class_sampling=first (real batches
and the init's images are the first of each class in file order), idm.init=real_tiled
(each image tiles ONE real image; with partition), data.train_sampling=passes (the queue's
batches walk shuffled passes), idm.unnormalized=True (condense on [0, 1] images; the
evaluation then trains on them against the normalized test set, as the release does).
The IPC-50 run of the release started its queue from a
pre-trained net, which is not reproducible and left out. "Model augmentation"
(paper supplement: idm.model_aug_lr_jitter=0.1, idm.model_aug_class_fraction) is
not in the release's command and stays off.
"""

import os

from configs.base import make_config


def data_source() -> str:
  return os.environ.get("IDM_IMAGENET", os.environ.get("IDM_IMAGENET_SUBSET", "imagenet"))


DATASET = {
    "data.source": data_source(),
    "data.classes": "imagenet_subset",  # the release's 100 wnids, in its label order
    "data.normalization": "imagenet",
    "data.image_size": 224,
    "data.resize": "center_crop",  # shorter side to 224, centre crop (not a squash)
    "model": "ConvNetD6",  # release: --model ConvNet_6
    "eval.archs": "ConvNetD6",  # evaluated with the matching network, as the release does
    "eval.batch_size": 128,  # release: --batch_train 128 is the evaluation batch
    "idm.batch_real": 128,
    "idm.batch_train": 128,  # the release trains its queue on batch_real-sized batches
    "idm.ce_weight": 3.0,
    "idm.net_generate_interval": 50,
    "idm.meter_reset_interval": 0,  # the release's ImageNet script never resets the meters
}

PER_IPC = {
    1: {"idm.net_num": 50},
    10: {"idm.net_num": 50},
    50: {"idm.net_num": 100, "idm.partition_factor": 1},  # no --aug: l = 1, whole-image init
}


def get_config(arg: str | None = None):
  return make_config(arg, DATASET, PER_IPC)
