"""Damaged or unusual datasets on disk (issue: data you can trust): every bad file named in one line with
the fix, layouts checked before training, caches keyed on what they hold, honest subsets. Every case is
built in the dataset's real on-disk format (tests/datasets_on_disk.py), with tiny images."""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_baseline
import train_dml
import train_mcl_okd
from data import BadDatasetError, DatasetError, DatasetNotFoundError, build_loaders, load_dataset
from datasets_on_disk import (TINY_VAL, colour, idx_bytes, image_bytes, loader_args, run_check, write,
                              write_cifar10, write_cifar100, write_fashion_mnist, write_imagenet, write_tinyimagenet)
from engine import UserError, train
from engine.trainer import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*the official release has:UserWarning")


def make_args(**kw) -> argparse.Namespace:
    return loader_args(**{"batch_size": 2, **kw})


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("OKD_DATASETS", str(tmp_path / "no-datasets-here"))


def one_line(err) -> str:
    text = str(err.value if hasattr(err, "value") else err)
    assert "\n" not in text, text
    return text


def truncated_jpeg() -> bytes:
    blob = image_bytes((200, 10, 10), size=32)
    return blob[: len(blob) // 2]


GARBAGE = b"this is not an image at all" * 4


# --------------------------------------------------------------------------- TinyImageNet: bad images

@pytest.mark.parametrize("where", ["train", "val"])
@pytest.mark.parametrize("damage", ["truncated", "unidentifiable"])
def test_tinyimagenet_bad_image_is_one_line_naming_it_and_nothing_is_cached(tmp_path, where, damage):
    root = write_tinyimagenet(tmp_path)
    bad = (root / "train" / "n00000007" / "images" / "n00000007_0.JPEG") if where == "train" \
        else root / "val" / "images" / "val_1.JPEG"
    bad.write_bytes(truncated_jpeg() if damage == "truncated" else GARBAGE)
    with pytest.raises(BadDatasetError) as err:
        load_dataset("tinyimagenet", root)
    msg = one_line(err)
    assert f"1 image cannot be read: {bad} (" in msg
    assert ("truncated" in msg.lower()) if damage == "truncated" else ("cannot identify" in msg)
    assert "extract tiny-imagenet-200.zip again" in msg and "check_dataset.py" in msg
    assert not (root / "okd_uint8_cache.pt").exists()                             # no failed decode cached


def test_tinyimagenet_several_bad_images_are_counted_and_listed(tmp_path):
    root = write_tinyimagenet(tmp_path)
    bad = [root / "train" / w / "images" / f"{w}_0.JPEG" for w in ("n00000001", "n00000002", "n00000150")]
    bad.append(root / "val" / "images" / "val_0.JPEG")
    for i, path in enumerate(bad):
        path.write_bytes(GARBAGE if i % 2 else truncated_jpeg())
    with pytest.raises(BadDatasetError, match="4 images cannot be read") as err:
        load_dataset("tinyimagenet", root)
    assert all(str(p) in one_line(err) for p in bad)


def test_tinyimagenet_png_named_jpeg_cmyk_and_grey_still_work(tmp_path):
    root = write_tinyimagenet(tmp_path)
    images = root / "train" / "n00000003" / "images"
    write(images / "png.JPEG", image_bytes(colour(3), fmt="PNG"))
    write(images / "cmyk.JPEG", image_bytes(colour(3), mode="CMYK"))
    write(images / "grey.JPEG", image_bytes((90, 90, 90), mode="L"))
    train, _ = load_dataset("tinyimagenet", root)
    mine = train.images[train.labels == 3].float().mean((2, 3))                  # 4 images of class 3
    names = ["cmyk", "grey", "n00000003_0", "png"]                                # sorted file order
    expected = {"cmyk": colour(3), "grey": (90, 90, 90), "n00000003_0": colour(3), "png": colour(3)}
    assert len(mine) == 4
    for row, name in zip(mine, names):
        assert (row - torch.tensor(expected[name]).float()).abs().max() < 6, name


# --------------------------------------------------------------------------- TinyImageNet: layout

@pytest.mark.parametrize("splits", ["train", "val", "both"])
@pytest.mark.parametrize("with_image", [False, True])
def test_tinyimagenet_hidden_entries_are_ignored(tmp_path, splits, with_image):
    root = write_tinyimagenet(tmp_path)
    folders = {"train": [root / "train" / ".ipynb_checkpoints"], "val": [root / "val" / "images" / ".ipynb_checkpoints"]}
    folders["both"] = folders["train"] + folders["val"]
    for folder in folders[splits]:
        folder.mkdir()
        if with_image:
            write(folder / "x.JPEG", GARBAGE)                                       # would fail if read
            write(folder.parent / "._val_0.JPEG", GARBAGE)                           # macOS resource fork
            write(folder.parent / ".DS_Store", b"\0\0")
    train, test = load_dataset("tinyimagenet", root)
    assert len(train.labels) == 200 and len(test.labels) == len(TINY_VAL)


def test_tinyimagenet_empty_class_folder_is_named(tmp_path):
    root = write_tinyimagenet(tmp_path)
    (root / "train" / "n00000042" / "images" / "n00000042_0.JPEG").unlink()
    with pytest.raises(BadDatasetError) as err:
        load_dataset("tinyimagenet", root)
    assert str(root / "train" / "n00000042" / "images") in one_line(err) and "holds no image" in str(err.value)


def test_tinyimagenet_train_folders_must_match_wnids(tmp_path):
    root = write_tinyimagenet(tmp_path)
    shutil.rmtree(root / "train" / "n00000009")
    (root / "train" / "n99999999" / "images").mkdir(parents=True)
    with pytest.raises(BadDatasetError) as err:
        load_dataset("tinyimagenet", root)
    msg = one_line(err)
    assert "missing: n00000009" in msg and "not in wnids.txt: n99999999" in msg


def test_tinyimagenet_class_count_must_be_200(tmp_path):
    root = write_tinyimagenet(tmp_path)
    (root / "wnids.txt").write_text("\n".join(sorted(os.listdir(root / "train"))[:199]) + "\n")
    with pytest.raises(BadDatasetError, match="lists 199 classes; TinyImageNet-200 has 200") as err:
        load_dataset("tinyimagenet", root)
    assert str(root / "wnids.txt") in one_line(err)


@pytest.mark.parametrize("cut", ["mid-line", "line boundary"])
def test_tinyimagenet_annotation_file_cut_in_half(tmp_path, cut):
    root = write_tinyimagenet(tmp_path)
    path = root / "val" / "val_annotations.txt"
    text = path.read_text()
    half = len(text) // 2 + 5 if cut == "mid-line" else text.index("\n", len(text) // 2 - 1) + 1
    assert (text[half - 1] == "\n") == (cut == "line boundary")
    path.write_text(text[:half])
    with pytest.raises(BadDatasetError) as err:
        load_dataset("tinyimagenet", root)
    msg = one_line(err)
    assert str(path) in msg
    if cut == "mid-line":
        assert "line 3 is malformed" in msg and "cut short" in msg
    else:
        assert "have no line in" in msg and "val_2.JPEG" in msg and "val_3.JPEG" in msg


def test_tinyimagenet_unknown_wnid_is_named_with_its_line(tmp_path):
    root = write_tinyimagenet(tmp_path)
    path = root / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace(lines[1].split("\t")[1], "n12345678")
    path.write_text("".join(lines))
    with pytest.raises(BadDatasetError) as err:
        load_dataset("tinyimagenet", root)
    assert f"{path} line 2 names wnid 'n12345678', which is not in wnids.txt" in one_line(err)


def test_tinyimagenet_missing_listed_image_is_named(tmp_path):
    root = write_tinyimagenet(tmp_path)
    (root / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(BadDatasetError) as err:
        load_dataset("tinyimagenet", root)
    msg = one_line(err)
    assert "1 image(s) listed in" in msg and "val_2.JPEG" in msg and str(root / "val" / "images") in msg


# --------------------------------------------------------------------------- TinyImageNet: the cache

def test_tinyimagenet_cache_is_rebuilt_when_images_are_added_removed_or_changed(tmp_path):
    root = write_tinyimagenet(tmp_path)
    train, test = load_dataset("tinyimagenet", root)
    assert len(train.labels) == 200 and (root / "okd_uint8_cache.pt").is_file()
    added = write(root / "train" / "n00000005" / "images" / "n00000005_1.JPEG", image_bytes(colour(5)))
    train, _ = load_dataset("tinyimagenet", root)
    assert len(train.labels) == 201 and int((train.labels == 5).sum()) == 2
    (root / "train" / "n00000006" / "images" / "extra.JPEG").write_bytes(image_bytes(colour(6)))
    (root / "train" / "n00000007" / "images" / "n00000007_0.JPEG").rename(
        root / "train" / "n00000007" / "images" / "renamed.JPEG")
    added.unlink()
    train, _ = load_dataset("tinyimagenet", root)
    assert len(train.labels) == 201 and int((train.labels == 5).sum()) == 1 and int((train.labels == 6).sum()) == 2
    # same name and size, new content and time: rebuilt too
    val0 = root / "val" / "images" / "val_0.JPEG"
    blob = image_bytes((7, 7, 7))
    val0.write_bytes(blob + b"\0" * (val0.stat().st_size - len(blob)) if len(blob) < val0.stat().st_size else blob)
    os.utime(val0, ns=(val0.stat().st_atime_ns, val0.stat().st_mtime_ns + 10 ** 9))
    _, test = load_dataset("tinyimagenet", root)
    assert test.images[0].float().mean() < 12
    # the annotation file is part of the key
    path = root / "val" / "val_annotations.txt"
    path.write_text(path.read_text().replace("val_0.JPEG\tn00000001", "val_0.JPEG\tn00000002"))
    _, test = load_dataset("tinyimagenet", root)
    assert test.labels[0] == 2
    assert [p.name for p in root.iterdir() if p.suffix == ".tmp"] == []          # written atomically


def test_tinyimagenet_truncated_cache_is_rebuilt(tmp_path):
    root = write_tinyimagenet(tmp_path)
    load_dataset("tinyimagenet", root)
    cache = root / "okd_uint8_cache.pt"
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning) as caught:
        train, _ = load_dataset("tinyimagenet", root)
    said = [str(w.message) for w in caught if "cache" in str(w.message)]
    assert said == [f"tinyimagenet: the cache file {cache} cannot be read (damaged, cut short or written by another "
                    "version); it is rebuilt from the images"]
    assert len(train.labels) == 200 and cache.stat().st_size > 1000


def test_tinyimagenet_download_extracts_a_damaged_folder_again(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils
    root = write_tinyimagenet(tmp_path)
    bad = root / "val" / "images" / "val_1.JPEG"
    bad.write_bytes(GARBAGE)
    calls = []

    def fake_extract(url, parent, md5=None, **kw):
        calls.append(Path(parent))
        bad.write_bytes(image_bytes(colour(2)))
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_extract)
    _, test = load_dataset("tinyimagenet", root, download=True)
    assert calls == [tmp_path] and len(test.labels) == len(TINY_VAL)


# --------------------------------------------------------------------------- CIFAR pickles

@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_cifar_damaged_pickle_is_one_line_naming_it(tmp_path, damage):
    folder = write_cifar10(tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000] if damage == "truncated" else GARBAGE)
    with pytest.raises(BadDatasetError) as err:
        load_dataset("cifar10", tmp_path)
    msg = one_line(err)
    assert str(path) in msg and ("truncated" in msg if damage == "truncated" else "not a pickle" in msg)
    assert "--download" in msg and "cifar-10-python.tar.gz" in msg


