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
REPO = Path(__file__).resolve().parents[1]


def loader_args(**kw) -> argparse.Namespace:
    """Every field ``data.build_loaders`` reads, at the engine's defaults (synthetic data), with ``kw`` on top
    (the evaluation batch and the loader resolved as the engine resolves them: twice the training batch, and the
    dataset's default loader; left unset where the dataset cannot be described, as build_loaders then says)."""
    base = dict(dataset="synthetic", data=None, download=False, subset=None, eval_subset=None, val_split=0,
                batch_size=64, workers=0, loader=None, seed=0, views=1, pad_mode="zero", image_size=None,
                classes=None, eval_only=None)
    base.update(kw)
    base.setdefault("eval_batch_size", None)
    base["eval_batch_size"] = base["eval_batch_size"] or 2 * base["batch_size"]
    if base["loader"] is None:
        from data import DatasetError, dataset_info
        try:
            base["loader"] = dataset_info(base["dataset"], base["data"], image_size=base["image_size"],
                                          classes=base["classes"]).default_loader
        except (DatasetError, ValueError):
            pass
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


# --------------------------------------------------------------------------- class folders (--dataset folder)

FOLDER_CLASSES = ("cat", "dog", "zebra")
# (PIL format, PIL mode, extension) in turn for the k-th image of a class in a mixed tree
MIXED = (("JPEG", "RGB", ".jpg"), ("PNG", "L", ".png"), ("PNG", "RGBA", ".PNG"), ("JPEG", "L", ".jpeg"),
         ("PNG", "P", ".png"), ("BMP", "RGB", ".bmp"))


def folder_image(c: int, k: int, fmt: str = "PNG", mode: str = "RGB", size=(20, 20)) -> bytes:
    """Class ``c``'s colour with a little noise seeded by (c, k), so every image differs; saved as ``fmt`` after
    converting to ``mode`` (greyscale 'L', 'RGBA' with a half-transparent alpha, palette 'P')."""
    w, h = size
    rng = np.random.default_rng(1000 * c + k)
    rgb = np.clip(np.array(colour(c))[None, None] + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        image.putalpha(128)
    elif mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def write_folder(root: Path, classes=FOLDER_CLASSES, per_split=(("train", 6), ("val", 2)), size: int = 20,
                 mixed: bool = False) -> Path:
    """``root/<split>/<class>/<k>.<ext>``: PNG RGB images of ``size`` x ``size``, or with ``mixed`` JPEG, PNG and
    BMP in turn, greyscale, RGBA and palette, and odd sizes around ``size`` (w = size + k % 5, h = size + 2 k % 7)."""
    for split, n in per_split:
        for c, name in enumerate(classes):
            for k in range(n):
                fmt, mode, ext = MIXED[k % len(MIXED)] if mixed else ("PNG", "RGB", ".png")
                shape = (size + k % 5, size + 2 * k % 7) if mixed else (size, size)
                write(root / split / name / f"{name}_{k}{ext}", folder_image(c, k + 100 * len(split), fmt, mode, shape))
    return root


def fashion_mnist_as_folders(root: Path, subset: int, eval_subset: int, seed: int = 0) -> Path:
    """Debian's Fashion-MNIST as PNG class folders: the ``subset`` training and ``eval_subset`` test images that
    ``--dataset fashion-mnist --subset N --eval-subset M --seed S`` trains and tests on (the same stratified
    draws), as their 28 x 28 greyscale originals in ``root/train/<class>/`` and ``root/val/<class>/``. Class
    folders are named ``<index>-<name>`` so that ImageFolder's sorted order is the built-in label order."""
    import torch
    from torchvision.datasets import FashionMNIST

    from data.fashion_mnist import SYSTEM_DIR, read_idx
    from data.loaders import _EVAL_SUBSET, _SUBSET, stratified_split
    names = [f"{i}-{c.replace('/', '-').replace(' ', '_')}" for i, c in enumerate(FashionMNIST.classes)]
    for split, prefix, n, stream in (("train", "train", subset, _SUBSET), ("val", "t10k", eval_subset, _EVAL_SUBSET)):
        images = read_idx(SYSTEM_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = torch.from_numpy(read_idx(SYSTEM_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        chosen = stratified_split(labels, n, seed, stream)[1] if n < len(labels) else torch.arange(len(labels))
        for i in chosen.tolist():
            folder = root / split / names[int(labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], "L").save(folder / f"{i:05d}.png")
    return root


def run_check(capsys, *args) -> tuple[int, str, str]:
    """scripts/check_dataset.py's main in this process (a subprocess would pay torch's import again)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("check_dataset", REPO / "scripts" / "check_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    code = script.main(["--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err
