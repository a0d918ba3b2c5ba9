"""--dataset folder (data/folder.py) and --classes: any class-folder tree, any number of classes, small or large
images; the checks, the protocols, the cache, the record, two methods trained end to end; ImageNet subsets."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets, transforms

import data.folder as folder
import train_baseline
import train_dml
import train_one
from data import (BadDatasetError, DataFlagError, DatasetError, DatasetNotFoundError, DeviceLoader, TorchLoader,
                  build_loaders, class_difference, dataset_info)
from data.imagenet import ImageFiles
from datasets_on_disk import FOLDER_CLASSES, folder_image, image_bytes, loader_args, run_check, write, write_folder
from engine import UserError, train
from engine.checkpoint import load_checkpoint
from engine.trainer import main
from models import ImageSizeError, check_image_size

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("OKD_DATASETS", str(tmp_path / "no-datasets-here"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def args_for(root, **kw):
    return loader_args(**{"dataset": "folder", "data": str(root), "batch_size": 4, **kw})


def one_line(err) -> str:
    text = str(err.value if hasattr(err, "value") else err)
    assert "\n" not in text, text
    return text


def truncated_png(c: int = 0) -> bytes:
    blob = folder_image(c, 999, "PNG", "RGB", (30, 30))
    return blob[: len(blob) // 2]


GARBAGE = b"this is not an image at all" * 4


def expected_pixels(path, size: int) -> torch.Tensor:
    """The CIFAR protocol's test view of a file as torchvision computes it: RGB, Resize((S, S)), uint8."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    return transforms.PILToTensor()(transforms.Resize((size, size))(rgb))


# --------------------------------------------------------------------------- layout: ImageFolder's rules

def test_classes_and_files_follow_imagefolder(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "val"):
        for c, name in enumerate(["b", "a", "C", "a b"]):                     # sorted, case-sensitive: C, a, a b, b
            write(root / split / name / "x.JPG", folder_image(c, 0, "JPEG"))
            write(root / split / name / "nested" / "y.webp", folder_image(c, 1, "WEBP"))
            write(root / split / name / "z.tiff", folder_image(c, 2, "TIFF"))
            write(root / split / name / "notes.txt", b"not an image")           # not an image extension: skipped
    info = dataset_info("folder", root)
    reference = datasets.ImageFolder(str(root / "train"))
    assert list(info.classes) == reference.classes == ["C", "a", "a b", "b"] and info.num_classes == 4
    tree = folder.scan(root)
    assert tree.samples["train"] == reference.samples and len(tree.samples["val"]) == 12


def test_mixed_formats_modes_and_odd_sizes_decode_as_torchvision_frames_them(tmp_path):
    root = write_folder(tmp_path / "tree", mixed=True, size=21)
    loaders = build_loaders(args_for(root, eval_batch_size=64), "cpu")
    info = loaders.info
    assert info.image_size == 32 and info.protocol == "cifar" and info.crop_padding == 4
    assert isinstance(loaders.test, DeviceLoader)
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    batch = next(iter(loaders.test))
    files = folder.scan(root).samples["val"]
    for k, (path, label) in enumerate(files):                                   # JPEG, PNG; L, RGBA, P; odd sizes
        pixels = (batch.images[k] * std + mean) * 255
        assert torch.allclose(pixels, expected_pixels(path, 32).float(), atol=1e-3), path
        assert batch.labels[k] == label
    grey = [k for k, (p, _) in enumerate(files) if Image.open(p).mode == "L"]
    assert grey and all(torch.allclose(batch.images[k][0] * std[0] + mean[0], batch.images[k][1] * std[1] + mean[1],
                                       atol=1e-5) for k in grey)


def test_hidden_entries_are_ignored_and_symlinks_followed(tmp_path):
    root = write_folder(tmp_path / "tree")
    write(root / "train" / ".ipynb_checkpoints" / "junk.png", GARBAGE)             # a hidden "class"
    write(root / "train" / "cat" / ".ipynb_checkpoints" / "cat_0-checkpoint.png", GARBAGE)
    write(root / "train" / "dog" / ".DS_Store", GARBAGE)
    write(root / "val" / "dog" / "._dog_0.png", GARBAGE)                           # macOS resource fork
    elsewhere = write_folder(tmp_path / "elsewhere", classes=("zebra",), per_split=(("train", 3),))
    shutil.rmtree(root / "train" / "zebra")
    (root / "train" / "zebra").symlink_to(elsewhere / "train" / "zebra")           # a symlinked class folder
    (root / "train" / "cat" / "linked.png").symlink_to(elsewhere / "train" / "zebra" / "zebra_0.png")
    loaders = build_loaders(args_for(root), "cpu")
    assert loaders.info.classes == FOLDER_CLASSES
    assert loaders.record["images_found"] == {"train": 6 + 7 + 6 - 3, "val": 6}
    assert torch.bincount(loaders.train.labels).tolist() == [7, 6, 3]


@pytest.mark.parametrize("links", [["train/cat/loop"], ["train/cat/deeper/loop"], ["val/dog/loop"],
                                   ["train/cat/a", "train/cat/b"], ["train/cat/nested/loop"]])
def test_a_symbolic_link_loop_is_refused_not_walked(tmp_path, links):
    """A link back to a folder above it would list that folder's images some 40 times (the system's limit of
    links), and two such links 2^40 times: refused, naming a link, before anything is trained. Also
    where the looped folder holds only sub-folders of images."""
    root = write_folder(tmp_path / "tree")
    if "nested" in links[0]:
        (root / "train" / "cat").rename(tmp_path / "images")
        (root / "train" / "cat").mkdir()
        (tmp_path / "images").rename(root / "train" / "cat" / "nested")
        links = ["train/cat/loop"]
    for link in links:
        (root / link).parent.mkdir(exist_ok=True)
        (root / link).symlink_to((root / link).parent.parent if "deeper" in link else (root / link).parent)
    named = "|".join(re.escape(str(root / link)) for link in links)          # (the walk's order: either link)
    with pytest.raises(BadDatasetError, match=f"({named}) is a symbolic link back to .*; remove the link"):
        build_loaders(args_for(root), "cpu")


LOOP = re.compile(r"(?:error: )?(.+) is a symbolic link back to (.+), a folder above it: its images would be listed "
                  r"again and again; remove the link")


def named_in_loop_error(text: str) -> tuple[str, str]:
    """(the link, the folder it points to) that a link-loop error names."""
    found = LOOP.fullmatch(text.strip())
    assert found, text
    return found[1], found[2]


# {link: what it points to (a leading / for tmp_path/...: an absolute link)}, the link named, the folder named;
# paths relative to tmp_path, the dataset in tmp_path/tree
LOOP_SHAPES = {
    "to the split folder": ({"tree/train/cat/back": ".."}, "tree/train/cat/back", "tree/train"),
    "to the dataset root": ({"tree/train/cat/back": "../.."}, "tree/train/cat/back", "tree"),
    "absolute, to the dataset root": ({"tree/train/cat/back": "/tree"}, "tree/train/cat/back", "tree"),
    "above the dataset root": ({"tree/train/cat/back": "../../.."}, "tree/train/cat/back", "."),
    "to the class folder": ({"tree/train/cat/sub/up": ".."}, "tree/train/cat/sub/up", "tree/train/cat"),
    "in val/": ({"tree/val/dog/back": "../.."}, "tree/val/dog/back", "tree"),
    "a class folder": ({"tree/train/all": ".."}, "tree/train/all", "tree"),
    "a chain of links": ({"tree/links/root": "..", "tree/train/cat/a": "../../links/root"}, "tree/train/cat/a",
                         "tree"),
    "through another class": ({"tree/train/cat/x": "../dog", "tree/train/dog/y": "../cat"}, "tree/train/cat/x/y",
                              "tree/train/cat"),
}


@pytest.mark.parametrize("shape", LOOP_SHAPES)
def test_a_symbolic_link_loop_names_the_link_not_a_folder_reached_through_it(tmp_path, capsys, shape):
    """The one path that a loop's error names is the symbolic link to remove, with the folder it points to,
    whatever the loop's shape: never a real folder reached through the link (``cat/back/train`` for ``cat/back ->
    ../..``, which is ``train/`` itself: removing it would remove the training set). Training and
    check_dataset.py alike."""
    links, link, target = LOOP_SHAPES[shape]
    root = write_folder(tmp_path / "tree")
    for path, to in links.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).symlink_to(tmp_path / to[1:] if to.startswith("/") else to)
    with pytest.raises(BadDatasetError) as err:
        build_loaders(args_for(root), "cpu")
    named = named_in_loop_error(one_line(err))
    assert named == (str(tmp_path / link), str(tmp_path / target)) and os.path.islink(named[0])
    code, _, text = run_check(capsys, "--dataset", "folder", "--data", str(root), "--workers", "0")
    assert code == 2 and text.count("\n") == 1 and named_in_loop_error(text) == named


def test_a_link_above_through_a_hidden_folder_is_no_loop(tmp_path):
    """The walk skips hidden folders: a link to a folder that holds the data only inside a hidden one
    (``~/.cache/...``) never comes back to it, and is followed as any other link."""
    root = write_folder(tmp_path / ".cache" / "tree")
    (root / "train" / "cat" / "up").symlink_to(tmp_path)
    write(tmp_path / "more" / "x.png", folder_image(0, 7))
    assert len(folder.scan(root).samples["train"]) == 3 * 6 + 1
    (tmp_path / "more" / "back").symlink_to(root)                   # (outside the class folders: the memo holds)
    with pytest.raises(BadDatasetError) as err:
        folder._scan(root, None, True)
    assert named_in_loop_error(one_line(err)) == (str(root / "train" / "cat" / "up" / "more" / "back"), str(root))