def test_cifar_every_bad_pickle_is_listed(tmp_path):
    folder = write_cifar100(tmp_path)
    (folder / "train").write_bytes((folder / "train").read_bytes()[:-7])
    (folder / "test").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["a"]}))
    with pytest.raises(BadDatasetError, match="3 pickle files cannot be read") as err:
        load_dataset("cifar100", folder)
    msg = one_line(err)
    assert all(str(folder / f) in msg for f in ("train", "test", "meta"))
    assert "uint8 N x 3072" in msg and "100 class names" in msg


def test_cifar_unextracted_archive_non_pickle_and_wrong_dtype_say_so_in_one_line(tmp_path):
    """Only the un-extracted cifar-10-python.tar.gz: it said the pickles were missing and to download (the archive was
    there). A non-pickle whose error holds a newline gave a two-line reason; a 'data' of the wrong dtype did not
    say the dtype."""
    import tarfile
    folder = write_cifar10(tmp_path / "made")
    archive = tmp_path / "got" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", archive.parent)
    assert f"{archive.name} is there, unextracted" in one_line(err)
    assert f"tar -xzf {archive} -C {archive.parent}" in str(err.value)
    (folder / "data_batch_2").write_bytes(b"P0\n.")       # a pickle's persistent id: UnpicklingError over two lines
    (folder / "data_batch_4").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}))
    with pytest.raises(BadDatasetError) as err:
        load_dataset("cifar10", tmp_path / "made")
    assert "not a pickle (A load persistent id instruction was encountered, but" in one_line(err)
    assert "(got ndarray (2, 3072) of dtype float32)" in str(err.value)


