"""Fashion-MNIST from its raw IDX files (gzipped or not), parsed here.

Files: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, looked for in ``--data`` (and its
``FashionMNIST/raw`` subfolder, torchvision's layout), else ``./datasets/fashion-mnist`` (or under
``$OKD_DATASETS``), else ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install
dataset-fashion-mnist``). ``--download`` fetches them with torchvision.

So that the 32x32 CIFAR backbones run unchanged, every 28x28 grey image is **zero-padded by 2 pixels on
each side to 32x32 and its channel replicated 3 times** (uint8 N x 3 x 32 x 32). Training augmentation
(in :mod:`data.loaders`): RandomCrop(32, padding=4, zero fill) + RandomHorizontalFlip(0.5); then /255
and Normalize with the usual Fashion-MNIST statistics (0.2860,) / (0.3530,) replicated to 3 channels
(measured on the 28x28 originals, so the padded images have a slightly lower mean). Test: /255 + Normalize.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import ArraySplit, DatasetNotFoundError, datasets_root, download_or_explain

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: os.PathLike | str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzip detected from its magic bytes, not its name).

    Header: two zero bytes, the type code 0x08 (uint8), the number of dimensions, then each
    dimension as a big-endian int32; then the data. Raises ``ValueError`` naming the file otherwise.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'empty'}, "
                         f"expected 000008xx)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {dims} ({int(np.prod(dims))} bytes) "
                         f"but the file holds {len(raw) - start} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _find(folder: Path, stem: str):
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def candidate_dirs(data=None) -> list[Path]:
    if data:
        return [Path(data), Path(data) / "FashionMNIST" / "raw"]
    local = datasets_root() / "fashion-mnist"
    return [local, local / "FashionMNIST" / "raw", SYSTEM_DIR]


def load_fashion_mnist(data=None, download: bool = False) -> tuple[ArraySplit, ArraySplit]:
    """Return (train, test) as uint8 N x 3 x 32 x 32 (padded, grey replicated) and int64 labels."""
    dirs = candidate_dirs(data)
    wanted = [stem for pair in FILES.values() for stem in pair]
    if download and not any(all(_find(folder, stem) for stem in wanted) for folder in dirs):
        from torchvision.datasets import FashionMNIST
        download_or_explain("fashion-mnist", dirs[0],  # -> <dir>/FashionMNIST/raw
                            lambda: FashionMNIST(str(dirs[0]), train=True, download=True))
    for folder in dirs:
        paths = {stem: _find(folder, stem) for stem in wanted}
        if all(paths.values()):
            return tuple(_split(paths[i], paths[l]) for i, l in FILES.values())
    raise DatasetNotFoundError(
        "fashion-mnist", f"the IDX files {', '.join(wanted)} (optionally .gz) are missing", dirs,
        "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), "
        "or pass --download, or put the files from https://github.com/zalandoresearch/fashion-mnist "
        "into a folder and point --data at it.")


def _split(images_path: Path, labels_path: Path) -> ArraySplit:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} / {labels_path}: expected N x 28 x 28 images and N labels, "
                         f"got {images.shape} and {labels.shape}")
    x = F.pad(torch.from_numpy(images.copy()), (2, 2, 2, 2))          # 28x28 -> 32x32, zeros
    x = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()             # grey -> 3 equal channels
    return ArraySplit(x, torch.from_numpy(labels.astype(np.int64)))
