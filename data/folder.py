"""Your own images: any class-folder tree (``--dataset folder --data DIR``), any number of classes, any size.

**Layout** (torchvision ``ImageFolder``'s): ``DIR/train/<class>/<image>``, and the evaluation images in
``DIR/val/<class>/`` or ``DIR/test/<class>/``. Classes are the folders of ``train/`` in sorted order (label =
position), images are the files with one of torchvision's ``IMG_EXTENSIONS`` (.jpg .jpeg .png .ppm .bmp .pgm
.tif .tiff .webp, any case), found recursively under each class folder, in sorted order
(``torchvision.datasets.folder.make_dataset``'s order, listed in one walk that also stops at a symbolic link
loop). ``--classes FILE`` keeps only the listed class folders
(still in sorted order), e.g. ImageNet-100 over an ILSVRC tree, without copying an image.

**Splits.** ``val/`` or ``test/``: the evaluation set (reported, and it chooses ``best`` unless
``--val-split N`` holds out N training images to choose it, as for the other datasets). Both: ``val/``
chooses ``best``, ``test/`` is reported (``--val-split`` is then refused). Neither: the run refuses, unless
``--val-split N`` holds out N training images (stratified, seeded), which then are the evaluation set.

**Checked before anything is decoded** (:func:`scan`; each problem one :class:`~data.common.DatasetError`
line naming the folder or file and the fix): ``train/`` exists and holds at least 2 class folders; hidden
entries (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``) are ignored at every depth; symlinked folders and
files are followed; every class folder holds an image (the empty ones are named); a class folder of ``val/``
or ``test/`` that ``train/`` has not is refused (the model could not predict it), a class of ``train/``
without a folder there is named in a warning (it is not evaluated); images of 16 bits or floats (PIL modes
I;16, I, F), which torchvision's RGB conversion clips at 255, are refused.

**Image size and protocol.** ``--image-size S``; default: the median shorter side of up to 1,000 training
images (evenly spread over the sorted list; headers only) rounded to 32, 64 or 224, whichever is nearest on
a log scale (sides up to 45 give 32, up to 119 give 64, from 120 on 224). S <= 64: the CIFAR protocol, every
image resized to S x S (PIL bilinear, antialiased), RandomCrop(S, padding round(S / 8)) + flip; S > 64: the
ImageNet protocol, RandomResizedCrop(S) + flip, test Resize(round(S * 8 / 7)) + CenterCrop(S). Greyscale,
palette and RGBA images are converted to RGB as ``ImageFolder`` does (PIL ``convert('RGB')``: alpha dropped).
Normalisation: the dataset's own per-channel mean and std, measured on the training images at size S (all
of them when they are decoded into memory, else up to 10,000 evenly spread ones, centre-framed as the test
transform frames them), cached; the images ``--val-split`` holds out (they evaluate) are left out (with
``--subset``: every image not held out is measured, the pool the subset is drawn from).

**Memory or files.** CIFAR protocol and the decoded set (train + val + test, 3 x S x S bytes each) within
4 GiB: every image is decoded once before training (all unreadable files listed in one line), kept as uint8
and served by the device-resident loader (``--loader device``, the default; ``--loader torch`` serves the
same arrays through a DataLoader). Larger, or the ImageNet protocol: the files are decoded by DataLoader
workers as training meets them, and an unreadable one stops the run with one line naming it (the last
finished epoch's checkpoint is intact). The ImageNet protocol always reads the files: RandomResizedCrop takes
its crops from the full-resolution image, which a copy decoded at S would not have.

**Cache** (``DIR/.okd_cache/``, or ``$XDG_CACHE_HOME/okd/<hash of DIR>/`` when DIR is read-only): the decoded
arrays (``images-<S>px-<classes>.pt``), keyed on a SHA-256 of the class list, S and every image's relative
path, size, modification time and label; the mean and std with the images they were measured on, one small
file per way of measuring and hold-out (``stats-<S>px-<classes>-<decoded|streamed>.json``, with
``-val<N>-seed<seed>`` before ``.json`` for ``--val-split N``), keyed on the same SHA-256 (a streamed set's
without the files' sizes and times) and the hold-out. Any change to the tree re-reads it. Written atomically; a
damaged cache is ignored and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import unicodedata
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .common import (HIGH_BIT_MODES, ArraySplit, BadDatasetError, DataFlagError, DatasetInfo, DatasetNotFoundError,
                     array_transforms, check_link_loop, decode_rgb, default_dir, high_bit_reason, is_hidden,
                     load_or_warn, printable, read_class_list, save_or_warn, some, unreadable_folder, visible_dirs)
from .files import write_atomically

NAME = "folder"
SPLITS = ("train", "val", "test")
SIZES = (32, 64, 224)              # what the automatic size rounds to: CIFAR, TinyImageNet, ImageNet
SMALL_MAX = 64                     # S <= 64: the CIFAR protocol; above, the ImageNet protocol
MEMORY_BYTES = 4 * 2 ** 30         # decoded sets up to this size are held in memory (the device loader)
SIZE_SAMPLE = 1000                 # image headers read to choose the size
STATS_SAMPLE = 10000               # streamed sets: images decoded to measure the mean and std
CACHE_DIR = ".okd_cache"
CACHE_VERSION = 2                  # 2: the decoded arrays' cache holds no mean or std
EXTENSIONS = " ".join(IMG_EXTENSIONS)


# --------------------------------------------------------------------------- the tree

@dataclass
class FolderTree:
    """What :func:`scan` found: ``classes`` in label order, ``samples[split]`` = [(path, label), ...] for
    each split folder present (``train`` always; ``val``, ``test`` when there), warnings to show."""
    root: Path
    classes: tuple
    samples: dict
    classes_file: Optional[Path] = None
    warnings: tuple = ()
    size_note: Optional[str] = field(default=None, compare=False)     # how the automatic size was chosen

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in ("val", "test") if s in self.samples]

    @cached_property
    def median_side(self) -> int:
        """The median shorter side of up to :data:`SIZE_SAMPLE` training images (headers only; read once), and
        ``size_note`` says so. Unreadable headers are skipped here (the decoding lists them); a high-bit-depth
        image is refused."""
        picks = [p for p, _ in _evenly(self.samples["train"], SIZE_SAMPLE)]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            headers = list(pool.map(_header, picks))
        sides, bad, deep = [], [], []
        for path, h in zip(picks, headers):
            if isinstance(h, str):
                bad.append((path, h))
                continue
            (w, hgt), mode = h
            if mode in HIGH_BIT_MODES:
                deep.append((path, mode))
            sides.append(min(w, hgt))
        if deep:
            raise high_bit_error(deep)
        if not sides:
            raise BadDatasetError.files(NAME, bad, check_fix(self.root), what="images")
        median = statistics.median_low(sides)
        self.size_note = (f"the median shorter side of {len(sides)} training images is {median} px: "
                          f"{nearest_size(median)}")
        return median

    def count(self) -> int:
        return sum(len(v) for v in self.samples.values())


def layout_fix(root: Path) -> str:
    return (f"put each class's images in its own folder, {root}/train/<class>/<image>, and the evaluation "
            f"images in {root}/val/<class>/ (or test/); then pass --data {root}")


def _images(split_dir: Path, index: dict[str, int]) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image (an ``IMG_EXTENSIONS`` file) below the class folders ``index`` names in
    ``split_dir``, in torchvision's ``make_dataset`` order (classes, then folders, then files, by name), hidden
    files and folders left out; and the paths of the other files there (not read). One walk per class folder,
    which stops at a symbolic link loop (:func:`~data.common.check_link_loop`; make_dataset would list the whole
    walk first, and never end)."""
    found, other = [], []
    for c in sorted(index):
        walk = []
        for folder, dirnames, filenames in os.walk(split_dir / c, onerror=unreadable_folder, followlinks=True):
            check_link_loop(folder, str(split_dir))
            dirnames[:] = [d for d in dirnames if not is_hidden(d)]
            walk.append((folder, filenames))
        visible = [os.path.join(folder, f) for folder, files in sorted(walk) for f in sorted(files) if not is_hidden(f)]
        found += [(f, index[c]) for f in visible if has_file_allowed_extension(f, IMG_EXTENSIONS)]
        other += [f for f in visible if not has_file_allowed_extension(f, IMG_EXTENSIONS)]
    return found, other


