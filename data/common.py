"""What every dataset shares: its static description, where its files live, the error when they don't.

Every dataset family module returns a training and a test :class:`ArraySplit` (or, for ImageNet, two
``ImageFolder`` datasets; for ``folder``, a :class:`data.folder.FolderData`); :mod:`data.loaders` turns them
into loaders.

Where files are looked for: ``--data`` if given, else ``$OKD_DATASETS/<name>`` if that variable is
set, else ``./datasets/<name>`` relative to the current directory (Fashion-MNIST additionally falls
back to the Debian package's ``/usr/share/datasets/fashion-mnist``).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

import torch

from .files import checksummed, verified, write_atomically


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(RuntimeError):
    """A dataset problem that is the user's to fix; ``engine.trainer.main`` prints it without a traceback."""


class DataFlagError(DatasetError, ValueError):
    """A data flag that does not fit the dataset (``--image-size`` on CIFAR, ``--classes`` naming a class the
    tree has not, ``--val-split`` beside a ``val/`` and a ``test/`` folder). One line: the flag and the fix.
    A ValueError too, as :func:`data.build_loaders` promises for flags that do not fit."""


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
        listed = "; ".join(f"{printable(p)} ({printable(reason)})" for p, reason in list(bad)[:shown])
        more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
        count = f"{len(bad)} {what if len(bad) > 1 else what.rstrip('s')} cannot be read"
        return cls(f"dataset {name!r}: {count}: {listed}{more}. Fix: {fix}")


def printable(text) -> str:
    """``text`` (a path or a message naming one) that any terminal, log or JSON file takes: a file name that is not
    valid UTF-8, which Python reads with its bytes as surrogate escapes (``'d\\udcf6g.png'``, unprintable under a
    strict UTF-8 output), shows those bytes as ``\\xf6`` (``d\\xf6g.png``); anything else is unchanged."""
    return os.fsencode(str(text)).decode("utf-8", "backslashreplace")


def is_hidden(name: str) -> bool:
    """Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.JPEG``) are never data."""
    return name.startswith(".")


# Names of files, never of class folders: a symbolic link so named that points to nothing is no missing class.
FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif", ".txt", ".csv",
                 ".json", ".md", ".xml", ".mat", ".tar", ".gz", ".zip", ".pt")


def visible_dirs(folder: os.PathLike | str, used: Optional[Iterable[str]] = None) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder`` (symbolic links to folders included). A symbolic
    link whose target does not exist (a network share that is not mounted looks so) and that names a class folder
    the caller uses raises :class:`BadDatasetError` naming the link and its target: left out, its class would
    vanish without a word. ``used``: the class folders the caller reads (a --classes list; ``()``: none, the
    listing only looks); None: every folder is a class (the broken links named like a file, e.g. ``x.jpg``, are
    not: :data:`FILE_SUFFIXES`)."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not is_hidden(e.name)]
    except PermissionError as e:
        unreadable_folder(e)
    wanted = (lambda name: not name.lower().endswith(FILE_SUFFIXES)) if used is None else set(used).__contains__
    broken = [e.path for e in entries if wanted(e.name) and e.is_symlink() and not os.path.exists(e.path)]
    if broken:
        targets = "; ".join(f"{printable(p)} -> {printable(os.readlink(p))}" for p in sorted(broken)[:5])
        more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
        raise BadDatasetError(f"{len(broken)} symbolic link(s) of class folders in {printable(folder)} point to "
                              f"nothing: {targets}{more}. "
                              "Fix: mount or restore what they point to (a network share?), or remove the links")
    return sorted(e.name for e in entries if e.is_dir())


def unreadable_folder(error: OSError) -> None:
    """``os.walk``'s ``onerror``: a folder of a dataset that cannot be listed stops with one line naming it (a
    walk would skip it, and its images would be missing from the dataset without a word)."""
    raise BadDatasetError(f"cannot list the folder {error.filename}: {error.strerror}. Fix: make it readable (e.g. "
                          "chmod -R a+rX), or move it out of the dataset")


