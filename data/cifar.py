"""CIFAR-10 / CIFAR-100 from the standard python-pickle layout, parsed and checked here.

Layout: ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<root>/cifar-100-python/{train, test, meta}``. ``--data`` may point at ``<root>`` or at the
``cifar-*`` folder itself; without it ``<root>`` is ``./datasets/cifar10`` / ``./datasets/cifar100``
(or under ``$OKD_DATASETS``). ``--download`` fetches the archive with torchvision into that root; with
``--download``, files already present are first checked against their published MD5s (the ones
torchvision's ``CIFAR10``/``CIFAR100`` classes carry, from https://www.cs.toronto.edu/~kriz/cifar.html's
archives) and the archive is fetched (or re-extracted) again when one differs.

Every pickle is validated when read: it must unpickle, hold a ``data`` uint8 array of N x 3072 and N
labels in range; a damaged file is one :class:`~data.common.BadDatasetError` naming every bad file.

Both splits are returned whole as uint8 N x 3 x 32 x 32 plus int64 labels (CIFAR-100: fine labels).
Training augmentation (in :mod:`data.loaders`): RandomCrop(32, padding=4; zero fill, or reflect with --pad-mode) +
RandomHorizontalFlip(0.5); then ToTensor-style /255 and Normalize with the mean/std of
:func:`data.dataset_info` (CIFAR-100 (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565, 0.2761);
CIFAR-10 (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616)). Test: /255 + Normalize only.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from .common import ArraySplit, BadDatasetError, DatasetNotFoundError, datasets_root, download_or_explain

_CLASSES = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}   # file names, MD5s, url (torchvision's)
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def _required_files(cls) -> list[tuple[str, str]]:
    """(file name, published MD5) of every file of the release, training batches first."""
    return [tuple(f) for f in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]


def _files_present(cls, root) -> bool:
    return all(os.path.isfile(os.path.join(root, cls.base_folder, f)) for f, _ in _required_files(cls))


def _checksum_mismatches(cls, root) -> list[tuple[Path, str]]:
    from torchvision.datasets.utils import check_integrity
    folder = Path(root) / cls.base_folder
    return [(folder / f, "MD5 differs from the published one") for f, md5 in _required_files(cls)
            if not check_integrity(str(folder / f), md5)]


def _candidate_roots(name: str, data) -> list[Path]:
    """Folders that may hold ``cifar-*``: ``--data`` (or its parent when it *is* the cifar-* folder),
    else ``<datasets_root>/<name>`` and ``<datasets_root>`` itself."""
    folder = _CLASSES[name].base_folder
    if data:
        data = Path(data)
        return [data.parent] if data.name == folder else [data]
    return [datasets_root() / name, datasets_root()]


def _fix(cls, root) -> str:
    return (f"delete {Path(root) / cls.base_folder} and run again with --download (it fetches {cls.url} and "
            f"checks its MD5), or untar {cls.filename} there again.")


def load_cifar(name: str, data=None, download: bool = False) -> tuple[ArraySplit, ArraySplit]:
    """Return (train, test) of ``name`` ('cifar10' or 'cifar100') as uint8 NCHW arrays.

    Raises DatasetNotFoundError (files missing) or BadDatasetError (a file damaged: every one named)."""
    cls = _CLASSES[name]
    roots = _candidate_roots(name, data)
    root = next((r for r in roots if _files_present(cls, r)), None)
    if download:
        target = root or roots[0]
        bad = _checksum_mismatches(cls, target) if root is not None else []
        if root is None or bad:
            if bad:
                print(f"{name}: {len(bad)} file(s) differ from the published MD5 "
                      f"({', '.join(p.name for p, _ in bad)}); fetching {cls.filename} again", flush=True)
            download_or_explain(name, target, lambda: datasets.utils.download_and_extract_archive(
                cls.url, str(target), filename=cls.filename, md5=cls.tgz_md5))
            root = target if _files_present(cls, target) else None
    archive = next((Path(r) / cls.filename for r in roots if (Path(r) / cls.filename).is_file()), None)
    if root is None and archive is not None:       # (--download extracts it: torchvision checks its MD5 first)
        raise DatasetNotFoundError(
            name, f"the python-pickle files are not extracted: {archive.name} is there, unextracted", [archive],
            f"tar -xzf {archive.absolute()} -C {archive.parent.absolute()} (or pass --download, which checks its MD5 "
            "and extracts it).")
    if root is None:
        looked_at = [Path(r) / cls.base_folder for r in roots]
        raise DatasetNotFoundError(
            name, f"the python-pickle files ({', '.join(f for f, _ in _required_files(cls))}) are missing", looked_at,
            ("" if download else f"pass --download to fetch {cls.url} into {roots[0]}, or ") + "download and untar "
            f"{cls.url} yourself and point --data at the folder that holds {cls.base_folder}/ (or at that folder "
            "itself).")
    return _read(name, cls, Path(root) / cls.base_folder)


def _read(name: str, cls, folder: Path) -> tuple[ArraySplit, ArraySplit]:
    """Parse and check every pickle; one error listing every bad file."""
    num_classes, bad, parts = _NUM_CLASSES[name], [], {}
    for f, _ in _required_files(cls):
        try:
            parts[f] = _parse_meta(folder / f, cls.meta["key"], num_classes) if f == cls.meta["filename"] \
                else _parse_batch(folder / f, num_classes)
        except Exception as e:  # noqa: BLE001 -- EOFError, UnpicklingError, KeyError, ValueError: all "damaged"
            bad.append((folder / f, _pickle_reason(e)))
    if bad:
        raise BadDatasetError.files(name, bad, _fix(cls, folder.parent), what="pickle files")
    train = [parts[f] for f, _ in cls.train_list]
    test = [parts[f] for f, _ in cls.test_list]
    return _to_split(train, folder), _to_split(test, folder)


def _pickle_reason(e: Exception) -> str:
    if isinstance(e, EOFError):
        return "truncated: the pickle ends early"
    if isinstance(e, pickle.UnpicklingError):
        return f"not a pickle ({' '.join(str(e).split())[:150]})"       # (one line: its message may hold newlines)
    return f"{type(e).__name__}: {' '.join(str(e).split())[:150]}"


def _unpickle(path: Path):
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    if not isinstance(entry, dict):
        raise ValueError(f"holds a {type(entry).__name__}, not the release's dict")
    return entry


def _parse_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path)
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", None)
        raise ValueError(f"'data' is not a uint8 N x 3072 array (got {type(data).__name__} {shape}"
                         + (f" of dtype {dtype})" if dtype is not None else ")"))
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),):
        raise ValueError(f"{len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1} (min {labels.min()}, max {labels.max()})")
    return data, labels


def _parse_meta(path: Path, key: str, num_classes: int) -> list:
    names = _unpickle(path).get(key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise ValueError(f"{key!r} does not list {num_classes} class names")
    return names


def _to_split(batches: list[tuple[np.ndarray, np.ndarray]], folder: Path) -> ArraySplit:
    data = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32)       # rows are R, G, B planes
    labels = np.concatenate([y for _, y in batches])
    return ArraySplit(torch.from_numpy(data.copy()), torch.from_numpy(labels), str(folder.absolute()))
