"""ImageNet (ILSVRC-2012) from ``<data>/train/<wnid>/*.JPEG`` and ``<data>/val/<wnid>/*.JPEG``.

Both folders must hold one sub-folder per wnid (class index = sorted wnid order, ``ImageFolder``'s rule).
The validation archive unpacks flat (50,000 images in one folder); ``scripts/prepare_imagenet_val.py``
sorts it into class folders. Without ``--data`` the root is ``./datasets/imagenet`` (or under
``$OKD_DATASETS``). There is no ``--download``: ImageNet needs a login at https://image-net.org.

**Checked before training** (:func:`load_imagenet`, one directory listing per class, no decoding):
hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.JPEG``) are ignored everywhere; ``train/`` and
``val/`` must hold the same class folders (the difference is named), 1000 of them, none empty.
Images are decoded when the loader reads them (PIL, as RGB: the set's CMYK and greyscale JPEGs and its
PNG named ``.JPEG`` work); one that does not decode stops the run with one line naming its path, and the
last finished epoch's checkpoint is untouched. ``scripts/check_dataset.py`` decodes a whole folder once
and lists every bad file.

Transforms (PIL, in DataLoader workers; ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)):
train RandomResizedCrop(224) (scale 0.08-1) + RandomHorizontalFlip + ToTensor + Normalize;
test Resize(256) + CenterCrop(224) + ToTensor + Normalize.
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset
from torchvision import transforms

from .common import (IMAGENET_MEAN, IMAGENET_STD, BadDatasetError, DatasetNotFoundError, dataset_info, decode_rgb,
                     default_dir, image_files, visible_dirs)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
NUM_CLASSES = dataset_info("imagenet").num_classes
CHECK = "python scripts/check_dataset.py --dataset imagenet --data {root} lists every bad file"


def train_transform(size: int = 224):
    return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def test_transform(size: int = 224, resize: int = 256):
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageFiles(Dataset):
    """A list of (image path, class index) as a dataset of (RGB ``PIL.Image``, label): ``ImageFolder``'s
    interface (``samples``, ``targets``, ``classes``) over a listing made here. A file that does not decode
    raises :class:`BadDatasetError` naming it (also out of a DataLoader worker)."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], root: Path):
        self.samples, self.classes, self.root = samples, classes, root
        self.targets = [y for _, y in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return decode_rgb(path), label
        except Exception as e:  # noqa: BLE001 -- OSError, UnidentifiedImageError, DecompressionBombError
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BadDatasetError(
                f"dataset 'imagenet': the image {path} cannot be read ({reason}). Fix: replace it from the "
                f"ILSVRC-2012 archive (or delete it), then continue with --resume auto: the last finished "
                f"epoch's checkpoint is intact; {CHECK.format(root=self.root)}") from None


def _some(names, k: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def load_imagenet(data=None) -> tuple[ImageFiles, ImageFiles]:
    """Return (train, val) :class:`ImageFiles` without transforms (the loader applies them), after the
    layout checks of the module docstring (DatasetNotFoundError or BadDatasetError, one line each)."""
    root = default_dir("imagenet", data)
    train_dir, val_dir = root / "train", root / "val"
    fix = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org, "
           "extract them to <root>/train/<wnid>/*.JPEG and <root>/val/, run "
           "`python scripts/prepare_imagenet_val.py --val-dir <root>/val --labels LOC_val_solution.csv` "
           "and pass --data <root>.")
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DatasetNotFoundError("imagenet", f"the folder {d.name}/ is missing", [d], fix)
    flat = [p for p in val_dir.iterdir() if p.is_file() and not p.name.startswith(".")
            and p.suffix.lower() in IMAGE_SUFFIXES]
    if flat:
        raise DatasetNotFoundError(
            "imagenet", f"{val_dir} holds {len(flat)} image files directly (the flat layout of the "
                        "validation archive) instead of one folder per class", [val_dir],
            f"run `python scripts/prepare_imagenet_val.py --val-dir {val_dir} --labels LOC_val_solution.csv` "
            "(from Kaggle's ImageNet object-localization challenge), or with the devkit's "
            "`--labels ILSVRC2012_validation_ground_truth.txt --meta meta.mat`, to move them into wnid folders.")
    classes = visible_dirs(train_dir)
    val_classes = visible_dirs(val_dir)
    if classes != val_classes:
        only_train, only_val = set(classes) - set(val_classes), set(val_classes) - set(classes)
        raise BadDatasetError(
            f"dataset 'imagenet': train/ and val/ hold different class folders"
            + (f"; only in {train_dir}: {_some(only_train)}" if only_train else "")
            + (f"; only in {val_dir}: {_some(only_val)}" if only_val else "")
            + ". Fix: extract the missing class folders again (for val/, run scripts/prepare_imagenet_val.py)")
    if len(classes) != NUM_CLASSES:
        raise BadDatasetError(f"dataset 'imagenet': {train_dir} holds {len(classes)} class folders; ILSVRC-2012 has "
                              f"{NUM_CLASSES}. Fix: extract all of ILSVRC2012_img_train.tar's class archives")
    splits = []
    for split_dir in (train_dir, val_dir):
        samples = []
        for index, wnid in enumerate(classes):
            files = image_files(split_dir / wnid, IMAGE_SUFFIXES)
            if not files:
                raise BadDatasetError(f"dataset 'imagenet': the class folder {split_dir / wnid} holds no image. "
                                      "Fix: extract its images again from the ILSVRC-2012 archive")
            samples += [(p, index) for p in files]
        splits.append(ImageFiles(samples, classes, root))
    return splits[0], splits[1]
