"""TinyImageNet-200 from the official unzipped layout, checked before it is used.

Layout: ``tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG,
val/val_annotations.txt}``. ``--data`` may point at ``tiny-imagenet-200`` or at its parent; without it
``./datasets/tinyimagenet`` (or under ``$OKD_DATASETS``). ``--download`` fetches and unzips
http://cs231n.stanford.edu/tiny-imagenet-200.zip there (torchvision checks the zip's MD5); when the
folder is present but damaged, ``--download`` extracts the zip again (fetching it again if its MD5 differs).

* **Class index = position of the wnid in the sorted list of wnids** (``wnids.txt`` itself is not
  sorted); this is also the order torchvision's ``ImageFolder`` gives the ``train/`` folders.
* The test split is the official validation set (10,000 images, 50 per class), labelled from
  ``val/val_annotations.txt``. It is **not** read as an ``ImageFolder``: ``val/images`` is one flat
  folder, and reading it as a class folder gives every image label 0 (the classic ~0.5 % accuracy).
  The unlabelled ``test/`` folder is not used.
* **Checked before use** (:func:`file_lists`): hidden entries (``.ipynb_checkpoints``, ``.DS_Store``) are
  ignored everywhere; ``wnids.txt`` lists 200 distinct wnids and ``train/`` holds exactly those folders,
  none empty; every line of ``val_annotations.txt`` is ``<image>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>`` with a
  known wnid, every listed image exists and every image of ``val/images`` is listed. Each problem is one
  :class:`~data.common.BadDatasetError` line naming the file.
* Images are decoded once, completely (as RGB: greyscale and CMYK JPEGs and a PNG named ``.JPEG`` work; a
  16-bit or float image, which RGB would clip to near-white, is refused: :func:`~data.common.decode_rgb`),
  into uint8 N x 3 x 64 x 64; every file that does not decode is listed in one error, and nothing is
  cached then. The result is cached in ``tiny-imagenet-200/okd_uint8_cache.pt``, keyed on what it holds:
  the path, size and modification time of every image, ``wnids.txt`` and ``val_annotations.txt``; any
  change rebuilds it, and so does a damaged one (it carries a checksum). Written atomically; skipped with a warning
  when the folder is read-only.

Training augmentation (in :mod:`data.loaders`): RandomCrop(64, padding=4; zero fill, or reflect with --pad-mode) +
RandomHorizontalFlip(0.5), then /255 and Normalize with the ImageNet mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225). Test: /255 + Normalize.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .common import (ArraySplit, BadDatasetError, DatasetNotFoundError, datasets_root, decode_rgb,
                     static_info, download_or_explain, image_files, is_hidden, load_or_warn, save_or_warn,
                     visible_dirs)

FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
CACHE = "okd_uint8_cache.pt"
CACHE_VERSION = 2
SIZE = 64
NUM_CLASSES = static_info("tinyimagenet").num_classes


REEXTRACT = f"extract {FOLDER}.zip again (or run with --download, which re-extracts it and checks its MD5)"


def _fix(root: Path) -> str:
    return f"{REEXTRACT}; python scripts/check_dataset.py --dataset tinyimagenet --data {root} lists every bad file"


def _candidates(data=None) -> list[Path]:
    base = Path(data) if data else datasets_root() / "tinyimagenet"
    return [base] if base.name == FOLDER else [base / FOLDER, base]


def _is_root(path: Path) -> bool:
    return (path / "wnids.txt").is_file() and (path / "train").is_dir() and \
        (path / "val" / "val_annotations.txt").is_file()


def _missing(candidates: list[Path]) -> str:
    """What each candidate folder lacks of wnids.txt, train/ and val/val_annotations.txt, in words."""
    parts = []
    for c in candidates:
        there = {"wnids.txt": (c / "wnids.txt").is_file(), "train/": (c / "train").is_dir(),
                 "val/val_annotations.txt": (c / "val" / "val_annotations.txt").is_file()}
        lacks = [name for name, found in there.items() if not found]
        parts.append(f"{c.absolute()} {'does not exist' if not c.exists() else 'lacks ' + ', '.join(lacks)}")
    return "; ".join(parts)


def fetch(parent: Path) -> None:
    """Download tiny-imagenet-200.zip into ``parent`` (again if its MD5 differs) and extract it there; one
    DatasetNotFoundError line when that cannot be done (no internet)."""
    from torchvision.datasets import utils
    download_or_explain("tinyimagenet", parent,
                        lambda: utils.download_and_extract_archive(URL, str(parent), md5=MD5))


def _download_parent(candidates: list[Path]) -> Path:
    return candidates[0].parent if candidates[0].name == FOLDER else candidates[-1]


def find_root(data=None, download: bool = False) -> Path:
    """The ``tiny-imagenet-200`` folder, downloading it first when asked."""
    candidates = _candidates(data)
    if download and not any(_is_root(c) for c in candidates):
        fetch(_download_parent(candidates))
    for c in candidates:
        if _is_root(c):
            return c
    raise DatasetNotFoundError(
        "tinyimagenet", _missing(candidates), candidates,
        ("" if download else "pass --download, or ") + f"download {URL}, unzip it and point --data at {FOLDER}/ "
        "(or its parent).")


def _bad(problem: str) -> BadDatasetError:
    return BadDatasetError(f"dataset 'tinyimagenet': {problem}. Fix: {REEXTRACT}")


def _some(names, k: int = 5) -> str:
    names = sorted(str(n) for n in names)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def class_names(root: Path) -> list[str]:
    """The 200 wnids of ``wnids.txt``, sorted: class index = position in this list. Checked: one wnid per
    line, no duplicates, 200 of them."""
    path = root / "wnids.txt"
    wnids = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    malformed = [w for w in wnids if len(w.split()) != 1 or is_hidden(w)]
    if malformed:
        raise _bad(f"{path} is malformed: expected one wnid per line, got {_some(repr(w) for w in malformed)}")
    duplicates = {w for w in wnids if wnids.count(w) > 1}
    if duplicates:
        raise _bad(f"{path} lists {_some(duplicates)} more than once")
    if len(wnids) != NUM_CLASSES:
        raise _bad(f"{path} lists {len(wnids)} classes; TinyImageNet-200 has {NUM_CLASSES}")
    return sorted(wnids)


def _annotations(path: Path, known: set) -> dict[str, str]:
    """{image name: wnid} from val_annotations.txt, every line checked."""
    labels = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 6 or not all(f.strip().lstrip("-").isdigit() for f in fields[2:]):
            raise _bad(f"{path} line {number} is malformed ({line[:80]!r}): expected "
                       "<image>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>; the file may be cut short")
        name, wnid = fields[0], fields[1]
        if wnid not in known:
            raise _bad(f"{path} line {number} names wnid {wnid!r}, which is not in wnids.txt")
        if name in labels:
            raise _bad(f"{path} line {number} annotates {name} a second time")
        labels[name] = wnid
    return labels


def file_lists(root: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(train, val) lists of (image path, class index); val labels come from val_annotations.txt.
    Checks the layout (module docstring) and raises BadDatasetError naming the first problem."""
    wnids = class_names(root)
    index = {w: i for i, w in enumerate(wnids)}
    train_dir = root / "train"
    folders = set(visible_dirs(train_dir))
    if folders != set(wnids):
        missing, extra = set(wnids) - folders, folders - set(wnids)
        raise _bad(f"{train_dir} does not hold one folder per wnid of wnids.txt"
                   + (f"; missing: {_some(missing)}" if missing else "")
                   + (f"; not in wnids.txt: {_some(extra)}" if extra else ""))
    train = []
    for w in wnids:
        images = image_files(train_dir / w / "images") if (train_dir / w / "images").is_dir() else []
        if not images:
            raise _bad(f"the class folder {train_dir / w / 'images'} holds no image")
        train += [(p, index[w]) for p in images]
    images_dir, annotation = root / "val" / "images", root / "val" / "val_annotations.txt"
    labels = _annotations(annotation, set(wnids))
    present = {p.name: p for p in image_files(images_dir)} if images_dir.is_dir() else {}
    unlisted, missing = set(present) - set(labels), set(labels) - set(present)
    if missing:
        raise _bad(f"{len(missing)} image(s) listed in {annotation} are missing from {images_dir}: {_some(missing)}")
    if unlisted:
        raise _bad(f"{len(unlisted)} image(s) of {images_dir} have no line in {annotation} (cut short?): "
                   f"{_some(unlisted)}")
    val = [(present[name], index[labels[name]]) for name in sorted(labels)]
    return train, val


