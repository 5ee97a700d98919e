"""Dataset sources -> host arrays ready for the device, plus on-device sampling.

`load_dataset(source)` turns one of three kinds of source into an
`ArrayDataset` (uint8 NHWC images, int32 labels, class names, per-channel
mean/std):

* ``"digits"``: scikit-learn's 8x8 digits (ships inside the package, no
  network), upsampled to 16x16, one channel, 10 classes.
* ``"tfds:<name>"``: a tensorflow_datasets dataset (cifar10, cifar100, mnist,
  fashion_mnist, ...) with its normal download, or its manual_dir offline.
* a folder or ``.tar.gz``/``.tgz``/``.tar`` archive laid out as
  ``[<top>/]<split>/<class>/<image>.(png|jpg|jpeg)``; decoded arrays are cached
  as one .npz so the second load takes seconds. ``classes`` picks (and orders)
  a subset of the class folders, e.g. "imagenet_subset": the 100 ImageNet
  classes of IDM's release, shipped as package data. Decoded datasets larger
  than `MEMMAP_BYTES` are cached as memory-mapped .npy files instead and come
  back as read-only memmaps, so a 224x224 ImageNet subset (~19 GB) never has
  to fit in RAM.

The real data then lives on the device as uint8 together with per-class
index tables (`class_index_table`), so the jitted step draws its own real
batches (`sample_class_batch`, `sample_batch`) and normalizes them
(`normalize`) without host round-trips.

One concept per module; this package re-exports their names, so `data.X` is the way to reach them:

* dataset.py: `ArrayDataset`, `load_dataset`, `load_config_dataset` (a source spec -> a dataset).
* sources.py: digits, tfds, and folder/archive sources -> split arrays.
* listing.py: which files of a folder/archive are which split and class; class lists.
* decode.py: PNG/JPEG decoding and the resize modes.
* cache.py: the decode cache (fingerprint, .npz, memory-mapped .npy, `MEMMAP_BYTES`).
* sampling.py: per-class index tables and on-device batch draws.
* normalization.py: channel statistics and normalize / denormalize / renormalize.
"""

from idm_jax.data.cache import MEMMAP_BYTES
from idm_jax.data.dataset import ArrayDataset, load_config_dataset, load_dataset
from idm_jax.data.decode import RESIZE_MODES
from idm_jax.data.listing import CLASS_LISTS, load_class_list
from idm_jax.data.normalization import (
    COMPUTED,
    NORMALIZATION,
    channel_stats,
    denormalize,
    infer_normalization,
    normalize,
    renormalize,
)
from idm_jax.data.sampling import (
    CLASS_SAMPLINGS,
    TRAIN_SAMPLINGS,
    check_batch_size,
    class_index_table,
    first_class_batch,
    pass_batch,
    sample_batch,
    sample_class_batch,
)
from idm_jax.data.sources import DIGITS_SIZE

__all__ = [
    "ArrayDataset", "load_dataset", "load_config_dataset", "DIGITS_SIZE", "load_class_list", "CLASS_LISTS",
    "RESIZE_MODES", "MEMMAP_BYTES", "NORMALIZATION", "COMPUTED", "infer_normalization", "channel_stats",
    "normalize", "denormalize", "renormalize", "class_index_table", "check_batch_size", "sample_class_batch",
    "first_class_batch", "pass_batch", "sample_batch", "CLASS_SAMPLINGS", "TRAIN_SAMPLINGS",
]