def _loose_images(folder: Path) -> int:
    with os.scandir(folder) as it:
        return sum(1 for e in it if not is_hidden(e.name) and e.is_file() and
                   has_file_allowed_extension(e.name, IMG_EXTENSIONS))


def _scan(root: Path, classes_file: Optional[Path], data_given: bool) -> FolderTree:
    train_dir = root / "train"
    if not root.is_dir():        # (the likeliest cause: a typo in --data, or no --data)
        raise DatasetNotFoundError(NAME, f"the folder {root} does not exist", [root], (
            "check the path given to --data" if data_given else "give --data DIR, the folder of your images (without "
            "it the default place is read)") + "; " + layout_fix(root))
    if not train_dir.is_dir():
        above = root.parent if root.name in ("train", "val", "test") and (root.parent / "train").is_dir() else None
        raise DatasetNotFoundError(NAME, "the folder train/ is missing", [train_dir], layout_fix(root) if above is None
                                   else f"pass --data {above}, the folder that holds train/, not {root.name}/ itself")
    listed = read_class_list(classes_file) if classes_file is not None else None
    train_classes = visible_dirs(train_dir, listed)       # (a broken link: refused only where its class is used)
    if classes_file is not None:
        missing = set(listed) - set(train_classes)
        if missing:
            folders = {unicodedata.normalize("NFC", c) for c in train_classes}
            twins = [m for m in missing if unicodedata.normalize("NFC", m) in folders]
            raise DataFlagError(f"--classes {classes_file} names {len(missing)} class(es) with no folder in "
                                f"{train_dir}: {some(missing)}" + (
                                    f" ({some(twins)}: a folder's letters in another Unicode form, as macOS writes "
                                    "names: copy the name from the folder)" if twins else "")
                                + ". Fix: correct the names (one class folder a line)")
        classes = sorted(listed)
    else:
        classes = train_classes
    if len(classes) < 2:
        loose = _loose_images(train_dir)
        found = (f"{len(classes)} class folder ({classes[0]})" if classes else "no class folder") + \
            (f" and {loose} images directly" if loose else "")
        raise BadDatasetError(f"dataset 'folder': {train_dir} holds {found}; a classifier needs at least 2 classes. "
                              f"Fix: {layout_fix(root)}")
    notes, samples, empty = [], {}, []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        folders = set(train_classes if split == "train" else visible_dirs(split_dir, listed))
        if split != "train":
            extra = folders - set(train_classes)
            files = sorted(str(train_dir / c) for c in extra if (train_dir / c).is_file())
            if files:
                are = "is a file" if len(files) == 1 else "are files"
                raise BadDatasetError(f"dataset 'folder': {some(files)} {are}, where {split_dir}/"
                                      f"{Path(files[0]).name}/ needs a class folder of training images. Fix: put the "
                                      f"class's training images in {train_dir}/<class>/")
            if extra:
                raise BadDatasetError(
                    f"dataset 'folder': {split_dir} holds {len(extra)} class folder(s) that train/ has not: "
                    f"{some(extra)}; the model could not predict them. Fix: add {train_dir}/<class>/ with images "
                    f"for each, or move them out of {split}/")
            if not folders & set(classes):
                loose = _loose_images(split_dir)       # (images put in val/ itself: they need their class folders)
                loose = f" ({loose} image(s) directly in it)" if loose else ""
                raise BadDatasetError(
                    f"dataset 'folder': {split_dir} holds none of the {len(classes)} class folders of train/"
                    f"{' listed by --classes' if classes_file else ''}{loose}. Fix: {layout_fix(root)}, or remove "
                    f"{split}/ and pass --val-split N")
            absent = [c for c in classes if c not in folders]
            if absent:
                notes.append(f"folder: {len(absent)} of {len(classes)} classes have no folder in {split_dir} and are "
                             f"not evaluated there: {some(absent)}")
        loose = _loose_images(split_dir)
        if loose:
            notes.append(f"folder: {loose} image(s) directly in {split_dir} belong to no class folder and are not "
                         f"used; move them into {split_dir}/<class>/")
        index = {c: i for i, c in enumerate(classes) if c in folders}
        found, other = _images(split_dir, index)
        if other:
            notes.append(f"folder: {len(other)} file(s) in the class folders of {split_dir} are not images by their "
                         f"name ({EXTENSIONS}) and are not used: {some(other)}")
        counts = Counter(label for _, label in found)
        empty += [split_dir / c for c, i in index.items() if not counts[i]]
        samples[split] = found
    if empty:
        raise BadDatasetError(f"dataset 'folder': {len(empty)} class folder{'s hold' if len(empty) > 1 else ' holds'} "
                              f"no image ({EXTENSIONS}): {some(empty)}. Fix: add the images, or delete the empty "
                              "folder(s)")
    return FolderTree(root, tuple(classes), samples, classes_file, tuple(notes))