def image_files(folder: os.PathLike | str, suffixes: Iterable[str] = (".jpeg", ".jpg", ".png")) -> list[Path]:
    """Every non-hidden image file under ``folder`` (recursively, hidden sub-folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable_folder, followlinks=True):
        check_link_loop(dirpath, str(folder))
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found += [Path(dirpath, f) for f in filenames if not is_hidden(f) and f.lower().endswith(tuple(suffixes))]
    return sorted(found)


def check_link_loop(folder: str, top: str) -> None:
    """Raise :class:`BadDatasetError` when ``folder``, a folder below ``top`` reached by a walk that follows
    symbolic links, is one of its own ancestors or holds one (``cat/back -> ../..``) through folders that are not
    hidden (the walk skips those): the walk would come back to that ancestor and list the same images again and
    again, up to the system's limit of 40 links (each image then counted some 40 times). Called on every folder
    of a walk, top down, it stops at the symbolic link itself and names it with the folder it points to, never
    a real folder reached through it (``cat/back/train``: that is ``train/``, and removing it removes the data)."""
    real, parent = os.path.realpath(folder), os.path.dirname(folder)
    while len(parent) >= len(top):
        above = os.path.realpath(parent)
        if os.path.commonpath([real, above]) == real and not any(map(is_hidden, Path(above).relative_to(real).parts)):
            link = _deepest_link(folder, parent)
            raise BadDatasetError(f"{link} is a symbolic link back to {_walked_as(link)}, a folder above it: its "
                                  "images would be listed again and again; remove the link")
        parent = os.path.dirname(parent)


def _deepest_link(folder: str, above: str) -> str:
    """The last symbolic link on the way from ``above`` down to ``folder`` (``folder`` itself in a walk that
    checks every folder), else ``folder``."""
    path = folder
    while len(path) > len(above) and not os.path.islink(path):
        path = os.path.dirname(path)
    return path if len(path) > len(above) else folder


def _walked_as(link: str) -> str:
    """The folder ``link`` points to, as the nearest folder above it on its own path that is that folder (the
    path the user gave, not one with its symbolic links resolved), else the real path."""
    target, path = os.path.realpath(link), os.path.dirname(link)
    while path and os.path.realpath(path) != target:
        path = os.path.dirname(path) if os.path.dirname(path) != path else ""
    return path or target


HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")    # PIL modes that convert("RGB") clips at 255


def high_bit_reason(mode: str) -> str:
    """Why an image of PIL ``mode`` (one of :data:`HIGH_BIT_MODES`) is refused, in a few words."""
    return (f"a {'float' if mode == 'F' else '16/32-bit'} image (PIL mode {mode}), which the conversion to 8-bit RGB "
            "clips at 255 (near-white); convert it to 8-bit")


def decode_rgb(path: os.PathLike | str):
    """Decode an image file completely into an RGB ``PIL.Image`` (greyscale, CMYK, palette and a PNG
    named ``.JPEG`` all work: PIL goes by the content, not the name). Raises ``OSError`` (a truncated
    file, or ``PIL.UnidentifiedImageError`` for a foreign one, or a 16-bit, 32-bit or float image, PIL modes
    :data:`HIGH_BIT_MODES`, which the conversion would clip to near-white: refused before it is decoded) or
    PIL's ``DecompressionBombError``. The one decoder of every image dataset (folder, TinyImageNet, ImageNet)
    and of ``scripts/check_dataset.py``. Module-level: picklable for DataLoader workers."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in HIGH_BIT_MODES:
            raise OSError(high_bit_reason(im.mode))
        im.load()                         # the whole file: a truncated JPEG fails here, not later
        if im.mode == "P" and "transparency" in im.info:    # the same RGB, without PIL's warning (which names no
            return im.convert("RGBA").convert("RGB")         # file) that such a palette be converted through RGBA
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


def load_or_warn(path: Path, version: int, key: str, who: str) -> Optional[dict]:
    """The cache blob at ``path`` (a checksummed torch file of :func:`save_or_warn`, or JSON) when it is of
    ``version`` and ``key``; else None, and it is rebuilt. A file that cannot be read is named in a warning for
    dataset ``who``, in plain words: damaged, cut short, another version's, or its checksum does not match (not
    the loader's own message, torch's about ``weights_only`` for a file cut short, which says neither)."""
    if not path.is_file():
        return None
    why = "damaged, cut short or written by another version"
    try:
        if path.suffix == ".json":
            blob = json.loads(path.read_text())
        else:
            blob = torch.load(path, weights_only=True)
            if not verified(blob):
                why = "its content does not match its checksum"
                raise ValueError(why)
        if blob.get("version") == version and blob.get("key") == key:
            return blob
    except Exception:  # noqa: BLE001 -- a truncated, damaged or foreign file: rebuilt
        warnings.warn(f"{who}: the cache file {path} cannot be read ({why}); it is rebuilt from the images")
    return None


def save_or_warn(obj, path: Path) -> None:
    """Write a cache atomically, with the checksum of its content (data/files.py); warn (and go on) when that
    fails: a cache that cannot be written is rebuilt next time, never half-written, and one damaged on disk is
    refused when read (:func:`~data.files.verified`)."""
    try:
        buffer = checksummed(obj)
        write_atomically(path, "wb", lambda f: f.write(buffer.getbuffer()))
    except OSError as err:
        warnings.warn(f"could not write the decoded-image cache {path} ({err}); "
                      "the images will be decoded again next time")