@pytest.mark.parametrize("target", ["images", "."])
def test_a_symbolic_link_loop_is_refused_in_a_tinyimagenet_walk(tmp_path, monkeypatch, target):
    """Also in a walk from a relative path, which names the link as the walk reached it, and the folder it
    points to as the walk's path to it, or as its real path when the walk started below it."""
    from data.common import image_files
    (tmp_path / "images" / "a").mkdir(parents=True)
    write(tmp_path / "images" / "a" / "x.png", GARBAGE)
    (tmp_path / "images" / "a" / "up").symlink_to(tmp_path / target)
    with pytest.raises(BadDatasetError) as err:
        image_files(tmp_path / "images")
    assert named_in_loop_error(one_line(err)) == (str(tmp_path / "images" / "a" / "up"), str(tmp_path / target))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadDatasetError) as err:
        image_files("images")
    pointed = "images" if target == "images" else os.path.realpath(tmp_path)
    assert named_in_loop_error(one_line(err)) == (os.path.join("images", "a", "up"), pointed)


def test_empty_class_folder_is_named(tmp_path):
    root = write_folder(tmp_path / "tree")
    for f in (root / "val" / "dog").iterdir():
        f.unlink()
    write(root / "val" / "dog" / "readme.txt", b"no images here")
    with pytest.raises(BadDatasetError, match="1 class folder holds no image") as err:
        dataset_info("folder", root)
    assert str(root / "val" / "dog") in one_line(err) and "delete the empty folder" in str(err.value)


def test_a_class_only_in_val_is_refused_and_one_missing_from_val_is_named(tmp_path):
    root = write_folder(tmp_path / "tree")
    write(root / "val" / "yak" / "y.png", folder_image(5, 0))
    with pytest.raises(BadDatasetError, match="holds 1 class folder.s. that train/ has not: yak") as err:
        build_loaders(args_for(root), "cpu")
    assert "the model could not predict them" in one_line(err)
    shutil.rmtree(root / "val" / "yak")
    shutil.rmtree(root / "val" / "zebra")
    with pytest.warns(UserWarning, match="1 of 3 classes have no folder in .*val and are not evaluated there: zebra"):
        loaders = build_loaders(args_for(root), "cpu")
    assert loaders.info.num_classes == 3 and torch.bincount(loaders.test.labels).tolist() == [2, 2]
    assert loaders.record["warnings"] and "zebra" in loaders.record["warnings"][0]


def test_a_file_where_a_folder_belongs_is_named_a_file(tmp_path):
    """train/cat a file beside val/cat/, or val a file: the message says which file is in the way, not that
    train/ lacks the class or that there is no val/."""
    root = write_folder(tmp_path / "tree")
    shutil.rmtree(root / "train" / "cat")
    (root / "train" / "cat").write_bytes(b"")
    with pytest.raises(BadDatasetError) as err:
        folder.scan(root)
    assert one_line(err).startswith(f"dataset 'folder': {root / 'train' / 'cat'} is a file, where {root / 'val'}/cat/ "
                                    "needs a class folder of training images. Fix:")
    root = write_folder(tmp_path / "tree2")
    shutil.rmtree(root / "val")
    (root / "val").write_bytes(b"")
    with pytest.raises(BadDatasetError) as err:
        build_loaders(args_for(root), "cpu")
    assert f"{root} has no val/ or test/ folder to evaluate on (val/ is a file). Fix:" in one_line(err)


def test_images_outside_the_class_folders_are_named(tmp_path):
    root = write_folder(tmp_path / "tree")
    write(root / "train" / "stray.png", folder_image(5, 0))
    write(root / "train" / "notes.txt", b"not an image")
    with pytest.warns(UserWarning, match=r"1 image\(s\) directly in .*train belong to no class folder and are not "
                                         "used; move them into"):
        loaders = build_loaders(args_for(root), "cpu")
    assert len(loaders.train.labels) == 3 * 6            # the class folders' images only
    assert "belong to no class folder" in loaders.record["warnings"][0]


def test_files_in_the_class_folders_that_are_not_images_are_named(tmp_path):
    """A file of a class folder that is no image by its name (notes, a .heic the loaders cannot read) is left out,
    as by torchvision's ImageFolder, and named in a warning and the run's record rather than dropped silently."""
    root = write_folder(tmp_path / "tree")
    cat = sorted(p for p in (root / "train").iterdir() if p.is_dir())[0]
    write(cat / "notes.txt", b"not an image")
    write(cat / "photo.heic", b"not read either")
    with pytest.warns(UserWarning, match=rf"folder: 2 file\(s\) in the class folders of {root / 'train'} are not "
                                         r"images by their name \(\.jpg .*\) and are not used: .*notes.txt, "
                                         r".*photo.heic"):
        loaders = build_loaders(args_for(root), "cpu")
    assert len(loaders.train.labels) == 3 * 6 and "photo.heic" in loaders.record["warnings"][0]


@pytest.mark.parametrize("classes", [("only",), ()])
def test_fewer_than_two_classes_is_refused(tmp_path, classes):
    root = write_folder(tmp_path / "tree", classes=classes)
    (root / "train").mkdir(parents=True, exist_ok=True)
    if not classes:
        write(root / "train" / "loose.png", folder_image(0, 0))
    with pytest.raises(BadDatasetError, match="a classifier needs at least 2 classes") as err:
        dataset_info("folder", root)
    assert ("1 class folder (only)" if classes else "no class folder and 1 images directly") in one_line(err)


def test_an_evaluation_folder_without_class_folders_says_what_it_holds(tmp_path):
    """val/ with images put in it directly, none in class folders: the line names val/, says it holds none of the
    class folders and how many images lie there directly (they need their class folders), and the fixes."""
    root = write_folder(tmp_path / "tree", per_split=(("train", 2),))
    (root / "val").mkdir()
    write(root / "val" / "a.png", folder_image(0, 1, "PNG", "RGB", (20, 20)))
    with pytest.raises(BadDatasetError) as err:
        dataset_info("folder", root)
    assert one_line(err) == (f"dataset 'folder': {root / 'val'} holds none of the 3 class folders of train/ (1 "
                             f"image(s) directly in it). Fix: {folder.layout_fix(root)}, or remove val/ and pass "
                             "--val-split N")


