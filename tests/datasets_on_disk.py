"""Small datasets written in each release's real on-disk format (CIFAR pickles, IDX files, TinyImageNet and
ImageNet folders), with the full class counts the loaders check but tiny images, for the data tests."""
from __future__ import annotations

import argparse
import gzip
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

TINY_WNIDS = [f"n{i:08d}" for i in range(200)][::-1]      # wnids.txt is not sorted in the release either
IMAGENET_WNIDS = [f"n{i:08d}" for i in range(1000)]


def loader_args(**kw) -> argparse.Namespace:
    """Every field ``data.build_loaders`` reads, at the engine's defaults (synthetic data), with ``kw`` on top."""
    base = dict(dataset="synthetic", data=None, download=False, subset=None, eval_subset=None, val_split=0,
                batch_size=64, eval_batch_size=None, workers=0, loader=None, seed=0, views=1, pad_mode="zero",
                image_size=None, classes=None)
    base.update(kw)
    return argparse.Namespace(**base)


def colour(c: int) -> tuple[int, int, int]:
    """A distinct, JPEG-stable colour per class index."""
    return (40 + c % 7 * 30, 250 - c % 11 * 20, 20 + c % 13 * 15)


def image_bytes(rgb=(10, 20, 30), size: int = 8, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    value = rgb if mode == "RGB" else (rgb[0] if mode == "L" else (0, 0, 0, 0))
    if mode == "CMYK":
        value = (255 - rgb[0], 255 - rgb[1], 255 - rgb[2], 0)
    Image.new(mode, (size, size), value).save(buf, fmt)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- CIFAR

def cifar_rows(values: list[int]) -> np.ndarray:
    """One row per image in CIFAR's layout (1024 R, 1024 G, 1024 B); image k is constant v, v+1, v+2."""
    return np.stack([np.repeat(np.array([v, v + 1, v + 2], np.uint8), 1024) for v in values])


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    v = 1
    for b in range(1, 6):
        values = list(range(v, v + 3 * per_batch, 3))
        v += 3 * per_batch
        entry = {"batch_label": f"batch {b}", "data": cifar_rows(values),
                 "labels": [(x // 3) % 10 for x in values], "filenames": [f"{x}.png" for x in values]}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(entry))
    test_values = list(range(200, 200 + 3 * n_test, 3))
    (folder / "test_batch").write_bytes(pickle.dumps(
        {"batch_label": "test", "data": cifar_rows(test_values), "labels": [x % 10 for x in test_values]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def write_cifar100(root: Path, n_train: int = 8, n_test: int = 4) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, start in (("train", n_train, 1), ("test", n_test, 100)):
        values = list(range(start, start + 3 * n, 3))
        (folder / name).write_bytes(pickle.dumps({"data": cifar_rows(values), "fine_labels": [x % 100 for x in values],
                                                  "coarse_labels": [x % 20 for x in values]}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"f{i}" for i in range(100)],
                                                "coarse_label_names": [f"c{i}" for i in range(20)]}))
    return folder


# --------------------------------------------------------------------------- Fashion-MNIST

def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(folder: Path, compress: bool, n_train: int = 5, n_test: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(1, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            blob = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            (folder / (name + ".gz" if compress else name)).write_bytes(gzip.compress(blob) if compress else blob)


# --------------------------------------------------------------------------- TinyImageNet

TINY_VAL = [("val_0.JPEG", 1), ("val_1.JPEG", 2), ("val_2.JPEG", 1), ("val_3.JPEG", 0)]   # (name, class index)


def write_tinyimagenet(parent: Path, per_class: int = 1, size: int = 8) -> Path:
    """200 classes x ``per_class`` train images (colour = class, red + k for the k-th), 4 val images labelled only by
    val_annotations.txt (val_3 greyscale, as some of the release's). Class index c = sorted(TINY_WNIDS)[c]."""
    root = parent / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    wnids = sorted(TINY_WNIDS)
    for c, w in enumerate(wnids):
        (root / "train" / w).mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(per_class):                                  # red + k: every image distinct
            r, g, b = colour(c)
            write(root / "train" / w / "images" / f"{w}_{k}.JPEG", image_bytes((r + k, g, b), size))
    for name, c in TINY_VAL:
        write(root / "val" / "images" / name, image_bytes(colour(c), size))
    write(root / "val" / "images" / "val_3.JPEG", image_bytes((128, 128, 128), size, mode="L"))
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnids[c]}\t0\t0\t7\t7\n" for name, c in TINY_VAL))
    return root


# --------------------------------------------------------------------------- ImageNet

def write_imagenet(root: Path, train_per_class: int = 1, val_per_class: int = 1, flat_val: bool = False) -> Path:
    """1000 class folders in train/ (and val/, or flat val/ images ILSVRC2012_val_<k>.JPEG whose class is
    k % 1000, as the archive unpacks), 8x8 JPEGs coloured by class."""
    for c, w in enumerate(IMAGENET_WNIDS):
        blob = image_bytes(colour(c))
        for k in range(train_per_class):
            write(root / "train" / w / f"{w}_{k}.JPEG", blob)
        for k in range(val_per_class):
            name = f"ILSVRC2012_val_{k * 1000 + c + 1:08d}.JPEG"
            write(root / "val" / ("" if flat_val else w) / name, blob)
    return root
