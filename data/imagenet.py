"""ImageNet (ILSVRC-2012) from ``<data>/train/<wnid>/*.JPEG`` and ``<data>/val/<wnid>/*.JPEG``.

Both folders must hold one sub-folder per wnid (class index = sorted wnid order, ``ImageFolder``'s rule).
The validation archive unpacks flat (50,000 images in one folder); ``scripts/prepare_imagenet_val.py``
sorts it into class folders. Without ``--data`` the root is ``./datasets/imagenet`` (or under
``$OKD_DATASETS``). There is no ``--download``: ImageNet needs a login at https://image-net.org.

**Checked before training** (:func:`load_imagenet`, one directory listing per class, no decoding):
hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.JPEG``) are ignored everywhere; ``train/`` and
``val/`` must hold the same class folders (the difference is named), 1000 of them, none empty.

**Subsets** (ImageNet-100 and the like): ``--classes FILE`` lists the wnids to use, one a line
(:func:`data.common.read_class_list`); only those folders are read, from the same ILSVRC tree (nothing is
copied), labelled in sorted wnid order (``ImageFolder``'s order, as a copied subset folder would be); each
must be a folder of ``train/`` and of ``val/``, the 1000-class rule is lifted, and the other folders are
ignored.
Images are decoded when the loader reads them (PIL, as RGB: the set's CMYK and greyscale JPEGs and its
PNG named ``.JPEG`` work); one that does not decode stops the run with one line naming its path, and the
last finished epoch's checkpoint is untouched. ``scripts/check_dataset.py`` decodes a whole folder once
and lists every bad file.

Transforms (PIL, in DataLoader workers; ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)):
train RandomResizedCrop(224) (scale 0.08-1) + RandomHorizontalFlip + ToTensor + Normalize;
test Resize(256) + CenterCrop(224) + ToTensor + Normalize. ``--image-size S``: RandomResizedCrop(S), and
Resize(round(S * 8 / 7)) + CenterCrop(S).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset
from torchvision import transforms

from .common import (IMAGENET_MEAN, IMAGENET_STD, BadDatasetError, DataFlagError, DatasetNotFoundError, static_info,
                     decode_rgb, default_dir, image_files, read_class_list, some, visible_dirs)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
NUM_CLASSES = static_info("imagenet").num_classes
CHECK = "python scripts/check_dataset.py --dataset imagenet --data {root} lists every bad file"
FIX = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org, "
       "extract them to <root>/train/<wnid>/*.JPEG and <root>/val/, run "
       "`python scripts/prepare_imagenet_val.py --val-dir <root>/val --labels LOC_val_solution.csv` "
       "and pass --data <root>.")


def train_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def test_transform(size: int = 224, resize: int = 256, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def replace_fix(root) -> str:
    return ("replace it from the ILSVRC-2012 archive, then continue with --resume auto: the last finished epoch's "
            "checkpoint is intact (deleted instead, it changes the data: a run resumes only on the images it was "
            f"trained on, so start a new one); {CHECK.format(root=root)}")


class ImageFiles(Dataset):
    """A list of (image path, class index) as a dataset of (RGB ``PIL.Image``, label): ``ImageFolder``'s
    interface (``samples``, ``targets``, ``classes``) over a listing made here. A file that does not decode
    raises :class:`BadDatasetError` naming it and ``fix`` (also out of a DataLoader worker). ``decode``
    (path -> RGB image; picklable, for the workers) defaults to :func:`data.common.decode_rgb`."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], root: Path, name: str = "imagenet",
                 fix: Optional[str] = None, decode: Callable = decode_rgb):
        self.samples, self.classes, self.root, self.name = samples, classes, root, name
        self.fix, self.decode = fix or replace_fix(root), decode
        self.targets = [y for _, y in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return self.decode(path), label
        except Exception as e:  # noqa: BLE001 -- OSError, UnidentifiedImageError, DecompressionBombError
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BadDatasetError(f"dataset {self.name!r}: the image {path} cannot be read ({reason}). "
                                  f"Fix: {self.fix}") from None


def _checked_root(data) -> Path:
    """The ImageNet folder of ``--data``, its train/ and val/ present and val/ sorted into class folders (the flat
    layout of the validation archive named, with the script that sorts it): DatasetNotFoundError or
    BadDatasetError, one line each."""
    root = default_dir("imagenet", data)
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DatasetNotFoundError("imagenet", f"the folder {d.name}/ is missing", [d], FIX)
    flat = [p for p in val_dir.iterdir() if p.is_file() and not p.name.startswith(".")
            and p.suffix.lower() in IMAGE_SUFFIXES]
    if flat and visible_dirs(val_dir, ()):          # sorted already: what prepare_imagenet_val.py left in place
        raise BadDatasetError(f"dataset 'imagenet': {val_dir} holds {len(flat)} image file(s) beside its class folders "
                              f"(e.g. {sorted(flat)[0].name}): a sort into class folders that was interrupted, or "
                              "images it left (no label, or a file of that name already in the class folder). Fix: run "
                              "scripts/prepare_imagenet_val.py again (it moves what has a label), then move or delete "
                              "what it leaves")
    if flat:
        raise DatasetNotFoundError(
            "imagenet", f"{val_dir} holds {len(flat)} image files directly (the flat layout of the "
                        "validation archive) instead of one folder per class", [val_dir],
            f"run `python scripts/prepare_imagenet_val.py --val-dir {val_dir} --labels LOC_val_solution.csv` "
            "(from Kaggle's ImageNet object-localization challenge), or with the devkit's "
            "`--labels ILSVRC2012_validation_ground_truth.txt --meta meta.mat`, to move them into wnid folders.")
    return root


def subset_classes(data, classes_file) -> list[str]:
    """The wnids of a ``--classes`` file, sorted (the label order), each checked to be a class folder of
    ``train/`` and of ``val/`` (one listing of each; DataFlagError naming the missing ones)."""
    root = _checked_root(data)
    names = read_class_list(classes_file)
    for split in ("train", "val"):
        folder = root / split
        missing = set(names) - set(visible_dirs(folder, names))
        if missing:
            raise DataFlagError(f"--classes {Path(classes_file).absolute()} names {len(missing)} class(es) with no "
                                f"folder in {folder}: {some(missing)}. Fix: correct the names (one wnid a line), or "
                                "extract those classes")
    return sorted(names)


def load_imagenet(data=None, classes=None) -> tuple[ImageFiles, ImageFiles]:
    """Return (train, val) :class:`ImageFiles` without transforms (the loader applies them), after the
    layout checks of the module docstring (DatasetNotFoundError or BadDatasetError, one line each).
    ``classes``: a ``--classes`` file (None: all 1000 classes)."""
    root = _checked_root(data)
    train_dir, val_dir = root / "train", root / "val"
    if classes is not None:
        classes = subset_classes(data, classes)
        return _files(root, classes)
    classes = visible_dirs(train_dir)
    val_classes = visible_dirs(val_dir)
    if classes != val_classes:
        only_train, only_val = set(classes) - set(val_classes), set(val_classes) - set(classes)
        raise BadDatasetError(
            "dataset 'imagenet': train/ and val/ hold different class folders"
            + (f"; only in {train_dir}: {some(only_train)}" if only_train else "")
            + (f"; only in {val_dir}: {some(only_val)}" if only_val else "")
            + ". Fix: extract the missing class folders again (for val/, run scripts/prepare_imagenet_val.py)")
    if len(classes) != NUM_CLASSES:
        raise BadDatasetError(f"dataset 'imagenet': {train_dir} holds {len(classes)} class folders; ILSVRC-2012 has "
                              f"{NUM_CLASSES}. Fix: extract all of ILSVRC2012_img_train.tar's class archives, or "
                              "pass --classes FILE to train on a subset")
    return _files(root, classes)


def _files(root: Path, classes: list[str]) -> tuple[ImageFiles, ImageFiles]:
    splits = []
    for split_dir in (root / "train", root / "val"):
        samples = []
        for index, wnid in enumerate(classes):
            files = image_files(split_dir / wnid, IMAGE_SUFFIXES)
            if not files:
                raise BadDatasetError(f"dataset 'imagenet': the class folder {split_dir / wnid} holds no image. "
                                      "Fix: extract its images again from the ILSVRC-2012 archive")
            samples += [(p, index) for p in files]
        splits.append(ImageFiles(samples, classes, root))
    return splits[0], splits[1]
