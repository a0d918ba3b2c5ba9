"""TinyImageNet-200 from the official unzipped layout.

Layout: ``tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG,
val/val_annotations.txt}``. ``--data`` may point at ``tiny-imagenet-200`` or at its parent; without it
``./datasets/tinyimagenet`` (or under ``$OKD_DATASETS``). ``--download`` fetches and unzips
http://cs231n.stanford.edu/tiny-imagenet-200.zip there.

* **Class index = position of the wnid in the sorted list of wnids** (``wnids.txt`` itself is not
  sorted); this is also the order torchvision's ``ImageFolder`` gives the ``train/`` folders.
* The test split is the official validation set (10,000 images, 50 per class), labelled from
  ``val/val_annotations.txt``. It is **not** read as an ``ImageFolder``: ``val/images`` is one flat
  folder, and reading it as a class folder gives every image label 0 (the classic ~0.5 % accuracy).
  The unlabelled ``test/`` folder is not used.
* Images are decoded once (as RGB; a few are greyscale) into uint8 N x 3 x 64 x 64 and cached in
  ``tiny-imagenet-200/okd_uint8_cache.pt`` (written atomically; skipped with a warning when the folder
  is read-only). Delete the file to force a re-decode.

Training augmentation (in :mod:`data.loaders`): RandomCrop(64, padding=4, zero fill) +
RandomHorizontalFlip(0.5), then /255 and Normalize with the ImageNet mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225). Test: /255 + Normalize.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .common import ArraySplit, DatasetNotFoundError, datasets_root, download_or_explain

FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
CACHE = "okd_uint8_cache.pt"
CACHE_VERSION = 1
SIZE = 64


def _candidates(data=None) -> list[Path]:
    base = Path(data) if data else datasets_root() / "tinyimagenet"
    return [base] if base.name == FOLDER else [base / FOLDER, base]


def _is_root(path: Path) -> bool:
    return (path / "wnids.txt").is_file() and (path / "train").is_dir() and \
        (path / "val" / "val_annotations.txt").is_file()


def find_root(data=None, download: bool = False) -> Path:
    """The ``tiny-imagenet-200`` folder, downloading it first when asked."""
    candidates = _candidates(data)
    if download and not any(_is_root(c) for c in candidates):
        from torchvision.datasets.utils import download_and_extract_archive
        parent = candidates[0].parent if candidates[0].name == FOLDER else candidates[-1]
        download_or_explain("tinyimagenet", parent, lambda: download_and_extract_archive(URL, str(parent), md5=MD5))
    for c in candidates:
        if _is_root(c):
            return c
    raise DatasetNotFoundError(
        "tinyimagenet", "wnids.txt, train/ or val/val_annotations.txt is missing", candidates,
        f"pass --download, or download {URL}, unzip it and point --data at {FOLDER}/ (or its parent).")


def class_names(root: Path) -> list[str]:
    """The 200 wnids, sorted: class index = position in this list."""
    return sorted(line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip())


def file_lists(root: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(train, val) lists of (image path, class index); val labels come from val_annotations.txt."""
    index = {w: i for i, w in enumerate(class_names(root))}
    train = [(p, index[w]) for w in index for p in sorted((root / "train" / w / "images").glob("*.JPEG"))]
    val = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            val.append((root / "val" / "images" / fields[0], index[fields[1]]))
    return train, val


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (SIZE, SIZE):
            im = im.resize((SIZE, SIZE), Image.BILINEAR)
        return np.asarray(im).transpose(2, 0, 1)


def _decode_all(items: list[tuple[Path, int]]) -> ArraySplit:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        arrays = list(pool.map(_decode, [p for p, _ in items]))
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8)
    return ArraySplit(images, torch.tensor([y for _, y in items], dtype=torch.int64))


def load_tinyimagenet(data=None, download: bool = False) -> tuple[ArraySplit, ArraySplit]:
    """Return (train, val-as-test) as uint8 N x 3 x 64 x 64 and int64 labels, using the cache when valid."""
    root = find_root(data, download)
    wnids = class_names(root)
    cache = root / CACHE
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob.get("version") == CACHE_VERSION and blob.get("wnids") == wnids:
                return ArraySplit(*blob["train"]), ArraySplit(*blob["test"])
        except Exception as err:  # a truncated or foreign file: rebuild it
            warnings.warn(f"ignoring unreadable cache {cache}: {err}")
    train_items, val_items = file_lists(root)
    train, test = _decode_all(train_items), _decode_all(val_items)
    blob = {"version": CACHE_VERSION, "wnids": wnids, "train": tuple(train), "test": tuple(test)}
    _atomic_save(blob, cache)
    return train, test


def _atomic_save(obj, path: Path) -> None:
    """Write to a temp file in the same folder, then ``os.replace``; warn (and go on) if that fails."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        warnings.warn(f"could not write the decoded-image cache {path} ({err}); "
                      "the JPEGs will be decoded again next time")
