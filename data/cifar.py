"""CIFAR-10 / CIFAR-100 from the standard python-pickle layout, parsed by torchvision.

Layout: ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<root>/cifar-100-python/{train, test, meta}``. ``--data`` may point at ``<root>`` or at the
``cifar-*`` folder itself; without it ``<root>`` is ``./datasets/cifar10`` / ``./datasets/cifar100``
(or under ``$OKD_DATASETS``). ``--download`` fetches the archive with torchvision into that root.

Both splits are returned whole as uint8 N x 3 x 32 x 32 plus int64 labels (CIFAR-100: fine labels).
Training augmentation (in :mod:`data.loaders`): RandomCrop(32, padding=4, zero fill) +
RandomHorizontalFlip(0.5); then ToTensor-style /255 and Normalize with the mean/std of
:func:`data.common.dataset_info` (CIFAR-100 (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565, 0.2761);
CIFAR-10 (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616)). Test: /255 + Normalize only.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torchvision import datasets

from .common import ArraySplit, DatasetNotFoundError, datasets_root, download_or_explain


class _ExistenceCheck:
    """Mix-in for torchvision's CIFAR classes: when *loading*, only check that the files exist (the
    md5 check rejects small generated test files); ``download`` keeps torchvision's md5 check."""

    def _check_integrity(self) -> bool:
        return _files_present(type(self), self.root)

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def download(self) -> None:
        if not super()._check_integrity():  # torchvision's md5 check
            datasets.utils.download_and_extract_archive(self.url, self.root, filename=self.filename,
                                                        md5=self.tgz_md5)


class CIFAR10(_ExistenceCheck, datasets.CIFAR10):
    pass


class CIFAR100(_ExistenceCheck, datasets.CIFAR100):
    pass


def _required_files(cls) -> list[str]:
    return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _files_present(cls, root) -> bool:
    return all(os.path.isfile(os.path.join(root, cls.base_folder, f)) for f in _required_files(cls))


_CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def _candidate_roots(name: str, data) -> list[Path]:
    """Folders that may hold ``cifar-*``: ``--data`` (or its parent when it *is* the cifar-* folder),
    else ``<datasets_root>/<name>`` and ``<datasets_root>`` itself."""
    folder = _CLASSES[name].base_folder
    if data:
        data = Path(data)
        return [data.parent] if data.name == folder else [data]
    return [datasets_root() / name, datasets_root()]


def load_cifar(name: str, data=None, download: bool = False) -> tuple[ArraySplit, ArraySplit]:
    """Return (train, test) of ``name`` ('cifar10' or 'cifar100') as uint8 NCHW arrays."""
    cls = _CLASSES[name]
    roots = _candidate_roots(name, data)
    if download and not any(_files_present(cls, root) for root in roots):
        download_or_explain(name, roots[0], lambda: cls(str(roots[0]), train=True, download=True))
    for root in roots:
        if _files_present(cls, root):
            return tuple(_to_split(cls(str(root), train=train)) for train in (True, False))
    looked_at = [Path(r) / cls.base_folder for r in roots]
    raise DatasetNotFoundError(
        name, f"the python-pickle files ({', '.join(_required_files(cls))}) are missing", looked_at,
        f"pass --download to fetch {cls.url} into {roots[0]}, or download and untar it yourself "
        f"and point --data at the folder that holds {cls.base_folder}/ (or at that folder itself).")


def _to_split(ds) -> ArraySplit:
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW uint8
    return ArraySplit(images, torch.as_tensor(ds.targets, dtype=torch.int64))