def read_class_list(path: os.PathLike | str) -> list[str]:
    """The class folder names of a ``--classes`` file: one a line (a folder name may hold spaces), blank
    lines and lines starting with ``#`` skipped, in the file's order. Checked: the file exists, no name twice,
    no hidden or nested name, at least 2 names; each problem is one :class:`DataFlagError` line."""
    file = Path(path).absolute()
    if file.is_dir():
        raise DataFlagError(f"--classes {file} is a folder. Fix: pass a text file that lists the class folders to "
                            "use, one name a line")
    if not file.is_file():
        raise DataFlagError(f"--classes {file}: no such file. Fix: pass a text file that lists the class "
                            "folders to use, one name a line (e.g. the 100 wnids of an ImageNet-100 list)")
    names = [line.strip() for line in file.read_text(errors="replace").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    odd = [n for n in names if is_hidden(n) or "/" in n or "\\" in n]
    if odd:
        raise DataFlagError(f"--classes {file}: {odd[0]!r} is not a class folder name (hidden or a path). Fix: "
                            "list the folder names under train/, one a line")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataFlagError(f"--classes {file} lists {', '.join(twice[:5])} more than once. Fix: list each class once")
    if len(names) < 2:
        raise DataFlagError(f"--classes {file} lists {len(names)} class{'es' if len(names) != 1 else ''}; a "
                            "classifier needs at least 2. Fix: list the class folders to use, one a line")
    return names


def some(names, k: int = 5) -> str:
    """The first ``k`` of ``names`` (sorted, as text) and how many more."""
    names = sorted(str(n) for n in names)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def class_difference(trained: Sequence[str], found: Sequence[str]) -> Optional[str]:
    """None when ``found`` is ``trained`` (the same class names in the same label order), else one phrase
    naming the difference, for the engine's refusal to evaluate a checkpoint on other classes, e.g.
    ``"it was trained on 3 classes, this data has 4: yak is new"`` or ``"... the same 3 classes in another
    order: label 0 is dog here, cat in training"``."""
    trained, found = list(trained), list(found)
    if trained == found:
        return None
    head = f"it was trained on {len(trained)} classes, this data has {len(found)}"
    new, gone = [c for c in found if c not in set(trained)], [c for c in trained if c not in set(found)]
    if new or gone:
        return head + "".join([f": {some(new, 3)} {'is' if len(new) == 1 else 'are'} new" if new else "",
                               f"{'; ' if new else ': '}{some(gone, 3)} {'is' if len(gone) == 1 else 'are'} missing"
                               if gone else ""])
    k = next(i for i, (a, b) in enumerate(zip(trained, found)) if a != b)
    return (f"it was trained on the same {len(trained)} classes in another order: label {k} is {found[k]} here, "
            f"{trained[k]} in training")


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
    except BaseException as e:  # noqa: BLE001 -- urllib, ssl, OSError, torchvision's RuntimeError: all one to the user
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if not isinstance(e, Exception):   # Ctrl-C: cleaned up, and still an interruption
            raise
        raise DatasetNotFoundError(
            name, f"--download failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
            [target], "check the internet connection, or fetch the files by hand and point --data at them "
                      "(README, 'Datasets').") from None


PROTOCOLS = ("cifar", "imagenet")


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset. ``mean``/``std`` are per-channel on the [0, 1] scale (the ``Normalize``
    after ``ToTensor``); ``crop_padding`` is the padding (zeros, or reflected with --pad-mode) of the training
    ``RandomCrop(image_size, padding)`` (0 for ImageNet, which uses ``RandomResizedCrop``);
    ``official_train``/``official_test`` are the image counts of the official release (None: no release).

    ``classes``: the class names in label order where the data names them (``folder``, and ImageNet once
    loaded or with ``--classes``), else None (the dataset's fixed classes). ``protocol``: ``'cifar'``
    (RandomCrop with padding + flip on images of ``image_size``) or ``'imagenet'`` (RandomResizedCrop +
    flip; test Resize(``test_resize``) + CenterCrop). ``default_loader``: the loader ``--loader`` defaults
    to (``'device'``: decoded images resident on the device; ``'torch'``: DataLoader workers).

    For ``folder``, :func:`dataset_info` gives ``mean = std = None`` (measured when the images are read:
    ``Loaders.info`` has them)."""
    name: str
    num_classes: int
    image_size: int
    mean: Optional[tuple]
    std: Optional[tuple]
    crop_padding: int
    official_train: Optional[int] = None
    official_test: Optional[int] = None
    classes: Optional[tuple] = None
    protocol: str = "cifar"
    default_loader: str = "device"

    @property
    def test_resize(self) -> int:
        """The ImageNet protocol's test Resize: ``image_size * 8 / 7`` rounded (256 for 224)."""
        return round(self.image_size * 8 / 7)


_INFOS = {
    # Official counts: CIFAR 50,000 / 10,000 (Krizhevsky 2009, "Learning multiple layers of features from tiny
    # images"); TinyImageNet 100,000 train / 10,000 val (cs231n); ILSVRC-2012 1,281,167 train / 50,000 val
    # (Russakovsky et al., IJCV 2015, Table 2); Fashion-MNIST 60,000 / 10,000 (Xiao et al., arXiv:1708.07747).
    "cifar10": DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, 50000, 10000),
    "cifar100": DatasetInfo("cifar100", 100, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 4,
                            50000, 10000),
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, 64, IMAGENET_MEAN, IMAGENET_STD, 4, 100000, 10000),
    "imagenet": DatasetInfo("imagenet", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, 0, 1281167, 50000,
                            protocol="imagenet", default_loader="torch"),
    # Grey 28x28 zero-padded to 32x32 and replicated to 3 channels (see data/fashion_mnist.py); the
    # usual Fashion-MNIST statistics, measured on the 28x28 originals, replicated to the 3 channels.
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 32, (0.2860,) * 3, (0.3530,) * 3, 4, 60000, 10000),
    # Synthetic images are built to have roughly this mean and spread (data/synthetic.py).
    "synthetic": DatasetInfo("synthetic", 10, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 4),
}
# "folder": any class-folder tree (data/folder.py); its facts come from the files.
DATASET_NAMES = tuple(_INFOS) + ("folder",)
NOT_DOWNLOADABLE = {      # the loaders download CIFAR, Fashion-MNIST and TinyImageNet
    "imagenet": "ImageNet cannot be downloaded by a script (it needs a login at https://image-net.org)",
    "folder": "a folder dataset is your own files, there is nothing to download",
    "synthetic": "synthetic data are generated, there is nothing to download",
}


