"""Where decoded folder/archive arrays persist between runs: the cache folder, the content
fingerprint that keys an entry, one .npz or (large sets) memory-mapped .npy files, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from idm_jax.data.listing import keep_dirs

_log = logging.getLogger(__name__)

_CACHE_VERSION = 2  # bump when the cached arrays' meaning changes
HASHED_BYTES = 1 << 20  # an archive's cache key hashes its first and last MiB (and its size)
# Decoded folder datasets larger than this are cached as memory-mapped .npy files (and served
# to the condensation step from the host, see condense.resolve_data_placement).
MEMMAP_BYTES = 4 << 30


def resolve_cache_dir(cache_dir: str | None) -> str:
    return cache_dir or os.environ.get("IDM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "idm_jax")


def fingerprint(path: str, image_size: int | None, resize: str = "stretch",
                 classes: tuple[str, ...] | None = None) -> str:
    """Hash of what determines the decoded arrays, independent of where the source lies.

    An archive is keyed by its content: its size and a hash of its first and last
    MiB, so one archive under two paths shares one cache entry. A folder is keyed
    by every file's relative path, size and modification time (of the listed classes).
    The options (image size, resize mode, class list) are part of the key.
    """
    if os.path.isfile(path):
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(HASHED_BYTES))
            if size > HASHED_BYTES:
                f.seek(max(size - HASHED_BYTES, HASHED_BYTES))
                digest.update(f.read())
        stamp: Any = [size, digest.hexdigest()]
    else:  # a folder's own mtime misses edits inside it: stamp every file (of the listed classes)
        stamp = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(keep_dirs(path, root, dirs, classes))
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                stamp.append([os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns])
    options = [image_size]
    if resize != "stretch" or classes is not None:
        options += [resize, list(classes or ())]
    blob = json.dumps([_CACHE_VERSION, *options, stamp]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def read_cache(cache_base: str) -> dict[str, Any] | None:
    """Arrays cached under cache_base: a folder of .npy files (memory-mapped) or cache_base.npz."""
    try:
        if os.path.isdir(cache_base):
            arrays = {k: np.load(os.path.join(cache_base, f"{k}.npy"), mmap_mode="r") for k in _ARRAY_KEYS}
            with open(os.path.join(cache_base, "class_names.json")) as f:
                arrays["class_names"] = tuple(json.load(f))
            return arrays
        if not os.path.exists(cache_base + ".npz"):
            return None
        with np.load(cache_base + ".npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAY_KEYS}
            arrays["class_names"] = tuple(str(s) for s in z["class_names"])
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        _log.warning("ignoring unreadable cache %s (%s); decoding again", cache_base, e)
        return None


def write_cache(cache_file: str, arrays: Mapping[str, Any]) -> None:
    """Writes the arrays as one .npz atomically: a killed run leaves no partial cache file."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache_file), prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{**arrays, "class_names": np.asarray(arrays["class_names"], dtype=str)})
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shared cache should be readable
        os.replace(tmp, cache_file)
        tmp = None
        _log.info("cached decoded images in %s", cache_file)
    except OSError as e:  # an unwritable cache only costs speed
        _log.warning("could not write cache %s: %s", cache_file, e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


class MemmapCache:
    """Decodes straight into .npy files in a temporary folder, renamed to cache_base when complete
    (a killed run leaves no partial cache); the arrays then come back as read-only memmaps."""

    def __init__(self, cache_base: str):
        self.base = cache_base
        try:
            os.makedirs(os.path.dirname(cache_base), exist_ok=True)
            self.tmp = tempfile.mkdtemp(dir=os.path.dirname(cache_base), prefix=".tmp-")
        except OSError as e:
            raise ValueError(f"a dataset this large is decoded into memory-mapped files, but the cache "
                             f"folder {os.path.dirname(cache_base)!r} is not writable ({e}); set "
                             "data.cache_dir (or $IDM_CACHE_DIR) to a writable folder with room") from e

    def allocate(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.lib.format.open_memmap(os.path.join(self.tmp, f"{key}.npy"), mode="w+", dtype=dtype,
                                         shape=shape)

    def finish(self, arrays: dict[str, Any]) -> dict[str, Any]:
        for k in _ARRAY_KEYS:
            arrays[k].flush()
        with open(os.path.join(self.tmp, "class_names.json"), "w") as f:
            json.dump(list(arrays["class_names"]), f)
        os.chmod(self.tmp, 0o755)
        os.replace(self.tmp, self.base)
        _log.info("cached decoded images (memory-mapped .npy) in %s", self.base)
        return read_cache(self.base)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
