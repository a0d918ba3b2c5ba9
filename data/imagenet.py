"""ImageNet (ILSVRC-2012) as two torchvision ``ImageFolder`` datasets, ``<data>/train`` and ``<data>/val``.

Both folders must hold one sub-folder per wnid (class index = sorted wnid order, ImageFolder's rule).
The validation archive unpacks flat (50,000 images in one folder); ``scripts/prepare_imagenet_val.py``
sorts it into class folders. Without ``--data`` the root is ``./datasets/imagenet`` (or under
``$OKD_DATASETS``). There is no ``--download``: ImageNet needs a login at https://image-net.org.

Transforms (PIL, in DataLoader workers; ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)):
train RandomResizedCrop(224) (scale 0.08-1) + RandomHorizontalFlip + ToTensor + Normalize;
test Resize(256) + CenterCrop(224) + ToTensor + Normalize.
"""
from __future__ import annotations


from torchvision import datasets, transforms

from .common import IMAGENET_MEAN, IMAGENET_STD, DatasetNotFoundError, default_dir

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def train_transform(size: int = 224):
    return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def test_transform(size: int = 224, resize: int = 256):
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_imagenet(data=None) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """Return (train, val) ImageFolders without transforms (the loader applies them)."""
    root = default_dir("imagenet", data)
    train_dir, val_dir = root / "train", root / "val"
    fix = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org, "
           "extract them to <root>/train/<wnid>/*.JPEG and <root>/val/, run "
           "`python scripts/prepare_imagenet_val.py --val-dir <root>/val --labels LOC_val_solution.csv` "
           "and pass --data <root>.")
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DatasetNotFoundError("imagenet", f"the folder {d.name}/ is missing", [d], fix)
    flat = [p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if flat:
        raise DatasetNotFoundError(
            "imagenet", f"{val_dir} holds {len(flat)} image files directly (the flat layout of the "
                        "validation archive) instead of one folder per class", [val_dir],
            f"run `python scripts/prepare_imagenet_val.py --val-dir {val_dir} --labels LOC_val_solution.csv` "
            "(from Kaggle's ImageNet object-localization challenge), or with the devkit's "
            "`--labels ILSVRC2012_validation_ground_truth.txt --meta meta.mat`, to move them into wnid folders.")
    train, val = datasets.ImageFolder(str(train_dir)), datasets.ImageFolder(str(val_dir))
    if train.classes != val.classes:
        raise DatasetNotFoundError("imagenet", f"train/ has {len(train.classes)} class folders and val/ has "
                                   f"{len(val.classes)}, or their names differ", [train_dir, val_dir], fix)
    return train, val