_SCANS: dict = {}


def _stamp(root: Path, classes_file: Optional[Path]):
    """Modification times of the split and class folders (and the --classes file): a file added, removed or
    renamed in a class folder changes its folder's time, so a memoised scan is not reused after that."""
    stamps = []
    for split in SPLITS:
        split_dir = root / split
        try:
            stamps.append((split, split_dir.stat().st_mtime_ns))
            with os.scandir(split_dir) as it:
                stamps += sorted((e.name, e.stat().st_mtime_ns) for e in it if e.is_dir())
        except OSError:
            stamps.append((split, None))
    if classes_file is not None:
        st = classes_file.stat() if classes_file.is_file() else None
        stamps.append(("--classes", st and (st.st_mtime_ns, st.st_size)))
    return tuple(stamps)


def scan(data=None, classes=None) -> FolderTree:
    """List and check the tree under ``--data`` (default ``datasets/folder``): the module docstring's layout
    checks, nothing decoded. Memoised in this process while the split and class folders are unchanged (the
    engine asks for the description before it builds the loaders)."""
    root = default_dir(NAME, data).absolute()
    classes_file = Path(classes).absolute() if classes is not None else None
    key = (str(root), str(classes_file))
    stamp = _stamp(root, classes_file)
    hit = _SCANS.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    tree = _scan(root, classes_file, data is not None)
    _SCANS[key] = (stamp, tree)
    return tree


