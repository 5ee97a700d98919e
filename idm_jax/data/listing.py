"""Which image files make up a folder/archive dataset: the split and class of each file, class
lists, and the checks on the [<top>/]<split>/<class>/<image> layout (nothing is decoded here)."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Sequence
from importlib import resources

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_TEST_SPLITS = ("test", "val", "valid")  # first one present is the test split
# Named class lists shipped with the package (files of one class folder name per line).
CLASS_LISTS = {"imagenet_subset": "imagenet_subset_classes.txt"}
LAYOUT = "[<top>/]<split>/<class>/<image>.(png|jpg|jpeg) with splits train and test (or val/valid)"

# A listing: every directory (as a tuple of path parts) and every image file
# (parts -> bytes for archive members, or a filesystem path for folders).
_Listing = tuple[set[tuple[str, ...]], dict[tuple[str, ...], "bytes | str"]]


def looks_like_path(source: str) -> bool:
    return (
        os.sep in source
        or "/" in source
        or source.startswith((".", "~"))
        or source.lower().endswith(ARCHIVE_SUFFIXES)
    )


def load_class_list(classes: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The class folder names `classes` stands for (see load_dataset), or None for all.

    "imagenet_subset" -> the 100 WordNet ids of IDM's ImageNet subset, in the release's order.
    """
    if classes is None or (isinstance(classes, str) and not classes.strip()):
        return None
    if isinstance(classes, str):
        spec = classes.strip()
        if spec in CLASS_LISTS:
            text = resources.files("idm_jax").joinpath(CLASS_LISTS[spec]).read_text()
            names = _class_lines(text)
        elif os.path.isfile(os.path.expanduser(spec)):
            with open(os.path.expanduser(spec)) as f:
                names = _class_lines(f.read())
        elif looks_like_path(spec) and "," not in spec:
            raise FileNotFoundError(f"class list file {spec!r} does not exist; data.classes takes "
                                    f"{', '.join(map(repr, CLASS_LISTS))}, a file or comma-separated names")
        else:
            names = [n.strip() for n in spec.split(",") if n.strip()]
    else:
        names = [str(n).strip() for n in classes]
    if not names:
        raise ValueError(f"class list {classes!r} names no classes")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"class list {classes!r} repeats {repeated}")
    return tuple(names)


def _class_lines(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def keep_dirs(top: str, root: str, dirs: list[str], classes: tuple[str, ...] | None) -> list[str]:
    """Subfolders of `root` (under `top`) worth walking: with a class list, a split's class
    folders not in it are skipped (ImageNet: 100 of 1000 classes are read)."""
    if classes is None or root == top or os.path.basename(root) not in ("train",) + _TEST_SPLITS:
        return list(dirs)
    wanted = set(classes)
    return [d for d in dirs if d in wanted]


def _is_hidden(parts: Iterable[str]) -> bool:
    # Skips .DS_Store, AppleDouble "._x.jpg" files and macOS "__MACOSX" folders.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def list_folder(path: str, classes: tuple[str, ...] | None = None) -> _Listing:
    dirs: set[tuple[str, ...]] = set()
    files: dict[tuple[str, ...], bytes | str] = {}
    for root, subdirs, names in os.walk(path):
        subdirs[:] = keep_dirs(path, root, subdirs, classes)  # ImageNet: skip the 900 classes not listed
        rel = os.path.relpath(root, path)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        if _is_hidden(parts):
            continue
        dirs.update(parts + (d,) for d in subdirs if not _is_hidden((d,)))
        files.update({parts + (n,): os.path.join(root, n) for n in names if _is_image(n) and not _is_hidden((n,))})
    return dirs, files


def list_archive(path: str) -> _Listing:
    """Reads a tar archive in one streaming pass (no extraction, no seeking in gzip)."""
    dirs: set[tuple[str, ...]] = set()
    files: dict[tuple[str, ...], bytes | str] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                if not parts or _is_hidden(parts):
                    continue
                if member.isdir():
                    dirs.add(parts)
                elif member.isfile() and _is_image(parts[-1]):
                    files[parts] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"cannot read archive {path!r}: {e}") from e
    for parts in files:  # tar files need not list parent directories
        dirs.update(parts[:i] for i in range(1, len(parts)))
    return dirs, files