def fingerprint(root: Path, items: list[tuple[Path, int]]) -> str:
    """SHA-256 of what the cache holds: every image's path (relative), size, modification time and label,
    and the bytes of wnids.txt and val_annotations.txt."""
    h = hashlib.sha256(f"v{CACHE_VERSION} size {SIZE}\n".encode())
    for f in (root / "wnids.txt", root / "val" / "val_annotations.txt"):
        h.update(f.read_bytes())
    for path, label in items:
        st = os.stat(path)
        h.update(os.fsencode(f"{path.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n"))  # any name
    return h.hexdigest()


def _decode(path: Path):
    """uint8 3 x 64 x 64, or the reason it does not decode."""
    try:
        im = decode_rgb(path)
    except Exception as e:  # noqa: BLE001 -- OSError, UnidentifiedImageError, DecompressionBombError
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if im.size != (SIZE, SIZE):
        im = im.resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(im).transpose(2, 0, 1)


def _decode_all(items: list[tuple[Path, int]]) -> tuple[ArraySplit, list[tuple[Path, str]]]:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        arrays = list(pool.map(_decode, [p for p, _ in items]))
    bad = [(p, a) for (p, _), a in zip(items, arrays) if isinstance(a, str)]
    if bad:
        return None, bad
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8)
    return ArraySplit(images, torch.tensor([y for _, y in items], dtype=torch.int64)), []