def test_cifar_labels_out_of_range(tmp_path):
    folder = write_cifar10(tmp_path)
    entry = pickle.loads((folder / "test_batch").read_bytes())
    entry["labels"][0] = 10
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(BadDatasetError, match="labels outside 0..9"):
        load_dataset("cifar10", tmp_path)


def test_cifar_download_refetches_only_when_a_checksum_differs(tmp_path, monkeypatch):
    """--download with the files present compares each with its published MD5 (here: of the generated files)
    and fetches the archive again only when one differs."""
    import torchvision.datasets.utils as tv_utils
    from torchvision import datasets
    folder = write_cifar100(tmp_path)
    md5 = {f: hashlib.md5((folder / f).read_bytes()).hexdigest() for f in ("train", "test", "meta")}
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]})
    calls = []

    def fake_fetch(url, root, filename=None, md5=None, **kw):
        calls.append(filename)
        shutil.rmtree(folder)
        write_cifar100(Path(root))
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_fetch)
    assert len(load_dataset("cifar100", tmp_path, download=True)[0].labels) == 8 and calls == []
    data = bytearray((folder / "train").read_bytes())
    data[len(data) // 2] ^= 1                                                      # a flipped pixel bit: parses fine
    (folder / "train").write_bytes(bytes(data))
    load_dataset("cifar100", tmp_path)                                            # without --download: not checked
    assert len(load_dataset("cifar100", tmp_path, download=True)[0].labels) == 8
    assert calls == ["cifar-100-python.tar.gz"] and hashlib.md5((folder / "train").read_bytes()).hexdigest() == md5["train"]


# --------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_truncated_gz_is_one_line_naming_it(tmp_path):
    write_fashion_mnist(tmp_path, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(BadDatasetError) as err:
        load_dataset("fashion-mnist", tmp_path)
    msg = one_line(err)
    assert str(path) in msg and "damaged gzip stream" in msg and "--download" in msg


def test_fashion_mnist_names_the_one_file_missing(tmp_path):
    write_fashion_mnist(tmp_path, compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", tmp_path)
    assert f"the IDX file t10k-labels-idx1-ubyte (optionally .gz) is missing from {tmp_path}" in one_line(err)
    assert "train-images" not in str(err.value)


def test_fashion_mnist_every_bad_file_is_listed(tmp_path):
    write_fashion_mnist(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((5, 28, 28)))[:-1])
    with pytest.raises(BadDatasetError, match="2 IDX files cannot be read") as err:
        load_dataset("fashion-mnist", tmp_path)
    assert "header says shape" in one_line(err) and "not an IDX file" in str(err.value)


def test_fashion_mnist_pairs_that_do_not_fit_are_all_listed(tmp_path):
    """A train pair whose counts differ and a test labels file with label 12: both named in one line (the test
    file was named only once the train pair was mended), each with its reason."""
    write_fashion_mnist(tmp_path, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(4) % 10))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 12, 1])))
    with pytest.raises(BadDatasetError, match="2 IDX files cannot be read") as err:
        load_dataset("fashion-mnist", tmp_path)
    msg = one_line(err)
    assert (f"{tmp_path / 'train-images-idx3-ubyte'} / {tmp_path / 'train-labels-idx1-ubyte'} ((5, 28, 28) images "
            "and (4,) labels, expected N x 28 x 28 and N)") in msg
    assert f"{tmp_path / 't10k-labels-idx1-ubyte'} (label 12, outside 0..9)" in msg