def select_splits(listing: _Listing, source: str, classes: tuple[str, ...] | None = None):
    """Finds the train and test split of a listing and checks its classes.

    classes: keep only these class folders, in this order (each must exist in both splits;
    other folders are ignored); None: every class folder, sorted.

    Returns:
      (train, test): each a list over classes of (class name,
      [(file display name, bytes | path), ...] in sorted file order).
    """
    dirs, files = listing
    if not files:
        raise ValueError(f"no images (.png/.jpg/.jpeg) found in {source!r}; expected layout {LAYOUT}")
    tops = sorted({d[:-1] for d in dirs if len(d) <= 2 and d[-1] == "train"})
    if not tops:
        raise ValueError(f"{source!r}: split folder 'train' is missing; expected layout {LAYOUT}")
    if len(tops) > 1 and () not in tops:
        raise ValueError(f"{source!r}: several 'train' folders {['/'.join(t + ('train',)) for t in tops]}")
    top = tops[0]  # sorted: the top level () wins over a nested <top>/train
    test_name = next((s for s in _TEST_SPLITS if top + (s,) in dirs), None)
    if test_name is None:
        where = "/".join(top) or "the top level"
        raise ValueError(
            f"{source!r}: split folder 'test' is missing next to 'train' in {where} "
            f"(also accepted: {', '.join(repr(s) for s in _TEST_SPLITS[1:])}); expected layout {LAYOUT}"
        )

    def split_classes(split: str):
        prefix = top + (split,)
        names = sorted(d[-1] for d in dirs if len(d) == len(prefix) + 1 and d[:-1] == prefix)
        loose = sum(1 for parts in files if len(parts) == len(prefix) + 1 and parts[:-1] == prefix)
        hint = (f" ({loose} images lie directly in {'/'.join(prefix)}/: sort them into one folder per class, "
                "e.g. ImageNet's val images into val/<wnid>/)" if loose else "")
        if classes is not None:
            absent = [c for c in classes if c not in names]
            if absent:
                shown = ", ".join(absent[:5]) + (f", ... ({len(absent)} of {len(classes)})" if len(absent) > 5 else "")
                raise ValueError(f"{source!r}: split {split!r} lacks class folder(s) {shown} of the class "
                                 f"list{hint}; expected layout {LAYOUT}")
            names = list(classes)
        if not names:
            raise ValueError(f"{source!r}: split {split!r} has no class folders{hint}; expected layout {LAYOUT}")
        by_class = {c: [] for c in names}
        for parts, data in files.items():
            if len(parts) == len(prefix) + 2 and parts[: len(prefix)] == prefix and parts[-2] in by_class:
                # Errors name the file: its path, or archive:member.
                shown = data if isinstance(data, str) else f"{source}:{'/'.join(parts)}"
                by_class[parts[-2]].append((shown, data))
        for c, entries in by_class.items():
            if not entries:
                raise ValueError(
                    f"{source!r}: class {c!r} in split {split!r} has no images (.png/.jpg/.jpeg)"
                )
            entries.sort(key=lambda e: e[0])
        return list(by_class.items())

    train, test = split_classes("train"), split_classes(test_name)
    train_names, test_names = [c for c, _ in train], [c for c, _ in test]
    if train_names != test_names:
        missing = sorted(set(train_names) - set(test_names))
        extra = sorted(set(test_names) - set(train_names))
        raise ValueError(
            f"{source!r}: classes of split {test_name!r} differ from 'train': "
            f"missing from {test_name!r}: {missing}, not in 'train': {extra}"
        )
    return train, test