def load_tinyimagenet(data=None, download: bool = False) -> tuple[ArraySplit, ArraySplit]:
    """Return (train, val-as-test) as uint8 N x 3 x 64 x 64 and int64 labels, using the cache when it
    holds exactly the files on disk. Raises DatasetNotFoundError or BadDatasetError (one line)."""
    root = find_root(data, download)
    try:
        return _load(root)
    except BadDatasetError as err:
        if not download:
            raise
        print(f"tinyimagenet: {err}\n--download: extracting {FOLDER}.zip again", flush=True)
        fetch(root.parent)
        return _load(root)


def _load(root: Path) -> tuple[ArraySplit, ArraySplit]:
    train_items, val_items = file_lists(root)
    key = fingerprint(root, train_items + val_items)
    cache = root / CACHE
    blob = load_or_warn(cache, CACHE_VERSION, key, "tinyimagenet")
    if blob is not None:
        source = str(root.absolute())              # (the folder, as when decoded: where the run read its data)
        return ArraySplit(*blob["train"][:2], source), ArraySplit(*blob["test"][:2], source)
    (train, bad_train), (test, bad_val) = _decode_all(train_items), _decode_all(val_items)
    if bad_train or bad_val:                     # nothing is cached
        raise BadDatasetError.files("tinyimagenet", bad_train + bad_val, _fix(root), what="images")
    train, test = train._replace(source=str(root.absolute())), test._replace(source=str(root.absolute()))
    save_or_warn({"version": CACHE_VERSION, "key": key, "train": tuple(train), "test": tuple(test)}, cache)
    return train, test