# --------------------------------------------------------------------------- size, protocol, description

def nearest_size(side: float) -> int:
    """32, 64 or 224, whichever is nearest to ``side`` on a log scale."""
    return min(SIZES, key=lambda s: abs(math.log(max(side, 1) / s)))


def high_bit_error(deep: list) -> BadDatasetError:
    """One line naming every (path, PIL mode) of ``deep`` (the first 5, then a count): 16-bit or float images."""
    if len(deep) == 1:
        return BadDatasetError(f"dataset 'folder': {printable(deep[0][0])} is {high_bit_reason(deep[0][1])}. Fix: "
                               "convert the images to 8-bit (e.g. scale each to 0..255 and save as PNG)")
    return BadDatasetError.files(NAME, [(p, f"PIL mode {m}") for p, m in deep], "convert them to 8-bit (e.g. scale "
                                 "each to 0..255 and save as PNG): RGB conversion clips them at 255",
                                 what="16-bit or float images")


def _header(path: str):
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except Exception as e:  # noqa: BLE001 -- OSError, UnidentifiedImageError, DecompressionBombError
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def _evenly(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (every class of a class-sorted list is visited)."""
    n = len(items)
    return items if n <= k else [items[i * n // k] for i in range(k)]


def crop_padding(size: int) -> int:
    return max(1, round(size / 8))


def decoded_bytes(tree: FolderTree, size: int) -> int:
    return tree.count() * 3 * size * size


def describe(data=None, image_size: Optional[int] = None, classes=None) -> DatasetInfo:
    """The folder's :class:`DatasetInfo` from a listing and at most :data:`SIZE_SAMPLE` image headers, no
    decoding (what ``data.dataset_info('folder', ...)`` returns): classes, image size, protocol and default
    loader; ``mean``/``std`` are None (measured by :func:`load_folder`)."""
    tree = scan(data, classes)
    size = image_size or nearest_size(tree.median_side)     # (--image-size's range is its flag's: engine/cli.py)
    small = size <= SMALL_MAX
    return DatasetInfo(NAME, len(tree.classes), size, None, None, crop_padding(size) if small else 0,
                       classes=tree.classes, protocol="cifar" if small else "imagenet",
                       default_loader="device" if small and decoded_bytes(tree, size) <= MEMORY_BYTES else "torch")


def protocol_text(info: DatasetInfo) -> str:
    s = info.image_size
    if info.protocol == "cifar":
        return f"resize to {s}x{s}, RandomCrop({s}, padding {info.crop_padding}) + flip; test: resize to {s}x{s}"
    return f"RandomResizedCrop({s}) + flip; test: Resize({info.test_resize}) + CenterCrop({s})"


# --------------------------------------------------------------------------- decoding and statistics

# A folder image decodes as every dataset's (data.common.decode_rgb: 16-bit and float images refused, for all of them),
# under the name this module's callers know (tests/test_export_peer.py imports folder.decode_image).
decode_image = decode_rgb


def frame(info: DatasetInfo):
    """PIL -> PIL: how an image is framed at the test transform's size, before any tensor: resize to S x S
    (CIFAR protocol) or Resize(S * 8 / 7) + CenterCrop(S) (ImageNet protocol)."""
    s = info.image_size
    if info.protocol == "cifar":
        return transforms.Resize((s, s))
    return transforms.Compose([transforms.Resize(info.test_resize), transforms.CenterCrop(s)])


def _decode_into(path: str, framing, out: torch.Tensor):
    try:
        image = framing(decode_image(path))
    except Exception as e:  # noqa: BLE001 -- OSError, UnidentifiedImageError, DecompressionBombError
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    out.copy_(torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()))
    return None


def decode_all(items: list, info: DatasetInfo) -> tuple[Optional[ArraySplit], list]:
    """uint8 N x 3 x S x S of ``items`` = [(path, label), ...] framed by :func:`frame`, decoded by threads (PIL
    decodes without the GIL) into one preallocated tensor; or (None, [(path, reason), ...])."""
    s = info.image_size
    images = torch.empty(len(items), 3, s, s, dtype=torch.uint8)
    framing = frame(info)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reasons = list(pool.map(lambda k: _decode_into(items[k][0], framing, images[k]), range(len(items))))
    bad = [(items[k][0], r) for k, r in enumerate(reasons) if r is not None]
    if bad:
        return None, bad
    return ArraySplit(images, torch.tensor([y for _, y in items], dtype=torch.int64)), []


def channel_stats(images: torch.Tensor, keep: Optional[torch.Tensor] = None) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 N x 3 x H x W images on the [0, 1] scale, of those ``keep`` indexes (None:
    all). Exact integer sums over chunks of 1,024 images: ``images`` is never copied whole (a 4 GiB set indexed at
    once would double the memory the run needs)."""
    total, squares, count = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 0
    for chunk in images.split(1024) if keep is None else (images[k] for k in keep.split(1024)):
        x = chunk.to(torch.int32)
        total += x.sum(dim=(0, 2, 3), dtype=torch.int64)
        squares += x.square_().sum(dim=(0, 2, 3), dtype=torch.int64)
        count += x.numel() // 3
    mean = total.double() / (255 * count)
    std = (squares.double() / (255 * 255 * count) - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


# --------------------------------------------------------------------------- cache

def _classes_digest(classes) -> str:
    return hashlib.sha256(os.fsencode("\n".join(classes))).hexdigest()[:12]   # (fsencode: names that are not UTF-8)


def fingerprint(tree: FolderTree, size: int, with_files: bool) -> str:
    """SHA-256 of the class list, ``size`` and every image's relative path and label, with its size and
    modification time when ``with_files`` (the decoded cache; the statistics of a streamed set skip the
    ``stat`` of every file)."""
    h = hashlib.sha256(f"v{CACHE_VERSION} {size}\n".encode())
    h.update(os.fsencode("\n".join(tree.classes) + "\n\n"))     # os.fsencode: a name need not be valid UTF-8
    for split, items in tree.samples.items():
        for path, label in items:
            line = f"{os.path.relpath(path, tree.root)}\t{label}"
            if with_files:
                try:
                    st = os.stat(path)
                    line += f"\t{st.st_size}\t{st.st_mtime_ns}"
                except OSError:             # a broken link, a file gone: decoding names it as unreadable
                    line += "\tunreadable"
            h.update(os.fsencode(line + "\n"))
    return h.hexdigest()


def cache_dir(root: Path) -> Optional[Path]:
    """``root/.okd_cache`` if it can be written, else ``$XDG_CACHE_HOME/okd/<hash of root>`` (default
    ``~/.cache``), else None (no cache, with a warning)."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "okd" / \
        hashlib.sha256(os.fsencode(root)).hexdigest()[:16]
    for folder in (root / CACHE_DIR, home):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    warnings.warn(f"folder: neither {root / CACHE_DIR} nor {home} can be written: no cache, so the images are read "
                  "again next time")
    return None


def _write_json(blob: dict, path: Path) -> None:
    try:
        write_atomically(path, "w", lambda f: f.write(json.dumps(blob, indent=1)))
    except OSError as err:
        warnings.warn(f"could not write {path} ({err}); the statistics will be measured again next time")


# --------------------------------------------------------------------------- loading

def check_fix(root: Path) -> str:
    return (f"replace or delete them; python scripts/check_dataset.py --dataset folder --data {root} lists every "
            "bad file")


def stream_fix(root: Path) -> str:
    return ("replace it with a readable copy, then continue with --resume auto: the last finished epoch's checkpoint "
            "is intact (deleted instead, it changes the data: a run resumes only on the images it was trained on, so "
            f"start a new one); python scripts/check_dataset.py --dataset folder --data {root} lists every bad file")


class FolderData(NamedTuple):
    """What :func:`load_folder` returns. ``train``/``val``/``test``: :class:`~data.common.ArraySplit` (decoded
    in memory) or :class:`~data.imagenet.ImageFiles` (streamed), None for a split folder that is not there;
    ``info`` with the measured ``mean``/``std``; ``tree`` the listing; ``in_memory`` which of the two;
    ``stats_of`` which images the mean and std were measured on, in words (the record's ``mean_std_of``)."""
    train: object
    val: object
    test: object
    info: DatasetInfo
    tree: FolderTree
    in_memory: bool
    stats_of: Optional[str] = None


def load_folder(data=None, image_size: Optional[int] = None, classes=None, loader: Optional[str] = None,
                held_out: tuple[int, int] = (0, 0), keep: Optional[torch.Tensor] = None) -> FolderData:
    """Scan, check and read the tree under ``data`` (module docstring). ``loader``: ``--loader`` (None: the
    default of :func:`describe`). Decodes into memory (CIFAR protocol within :data:`MEMORY_BYTES`, or
    ``--loader device``) or lists the files for DataLoader workers; raises DatasetError / DataFlagError.
    ``held_out``: (``--val-split`` N, ``--seed``), with ``keep`` the indices of the training images it leaves
    (:func:`data.loaders.training_indices`): the mean and std leave out the N images held out (they evaluate;
    N = 0 and ``keep`` None: none)."""
    info = describe(data, image_size, classes)
    tree = scan(data, classes)
    n_train, (n, seed) = len(tree.samples["train"]), held_out
    if (keep is None) == bool(n) or (keep is not None and len(keep) != n_train - n):
        raise ValueError(f"held_out {held_out} and keep disagree: keep is data.loaders.training_indices(tree, "
                         "*held_out)")        # (one fact in two arguments: a record would state another hold-out)
    if loader == "device" and info.protocol == "imagenet":
        raise DataFlagError(f"--loader device keeps images decoded at {info.image_size}x{info.image_size}, but at "
                            f"{info.image_size} px (above {SMALL_MAX}) the ImageNet protocol crops the full-resolution "
                            "files (RandomResizedCrop). Fix: leave --loader out (or --loader torch), or pass "
                            f"--image-size {SMALL_MAX} or less")
    in_memory = info.protocol == "cifar" and \
        (loader == "device" or decoded_bytes(tree, info.image_size) <= MEMORY_BYTES)
    folder = cache_dir(tree.root)
    stem = f"{info.image_size}px-{_classes_digest(tree.classes)}"
    less = f", train/ less the {n} images --val-split {n} holds out (seed {seed})" if n else " of train/"
    if in_memory:
        key = fingerprint(tree, info.image_size, with_files=True)
        splits = _in_memory(tree, info, folder, stem, key)
        mean, std, _ = _statistics(tree, folder, f"{stem}-decoded", key, keep, held_out,
                                   lambda: (*channel_stats(splits["train"].images, keep), n_train - n))
        stats_of = f"all {n_train - n} training images{less}"
    else:
        key = fingerprint(tree, info.image_size, with_files=False) + f" up to {STATS_SAMPLE}"
        mean, std, sampled = _statistics(tree, folder, f"{stem}-streamed", key, keep, held_out,
                                         lambda: _streamed_stats(tree, info, keep))
        splits = {s: _files(tree, s) for s in tree.samples}
        stats_of = f"{sampled} of the {n_train - n} training images{less}, evenly spread"
    info = replace(info, mean=mean, std=std)
    return FolderData(splits.get("train"), splits.get("val"), splits.get("test"), info, tree, in_memory, stats_of)


def _files(tree: FolderTree, split: str):
    from .imagenet import ImageFiles
    return ImageFiles([(Path(p), y) for p, y in tree.samples[split]], list(tree.classes), tree.root, name=NAME,
                      fix=stream_fix(tree.root), decode=decode_image)


def _in_memory(tree: FolderTree, info: DatasetInfo, folder: Optional[Path], stem: str, key: str):
    path = folder / f"images-{stem}.pt" if folder else None
    blob = load_or_warn(path, CACHE_VERSION, key, "folder") if path else None
    if blob is not None:
        return {s: ArraySplit(*blob["splits"][s]) for s in blob["splits"]}
    splits, bad = {}, []
    for split, items in tree.samples.items():
        arrays, problems = decode_all(items, info)
        splits[split], bad = arrays, bad + problems
    if bad:                                         # nothing is cached
        raise BadDatasetError.files(NAME, bad, check_fix(tree.root), what="images")
    if path:      # (the arrays only: their mean and std depend on the hold-out, cached apart by _statistics)
        save_or_warn({"version": CACHE_VERSION, "key": key, "classes": list(tree.classes),
                      "image_size": info.image_size, "splits": {s: tuple(a) for s, a in splits.items()}}, path)
    return splits


def _statistics(tree: FolderTree, folder: Optional[Path], name: str, key: str, keep: Optional[torch.Tensor],
                held_out: tuple[int, int], measure):
    """(mean, std, images measured) of the training images ``keep`` indexes (None: all), from ``measure()`` unless
    cached: one small JSON file per way of measuring and hold-out, ``stats-<name>[-val<N>-seed<S>].json``
    (``name``: ``<S>px-<classes>-decoded`` or ``-streamed``; so runs of other seeds, --val-split or --loader
    neither measure again nor overwrite each other's), keyed on ``key`` (the tree's fingerprint) and the hold-out."""
    n, seed = held_out                    # (N = 0 exactly when ``keep`` is None: load_folder checks it)
    path = folder / (f"stats-{name}" + (f"-val{n}-seed{seed}" if n else "") + ".json") if folder else None
    key += f" {name}" + (f" less --val-split {n} seed {seed}" if n else "")
    blob = load_or_warn(path, CACHE_VERSION, key, "folder") if path else None
    if blob is not None and {"mean", "std", "sampled"} <= set(blob):      # (a hand-edited file: measured again)
        return tuple(blob["mean"]), tuple(blob["std"]), blob["sampled"]
    mean, std, sampled = measure()
    if path:
        _write_json({"version": CACHE_VERSION, "key": key, "classes": list(tree.classes), "sampled": sampled,
                     "of": len(tree.samples["train"]) - n, "held_out": n, "seed": seed if n else None,
                     "mean": list(mean), "std": list(std)}, path)
    return mean, std, sampled


def _streamed_stats(tree: FolderTree, info: DatasetInfo, keep: Optional[torch.Tensor]):
    """(mean, std, images measured) of up to :data:`STATS_SAMPLE` training images, evenly spread among those
    ``keep`` indexes (None: all), decoded and framed as the test transform frames them."""
    items = tree.samples["train"] if keep is None else [tree.samples["train"][i] for i in keep.tolist()]
    sample = _evenly(items, STATS_SAMPLE)
    print(f"folder: measuring the mean and std of {len(sample)} training images at {info.image_size} px (once; cached)",
          flush=True)
    arrays, bad = decode_all(sample, info)
    if bad:
        raise BadDatasetError.files(NAME, bad, check_fix(tree.root), what="images")
    return (*channel_stats(arrays.images), len(sample))


def transform(info: DatasetInfo, train: bool, streamed: bool, pad_mode: str = "zero"):
    """The per-sample transform of a split: on uint8 arrays (CIFAR protocol in memory) the arrays' transform;
    on files, the frame and then the same steps (CIFAR protocol), or the ImageNet protocol's PIL transforms."""
    from .imagenet import test_transform, train_transform
    if info.protocol == "imagenet":
        return train_transform(info.image_size, info.mean, info.std) if train else \
            test_transform(info.image_size, info.test_resize, info.mean, info.std)
    steps = array_transforms(info, train, pad_mode)
    return transforms.Compose([frame(info), transforms.PILToTensor(), steps]) if streamed else steps