def check_download(name: str, download: bool) -> None:
    """``--download`` of a dataset that cannot be downloaded: one :class:`DataFlagError` line."""
    if download and name in NOT_DOWNLOADABLE:
        raise DataFlagError(f"--download: {NOT_DOWNLOADABLE[name]}. Fix: leave --download out")


def static_info(name: str) -> DatasetInfo:
    """The fixed facts of built-in dataset ``name`` (no file read); ``data.dataset_info`` adds what the files
    and the flags say."""
    try:
        return _INFOS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}") from None


PAD_MODES = ("zero", "reflect")


def array_transforms(info: DatasetInfo, train: bool, pad_mode: str = "zero"):
    """torchvision transforms on uint8 C x H x W tensors: [RandomCrop(size, padding, padding_mode) + flip]
    + /255 + Normalize; ``pad_mode`` 'zero' (torchvision's 'constant' 0) or 'reflect'."""
    from torchvision import transforms
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}; got {pad_mode!r}")
    steps = [transforms.RandomCrop(info.image_size, padding=info.crop_padding,
                                   padding_mode="constant" if pad_mode == "zero" else pad_mode),
             transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose(steps + [transforms.ConvertImageDtype(torch.float32),
                                       transforms.Normalize(info.mean, info.std)])


class ArraySplit(NamedTuple):
    """One split held in memory: ``images`` uint8 N x 3 x H x W, ``labels`` int64 N, and where they were read
    (``source``: a folder, or how they were made)."""
    images: torch.Tensor
    labels: torch.Tensor
    source: Optional[str] = None


def datasets_root() -> Path:
    """``$OKD_DATASETS`` if set, else ``./datasets`` (relative to the current directory)."""
    return Path(os.environ.get("OKD_DATASETS") or "datasets")


def default_dir(name: str, data: Optional[os.PathLike | str]) -> Path:
    """``--data`` if given, else ``<datasets_root()>/<name>``."""
    return Path(data) if data else datasets_root() / name


def inside_the_classes(name: str, data: Optional[os.PathLike | str], folder: os.PathLike | str) -> Optional[str]:
    """Why a run's (or an evaluation's) ``folder`` cannot lie where it does, or None: inside a split folder
    (train/, val/, test/) of a class-folder dataset (folder, imagenet), where it would be listed as a class of
    its own (then an empty one: no later run on the data could start)."""
    if name not in ("folder", "imagenet"):
        return None
    where, root = Path(folder).resolve(), default_dir(name, data).resolve()
    split = next((root / s for s in ("train", "val", "test") if where == root / s or root / s in where.parents), None)
    return split and (f"{folder} lies inside {split}, where each folder is a class of the dataset: the run's "
                      f"folder would be read as a class of images. Give an --out outside {split}")
