"""What every dataset shares: its static description, where its files live, the error when they don't.

Every dataset family module returns a training and a test :class:`ArraySplit` (or, for ImageNet, two
``ImageFolder`` datasets); :mod:`data.loaders` turns them into loaders.

Where files are looked for: ``--data`` if given, else ``$OKD_DATASETS/<name>`` if that variable is
set, else ``./datasets/<name>`` relative to the current directory (Fashion-MNIST additionally falls
back to the Debian package's ``/usr/share/datasets/fashion-mnist``).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

import torch

DATASET_NAMES = ("cifar10", "cifar100", "tinyimagenet", "imagenet", "fashion-mnist", "synthetic")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(RuntimeError):
    """A dataset problem that is the user's to fix; ``engine.trainer.main`` prints it without a traceback."""


class DatasetNotFoundError(DatasetError):
    """A dataset's files are missing. One line: what is missing, every path looked at, and the fix."""

    def __init__(self, name: str, missing: str, looked_at: Sequence[os.PathLike | str], fix: str):
        paths = ", ".join(str(Path(p).absolute()) for p in looked_at)
        super().__init__(f"dataset {name!r}: {missing}; looked at {paths}. To get it: {fix}")
        self.name, self.missing, self.looked_at, self.fix = name, missing, [str(p) for p in looked_at], fix

    def __reduce__(self):  # picklable, e.g. out of a spawned worker
        return type(self), (self.name, self.missing, self.looked_at, self.fix)


class BadDatasetError(DatasetError):
    """A dataset's files are there but damaged (a truncated JPEG, pickle or .gz) or laid out wrongly (a
    missing class folder, a malformed annotation file). One line: what is wrong, which file(s), the fix.

    Its constructor takes the message alone, so that a DataLoader worker's error is re-raised in the main
    process as this type; the worker's traceback that torch prepends is then cut away again."""

    def __init__(self, message: str):
        if "\nOriginal Traceback" in message:  # re-raised from a DataLoader worker: keep our own line
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)

    @classmethod
    def files(cls, name: str, bad: Sequence[tuple[os.PathLike | str, str]], fix: str,
              what: str = "files", shown: int = 5) -> "BadDatasetError":
        """The error for ``bad`` = [(path, reason), ...]: the count, the first ``shown`` paths with their
        reason, and the fix."""
        listed = "; ".join(f"{p} ({reason})" for p, reason in list(bad)[:shown])
        more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
        count = f"{len(bad)} {what if len(bad) > 1 else what.rstrip('s')} cannot be read"
        return cls(f"dataset {name!r}: {count}: {listed}{more}. Fix: {fix}")


def is_hidden(name: str) -> bool:
    """Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.JPEG``) are never data."""
    return name.startswith(".")


def visible_dirs(folder: os.PathLike | str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not is_hidden(e.name) and e.is_dir())


def image_files(folder: os.PathLike | str, suffixes: Iterable[str] = (".jpeg", ".jpg", ".png")) -> list[Path]:
    """Every non-hidden image file under ``folder`` (recursively, hidden sub-folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found += [Path(dirpath, f) for f in filenames if not is_hidden(f) and f.lower().endswith(tuple(suffixes))]
    return sorted(found)


def decode_rgb(path: os.PathLike | str):
    """Decode an image file completely into an RGB ``PIL.Image`` (greyscale, CMYK, palette and a PNG
    named ``.JPEG`` all work: PIL goes by the content, not the name). Raises ``OSError`` (a truncated
    file, or ``PIL.UnidentifiedImageError`` for a foreign one) or PIL's ``DecompressionBombError``."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()                         # the whole file: a truncated JPEG fails here, not later
        return im.convert("RGB")


def image_problem(path: os.PathLike | str) -> Optional[str]:
    """None if ``path`` decodes completely, else a short reason (for lists of bad files)."""
    try:
        decode_rgb(path)
    except Exception as e:  # noqa: BLE001 -- OSError, UnidentifiedImageError, DecompressionBombError, SyntaxError
        return _reason(e)
    return None


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) < 160 else text[:157] + "..."


def download_or_explain(name: str, target, fetch) -> None:
    """Run ``fetch()`` (a torchvision download); a failure (no internet, a proxy, a full disk) becomes one
    DatasetNotFoundError that says so, instead of a traceback. Folders the failed download created (``target``
    and any missing parent) are removed with what they hold, so a failure leaves nothing behind."""
    created = Path(target).absolute()
    while not created.parent.exists():
        created = created.parent
    created = None if created.exists() else created     # the topmost folder this download would create
    try:
        fetch()
    except BaseException as e:  # noqa: BLE001 -- urllib, ssl, OSError, torchvision's RuntimeError: all the same to the user
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if not isinstance(e, Exception):   # Ctrl-C: cleaned up, and still an interruption
            raise
        raise DatasetNotFoundError(
            name, f"--download failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
            [target], "check the internet connection, or fetch the files by hand and point --data at them "
                      "(README, 'Datasets').") from None


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset. ``mean``/``std`` are per-channel on the [0, 1] scale (the
    ``Normalize`` after ``ToTensor``); ``crop_padding`` is the zero padding of the training
    ``RandomCrop(image_size, padding)`` (0 for ImageNet, which uses ``RandomResizedCrop``);
    ``official_train``/``official_test`` are the image counts of the official release (None: no release)."""
    name: str
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    crop_padding: int
    official_train: Optional[int] = None
    official_test: Optional[int] = None


_INFOS = {
    # Official counts: CIFAR 50,000 / 10,000 (Krizhevsky 2009, "Learning multiple layers of features from tiny
    # images"); TinyImageNet 100,000 train / 10,000 val (cs231n); ILSVRC-2012 1,281,167 train / 50,000 val
    # (Russakovsky et al., IJCV 2015, Table 2); Fashion-MNIST 60,000 / 10,000 (Xiao et al., arXiv:1708.07747).
    "cifar10": DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, 50000, 10000),
    "cifar100": DatasetInfo("cifar100", 100, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 4,
                            50000, 10000),
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, 64, IMAGENET_MEAN, IMAGENET_STD, 4, 100000, 10000),
    "imagenet": DatasetInfo("imagenet", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, 0, 1281167, 50000),
    # Grey 28x28 zero-padded to 32x32 and replicated to 3 channels (see data/fashion_mnist.py); the
    # usual Fashion-MNIST statistics, measured on the 28x28 originals, replicated to the 3 channels.
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 32, (0.2860,) * 3, (0.3530,) * 3, 4, 60000, 10000),
    # Synthetic images are built to have roughly this mean and spread (data/synthetic.py).
    "synthetic": DatasetInfo("synthetic", 10, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 4),
}
assert tuple(_INFOS) == DATASET_NAMES


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (one of :data:`DATASET_NAMES`)."""
    try:
        return _INFOS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}") from None


class ArraySplit(NamedTuple):
    """One split held in memory: ``images`` uint8 N x 3 x H x W, ``labels`` int64 N."""
    images: torch.Tensor
    labels: torch.Tensor


def datasets_root() -> Path:
    """``$OKD_DATASETS`` if set, else ``./datasets`` (relative to the current directory)."""
    return Path(os.environ.get("OKD_DATASETS") or "datasets")


def default_dir(name: str, data: Optional[os.PathLike | str]) -> Path:
    """``--data`` if given, else ``<datasets_root()>/<name>``."""
    return Path(data) if data else datasets_root() / name