def test_missing_tree_names_the_folder_and_the_layout(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="the folder train/ is missing") as err:
        dataset_info("folder", tmp_path / "empty")
    assert "train/<class>/<image>" in one_line(err)
    with pytest.raises(DatasetNotFoundError, match=f"the folder {tmp_path / 'nowhere'} does not exist") as err:
        dataset_info("folder", tmp_path / "nowhere")                  # a typo in --data: named as such
    assert "check the path given to --data" in one_line(err) and "train/<class>/<image>" in one_line(err)
    monkeypatch.setenv("OKD_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as err:             # no --data: the default place, said so
        dataset_info("folder")
    assert "give --data DIR, the folder of your images (without it the default place is read)" in one_line(err)
    root = write_folder(tmp_path / "tree")                    # --data given the train/ folder itself
    with pytest.raises(DatasetNotFoundError) as err:
        dataset_info("folder", root / "train")
    assert one_line(err).endswith(f"To get it: pass --data {root}, the folder that holds train/, not train/ itself")


# --------------------------------------------------------------------------- the evaluation split

def test_no_val_or_test_folder_is_refused_unless_val_split_holds_out_the_evaluation_set(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "tree", per_split=(("train", 10),))
    monkeypatch.setattr(folder, "decode_all", lambda *a: pytest.fail("decoded before the refusal"))
    with pytest.raises(BadDatasetError, match="no val/ or test/ folder") as err:
        build_loaders(args_for(root), "cpu")
    assert "--val-split N" in one_line(err) and "val/<class>/" in str(err.value)
    with pytest.raises(BadDatasetError, match="no val/ or test/ folder") as err:   # a checkpoint keeps its own
        build_loaders(args_for(root, eval_only="RUN/best.pt"), "cpu")               # --val-split: not advised
    assert "--val-split" not in one_line(err) and str(err.value).endswith(f"{root}/val/<class>/ with images")
    monkeypatch.undo()
    loaders = build_loaders(args_for(root, val_split=6), "cpu")
    assert loaders.val is None and loaders.n_train == 24
    assert torch.bincount(loaders.test.labels).tolist() == [2, 2, 2]                # stratified
    assert loaders.record["folder"]["splits"]["test"].startswith("--val-split 6: 6 images held out of train/")
    assert "the evaluation set" in loaders.record["folder"]["splits"]["test"]
    assert loaders.record["images_used"] == {"train": 24, "val": 0, "test": 6}
    trained = {tuple(x.flatten().tolist()) for x in loaders.train.images}
    assert not any(tuple(x.flatten().tolist()) in trained for x in loaders.test.images)   # never trained on
    held = build_loaders(args_for(root, val_split=6), "cpu")
    assert torch.equal(held.test.images, loaders.test.images)                      # seeded


def test_a_val_split_that_holds_out_every_image_of_a_class_says_so(tmp_path):
    """A class of one image: --val-split's largest remainder can give it to the hold-out, and the network then
    never trains on that class; a warning names it, and the record keeps the warning (there was none)."""
    root = write_folder(tmp_path / "tree", per_split=(("train", 12),), classes=FOLDER_CLASSES[:3])
    write(root / "train" / "lonely" / "one.png", folder_image(3, 0))
    with pytest.warns(UserWarning, match=r"--val-split 10 holds out every training image of 1 class\(es\) \(lonely\): "
                                         "the network never trains on them; lower --val-split"):
        loaders = build_loaders(args_for(root, val_split=10), "cpu")
    lonely = loaders.info.classes.index("lonely")
    assert torch.bincount(loaders.train.labels, minlength=4).tolist()[lonely] == 0
    assert any("lonely" in w for w in loaders.record["warnings"])


def test_val_and_test_folders_give_validation_and_test_loaders(tmp_path):
    root = write_folder(tmp_path / "tree", per_split=(("train", 4), ("val", 2), ("test", 3)))
    loaders = build_loaders(args_for(root), "cpu")
    assert loaders.val.num_samples == 6 and loaders.test.num_samples == 9
    assert loaders.record["folder"]["splits"] == {"train": "train/", "val": "val/ (chooses best)",
                                                  "test": "test/ (reported)"}
    with pytest.raises(DataFlagError, match="--val-split 3: .* has val/, which chooses the best epoch, and test/"):
        build_loaders(args_for(root, val_split=3), "cpu")
    shutil.rmtree(root / "val")                                                    # test/ alone: the evaluation set
    loaders = build_loaders(args_for(root, val_split=3), "cpu")
    assert loaders.val.num_samples == 3 and loaders.test.num_samples == 9 and loaders.n_train == 9


# --------------------------------------------------------------------------- size, protocol, statistics

def test_default_size_is_the_median_side_rounded_to_32_64_or_224(tmp_path):
    assert [folder.nearest_size(s) for s in (8, 28, 44, 46, 64, 100, 119, 121, 500)] == \
        [32, 32, 32, 64, 64, 64, 64, 224, 224]
    root = write_folder(tmp_path / "tree", size=50)
    info = dataset_info("folder", root)
    assert (info.image_size, info.crop_padding, info.protocol, info.default_loader) == (64, 8, "cifar", "device")
    assert folder.scan(root).size_note == "the median shorter side of 18 training images is 50 px: 64"
    big = write_folder(tmp_path / "big", size=130, per_split=(("train", 2), ("test", 1)))
    info = dataset_info("folder", big)
    assert (info.image_size, info.crop_padding, info.protocol, info.default_loader) == (224, 0, "imagenet", "torch")
    assert dataset_info("folder", big, image_size=48).image_size == 48


def test_cifar_protocol_in_memory_and_streamed_give_the_same_batches(tmp_path, monkeypatch):
    """The decoded arrays (device and torch loaders) and the files streamed by DataLoader workers: the same
    test views, and under the torch loader the same augmented training batches, epoch by epoch (the
    (seed, epoch, rank) contract)."""
    root = write_folder(tmp_path / "tree", mixed=True, size=23)
    in_memory = build_loaders(args_for(root, loader="torch"), "cpu")
    device = build_loaders(args_for(root), "cpu")
    monkeypatch.setattr(folder, "MEMORY_BYTES", 0)
    assert dataset_info("folder", root).default_loader == "torch"
    streamed = build_loaders(args_for(root, workers=1), "cpu")
    assert isinstance(streamed.train, TorchLoader) and isinstance(streamed.train.dataloader.dataset.source, ImageFiles)
    assert streamed.record["folder"]["decoded_in_memory"] is False and streamed.info.mean == in_memory.info.mean
    for a, b, c in zip(in_memory.test, streamed.test, device.test, strict=True):
        assert torch.allclose(a.images, b.images, atol=1e-5) and torch.allclose(a.images, c.images, atol=1e-5)
    seen = []
    for epoch in (0, 1):
        in_memory.train.set_epoch(epoch)
        streamed.train.set_epoch(epoch)
        for a, b in zip(in_memory.train, streamed.train, strict=True):
            assert torch.equal(a.index, b.index) and torch.allclose(a.images, b.images, atol=1e-5)
            seen.append(a.images)
    assert len(seen) == 10 and not torch.allclose(seen[0], seen[5])              # 5 batches an epoch, each its own


def test_imagenet_protocol_above_64_streams_the_files(tmp_path):
    root = write_folder(tmp_path / "tree", size=130, per_split=(("train", 2), ("val", 1)))
    loaders = build_loaders(args_for(root, image_size=96), "cpu")
    info = loaders.info
    assert (info.protocol, info.test_resize) == ("imagenet", 110) and isinstance(loaders.train, TorchLoader)
    assert loaders.record["folder"]["protocol"] == "RandomResizedCrop(96) + flip; test: Resize(110) + CenterCrop(96)"
    path = folder.scan(root).samples["val"][0][0]
    reference = transforms.Compose([transforms.Resize(110), transforms.CenterCrop(96), transforms.ToTensor(),
                                    transforms.Normalize(info.mean, info.std)])(Image.open(path).convert("RGB"))
    assert torch.allclose(next(iter(loaders.test)).images[0], reference, atol=1e-6)
    assert next(iter(loaders.train)).images.shape == (4, 3, 96, 96)
    with pytest.raises(DataFlagError, match="--loader device keeps images decoded at 96x96"):
        build_loaders(args_for(root, image_size=96, loader="device"), "cpu")


def test_mean_and_std_are_the_training_images_own(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "tree", mixed=True)
    info = build_loaders(args_for(root), "cpu").info
    pixels = torch.stack([expected_pixels(p, 32) for p, _ in folder.scan(root).samples["train"]]).double() / 255
    assert np.allclose(info.mean, pixels.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    assert np.allclose(info.std, pixels.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-6)
    monkeypatch.setattr(folder, "STATS_SAMPLE", 6)                                  # streamed: a spread sample
    monkeypatch.setattr(folder, "MEMORY_BYTES", 0)
    loaders = build_loaders(args_for(root), "cpu")
    stats = json.loads(next((root / ".okd_cache").glob("stats-32px-*.json")).read_text())
    assert stats["sampled"] == 6 and stats["of"] == 18 and stats["classes"] == list(FOLDER_CLASSES)
    assert tuple(stats["mean"]) == loaders.info.mean != info.mean


@pytest.mark.parametrize("streamed", [False, True])
def test_mean_and_std_leave_out_the_images_val_split_holds_out(tmp_path, monkeypatch, streamed):
    """--val-split N holds N training images out as the evaluation set: the mean and std are those of the images
    the run trains on (they were measured over all of train/, the held-out test images included), the record says
    which, and the streamed statistics' cache is keyed on the hold-out (another --val-split measures again)."""
    from data.loaders import stratified_split
    root = write_folder(tmp_path / "tree", per_split=(("train", 6),))
    for k in range(6):                  # a few very dark images, so that leaving some out moves the mean
        write(root / "train" / "cat" / f"dark_{k}.png", folder_image(0, k, "PNG", "L", (20, 20)))
    if streamed:
        monkeypatch.setattr(folder, "MEMORY_BYTES", 0)
    files = folder.scan(root).samples["train"]
    kept = stratified_split(torch.tensor([y for _, y in files]), 5, 0)[0].tolist()
    pixels = torch.stack([expected_pixels(files[i][0], 32) for i in kept]).double() / 255
    loaders = build_loaders(args_for(root, val_split=5, image_size=32), "cpu")
    assert len(kept) == loaders.n_train == 19
    assert np.allclose(loaders.info.mean, pixels.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    assert np.allclose(loaders.info.std, pixels.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-6)
    record = loaders.record["folder"]
    assert record["mean_std_of"] == (f"{'19 of the ' if streamed else 'all '}19 training images, train/ less the 5 "
                                     f"images --val-split 5 holds out (seed 0){', evenly spread' if streamed else ''}")
    other = build_loaders(args_for(root, val_split=6, image_size=32), "cpu")
    assert other.info.mean != loaders.info.mean and "less the 6 images" in other.record["folder"]["mean_std_of"]


@pytest.mark.parametrize("streamed", [False, True])
def test_the_mean_and_std_of_each_hold_out_are_cached_in_a_file_of_their_own(tmp_path, monkeypatch, streamed):
    """Runs of seeds 0, 1, 2 with --val-split (as reproduce.py starts them): the streamed statistics had one file,
    whose key named the hold-out, so each start decoded up to 10,000 images again and overwrote the others' file;
    in memory they were measured on every start, on a copy of the whole training tensor (images[keep])."""
    root = write_folder(tmp_path / "tree")
    if streamed:
        monkeypatch.setattr(folder, "MEMORY_BYTES", 0)
    measured, real = [], folder.channel_stats
    monkeypatch.setattr(folder, "channel_stats", lambda images, *keep: measured.append(len(images)) or
                        real(images, *keep))
    means = {seed: build_loaders(args_for(root, val_split=3, seed=seed), "cpu").info.mean for seed in (0, 1, 2)}
    assert measured == ([15] * 3 if streamed else [18] * 3)        # in memory: the arrays, not a copy of 15 of them
    again = {seed: build_loaders(args_for(root, val_split=3, seed=seed), "cpu").info.mean for seed in (2, 0, 1)}
    assert again == means and len(measured) == 3                   # each from its own file
    names = sorted(p.name for p in (root / ".okd_cache").glob("stats-*.json"))
    kind = "streamed" if streamed else "decoded"
    assert [n.split("-", 3)[-1] for n in names] == [f"{kind}-val3-seed{s}.json" for s in (0, 1, 2)]
    blob = json.loads((root / ".okd_cache" / names[1]).read_text())
    assert (blob["held_out"], blob["seed"], blob["of"], blob["sampled"]) == (3, 1, 15, 15)


def test_channel_stats_of_indexed_images_are_those_of_the_copy():
    images = torch.randint(0, 256, (2500, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    keep = torch.arange(0, 2500, 3)
    assert folder.channel_stats(images, keep) == folder.channel_stats(images[keep].clone())


@pytest.mark.parametrize("flags, message", [
    ({"eval_subset": 64}, "--eval-subset 64 exceeds the 6 test samples (the images of {root}/val); give "
                          "--eval-subset 6 or less"),
    ({"subset": 19}, "--subset 19 exceeds the 18 available training samples (the images of {root}/train); give "
                     "--subset 18 or less"),
    ({"subset": 17, "val_split": 3}, "--subset 17 exceeds the 15 available training samples (the images of "
                                     "{root}/train, less the 3 --val-split holds out)"),
    ({"eval_subset": 4, "val_split": 3, "drop_val": True}, "--eval-subset 4 exceeds the 3 test samples (the 3 "
                                                           "images --val-split holds out of {root}/train)"),
    ({"val_split": 500}, "--val-split 500 must be between 1 and 17 (the 18 images of {root}/train); give "
                         "--val-split 17 or less")])
def test_subsets_larger_than_the_folder_are_refused_before_decoding(tmp_path, monkeypatch, flags, message):
    """The scan's counts decide a --subset, --eval-subset or --val-split too large: refused before an image is
    decoded (it came after every image was decoded and cached), naming the folder that holds the images."""
    root = write_folder(tmp_path / "tree")
    if flags.pop("drop_val", False):
        shutil.rmtree(root / "val")
    monkeypatch.setattr(folder, "decode_all", lambda *a, **k: pytest.fail("decoded before the flags were checked"))
    with pytest.raises(ValueError) as err:
        build_loaders(args_for(root, **flags), "cpu")
    assert message.format(root=root) in one_line(err)


def test_sixteen_bit_images_are_refused_in_one_line(tmp_path):
    root = write_folder(tmp_path / "tree")
    bad = root / "train" / "dog" / "deep.png"
    Image.fromarray((np.arange(400).reshape(20, 20) * 100).astype(np.uint16)).save(bad)
    with pytest.raises(BadDatasetError, match="16/32-bit image .PIL mode I;16.") as err:
        build_loaders(args_for(root, image_size=32), "cpu")                      # met when decoding
    assert str(bad) in one_line(err) and "convert it to 8-bit" in str(err.value)


def test_every_sixteen_bit_image_the_size_sample_meets_is_named_in_one_line(tmp_path):
    """The docs promise every 16-bit image named in one line; the size sample named the first only."""
    root = write_folder(tmp_path / "tree")
    bad = [root / "train" / "dog" / "deep.png", root / "train" / "zebra" / "deeper.png"]
    for path in bad:
        Image.fromarray((np.arange(400).reshape(20, 20) * 100).astype(np.uint16)).save(path)
    with pytest.raises(BadDatasetError, match="2 16-bit or float images cannot be read") as err:
        build_loaders(args_for(root), "cpu")                                     # met choosing the size
    assert all(f"{p} (PIL mode I;16)" in one_line(err) for p in bad)


# --------------------------------------------------------------------------- damaged files and the cache

def test_corrupt_files_are_all_named_before_training_and_nothing_is_cached(tmp_path):
    root = write_folder(tmp_path / "tree")
    bad = [write(root / "train" / "cat" / "cut.png", truncated_png()),
           write(root / "val" / "dog" / "junk.jpg", GARBAGE)]
    with pytest.raises(BadDatasetError, match="2 images cannot be read") as err:
        build_loaders(args_for(root), "cpu")
    assert all(str(p) in one_line(err) for p in bad) and "check_dataset.py --dataset folder" in str(err.value)
    assert not list((root / ".okd_cache").glob("images-*"))


@pytest.mark.parametrize("unreadable", ["val/dog", "train/cat/nested", "train"])
def test_a_folder_that_cannot_be_listed_is_named_not_taken_for_empty(tmp_path, monkeypatch, unreadable):
    """A class folder without read permission (faked: the tests may run as root) was reported as holding no
    image, and the fix advised deleting it; it is named as unreadable."""
    root = write_folder(tmp_path / "tree")
    (root / "train" / "cat" / "nested").mkdir()
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(root / unreadable):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(BadDatasetError) as err:
        folder.scan(root)
    assert one_line(err) == (f"cannot list the folder {root / unreadable}: Permission denied. Fix: make it readable "
                             "(e.g. chmod -R a+rX), or move it out of the dataset")


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_class_folder_that_is_a_broken_link_is_named(tmp_path, capsys, split):
    """A class folder that is a symbolic link to nothing (a network share that is not mounted) was dropped without a
    word, by training and the checker alike: the run trained on one class fewer."""
    root = write_folder(tmp_path / "tree")
    os.symlink("/nonexistent/horse", root / split / "horse")
    with pytest.raises(BadDatasetError, match="point to nothing") as err:
        build_loaders(args_for(root), "cpu")
    assert f"{root / split / 'horse'} -> /nonexistent/horse" in one_line(err) and "mount" in str(err.value)
    code, _, err_text = run_check(capsys, "--dataset", "folder", "--data", str(root))
    assert code == 2 and f"{root / split / 'horse'} -> /nonexistent/horse" in err_text


def test_a_broken_link_is_refused_only_where_its_class_folder_is_used(tmp_path):
    """Every broken link of train/ or val/ stopped the run (f112d2f returned the listed classes): a class folder
    that --classes leaves out (ImageNet-100 over a tree with unmounted class links), or a dangling link to a file."""
    root = write_folder(tmp_path / "tree", classes=("ant", "bee", "cat"))
    for split in ("train", "val"):
        os.symlink("/nonexistent/horse", root / split / "horse")
    listing = write(tmp_path / "subset.txt", b"ant\ncat\n")
    assert build_loaders(args_for(root, classes=str(listing)), "cpu").info.classes == ("ant", "cat")
    listing.write_bytes(b"ant\nhorse\n")                                  # listed: its broken link is named
    with pytest.raises(BadDatasetError, match="point to nothing") as err:
        dataset_info("folder", root, classes=listing)
    assert f"{root / 'train' / 'horse'} -> /nonexistent/horse" in one_line(err)
    for split in ("train", "val"):
        os.unlink(root / split / "horse")
        os.symlink("/nonexistent/notes.txt", root / split / "notes.txt")     # a file's link: no class
    assert build_loaders(args_for(root), "cpu").info.classes == ("ant", "bee", "cat")


def write_ilsvrc(root: Path, n_classes: int, train_greens=(20,)) -> list[str]:
    """An ILSVRC-2012 layout with ``n_classes`` wnids: per class one train image per green value of
    ``train_greens`` and one val image (red 40 x the class index). Returns the wnids."""
    wnids = [f"n{i:08d}" for i in range(n_classes)]
    for c, w in enumerate(wnids):
        for k, green in enumerate(train_greens):
            write(root / "train" / w / f"{w}_{k}.JPEG", image_bytes((40 * c, green, 20), size=40))
        write(root / "val" / w / f"ILSVRC2012_val_{c:08d}.JPEG", image_bytes((40 * c, 20, 20), size=40))
    return wnids


def test_an_imagenet_subset_ignores_the_broken_links_of_classes_it_leaves_out(tmp_path):
    root = tmp_path / "ilsvrc"
    wnids = write_ilsvrc(root, 3)
    for split in ("train", "val"):
        os.symlink("/unmounted/n09999999", root / split / "n09999999")
    listing = write(tmp_path / "imagenet100.txt", f"{wnids[0]}\n{wnids[2]}\n".encode())
    assert dataset_info("imagenet", root, classes=listing).classes == (wnids[0], wnids[2])
    listing.write_text(f"{wnids[0]}\nn09999999\n")
    with pytest.raises(BadDatasetError, match="point to nothing") as err:
        dataset_info("imagenet", root, classes=listing)
    assert f"{root / 'train' / 'n09999999'} -> /unmounted/n09999999" in one_line(err)
    with pytest.raises(BadDatasetError, match="n09999999 -> /unmounted/n09999999"):      # all 1000: every link used
        build_loaders(loader_args(dataset="imagenet", data=str(root), batch_size=2), "cpu")


def test_a_broken_link_is_named_as_an_image_that_cannot_be_read(tmp_path):
    root = write_folder(tmp_path / "tree")
    broken = root / "train" / "cat" / "gone.png"
    broken.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(BadDatasetError, match="1 image cannot be read") as err:
        build_loaders(args_for(root), "cpu")
    assert str(broken) in one_line(err)


def test_a_corrupt_file_met_by_the_streaming_loader_is_one_line_naming_it(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "tree", size=130, per_split=(("train", 3), ("val", 1)))
    bad = write(root / "train" / "dog" / "dog_9.png", truncated_png(1))
    monkeypatch.setattr(folder, "STATS_SAMPLE", 2)                                 # the statistics' sample misses it
    loaders = build_loaders(args_for(root, image_size=72), "cpu")
    with pytest.raises(BadDatasetError, match="the image .* cannot be read") as err:
        for _ in loaders.train:
            pass
    assert str(bad) in one_line(err) and "--resume auto" in str(err.value)


def test_the_cache_is_used_and_rebuilt_when_the_tree_changes(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "tree")
    decoded = []
    real = folder.decode_all
    monkeypatch.setattr(folder, "decode_all", lambda items, info: decoded.append(len(items)) or real(items, info))
    first = build_loaders(args_for(root), "cpu")
    assert decoded == [18, 6]
    again = build_loaders(args_for(root), "cpu")
    assert decoded == [18, 6] and torch.equal(again.train.images, first.train.images)     # from the cache
    write(root / "train" / "cat" / "new.png", folder_image(0, 77))                         # added
    assert build_loaders(args_for(root), "cpu").n_train == 19 and decoded[-2:] == [19, 6]
    os.utime(root / "train" / "cat" / "new.png", ns=(1, 1))                               # rewritten (time)
    build_loaders(args_for(root), "cpu")
    assert len(decoded) == 6
    cache = next((root / ".okd_cache").glob("images-*.pt"))
    cache.write_bytes(cache.read_bytes()[:100])                                            # damaged: rebuilt
    with pytest.warns(UserWarning) as caught:
        build_loaders(args_for(root), "cpu")
    said = [str(w.message) for w in caught if "cache" in str(w.message)]
    assert said == [f"folder: the cache file {cache} cannot be read (damaged, cut short or written by another "
                    "version); it is rebuilt from the images"]            # not torch's message about weights_only
    assert len(decoded) == 8
    build_loaders(args_for(root, image_size=48), "cpu")                                    # another size: its own
    assert len(decoded) == 10 and len(list((root / ".okd_cache").glob("images-*.pt"))) == 2


def test_the_previous_versions_caches_and_this_ones_are_each_rebuilt_by_the_other(tmp_path, monkeypatch, recwarn):
    """The decoded arrays' cache lost its mean and std (measured apart, per hold-out) at the same CACHE_VERSION 1,
    so the previous version took this one's file for its own and stopped with KeyError: 'mean'; and this version
    took the previous one's streamed statistics for its own (KeyError: 'sampled'). Each rebuilds the other's."""
    from data.common import load_or_warn, save_or_warn
    root = write_folder(tmp_path / "tree")
    build_loaders(args_for(root), "cpu")
    tree, cache = folder.scan(root), root / ".okd_cache"
    with monkeypatch.context() as old:                          # the keys the previous version computes
        old.setattr(folder, "CACHE_VERSION", 1)
        old_keys = {files: folder.fingerprint(tree, 32, with_files=files) for files in (True, False)}
    images = next(cache.glob("images-32px-*.pt"))
    assert load_or_warn(images, 1, old_keys[True], "folder") is None     # the previous version decodes again
    mean = build_loaders(args_for(root), "cpu").info.mean
    blob = torch.load(images, weights_only=True)
    save_or_warn({**blob, "version": 1, "key": old_keys[True], "mean": [0.5] * 3, "std": [0.25] * 3}, images)
    assert build_loaders(args_for(root), "cpu").info.mean == mean                 # its arrays and stats: not used
    monkeypatch.setattr(folder, "MEMORY_BYTES", 0)                                # streamed
    stats = cache / f"stats-32px-{folder._classes_digest(tree.classes)}.json"
    stats.write_text(json.dumps({"version": 1, "key": old_keys[False], "mean": [0.5] * 3, "std": [0.25] * 3}))
    assert build_loaders(args_for(root), "cpu").info.mean != (0.5,) * 3
    assert not [w for w in recwarn if "folder" in str(w.message)]                  # silently


def test_a_read_only_tree_caches_under_xdg_cache_home(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "tree")
    real_access = os.access
    monkeypatch.setattr(folder.os, "access", lambda p, mode: False if str(p).startswith(str(root)) else
                        real_access(p, mode))
    build_loaders(args_for(root), "cpu")
    assert list((tmp_path / "xdg-cache" / "okd").glob("*/images-32px-*.pt"))


# --------------------------------------------------------------------------- --classes

def test_classes_file_picks_class_folders_in_sorted_order(tmp_path):
    root = write_folder(tmp_path / "tree", classes=("ant", "bee", "cat", "dog"))
    listing = write(tmp_path / "subset.txt", b"# two of them\ndog\n\nbee\n")
    loaders = build_loaders(args_for(root, classes=str(listing)), "cpu")
    assert loaders.info.classes == ("bee", "dog") and loaders.record["classes"] == ["bee", "dog"]
    assert loaders.record["images_found"] == {"train": 12, "val": 4}
    assert loaders.record["folder"]["classes_file"] == str(listing)
    for text, message in ((b"dog\nyak\n", "names 1 class.es. with no folder in .*train: yak"),
                          (b"dog\ndog\nbee\n", "lists dog more than once"), (b"dog\n", "lists 1 class; a classifier"),
                          (b".hidden\ndog\n", "'.hidden' is not a class folder name")):
        listing.write_bytes(text)
        with pytest.raises(DataFlagError, match=message) as err:
            dataset_info("folder", root, classes=listing)
        one_line(err)
    with pytest.raises(DataFlagError, match="no such file"):
        dataset_info("folder", root, classes=tmp_path / "missing.txt")


def test_a_classes_name_in_another_unicode_form_says_so(tmp_path):
    """A --classes file that spells a folder's name in another Unicode form (NFD, as macOS writes names; the
    folder's is NFC) printed a name that looked the same as the folder's; the line now says why they differ."""
    import unicodedata
    root = write_folder(tmp_path / "tree", classes=("cat", "zèbre"))
    listing = write(tmp_path / "subset.txt", ("cat\n" + unicodedata.normalize("NFD", "zèbre") + "\n").encode())
    with pytest.raises(DataFlagError) as err:
        dataset_info("folder", root, classes=listing)
    assert "zèbre: a folder's letters in another Unicode form, as macOS writes names: copy the name from the " \
        "folder)" in unicodedata.normalize("NFC", one_line(err))


def test_a_palette_image_with_transparency_decodes_without_a_warning(tmp_path):
    """PIL warns, naming no file, that a palette image with transparency bytes should go through RGBA; the decoder
    does so: the same RGB, and no warning line without a file name."""
    import warnings
    from data.common import decode_rgb
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    image.info["transparency"] = bytes([0, 128] + [255] * 254)
    image.save(tmp_path / "p.png", transparency=bytes([0, 128] + [255] * 254))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_rgb(tmp_path / "p.png")
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (200, 30, 10)


def test_imagenet_subset_over_an_ilsvrc_tree_without_the_1000_class_rule(tmp_path):
    root = tmp_path / "ilsvrc"
    wnids = write_ilsvrc(root, 6, train_greens=(20, 30))
    with pytest.raises(BadDatasetError, match="holds 6 class folders; ILSVRC-2012 has 1000.*--classes FILE"):
        build_loaders(loader_args(dataset="imagenet", data=str(root), batch_size=2), "cpu")
    listing = write(tmp_path / "imagenet100.txt", ("\n".join([wnids[4], wnids[1], wnids[2]]) + "\n").encode())
    info = dataset_info("imagenet", root, classes=listing)
    assert info.num_classes == 3 and info.classes == (wnids[1], wnids[2], wnids[4]) and info.official_train is None
    loaders = build_loaders(loader_args(dataset="imagenet", data=str(root), batch_size=2, classes=str(listing),
                                        image_size=32), "cpu")
    assert loaders.record["images_found"] == {"train": 6, "test": 3} and loaders.record["official"] is None
    assert loaders.record["classes"] == [wnids[1], wnids[2], wnids[4]]
    assert next(iter(loaders.test)).images.shape == (3, 3, 32, 32) and loaders.info.test_resize == 37
    as_folder = build_loaders(args_for(root, classes=str(listing), batch_size=2), "cpu")     # the same tree as a folder
    assert as_folder.info.classes == loaders.info.classes and as_folder.info.image_size == 32
    listing.write_text(wnids[1] + "\nn99999999\n")
    with pytest.raises(DataFlagError, match="names 1 class.es. with no folder in .*train: n99999999"):
        dataset_info("imagenet", root, classes=listing)


def test_size_and_classes_flags_are_refused_where_they_do_not_apply():
    with pytest.raises(DataFlagError, match="--image-size 64: cifar100's images are 32x32") as err:
        dataset_info("cifar100", image_size=64)
    assert isinstance(err.value, ValueError) and isinstance(err.value, DatasetError)
    assert dataset_info("cifar100", image_size=32).image_size == 32
    with pytest.raises(DataFlagError, match="--classes picks class folders of --dataset folder or imagenet"):
        dataset_info("tinyimagenet", classes="x.txt")
    assert dataset_info("imagenet", image_size=160).test_resize == 183


def test_backbones_that_cannot_take_the_size_are_named():
    check_image_size("resnet20", 8)
    check_image_size("resnet18", 224)
    with pytest.raises(ImageSizeError, match="--arch vgg16 cannot take 16x16 images .* needs at least 32x32") as err:
        check_image_size("vgg16", 16)
    assert "--image-size 32 or more" in one_line(err)


def test_class_difference_names_what_changed():
    assert class_difference(FOLDER_CLASSES, list(FOLDER_CLASSES)) is None
    assert class_difference(FOLDER_CLASSES, ["cat", "dog", "yak", "zebra"]) == \
        "it was trained on 3 classes, this data has 4: yak is new"
    assert class_difference(FOLDER_CLASSES, ["cat", "emu", "yak"]) == \
        "it was trained on 3 classes, this data has 3: emu, yak are new; dog, zebra are missing"
    assert class_difference(["cat", "dog"], ["dog", "cat"]) == \
        "it was trained on the same 2 classes in another order: label 0 is dog here, cat in training"


# --------------------------------------------------------------------------- end to end through the engine

def test_two_methods_train_end_to_end_on_a_folder_and_record_the_classes(tmp_path):
    root = write_folder(tmp_path / "tree", mixed=True, per_split=(("train", 8), ("val", 3)))
    write(root / "train" / ".ipynb_checkpoints" / "x.png", GARBAGE)
    common = ["--dataset", "folder", "--data", str(root), "--arch", "resnet20", "--epochs", "1", "--batch-size", "4",
              "--gpu", "-1", "--threads", "1", "--no-progress"]
    for method in (train_dml.DML, train_one.ONE):
        out = tmp_path / method.name
        results = train(method, common + ["--out", str(out)])
        saved = json.loads((out / "results.json").read_text())
        assert saved["data"]["classes"] == list(FOLDER_CLASSES) and saved["data"] == results["data"]
        assert saved["data"]["folder"]["splits"]["test"] == "val/" and saved["data"]["images_used"]["test"] == 9
        assert len(saved["history"]) == 1 and saved["args"]["num_classes"] == 3
        checkpoint = torch.load(out / "last.pt", weights_only=True)
        assert checkpoint["args"]["dataset"] == "folder"
        assert saved["classes"] == checkpoint["classes"] == list(FOLDER_CLASSES)     # the classes travel with the run


def test_eval_only_evaluates_at_the_size_the_run_was_trained_at(tmp_path):
    """A folder run without --image-size trains at the size its images suggest (20 px: 32). Once the folder holds
    larger images (60 px: 64), --eval-only of its checkpoint still evaluates at 32, the size it was trained at."""
    root = write_folder(tmp_path / "tree", per_split=(("train", 2), ("val", 1)), size=20)
    common = ["--gpu", "-1", "--threads", "1", "--no-progress"]
    trained = train(train_baseline.Baseline, common + ["--dataset", "folder", "--data", str(root), "--arch",
                                                       "resnet20", "--epochs", "1", "--batch-size", "4", "--out",
                                                       str(tmp_path / "run")])
    assert trained["image_size"] == 32
    shutil.rmtree(root)
    write_folder(root, per_split=(("train", 2), ("val", 1)), size=60)
    evaluated = train(train_baseline.Baseline, common + ["--eval-only", str(tmp_path / "run" / "best.pt")])
    assert evaluated["epoch"] == 1 and evaluated["image_size"] == 32


def test_a_checkpoint_is_normalised_as_it_was_trained_whatever_copy_of_the_data(tmp_path, capsys):
    """A folder's mean and std are measured on its training images. --eval-only of a checkpoint on another copy of
    the data (here: the same val/ images, other training images) and a resumed run both use the checkpoint's, and
    say so where the copy's own differ (they were used instead, silently)."""
    root = write_folder(tmp_path / "tree", per_split=(("train", 4), ("val", 2)))
    out = tmp_path / "run"
    argv = ["--dataset", "folder", "--data", str(root), "--arch", "resnet20", "--batch-size", "4", "--gpu", "-1",
            "--threads", "1", "--no-progress", "--out", str(out)]
    trained = train(train_baseline.Baseline, argv + ["--epochs", "1"])
    copy = tmp_path / "copy"
    shutil.copytree(root / "val", copy / "val")
    for image in (root / "train").rglob("*.png"):              # as many training images, darker ones
        (copy / image.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(Image.open(image)) // 4).save(copy / image.relative_to(root))
    evaluate = ["--gpu", "-1", "--threads", "1", "--no-progress", "--eval-only", str(out / "last.pt"), "--out"]
    capsys.readouterr()
    on_copy = train(train_baseline.Baseline, evaluate + [str(tmp_path / "e1"), "--data", str(copy)])
    assert "folder: normalised with the checkpoint's mean" in capsys.readouterr().out
    assert on_copy["test"] == train(train_baseline.Baseline, evaluate + [str(tmp_path / "e2")])["test"]
    resumed = train(train_baseline.Baseline, argv + ["--epochs", "2", "--extend-epochs", "--resume", "auto",
                                                     "--data", str(copy)])
    assert resumed["data"]["folder"]["mean"] == trained["data"]["folder"]["mean"]


def test_a_run_found_by_its_options_resumes_normalised_as_it_was_trained(tmp_path, monkeypatch):
    """--resume auto without --out: the run's folder, and so its checkpoint, is found by the Run (the command line
    names none); the resumed epochs still use the checkpoint's mean and std, not those of the training images as
    they are now (darkened in place, as many)."""
    from toy_methods import interrupted
    monkeypatch.setenv("OKD_RUNS", str(tmp_path / "runs"))
    root = write_folder(tmp_path / "tree", per_split=(("train", 4), ("val", 2)))
    argv = ["--dataset", "folder", "--data", str(root), "--arch", "resnet20", "--batch-size", "4", "--gpu", "-1",
            "--threads", "1", "--no-progress", "--epochs", "2"]
    with pytest.raises(KeyboardInterrupt):
        train(interrupted(train_baseline.Baseline, 1), argv)
    trained = load_checkpoint(next((tmp_path / "runs").iterdir()) / "last.pt")["data"]["folder"]
    for image in (root / "train").rglob("*.png"):
        Image.fromarray(np.asarray(Image.open(image)) // 4).save(image)
    resumed = train(train_baseline.Baseline, argv + ["--resume", "auto"])
    assert resumed["epochs_done"] == 2 and len(list((tmp_path / "runs").iterdir())) == 1
    assert resumed["data"]["folder"]["mean"] == trained["mean"]


def test_a_relative_data_or_classes_is_recorded_as_the_folder_it_named(tmp_path, monkeypatch):
    """--data and --classes given relative to the current folder are recorded absolute: resumed or evaluated from
    another folder that holds a different copy under the same relative name (same classes, same counts), the run
    reads the folder it was trained on, and its record says so (it once read the other copy, silently)."""
    from engine.checkpoint import atomic_save
    from toy_methods import interrupted
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for where, seed_images in ((here, False), (elsewhere, True)):
        root = write_folder(where / "ds", per_split=(("train", 4), ("val", 2)))
        if seed_images:                                  # another copy: the same names, other pixels
            for image in root.rglob("*.png"):
                Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
        (where / "classes.txt").write_text("\n".join(FOLDER_CLASSES[:2]) + "\n")
    monkeypatch.chdir(here)
    argv = ["--dataset", "folder", "--data", "ds", "--classes", "classes.txt", "--arch", "resnet20", "--batch-size",
            "4", "--gpu", "-1", "--threads", "1", "--no-progress", "--epochs", "2", "--out", str(tmp_path / "run")]
    with pytest.raises(KeyboardInterrupt):
        train(interrupted(train_baseline.Baseline, 1), argv)
    trained = load_checkpoint(tmp_path / "run" / "last.pt")
    assert trained["args"]["data"] == str(here / "ds") and trained["args"]["classes"] == str(here / "classes.txt")
    monkeypatch.chdir(elsewhere)
    evaluated = train(train_baseline.Baseline, ["--eval-only", str(tmp_path / "run" / "last.pt"), "--gpu", "-1",
                                                "--no-progress", "--out", str(tmp_path / "eval")])
    assert evaluated["data"] == str(here / "ds")
    resumed = train(train_baseline.Baseline, ["--resume", str(tmp_path / "run" / "last.pt"), "--gpu", "-1",
                                              "--no-progress", "--threads", "1"])
    assert resumed["epochs_done"] == 2 and resumed["data"]["source"] == trained["data"]["source"]
    assert resumed["args"]["data"] == str(here / "ds")
    old = {**trained, "args": {**trained["args"], "data": "ds", "classes": "classes.txt"}}   # as older versions wrote
    atomic_save(old, tmp_path / "old" / "last.pt")
    evaluated = train(train_baseline.Baseline, ["--eval-only", str(tmp_path / "old" / "last.pt"), "--gpu", "-1",
                                                "--no-progress", "--classes", str(here / "classes.txt")])
    assert evaluated["data"] == str(here / "ds")            # the folder it read (its record), not ./ds here


def test_an_evaluation_names_the_folders_splits_as_the_run_recorded_them(tmp_path):
    """--eval-only of a run on a folder with train/ only, evaluated on a hold-out (--val-split): the evaluation
    file says which images it evaluated as results.json does (it once said 'the folder test set', which the folder
    does not have)."""
    root = write_folder(tmp_path / "tree", per_split=(("train", 6),))
    out = tmp_path / "run"
    trained = train(train_baseline.Baseline, ["--dataset", "folder", "--data", str(root), "--val-split", "9", "--arch",
                                              "resnet20", "--epochs", "1", "--batch-size", "4", "--gpu", "-1",
                                              "--threads", "1", "--no-progress", "--out", str(out)])
    recorded = trained["data"]["folder"]["splits"]["test"]
    assert recorded.startswith("--val-split 9: 9 images held out of train/")
    evaluated = train(train_baseline.Baseline, ["--eval-only", str(out / "best.pt"), "--gpu", "-1", "--no-progress"])
    assert evaluated["splits"] == {"test": recorded}
    subset = train(train_baseline.Baseline, ["--eval-only", str(out / "best.pt"), "--gpu", "-1", "--no-progress",
                                             "--eval-subset", "3", "--out", str(tmp_path / "e")])
    assert subset["splits"] == {"test": f"3 images of {recorded} (stratified, seed 0)"}


def test_a_run_of_an_older_version_with_a_relative_classes_file_resumes(tmp_path, monkeypatch):
    """A checkpoint of an older version records --classes as typed (``classes.txt``): resumed from elsewhere with
    --classes naming that file absolutely, it is the same file (it was refused as trained with another --classes),
    and the run reads it, not a ``classes.txt`` of the current folder."""
    from engine.checkpoint import atomic_save
    from toy_methods import interrupted
    root = write_folder(tmp_path / "tree", per_split=(("train", 4), ("val", 2)))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    argv = ["--dataset", "folder", "--data", str(root), "--arch", "resnet20", "--batch-size", "4", "--gpu", "-1",
            "--threads", "1", "--no-progress", "--epochs", "2", "--out", str(tmp_path / "run")]
    with pytest.raises(KeyboardInterrupt):
        train(interrupted(train_baseline.Baseline, 1), argv + ["--classes", str(tmp_path / "classes.txt")])
    last = tmp_path / "run" / "last.pt"
    ckpt = load_checkpoint(last)
    atomic_save({**ckpt, "args": {**ckpt["args"], "classes": "classes.txt"}}, last)      # as an older version wrote it
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "classes.txt").write_text("cat\nzebra\n")                # another file of that name
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = train(train_baseline.Baseline, ["--resume", str(last), "--classes", str(tmp_path / "classes.txt"),
                                              "--gpu", "-1", "--threads", "1", "--no-progress"])
    assert resumed["epochs_done"] == 2 and resumed["classes"] == ["cat", "dog"]


def test_a_resume_on_a_folder_that_gained_or_lost_images_is_refused(tmp_path):
    """The later epochs of a resumed run train on the images its checkpoint was trained on: a folder that has
    gained (or lost) images since is named with both counts, and nothing of the run changes. --eval-only of the
    checkpoint evaluates on the folder as it is."""
    root = write_folder(tmp_path / "tree", per_split=(("train", 4), ("val", 1)))
    out = tmp_path / "run"
    argv = ["--dataset", "folder", "--data", str(root), "--arch", "resnet20", "--batch-size", "4", "--gpu", "-1",
            "--threads", "1", "--no-progress", "--out", str(out), "--epochs"]
    train(train_baseline.Baseline, argv + ["1"])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    write(root / "train" / FOLDER_CLASSES[0] / "added.png", folder_image(0, 99, "PNG", "RGB", (20, 20)))
    with pytest.raises(UserError) as e:
        train(train_baseline.Baseline, argv + ["2", "--resume", "auto", "--extend-epochs"])
    assert one_line(e) == (f"{out / 'last.pt'} was trained on 12 train / 3 val images; this data has 13 train / 3 val "
                           "(images added or removed since?): give the data it was trained on, or start a new run "
                           "with another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    evaluated = train(train_baseline.Baseline, ["--eval-only", str(out / "last.pt"), "--gpu", "-1", "--no-progress"])
    assert evaluated["images_used"] == {"train": 13, "val": 0, "test": 3}    # the folder as it is, said so
    (root / "train" / FOLDER_CLASSES[0] / "added.png").unlink()
    assert train(train_baseline.Baseline, argv + ["2", "--resume", "auto", "--extend-epochs"])["epochs_done"] == 2


@pytest.mark.slow
def test_an_image_that_breaks_in_a_loader_worker_ends_the_process(tmp_path):
    """An image that cannot be read, met by a worker of the file-reading loader in the middle of training (its
    statistics cached by an earlier run), stops the run with the one line and exit status 2, and the process
    ends: the workers, which leave the stop signals to the training process, do not keep it waiting."""
    import subprocess
    import sys
    root = write_folder(tmp_path / "tree", per_split=(("train", 4), ("val", 1)), size=72)
    command = [sys.executable, "train_baseline.py", "--dataset", "folder", "--data", str(root), "--arch", "resnet20",
               "--image-size", "72", "--loader", "torch", "--workers", "2", "--epochs", "1", "--batch-size", "4",
               "--gpu", "-1", "--threads", "1", "--no-progress"]
    first = subprocess.run(command + ["--out", str(tmp_path / "first")], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    image = sorted((root / "train" / "cat").iterdir())[0]
    image.write_bytes(image.read_bytes()[:image.stat().st_size // 2])
    try:
        second = subprocess.run(command + ["--out", str(tmp_path / "second")], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not end after the error (its loader workers kept it waiting)")
    assert second.returncode == 2, second.stderr
    assert f"the image {image} cannot be read" in second.stderr.splitlines()[-1]
    assert "Traceback" not in second.stderr, second.stderr


@pytest.mark.slow
def test_the_classes_travel_with_the_run(tmp_path, monkeypatch):
    """The class names and their order are in results.json, every checkpoint and an export; --eval-only and a
    resume on a folder with other classes refuse in one line naming the difference; two folders get their own
    default run folders."""
    import subprocess
    import sys
    root = write_folder(tmp_path / "tree", per_split=(("train", 4), ("val", 2)))
    other = write_folder(tmp_path / "other", classes=("cat", "dog", "yak"), per_split=(("train", 4), ("val", 2)))
    monkeypatch.setenv("OKD_RUNS", str(tmp_path / "runs"))
    common = ["--dataset", "folder", "--arch", "resnet20", "--epochs", "1", "--batch-size", "4", "--gpu", "-1",
              "--threads", "1", "--no-progress"]
    first = train(train_dml.DML, common + ["--data", str(root)])
    train(train_dml.DML, common + ["--data", str(other)])
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert [re.sub(r"-[0-9a-f]{6}-n2.*", "", f) for f in folders] == ["dml-resnet20-folder-other",
                                                                     "dml-resnet20-folder-tree"]
    run = tmp_path / "runs" / folders[1]
    assert first["classes"] == torch.load(run / "best.pt", weights_only=True)["classes"] == list(FOLDER_CLASSES)
    export = subprocess.run([sys.executable, "scripts/export_peer.py", str(run / "best.pt"), "--peer", "1", "-o",
                             str(tmp_path / "peer1.pt")], cwd=REPO, capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    assert torch.load(tmp_path / "peer1.pt", weights_only=True)["classes"] == list(FOLDER_CLASSES)
    with pytest.raises(UserError) as e:
        train(train_dml.DML, ["--gpu", "-1", "--eval-only", str(run / "best.pt"), "--data", str(other)])
    assert "does not fit this data: it was trained on 3 classes, this data has 3: yak is new; zebra is missing" in str(e.value)
    with pytest.raises(UserError, match="does not fit this data"):
        train(train_dml.DML, ["--gpu", "-1", "--resume", str(run / "last.pt"), "--data", str(other), "--epochs", "2",
                              "--extend-epochs", "--out", str(tmp_path / "elsewhere")])
    # without --data: the folder it was trained from, still there (the default place holds no dataset)
    monkeypatch.chdir(tmp_path)
    assert train(train_dml.DML, ["--gpu", "-1", "--eval-only", str(run / "best.pt")])["dataset"] == "folder"
    longer = train(train_dml.DML, ["--gpu", "-1", "--threads", "1", "--no-progress", "--resume", str(run / "last.pt"),
                                   "--epochs", "2", "--extend-epochs", "--out", str(tmp_path / "longer")])
    assert longer["epochs_done"] == 2 and longer["args"]["data"] == str(root)
    # moved away: the message names where it was trained from and the flag that says where it is now
    root.rename(tmp_path / "moved")
    with pytest.raises(UserError, match=f"was trained on --data {root}, which is no longer there; give --data"):
        train(train_dml.DML, ["--gpu", "-1", "--eval-only", str(run / "best.pt")])
    assert train(train_dml.DML, ["--gpu", "-1", "--eval-only", str(run / "best.pt"), "--data",
                                 str(tmp_path / "moved")])["dataset"] == "folder"


@pytest.mark.slow
def test_an_imagenet_protocol_folder_trains_streamed(tmp_path):
    root = write_folder(tmp_path / "tree", size=90, per_split=(("train", 4), ("val", 1)))
    out = tmp_path / "run"
    results = train(train_baseline.Baseline, ["--dataset", "folder", "--data", str(root), "--image-size", "72",
                                              "--arch", "resnet18", "--epochs", "1", "--batch-size", "6",
                                              "--workers", "1", "--gpu", "-1", "--threads", "1", "--no-progress",
                                              "--out", str(out)])
    assert results["args"]["loader"] == "torch" and results["data"]["folder"]["decoded_in_memory"] is False
    assert json.loads((out / "results.json").read_text())["data"]["folder"]["image_size"] == 72


def test_the_engine_refuses_a_backbone_for_the_size_before_decoding(tmp_path, capsys, monkeypatch):
    root = write_folder(tmp_path / "tree", size=16)
    monkeypatch.setattr(folder, "decode_all", lambda *a: pytest.fail("decoded before the refusal"))
    with pytest.raises(SystemExit) as exit_:
        main(train_dml.DML, ["--dataset", "folder", "--data", str(root), "--arch", "vgg16", "--image-size", "16",
                             "--gpu", "-1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "--arch vgg16 cannot take 16x16 images" in err
    with pytest.raises(SystemExit):
        main(train_dml.DML, ["--dataset", "folder", "--data", str(root / "train"), "--gpu", "-1",
                             "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: dataset 'folder': the folder train/ is missing")


@pytest.mark.parametrize("out", ["train/runs", "val", "test/a/b"])
def test_an_out_inside_the_class_folders_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, out):
    """A run directory inside train/ (or val/, test/) would be listed as a class of its own, an empty one, and no
    later run on the data (this one resumed included) could start: refused in one line before anything is decoded,
    nothing created; so is an evaluation's --out there, and a default run folder there (the working directory)."""
    root = write_folder(tmp_path / "tree")
    monkeypatch.setattr(folder, "decode_all", lambda *a: pytest.fail("decoded before the refusal"))
    with pytest.raises(SystemExit) as exit_:
        main(train_dml.DML, ["--dataset", "folder", "--data", str(root), "--gpu", "-1", "--out", str(root / out)])
    err = capsys.readouterr().err.strip()
    split = root / out.split("/")[0]
    assert exit_.value.code == 2 and err == (f"error: {root / out} lies inside {split}, where each folder is a "
                                             "class of the dataset: the run's folder would be read as a class of "
                                             f"images. Give an --out outside {split}")
    assert not (root / out).exists() or out == "val"
    if out != "train/runs":
        return
    monkeypatch.chdir(root / "train")
    with pytest.raises(SystemExit):
        main(train_dml.DML, ["--dataset", "folder", "--data", str(root), "--gpu", "-1"])
    assert f"runs/dml-resnet32-folder-tree-" in capsys.readouterr().err
    assert not (root / "train" / "runs").exists()


@pytest.mark.parametrize("dataset", ["imagenet", "folder", "synthetic"])
def test_training_refuses_download_where_there_is_nothing_to_download(tmp_path, capsys, dataset):
    """As check_dataset.py does: --download of ImageNet (a login), a folder (your files) or synthetic data is one
    line, not silently ignored, and nothing is trained."""
    root = write_folder(tmp_path / "tree") if dataset == "folder" else tmp_path
    data = ["--data", str(root)] if dataset != "synthetic" else []
    with pytest.raises(SystemExit) as exit_:
        main(train_dml.DML, ["--dataset", dataset, *data, "--download", "--arch", "resnet20", "--gpu", "-1",
                             "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err, err
    assert err.startswith("error: --download: ") and err.endswith("Fix: leave --download out")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow   # two torchrun processes
@pytest.mark.parametrize("image_size", ["32", "72"])
def test_two_ranks_under_torchrun_train_on_a_folder(tmp_path, image_size):
    """Rank 0 checks and decodes (and writes the cache), the other rank then reads it; the same for a streamed
    folder, whose statistics rank 0 measures. Both ranks see the same classes and sizes."""
    import subprocess
    import sys
    root = write_folder(tmp_path / "tree", size=40, per_split=(("train", 8), ("val", 2)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_worker.py"), "train_dml", "--dataset", "folder", "--data", str(root),
           "--image-size", image_size, "--arch", "resnet20", "--epochs", "1", "--batch-size", "4", "--workers", "0",
           "--gpu", "-1", "--no-progress", "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["data"]["classes"] == list(FOLDER_CLASSES) and saved["data"]["folder"]["image_size"] == int(image_size)
    kind = "images" if image_size == "32" else "stats"
    assert len(list((root / ".okd_cache").glob(f"{kind}-{image_size}px-*"))) == 1


# --------------------------------------------------------------------------- scripts/check_dataset.py

def test_names_that_are_not_utf8_are_hashed_printed_and_recorded(tmp_path, capsys):
    """A file and a class folder whose names are not valid UTF-8 (bytes a Latin-1 copy leaves, here 0xf6 and 0xe4):
    a whole run trains on them and records the class as the name Python reads (a surrogate escape), the checker
    passes the tree, and a TinyImageNet file so named is hashed for its cache (each stopped with "surrogates not
    allowed", naming nothing)."""
    from data.tinyimagenet import load_tinyimagenet
    from datasets_on_disk import write_tinyimagenet
    root = write_folder(tmp_path / "tree", per_split=(("train", 4), ("val", 2)))
    os.rename(os.fsencode(root / "train" / "dog" / "dog_1.png"), os.fsencode(root / "train" / "dog") + b"/d\xf6g.png")
    for split in ("train", "val"):
        os.rename(os.fsencode(root / split / "cat"), os.fsencode(root / split) + b"/c\xe4t")
    out = tmp_path / "run"
    train(train_baseline.Baseline, ["--dataset", "folder", "--data", str(root), "--arch", "resnet20", "--epochs", "1",
                                    "--batch-size", "4", "--gpu", "-1", "--threads", "1", "--no-progress", "--out",
                                    str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["data"]["classes"] == [os.fsdecode(b"c\xe4t"), "dog", "zebra"]
    assert saved["data"]["images_used"] == {"train": 12, "val": 0, "test": 6}
    code, out_text, _ = run_check(capsys, "--dataset", "folder", "--data", str(root))
    assert code == 0 and "3 classes (c\\xe4t, dog, zebra)" in out_text, out_text
    with open(os.fsencode(root / "train" / "dog") + b"/\xe9bad.png", "wb") as f:
        f.write(GARBAGE)
    code, out_text, _ = run_check(capsys, "--dataset", "folder", "--data", str(root), "--out", str(tmp_path / "bad"))
    assert code == 1 and f"{root}/train/dog/\\xe9bad.png: cannot identify" in out_text, out_text
    assert (tmp_path / "bad").read_bytes() == os.fsencode(root / "train" / "dog") + b"/\xe9bad.png\n"
    with pytest.raises(DatasetError, match=r"dog/\\xe9bad\.png \(cannot identify"):
        train(train_baseline.Baseline, ["--dataset", "folder", "--data", str(root), "--gpu", "-1", "--out",
                                        str(tmp_path / "run2")])
    tiny = write_tinyimagenet(tmp_path / "tiny")
    first = next((tiny / "train").iterdir()) / "images"
    image = next(first.iterdir())
    os.rename(os.fsencode(image), os.fsencode(first) + b"/x\xf6.JPEG")
    train_set, _ = load_tinyimagenet(tiny)
    assert len(train_set.labels) == 200


def test_check_dataset_takes_folder(tmp_path, capsys):
    root = write_folder(tmp_path / "tree", mixed=True)
    code, out, _ = run_check(capsys, "--dataset", "folder", "--data", str(root), "--workers", "0")
    assert code == 0 and "3 classes" in out and "all 24 images decode" in out and "--val-split" not in out
    train_only = write_folder(tmp_path / "train_only", per_split=(("train", 2),))      # training needs --val-split
    code, out, _ = run_check(capsys, "--dataset", "folder", "--data", str(train_only), "--workers", "0")
    assert code == 0 and "note: no val/ or test/ folder: training needs --val-split N" in out
    bad = [write(root / "train" / "cat" / "cut.png", truncated_png()),
           write(root / "val" / "dog" / "junk.jpg", GARBAGE)]
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(root / "train" / "dog" / "deep.png")
    bad.append(root / "train" / "dog" / "deep.png")
    write(root / "train" / ".ipynb_checkpoints" / "x.png", GARBAGE)                 # hidden: not checked
    code, out, err = run_check(capsys, "--dataset", "folder", "--data", str(root), "--workers", "0")
    listed = [line.split(": ")[0] for line in out.splitlines() if line.startswith(str(root))]
    assert code == 1 and sorted(listed) == sorted(map(str, bad))
    assert "3 of 27 images cannot be decoded" in err
    listing = write(tmp_path / "two.txt", b"cat\nzebra\n")
    code, out, _ = run_check(capsys, "--dataset", "folder", "--data", str(root), "--classes", str(listing),
                             "--workers", "0")
    assert code == 1 and "2 classes" in out and str(bad[0]) in out and str(bad[1]) not in out
    shutil.rmtree(root / "val" / "dog")
    write(root / "val" / "yak" / "y.png", folder_image(0, 0))
    code, _, err = run_check(capsys, "--dataset", "folder", "--data", str(root))
    assert code == 2 and "yak" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- real data: Fashion-MNIST as PNG folders

FASHION = Path("/usr/share/datasets/fashion-mnist")
# DML, 2 x ResNet-20, the same 2,000 training and 1,000 test images (stratified, seed S), 3 epochs at lr 0.05,
# batch 32 (63 steps an epoch, the last of 16 images), CPU, one thread: ensemble top-1 (%) after each epoch,
# seeds 0, 1, 2 (docs/data.md).
MEASURED = {"built-in": [(48.7, 60.2, 75.0), (56.3, 69.9, 75.9), (67.4, 61.9, 75.5)],
            "folder": [(67.2, 29.4, 70.7), (62.4, 66.2, 76.8), (55.3, 67.6, 76.2)]}


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_as_png_folders_learns_as_the_built_in_loader(tmp_path):
    """The same images through the built-in loader (28 x 28 zero-padded to 32, Fashion-MNIST's mean and std) and
    as PNG class folders (28 px: 32 chosen, resized to 32 x 32, their own mean and std): DML learns alike, each
    epoch within the spread that the seeds give (MEASURED), the last epochs as close as the seeds' last epochs."""
    from datasets_on_disk import fashion_mnist_as_folders
    tree = fashion_mnist_as_folders(tmp_path / "fm", 2000, 1000, seed=0)
    common = ["--arch", "resnet20", "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--seed", "0",
              "--gpu", "-1", "--threads", "1", "--no-progress"]
    runs = {"built-in": ["--dataset", "fashion-mnist", "--subset", "2000", "--eval-subset", "1000"],
            "folder": ["--dataset", "folder", "--data", str(tree)]}
    curves = {}
    for kind, data_flags in runs.items():
        results = train(train_dml.DML, common + data_flags + ["--out", str(tmp_path / kind)])
        assert results["data"]["images_used"] == {"train": 2000, "val": 0, "test": 1000}
        curves[kind] = [h["test"]["ensemble/top1"] for h in results["history"]]
    assert results["data"]["folder"]["image_size_from"].endswith("is 28 px: 32")
    assert results["data"]["classes"][0] == "0-T-shirt-top" and len(results["data"]["classes"]) == 10
    everything = [run for runs_ in MEASURED.values() for run in runs_]
    for epoch in range(3):
        low, high = min(r[epoch] for r in everything), max(r[epoch] for r in everything)
        for kind, curve in curves.items():
            assert low - 5 <= curve[epoch] <= high + 5, (kind, epoch + 1, curve, (low, high))
    last = [run[-1] for run in everything]
    assert abs(curves["folder"][-1] - curves["built-in"][-1]) <= max(last) - min(last)
    assert min(c[-1] for c in curves.values()) > 65


def test_the_statistics_of_each_loader_and_a_disagreeing_hold_out(tmp_path, monkeypatch):
    """--loader device and --loader torch measure a set otherwise (all decoded images; up to 10,000 streamed): each
    has its file, so switching measures neither again (they overwrote one file); a hand-edited file without a field
    is measured again, not a KeyError; held_out without the indices it leaves is refused (a record stated a
    hold-out while every image was measured)."""
    root = write_folder(tmp_path / "tree")
    monkeypatch.setattr(folder, "MEMORY_BYTES", 0)
    measured, real = [], folder.channel_stats
    monkeypatch.setattr(folder, "channel_stats", lambda images, *keep: measured.append(1) or real(images, *keep))
    for kind in ("torch", "device", "torch", "device"):
        build_loaders(args_for(root, loader=kind), "cpu")
    assert len(measured) == 2 and len(list((root / ".okd_cache").glob("stats-*.json"))) == 2
    stats = next((root / ".okd_cache").glob("stats-*-decoded.json"))
    stats.write_text(json.dumps({k: v for k, v in json.loads(stats.read_text()).items() if k != "sampled"}))
    build_loaders(args_for(root, loader="device"), "cpu")
    assert len(measured) == 3
    with pytest.raises(ValueError, match=r"held_out \(3, 0\) and keep disagree"):
        folder.load_folder(root, held_out=(3, 0))