def test_fashion_mnist_download_refetches_the_damaged_file(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils
    import data.fashion_mnist as fm
    write_fashion_mnist(tmp_path, compress=True)
    good = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(fm, "CONTENT_MD5", {name[:-3]: hashlib.md5(gzip.decompress(blob)).hexdigest()
                                            for name, blob in good.items()})
    broken = tmp_path / "t10k-images-idx3-ubyte.gz"
    broken.write_bytes(good[broken.name][:-10])
    calls = []

    def fake_download(url, root, filename=None, md5=None, **kw):
        calls.append((url.rsplit("/", 1)[-1], Path(root), md5))
        (Path(root) / filename).write_bytes(good[filename])
    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    train, test = load_dataset("fashion-mnist", tmp_path, download=True)
    assert len(test.labels) == 3
    assert calls == [("t10k-images-idx3-ubyte.gz", tmp_path, "bef4ecab320f06d8554ea6380940ec79")]


# --------------------------------------------------------------------------- ImageNet

@pytest.fixture(scope="module")
def imagenet_template(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture
def imagenet(tmp_path, imagenet_template):
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet_template, root)
    return root


@pytest.mark.parametrize("splits", ["train", "both"])
@pytest.mark.parametrize("with_image", [False, True])
def test_imagenet_hidden_folders_are_ignored(imagenet, splits, with_image):
    for split in (["train"] if splits == "train" else ["train", "val"]):
        hidden = imagenet / split / ".ipynb_checkpoints"
        hidden.mkdir()
        if with_image:
            write(hidden / "x.JPEG", image_bytes())
            write(imagenet / split / "n00000004" / ".ipynb_checkpoints" / "y-checkpoint.JPEG", GARBAGE)
            write(imagenet / split / "n00000004" / "._n00000004_0.JPEG", GARBAGE)
    train, val = load_dataset("imagenet", imagenet)
    assert len(train.classes) == 1000 and len(train) == 1000 and len(val) == 1000
    assert train.classes[0] == "n00000000"


def test_imagenet_train_and_val_classes_must_agree(imagenet):
    shutil.rmtree(imagenet / "val" / "n00000017")
    with pytest.raises(BadDatasetError) as err:
        load_dataset("imagenet", imagenet)
    assert f"only in {imagenet / 'train'}: n00000017" in one_line(err)


def test_imagenet_class_count_must_be_1000(imagenet):
    for split in ("train", "val"):
        shutil.rmtree(imagenet / split / "n00000017")
    with pytest.raises(BadDatasetError, match="holds 999 class folders; ILSVRC-2012 has 1000") as err:
        load_dataset("imagenet", imagenet)
    one_line(err)


def test_imagenet_empty_class_folder_is_named(imagenet):
    (imagenet / "val" / "n00000500" / "ILSVRC2012_val_00000501.JPEG").unlink()
    with pytest.raises(BadDatasetError) as err:
        load_dataset("imagenet", imagenet)
    assert f"the class folder {imagenet / 'val' / 'n00000500'} holds no image" in one_line(err)


@pytest.mark.parametrize("workers", [0, 1])
def test_imagenet_bad_image_met_by_the_loader_is_one_line(imagenet, workers):
    """Truncated (and unidentifiable) files in every 10th class of train/ and val/: the loader (in this
    process, or re-raised from a DataLoader worker) stops with one line naming one of them."""
    bad = {"train": [], "val": []}
    for c in range(3, 1000, 10):
        for split in bad:
            for f in (imagenet / split / f"n{c:08d}").iterdir():
                f.write_bytes(truncated_jpeg() if (c // 10) % 2 else GARBAGE)
                bad[split].append(str(f))
    loaders = build_loaders(make_args(dataset="imagenet", data=str(imagenet), workers=workers, batch_size=10,
                                      eval_batch_size=10), "cpu")
    for split, loader in (("train", loaders.train), ("val", loaders.test)):
        with pytest.raises(BadDatasetError) as err:
            for _ in loader:
                pass
        msg = one_line(err)
        assert msg.startswith("dataset 'imagenet': the image ") and msg.split("the image ")[1].split(" cannot")[0] in bad[split]
        assert "--resume auto" in msg and "check_dataset.py" in msg


def test_imagenet_unusual_but_valid_files_decode(imagenet):
    folder = imagenet / "train" / "n00000009"
    write(folder / "png.JPEG", image_bytes(colour(9), fmt="PNG"))
    write(folder / "cmyk.JPEG", image_bytes(colour(9), mode="CMYK"))
    write(folder / "grey.JPEG", image_bytes((90, 90, 90), mode="L"))
    train, _ = load_dataset("imagenet", imagenet)
    mine = [(p.name, train[i][0]) for i, (p, y) in enumerate(train.samples) if y == 9]
    assert [n for n, _ in mine] == ["cmyk.JPEG", "grey.JPEG", "n00000009_0.JPEG", "png.JPEG"]
    for name, im in mine:
        expected = (90, 90, 90) if name == "grey.JPEG" else colour(9)
        assert im.mode == "RGB" and np.abs(np.asarray(im).reshape(-1, 3).mean(0) - expected).max() < 6, name


def test_imagenet_bad_image_in_epoch_two_keeps_epoch_one(imagenet, tmp_path, capsys):
    """A corrupt image met in the second epoch: one line on stderr naming it, exit status 2, and the first
    epoch's checkpoint untouched; --resume continues once the file is replaced."""
    out = tmp_path / "run"
    argv = ["--dataset", "imagenet", "--data", str(imagenet), "--arch", "resnet20", "--subset", "2",
            "--eval-subset", "2", "--batch-size", "2", "--gpu", "-1", "--no-progress", "--workers", "0",
            "--out", str(out), "--lr", "0.01"]
    train(train_baseline.Baseline, argv + ["--epochs", "1"])
    saved = (out / "last.pt").read_bytes()
    bad = []
    for folder in (imagenet / "train").iterdir():
        for f in folder.iterdir():
            f.write_bytes(truncated_jpeg())
            bad.append(str(f))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(train_baseline.Baseline, argv + ["--epochs", "2", "--extend-epochs", "--resume", "auto"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and err.startswith("error: dataset 'imagenet': the image ")
    assert err.split("the image ")[1].split(" cannot")[0] in bad
    assert (out / "last.pt").read_bytes() == saved


# --------------------------------------------------------------------------- subsets and counts

def test_subset_is_stratified_seeded_and_recorded_on_a_class_sorted_set(tmp_path):
    root = write_tinyimagenet(tmp_path, per_class=3)
    args = make_args(dataset="tinyimagenet", data=str(root), subset=400)
    loaders = build_loaders(args, "cpu")
    counts = torch.bincount(loaders.train.labels, minlength=200)
    assert loaders.n_train == 400 and counts.min() == 2 and counts.max() == 2    # not the first 400 (= 134 classes)
    again = build_loaders(args, "cpu").train.labels
    other = build_loaders(make_args(dataset="tinyimagenet", data=str(root), subset=400, seed=1), "cpu")
    assert torch.equal(again, loaders.train.labels)
    assert not torch.equal(loaders.train.images, other.train.images)             # another seed, other samples
    record = loaders.record
    assert record["subset"] == {"size": 400, "of": 600, "selection": "stratified random (each class in proportion "
                                "to its size)", "seed": 0, "classes": 200}
    assert record["images_found"] == {"train": 600, "test": 4} and record["official"] == {"train": 100000, "test": 10000}
    assert record["images_used"] == {"train": 400, "val": 0, "test": 4} and len(record["warnings"]) == 2


def test_subset_that_leaves_a_class_empty_is_refused_where_every_class_is_needed(tmp_path):
    root = write_tinyimagenet(tmp_path, per_class=2)
    args = make_args(dataset="tinyimagenet", data=str(root), subset=150)
    assert build_loaders(args, "cpu").record["subset"]["classes"] == 150          # allowed, and said
    with pytest.raises(ValueError, match="--subset 150 leaves 50 of 200 classes without a training sample") as err:
        build_loaders(args, "cpu", needs_every_class=True)
    assert "use --subset 200 or more" in one_line(err)
    assert build_loaders(make_args(dataset="tinyimagenet", data=str(root), subset=200), "cpu",
                         needs_every_class=True).n_train == 200


def test_mcl_okd_declares_it_needs_every_class(tmp_path):
    assert train_mcl_okd.MCLOKD.needs_every_class and not train_dml.DML.needs_every_class
    with pytest.raises(UserError, match="--subset 5 leaves 5 of 10 classes") as err:
        train(train_mcl_okd.MCLOKD, ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "5", "--gpu", "-1",
                                     "--out", str(tmp_path), "--batch-size", "2"])
    one_line(err)


def test_eval_subset_is_stratified_and_recorded_in_results(tmp_path):
    loaders = build_loaders(make_args(eval_subset=100, batch_size=64), "cpu")
    assert loaders.test.num_samples == 100 and torch.bincount(loaders.test.labels).tolist() == [10] * 10
    with pytest.raises(ValueError, match="--eval-subset 600 exceeds the 512 test samples"):
        build_loaders(make_args(eval_subset=600), "cpu")
    results = train(train_dml.DML, ["--dataset", "synthetic", "--arch", "resnet20", "--subset", "64",
                                    "--eval-subset", "50", "--batch-size", "32", "--epochs", "1", "--gpu", "-1",
                                    "--no-progress", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["data"] == results["data"]
    assert saved["data"]["images_used"] == {"train": 64, "val": 0, "test": 50}
    assert saved["data"]["eval_subset"]["size"] == 50 and saved["data"]["subset"]["classes"] == 10
    assert saved["data"]["official"] is None and saved["data"]["warnings"] == []


def test_counts_are_printed_and_differences_from_the_official_counts_warned(tmp_path, capsys):
    write_cifar10(tmp_path)
    with pytest.warns(UserWarning, match="cifar10: found 20 train images, the official release has 50000"):
        loaders = build_loaders(make_args(dataset="cifar10", data=str(tmp_path), val_split=10, batch_size=2), "cpu")
    out = capsys.readouterr().out
    folder = tmp_path.absolute() / "cifar-10-batches-py"               # the run says where its data came from
    assert (f"cifar10 from {folder}: found 20 train / 6 test images (official 50000 / 10000); using 10 train, 10 val, "
            "6 test") in out
    assert loaders.record["images_used"] == {"train": 10, "val": 10, "test": 6}
    assert loaders.record["source"] == str(folder)


# --------------------------------------------------------------------------- the CLI and the check script

@pytest.mark.parametrize("dataset", ["cifar10", "folder", "fashion-mnist"])
def test_data_that_is_a_file_is_one_line(tmp_path, capsys, dataset):
    not_a_folder = write(tmp_path / "data.bin", b"x")
    with pytest.raises(SystemExit) as exit_:
        main(train_dml.DML, ["--dataset", dataset, "--data", str(not_a_folder), "--gpu", "-1", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err == f"train_dml.py: error: argument --data: {not_a_folder} is a file, not a " \
                                          "folder: give the folder that holds the dataset (--help lists the options)"


def test_main_prints_a_bad_dataset_as_one_line(tmp_path, capsys):
    root = write_tinyimagenet(tmp_path)
    bad = root / "train" / "n00000100" / "images" / "n00000100_0.JPEG"
    bad.write_bytes(truncated_jpeg())
    with pytest.raises(SystemExit) as exit_:
        main(train_dml.DML, ["--dataset", "tinyimagenet", "--data", str(root), "--gpu", "-1", "--out",
                             str(tmp_path / "run")])    # (not tmp_path, which holds the dataset: no run's own folder)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and str(bad) in err and err.startswith("error: dataset")
    assert issubclass(BadDatasetError, DatasetError) and issubclass(DatasetNotFoundError, DatasetError)


def test_check_dataset_lists_every_bad_file(tmp_path, capsys):
    root = write_tinyimagenet(tmp_path)
    bad = [root / "train" / "n00000001" / "images" / "n00000001_0.JPEG", root / "val" / "images" / "val_2.JPEG"]
    bad[0].write_bytes(truncated_jpeg())
    bad[1].write_bytes(GARBAGE)
    write(root / "train" / ".ipynb_checkpoints" / "junk.JPEG", GARBAGE)          # hidden: not checked
    code, out, err = run_check(capsys, "--dataset", "tinyimagenet", "--data", str(tmp_path), "--workers", "2",
                               "--out", str(tmp_path / "bad.txt"))
    assert code == 1, err
    assert f"{bad[0]}: " in out and f"{bad[1]}: cannot identify" in out
    assert "2 of 204 images cannot be decoded" in err
    assert (tmp_path / "bad.txt").read_text().split() == [str(p) for p in bad]
    for p in bad:
        p.write_bytes(image_bytes())
    code, out, _ = run_check(capsys, "--dataset", "tinyimagenet", "--data", str(root), "--workers", "0")
    assert code == 0 and "all 204 images decode" in out


@pytest.mark.parametrize("removed", ["wnids.txt", "train", "val/val_annotations.txt"])
def test_a_tinyimagenet_without_one_of_its_files_names_that_one(tmp_path, removed):
    """The error said 'wnids.txt, train/ or val/val_annotations.txt is missing': which one, the user had to find."""
    root = write_tinyimagenet(tmp_path)
    shutil.rmtree(root / removed) if (root / removed).is_dir() else (root / removed).unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("tinyimagenet", tmp_path)
    text = str(err.value)
    assert f"{root} lacks {removed.rstrip('/')}{'/' if removed == 'train' else ''}" in text and "\n" not in text
    assert f"{tmp_path} lacks wnids.txt, train/, val/val_annotations.txt" in text      # the other place looked at


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_images_are_refused_by_every_dataset_and_the_checker(tmp_path, imagenet, capsys, mode):
    """A 16-bit, 32-bit or float image (PIL modes I;16, I, F): the conversion to 8-bit RGB clips it to near-white.
    The folder reader refused it; TinyImageNet, ImageNet and check_dataset.py (one decoder, data.common.decode_rgb)
    trained on white images without a word."""
    from data.imagenet import load_imagenet
    values = np.arange(64).reshape(8, 8) * 1000
    pixels = values.astype(np.float32) if mode == "F" else values.astype(np.uint16 if mode == "I;16" else np.int32)
    root = write_tinyimagenet(tmp_path / "tiny")
    deep = root / "train" / "n00000001" / "images" / "n00000001_0.JPEG"
    Image.fromarray(pixels).save(deep, "PNG" if mode == "I;16" else "TIFF")   # (PIL goes by content, not name)
    with Image.open(deep) as im:
        assert im.mode == mode
    with pytest.raises(BadDatasetError, match=f"PIL mode {re.escape(mode)}.*convert it to 8-bit") as err:
        load_dataset("tinyimagenet", root)
    assert str(deep) in str(err.value) and "\n" not in str(err.value)
    code, out, err_text = run_check(capsys, "--dataset", "tinyimagenet", "--data", str(root), "--workers", "0")
    assert code == 1 and f"{deep}: a " in out and f"PIL mode {mode}" in out, out + err_text
    streamed = imagenet / "train" / "n00000003" / "n00000003_0.JPEG"
    Image.fromarray(pixels).save(streamed, "PNG" if mode == "I;16" else "TIFF")
    train_set, _ = load_imagenet(imagenet)
    with pytest.raises(BadDatasetError, match=f"{re.escape(str(streamed))}.*PIL mode {re.escape(mode)}"):
        train_set[next(i for i, (p, _) in enumerate(train_set.samples) if Path(p) == streamed)]


def test_check_dataset_reports_layout_problems_and_other_datasets(tmp_path, imagenet, capsys):
    bad = imagenet / "train" / "n00000999" / "n00000999_0.JPEG"
    bad.write_bytes(GARBAGE)
    code, out, err = run_check(capsys, "--dataset", "imagenet", "--data", str(imagenet), "--workers", "0")
    assert code == 1 and f"{bad}: cannot identify" in out and "1 of 2000 images cannot be decoded" in err
    shutil.rmtree(imagenet / "val" / "n00000017")
    code, out, err = run_check(capsys, "--dataset", "imagenet", "--data", str(imagenet), "--workers", "0")
    assert code == 2 and "only in" in err and err.count("\n") == 1
    write_fashion_mnist(tmp_path / "fm", compress=True)
    code, out, _ = run_check(capsys, "--dataset", "fashion-mnist", "--data", str(tmp_path / "fm"))
    assert code == 0 and "5 train and 3 test images" in out


@pytest.mark.slow
def test_damaged_dataset_under_torchrun_stops_every_rank_in_one_line(tmp_path):
    """Rank 0 checks the files; the other ranks get its verdict instead of waiting at a barrier forever."""
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(GARBAGE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train_dml.py"), "--dataset", "cifar10", "--data", str(tmp_path), "--gpu", "-1",
           "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all(str(folder / "data_batch_2") in e and "not a pickle" in e for e in errors), r.stderr


@pytest.mark.parametrize("damage", ["cut mid-line", "unknown wnid"])
def test_prepare_imagenet_val_checks_the_label_file_before_moving(tmp_path, damage, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("prepare_imagenet_val", REPO / "scripts" / "prepare_imagenet_val.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for w in ("n00000001", "n00000002"):
        (tmp_path / "train" / w).mkdir(parents=True)
    rows = [(f"ILSVRC2012_val_{k:08d}", f"n0000000{1 + k % 2}") for k in range(1, 5)]
    for stem, _ in rows:
        write(tmp_path / "val" / f"{stem}.JPEG", image_bytes())
    write(tmp_path / "val" / "._ILSVRC2012_val_00000001.JPEG", GARBAGE)           # hidden: not an image to move
    text = "ImageId,PredictionString\n" + "".join(f"{s},{w} 1 2 3 4\n" for s, w in rows)
    if damage == "unknown wnid":
        text = text.replace("ILSVRC2012_val_00000003,n00000002", "ILSVRC2012_val_00000003,n99999999")
    else:
        text = text[: text.index("ILSVRC2012_val_00000004,") + len("ILSVRC2012_val_00000004,n000")]
    csv = write(tmp_path / "LOC_val_solution.csv", text.encode())
    with pytest.raises(SystemExit) as exit_:
        script.main(["--val-dir", str(tmp_path / "val"), "--labels", str(csv)])
    msg = capsys.readouterr().err
    assert exit_.value.code == 2 and msg.count("\n") == 1 and msg.startswith("error: ") and str(csv) in msg
    assert ("line 5 is malformed" in msg) if damage == "cut mid-line" else ("n99999999" in msg and "nothing was moved" in msg)
    assert len(list((tmp_path / "val").glob("ILSVRC*.JPEG"))) == 4                   # nothing moved
    if damage == "unknown wnid":                                                  # repaired: all four move
        csv.write_text(text.replace("n99999999", "n00000002"))
        assert script.main(["--val-dir", str(tmp_path / "val"), "--labels", str(csv)]) == 0
        assert len(list((tmp_path / "val").glob("n0000000*/*.JPEG"))) == 4


@pytest.mark.parametrize("name, module, fetcher", [("cifar10", "data.cifar", "download_or_explain"),
                                                   ("fashion-mnist", "data.fashion_mnist", "download_or_explain"),
                                                   ("tinyimagenet", "data.tinyimagenet", "fetch")])
def test_a_download_that_leaves_no_dataset_does_not_ask_for_download(tmp_path, monkeypatch, name, module, fetcher):
    """--download that went through yet left no dataset (a mirror serving another layout) is named in one line
    that does not ask for the --download just given; without --download the line offers it."""
    import importlib
    monkeypatch.setattr(importlib.import_module(module), fetcher, lambda *a, **k: None)   # fetches nothing
    for download in (True, False):
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset(name, tmp_path, download=download)
        assert ("--download" in str(e.value)) is not download and "\n" not in str(e.value), str(e.value)
