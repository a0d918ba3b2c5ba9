"""data/: on-disk formats from small generated files, missing-data errors, the device loader's augmentation
against torchvision's, splits, determinism, sharding, views and subsets. CPU only, seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from data import (DATASET_NAMES, DatasetInfo, DatasetNotFoundError, DeviceLoader, build_loaders, dataset_info,
                  load_dataset, stratified_split)
from data.common import ArraySplit
from data.files import checksummed
from data.fashion_mnist import read_idx
from data.loaders import array_transforms, crop_flip
from datasets_on_disk import (TINY_VAL, colour, idx_bytes, loader_args, write_cifar10, write_cifar100,
                              write_fashion_mnist, write_imagenet, write_tinyimagenet)

REPO = Path(__file__).resolve().parents[1]


make_args = loader_args


@pytest.fixture(autouse=True)
def _isolated_and_single_threaded(tmp_path, monkeypatch):
    """No test may see a real ./datasets folder. One intra-op thread: these small ops run many times
    faster that way on a shared 2-core machine than with two contending threads."""
    monkeypatch.setenv("OKD_DATASETS", str(tmp_path / "no-datasets-here"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- generated on-disk datasets

def test_cifar10_pickles_parse_through_torchvision(tmp_path):
    write_cifar10(tmp_path)
    train, test = load_dataset("cifar10", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 3, 32, 32)
    values = torch.arange(1, 61, 3)
    assert torch.equal(train.images[:, 0, 5, 7], values.to(torch.uint8))          # channel order R, G, B
    assert torch.equal(train.images[:, 2, 31, 0], (values + 2).to(torch.uint8))
    assert torch.equal(train.labels, (values // 3) % 10) and train.labels.dtype == torch.int64


def test_cifar100_data_may_point_at_the_pickle_folder(tmp_path):
    folder = write_cifar100(tmp_path)
    for data in (tmp_path, folder):
        train, test = load_dataset("cifar100", data)
        assert train.images.shape == (8, 3, 32, 32) and len(test.labels) == 4
        assert torch.equal(train.labels, torch.arange(1, 25, 3) % 100)            # fine labels
    loaders = build_loaders(make_args(dataset="cifar100", data=str(folder), batch_size=4), "cpu")
    assert loaders.n_train == 8 and loaders.info.num_classes == 100 and len(loaders.train) == 2


def test_cifar_default_location_under_okd_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("OKD_DATASETS", str(tmp_path))
    write_cifar10(tmp_path / "cifar10")
    assert len(load_dataset("cifar10")[0].labels) == 20


def test_download_flag_fetches_into_the_dataset_folder(tmp_path, monkeypatch):
    """--download goes through torchvision's downloader (stubbed here: no internet) into ./datasets/<name>."""
    import torchvision.datasets.utils as tv_utils
    calls = []

    def fake_download(url, root, filename=None, md5=None, **kw):
        calls.append((url, Path(root), md5))
        if "cifar" in url:
            write_cifar100(Path(root))
        else:
            write_tinyimagenet(Path(root))
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    monkeypatch.setenv("OKD_DATASETS", str(tmp_path))
    assert len(load_dataset("cifar100", download=True)[0].labels) == 8
    assert len(load_dataset("tinyimagenet", download=True)[1].labels) == len(TINY_VAL)
    assert [(Path(u).name, r, bool(m)) for u, r, m in calls] == [
        ("cifar-100-python.tar.gz", tmp_path / "cifar100", True),
        ("tiny-imagenet-200.zip", tmp_path / "tinyimagenet", True)]


def test_missing_dataset_names_paths_and_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_loaders(make_args(dataset="cifar100"), "cpu")
    msg = str(err.value)
    assert str(tmp_path / "no-datasets-here" / "cifar100" / "cifar-100-python") in msg
    assert "--download" in msg and "cifar-100-python.tar.gz" in msg
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist", tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200.zip") as err:
        load_dataset("tinyimagenet", tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "tiny-imagenet-200") in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="image-net.org"):
        load_dataset("imagenet", tmp_path / "nothing")


# --- TinyImageNet

def test_tinyimagenet_val_labels_come_from_annotations_and_are_cached(tmp_path):
    root = write_tinyimagenet(tmp_path, per_class=2)
    train, test = load_dataset("tinyimagenet", tmp_path)                          # parent of tiny-imagenet-200
    assert train.images.shape == (400, 3, 64, 64) and test.images.shape == (4, 3, 64, 64)
    assert train.labels.tolist() == [c for c in range(200) for _ in range(2)]    # sorted wnids
    assert test.labels.tolist() == [c for _, c in TINY_VAL]                      # from val_annotations.txt
    for k in (0, 1, 399):
        expected = torch.tensor(colour(int(train.labels[k]))).float()
        assert (train.images[k].float().mean((1, 2)) - expected).abs().max() < 4  # 8x8 resized to 64x64
    assert torch.all((test.images[3].float() - 128).abs() <= 2)                  # grey -> 3 equal channels
    assert (root / "okd_uint8_cache.pt").is_file()
    cache = torch.load(root / "okd_uint8_cache.pt", weights_only=True)
    cache["train"] = (cache["train"][0] + 1, cache["train"][1])                  # marks a cache hit
    torch.save(cache, root / "okd_uint8_cache.pt")                               # ... but the checksum is stale
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert torch.equal(load_dataset("tinyimagenet", root)[0].images, train.images)   # rebuilt from the JPEGs
    cache = torch.load(root / "okd_uint8_cache.pt", weights_only=True)
    cache["train"] = (cache["train"][0] + 1, cache["train"][1])
    (root / "okd_uint8_cache.pt").write_bytes(checksummed(cache).getvalue())     # a cache written as the loader does
    train2, test2 = load_dataset("tinyimagenet", root)                           # served from the cache
    assert torch.equal(train2.images, train.images + 1) and torch.equal(test2.labels, test.labels)


def test_tinyimagenet_read_only_folder_still_loads(tmp_path, monkeypatch):
    write_tinyimagenet(tmp_path)
    import data.tinyimagenet as tiny

    real_open = os.open

    def refuse(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise PermissionError("read-only file system")
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", refuse)
    with pytest.warns(UserWarning, match="could not write"):
        train, _ = load_dataset("tinyimagenet", tmp_path)
    assert len(train.labels) == 200 and not (tmp_path / "tiny-imagenet-200" / tiny.CACHE).exists()


# --- Fashion-MNIST

@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_padded_and_replicated(tmp_path, compress):
    write_fashion_mnist(tmp_path, compress)
    train, test = load_dataset("fashion-mnist", tmp_path)
    assert train.images.shape == (5, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    raw = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else "")))
    assert torch.equal(train.images[:, 1, 2:30, 2:30], torch.from_numpy(raw.copy()))
    assert train.images[:, :, :2].eq(0).all() and train.images[:, :, :, 30:].eq(0).all()   # 2-px zero border
    assert torch.equal(train.images[:, 0], train.images[:, 2])                   # grey replicated
    assert train.labels.tolist() == [0, 1, 2, 3, 4]


def test_idx_parser_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")   # float type code
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((2, 28, 28)))[:-5])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian():
    loaders = build_loaders(make_args(dataset="fashion-mnist", batch_size=500), "cpu")
    assert loaders.n_train == 60000 and loaders.test.num_samples == 10000
    assert torch.equal(torch.bincount(loaders.train.labels), torch.full((10,), 6000))
    batch = next(iter(loaders.test))
    assert batch.images.shape == (1000, 3, 32, 32)


# --- ImageNet

def test_imagenet_flat_val_tells_how_to_fix(tmp_path):
    """Also with --classes, whose check of the class folders once came first and blamed the names."""
    write_imagenet(tmp_path, flat_val=True)
    some = tmp_path / "some.txt"
    some.write_text("n00000000\nn00000001\n")                    # (two of write_imagenet's class folders)
    for classes in (None, some):
        with pytest.raises(DatasetNotFoundError, match="prepare_imagenet_val.py") as err:
            load_dataset("imagenet", tmp_path, classes=classes)
        assert str(tmp_path / "val") in str(err.value) and "--labels" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="prepare_imagenet_val.py"):
        dataset_info("imagenet", tmp_path, classes=some)             # (what a run reads first, with --classes)


def test_prepare_imagenet_val_then_imagefolder_loaders(tmp_path):
    write_imagenet(tmp_path, flat_val=True)
    rows = {f"ILSVRC2012_val_{k + 1:08d}": f"n{k:08d}" for k in range(1000)}
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(f"{k},{w} 1 2 3 4 {w} 5 6 7 8\n" for k, w in rows.items()))
    script = [sys.executable, str(REPO / "scripts" / "prepare_imagenet_val.py"), "--val-dir", str(tmp_path / "val"),
              "--labels", str(csv)]
    subprocess.run(script + ["--dry-run"], check=True, capture_output=True)
    assert len(list((tmp_path / "val").glob("*.JPEG"))) == 1000                  # dry run moved nothing
    subprocess.run(script, check=True, capture_output=True)
    assert (tmp_path / "val" / "n00000002" / "ILSVRC2012_val_00000003.JPEG").is_file()

    with pytest.raises(ValueError, match="--loader torch"):
        build_loaders(make_args(dataset="imagenet", data=str(tmp_path), loader="device"), "cpu")
    loaders = build_loaders(make_args(dataset="imagenet", data=str(tmp_path), batch_size=2, eval_subset=3), "cpu")
    batch = next(iter(loaders.train))
    assert batch.images.shape == (2, 3, 224, 224) and loaders.info.crop_padding == 0
    test = [b for b in loaders.test]
    assert loaders.test.num_samples == 3
    for b in test:                                                                # colour = class
        mean = torch.tensor(loaders.info.mean).view(3, 1, 1)
        std = torch.tensor(loaders.info.std).view(3, 1, 1)
        rgb = ((b.images * std + mean) * 255).mean((2, 3))
        expected = torch.tensor([colour(int(y)) for y in b.labels]).float()
        assert (rgb - expected).abs().max() < 4


def test_prepare_imagenet_val_devkit_labels(tmp_path, monkeypatch):
    """The devkit route: ground-truth ILSVRC2012_IDs mapped to wnids through meta.mat (scipy stubbed)."""
    import importlib.util
    import types
    spec = importlib.util.spec_from_file_location("prepare_imagenet_val", REPO / "scripts" / "prepare_imagenet_val.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    synsets = np.array([(1, "n02", 0), (2, "n01", 0), (1001, "n00", 2)],
                       dtype=[("ILSVRC2012_ID", int), ("WNID", "U9"), ("num_children", int)])
    scipy_io = types.ModuleType("scipy.io")
    scipy_io.loadmat = lambda path, squeeze_me: {"synsets": synsets}
    monkeypatch.setitem(sys.modules, "scipy", types.ModuleType("scipy"))
    monkeypatch.setitem(sys.modules, "scipy.io", scipy_io)
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("2\n1\n1\n")
    assert script.labels_from_devkit(truth, tmp_path / "meta.mat") == {
        "ILSVRC2012_val_00000001": "n01", "ILSVRC2012_val_00000002": "n02", "ILSVRC2012_val_00000003": "n02"}


# --------------------------------------------------------------------------- augmentation vs torchvision

def _coordinate_image() -> torch.Tensor:
    """32x32 uint8 image whose pixel (y, x) is (y+1, x+1, 0): every pixel distinct, 0 only in the padding."""
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    return torch.stack([ys + 1, xs + 1, torch.zeros_like(ys)]).to(torch.uint8)


def _outcome(out: torch.Tensor) -> torch.Tensor:
    """(dy, dx, flip) of RandomCrop(32, padding=4) + flip outputs (B x 3 x 32 x 32) of the coordinate image,
    encoded as dy * 18 + dx * 2 + flip."""
    row, c16, c17 = out[:, 0, 16, 16].long() - 1, out[:, 1, 16, 16].long() - 1, out[:, 1, 16, 17].long() - 1
    flip = (c17 < c16).long()
    dy, dx = row - 12, c16 - 12 + flip
    assert dy.min() >= 0 and dy.max() <= 8 and dx.min() >= 0 and dx.max() <= 8
    return dy * 18 + dx * 2 + flip


def _templates(image: torch.Tensor, pad_mode: str = "zero") -> torch.Tensor:
    """All 162 outputs, by torchvision's functional ops, indexed like :func:`_outcome`."""
    import torchvision.transforms.functional as TF
    padded = TF.pad(image, 4, padding_mode="constant" if pad_mode == "zero" else pad_mode)
    outs = []
    for dy in range(9):
        for dx in range(9):
            crop = TF.crop(padded, dy, dx, 32, 32)
            outs += [crop, TF.hflip(crop)]
    return torch.stack(outs)


def _chi_square_uniform(codes: torch.Tensor, k: int = 162) -> float:
    counts = torch.bincount(codes, minlength=k).double()
    expected = len(codes) / k
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.slow
@pytest.mark.parametrize("pad_mode", ["zero", "reflect"])
def test_device_crop_flip_matches_torchvision_distribution(pad_mode):
    image, n = _coordinate_image(), 16200
    info = DatasetInfo("coords", 10, 32, (0.0, 0.0, 0.0), (1 / 255,) * 3, 4)      # normalisation = identity on 0..255
    loader = DeviceLoader(ArraySplit(image.expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long)),
                          info, n, "cpu", train=True, seed=3, pad_mode=pad_mode)
    out = next(iter(loader)).images.round().to(torch.uint8)
    device_codes = _outcome(out)
    assert torch.equal(out, _templates(image, pad_mode)[device_codes])          # pixel-exact, padding included
    assert (out == 0).all(1).any() == (pad_mode == "zero")                     # zero pixels only from zero padding

    torch.manual_seed(0)
    tv = transforms.Compose([transforms.RandomCrop(32, padding=4, padding_mode="constant" if pad_mode == "zero"
                                                   else pad_mode), transforms.RandomHorizontalFlip()])
    tv_codes = _outcome(torch.stack([tv(image) for _ in range(n)]))
    torch_out = torch.stack([array_transforms(info, True, pad_mode)(image) for _ in range(300)]).round().to(torch.uint8)
    assert torch.equal(torch_out, _templates(image, pad_mode)[_outcome(torch_out)])  # the torch loader's padding

    assert set(device_codes.tolist()) == set(tv_codes.tolist()) == set(range(162))
    # chi-square with 161 degrees of freedom: mean 161, sd 18; 161 + 5 sd is a loose, never-flaky bound
    assert _chi_square_uniform(device_codes) < 251 and _chi_square_uniform(tv_codes) < 251
    both = torch.stack([torch.bincount(device_codes, minlength=162), torch.bincount(tv_codes, minlength=162)]).double()
    expected = both.sum(0, keepdim=True) * both.sum(1, keepdim=True) / both.sum()
    assert float(((both - expected) ** 2 / expected).sum()) < 251             # two-sample homogeneity


def test_crop_flip_without_padding_is_identity_or_mirror():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    zero = torch.zeros(4, dtype=torch.long)
    for mode in ("zero", "reflect"):
        assert torch.equal(crop_flip(x, zero, zero, torch.zeros(4, dtype=torch.bool), 0, mode), x)
        assert torch.equal(crop_flip(x, zero, zero, torch.ones(4, dtype=torch.bool), 0, mode), x.flip(-1))


def test_reflect_crop_equals_torch_reflect_pad_then_crop():
    x = torch.randint(0, 256, (5, 3, 6, 7), dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    dy, dx, flip = torch.randint(0, 9, (5,), generator=g), torch.randint(0, 9, (5,), generator=g), torch.rand(5, generator=g) < 0.5
    padded = torch.nn.functional.pad(x.float(), (4,) * 4, mode="reflect")
    want = torch.stack([padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 7] for i in range(5)])
    want = torch.where(flip[:, None, None, None], want.flip(-1), want).to(torch.uint8)
    assert torch.equal(crop_flip(x, dy, dx, flip, 4, "reflect"), want)
    with pytest.raises(ValueError, match="pad_mode"):
        crop_flip(x, dy, dx, flip, 4, "edge")


def test_normalisation_matches_torchvision():
    info = dataset_info("cifar100")
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    loader = DeviceLoader(ArraySplit(images, torch.zeros(10, dtype=torch.long)), info, 10, "cpu", train=False)
    ours = next(iter(loader)).images
    to_tensor = transforms.ToTensor()
    normalize = transforms.Normalize(info.mean, info.std)
    reference = torch.stack([normalize(to_tensor(im.permute(1, 2, 0).numpy())) for im in images])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- splits, order, sharding

def test_stratified_split_is_balanced_seeded_and_disjoint():
    labels = torch.arange(500) % 10
    train, val = stratified_split(labels, 100, seed=0)
    assert torch.equal(torch.bincount(labels[val]), torch.full((10,), 10))
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 500
    assert torch.equal(stratified_split(labels, 100, seed=0)[1], val)
    assert not torch.equal(stratified_split(labels, 100, seed=1)[1], val)
    uneven = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    assert torch.bincount(uneven[stratified_split(uneven, 6, seed=0)[1]]).tolist() == [3, 2, 1]
    with pytest.raises(ValueError):
        stratified_split(labels, 500, seed=0)


def test_val_loader_holds_out_training_samples():
    loaders = build_loaders(make_args(val_split=200, batch_size=50), "cpu")
    assert loaders.n_train == 2048 - 200 and loaders.val.num_samples == 200
    assert torch.equal(torch.bincount(loaders.val.labels), torch.full((10,), 20))
    # the val images are training images, not in the training loader, and get no augmentation
    train_images = loaders.train.images.flatten(1)
    val_images = loaders.val.images.flatten(1)
    assert not (train_images[:, None, :64] == val_images[None, :, :64]).all(-1).any()
    batch = next(iter(loaders.val))
    torch.testing.assert_close(batch.images, loaders.val.normalize(loaders.val.images[batch.index]))


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [tuple(t.clone() for t in (b.images, b.labels, b.index)) for b in loader]


@pytest.mark.parametrize("kind", ["device", "torch"])
def test_epoch_is_a_pure_function_of_seed_and_epoch(kind):
    args = make_args(loader=kind, batch_size=256, subset=1024)
    a, b = build_loaders(args, "cpu").train, build_loaders(args, "cpu").train
    for e in range(3):
        run_a = _epoch(a, e)
    run_b = _epoch(b, 2)                                                          # "resumed" straight at epoch 2
    assert len(run_a) == len(a) == 4
    for x, y in zip(run_a, run_b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    other = _epoch(b, 3)
    assert not torch.equal(run_a[0][2], other[0][2])                              # another epoch, another order
    assert all(torch.equal(u, v) for u, v in zip(_epoch(b, 3)[0], other[0]))      # re-iterating repeats it


def test_torch_loader_matches_device_loader_order_and_eval_output():
    dev = build_loaders(make_args(loader="device", batch_size=128), "cpu")
    tor = build_loaders(make_args(loader="torch", batch_size=128), "cpu")
    for loader in (dev.train, tor.train):
        loader.set_epoch(5)
    db, tb = next(iter(dev.train)), next(iter(tor.train))
    assert torch.equal(db.index, tb.index) and torch.equal(db.labels, tb.labels)
    assert tb.images.shape == db.images.shape and tb.images.dtype == torch.float32
    de, te = next(iter(dev.test)), next(iter(tor.test))
    torch.testing.assert_close(de.images, te.images, rtol=0, atol=1e-6)


def test_torch_loader_augmentation_independent_of_workers_and_global_rng():
    state = torch.get_rng_state()
    run0 = _epoch(build_loaders(make_args(loader="torch", workers=0, batch_size=256, subset=512), "cpu").train, 1)
    assert torch.equal(torch.get_rng_state(), state)                             # training RNG untouched
    run2 = _epoch(build_loaders(make_args(loader="torch", workers=2, batch_size=256, subset=512), "cpu").train, 1)
    for x, y in zip(run0, run2):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


@pytest.mark.parametrize("kind", ["device", "torch"])
def test_ddp_shards(kind):
    def shards(rank):
        loaders = build_loaders(make_args(loader=kind, batch_size=100, val_split=101), "cpu", rank, 2)
        loaders.train.set_epoch(4)
        train = torch.cat([b.index for b in loaders.train])
        val = torch.cat([b.index for b in loaders.val])
        test = torch.cat([b.index for b in loaders.test])
        return loaders, train, val, test

    (l0, train0, val0, test0), (l1, train1, val1, test1) = shards(0), shards(1)
    n = l0.n_train                                                                # 1947
    assert len(train0) == len(train1) == l0.train.num_samples == n // 2            # the last partial batch kept
    assert len(l0.train) == len(l1.train) == 10                                   # the same steps on each rank
    assert not set(train0.tolist()) & set(train1.tolist())
    assert torch.equal(torch.cat([val0, val1]).sort().values, torch.arange(101))  # each exactly once
    assert (l0.val.num_samples, l1.val.num_samples) == (51, 50)
    assert torch.equal(torch.cat([test0, test1]).sort().values, torch.arange(512))


def test_ddp_train_shards_come_from_one_permutation():
    """Rank r's shard is perm[r::world_size] of the same per-epoch permutation (DistributedSampler contract)."""
    args = make_args(batch_size=8, subset=64)
    r0, r1, single = (build_loaders(args, "cpu", r, ws).train for r, ws in ((0, 2), (1, 2), (0, 1)))
    for loader in (r0, r1, single):
        loader.set_epoch(7)
    perm = single.positions()
    assert torch.equal(r0.positions(), perm[0::2]) and torch.equal(r1.positions(), perm[1::2])


def test_index_points_at_the_sample(tmp_path):
    """Fake CIFAR-10 with a constant image per sample: an augmented image holds only its value and zeros."""
    write_cifar10(tmp_path)
    loaders = build_loaders(make_args(dataset="cifar10", data=str(tmp_path), batch_size=5, views=2), "cpu")
    info = loaders.info
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    value = torch.arange(1, 61, 3)[:, None] + torch.arange(3)                    # sample k: (v, v+1, v+2)
    for batch in loaders.train:
        assert torch.equal(batch.labels, loaders.train.labels[batch.index])
        expected = value[batch.index].float()[:, :, None, None]
        for view in batch.images:
            raw = ((view * std + mean) * 255).round()
            assert ((raw == expected) | (raw == 0)).all() and (raw == expected).float().mean() > 0.5


@pytest.mark.parametrize("kind", ["device", "torch"])
def test_views_are_independent(kind):
    loaders = build_loaders(make_args(loader=kind, views=3, batch_size=256), "cpu")
    batch = next(iter(loaders.train))
    assert isinstance(batch.images, list) and len(batch.images) == 3
    for a, b in ((0, 1), (0, 2), (1, 2)):
        same = (batch.images[a] == batch.images[b]).flatten(1).all(1).float().mean()
        assert same < 0.05                                                        # 1/162 by chance
    assert isinstance(next(iter(loaders.test)).images, torch.Tensor)             # evaluation: one view


def test_subset_and_batch_counts():
    loaders = build_loaders(make_args(subset=300, batch_size=64, eval_batch_size=100), "cpu")
    assert loaders.n_train == 300 and len(loaders.train) == 5 and loaders.train.num_samples == 300
    indices = torch.cat([b.index for b in loaders.train])
    assert indices.max() < 300 and len(set(indices.tolist())) == 300                # the last batch of 44 too
    assert len(loaders.test) == 6 and [len(b.labels) for b in loaders.test][-1] == 12
    assert [len(b.labels) for b in build_loaders(make_args(subset=10, batch_size=64), "cpu").train] == [10]
    with pytest.raises(ValueError, match="give no training batch .*; lower --batch-size$"):    # --cuda-graph: full
        build_loaders(make_args(subset=10, batch_size=64), "cpu", drop_last=True)
    with pytest.raises(ValueError, match=r"1 training samples over 2 process\(es\) give no training batch .*; train "
                                         "on more samples"):          # a batch of one: no --batch-size helps
        build_loaders(make_args(subset=1, batch_size=16), "cpu", rank=1, world_size=2)
    for flags, says in (({"eval_subset": 1}, "1 test images over 2 processes leave a process none to evaluate; give "
                                              "a larger --eval-subset, or start at most 1 processes"),
                        ({"val_split": 1}, "1 validation images over 2 processes leave a process none to evaluate; "
                                           "give a larger --val-split, or start at most 1 processes")):
        with pytest.raises(ValueError) as e:               # a process with no image to evaluate: said before training
            build_loaders(make_args(subset=64, batch_size=16, **flags), "cpu", rank=0, world_size=2)
        assert str(e.value) == says
    with pytest.raises(ValueError, match=r"give no training batch .*; train on more samples \(--subset\)$"):
        build_loaders(make_args(subset=1, batch_size=16), "cpu")                        # one process: no "fewer"


def test_dataset_info_and_names():
    assert set(DATASET_NAMES) == {"cifar10", "cifar100", "tinyimagenet", "imagenet", "fashion-mnist", "synthetic",
                                  "folder"}
    assert dataset_info("imagenet").crop_padding == 0 and dataset_info("tinyimagenet").image_size == 64
    assert dataset_info("cifar100").mean == (0.5071, 0.4867, 0.4408)
    with pytest.raises(ValueError, match="cifar100"):
        dataset_info("mnist")


def test_synthetic_is_fixed_and_learnable():
    train, test = load_dataset("synthetic")
    assert torch.equal(load_dataset("synthetic")[0].images, train.images)
    assert train.images.shape == (2048, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [52] * 2 + [51] * 8
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loaders = build_loaders(make_args(batch_size=64), "cpu")
    loaders.train.set_epoch(0)
    for batch in loaders.train:                                                   # one epoch
        loss = nn.functional.cross_entropy(net(batch.images), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(b.images).argmax(1) == b.labels).sum()) for b in loaders.test)
    assert correct / 512 > 0.3                                                    # chance is 0.1


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    """No internet: --download ends in DatasetNotFoundError naming the failure, not a urllib traceback."""
    import torchvision.datasets.utils as tv_utils
    from data.common import DatasetNotFoundError
    from data.loaders import load_dataset

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_utils, "download_url", offline)
    for name in ("cifar100", "fashion-mnist", "tinyimagenet"):
        with pytest.raises(DatasetNotFoundError, match="--download failed"):
            load_dataset(name, str(tmp_path / name), download=True)


def test_download_skipped_when_files_exist(monkeypatch):
    """--download with the files already there (Debian's Fashion-MNIST offline) does not touch the network."""
    import torchvision.datasets.utils as tv_utils
    from data.loaders import load_dataset
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist")

    def no_network(*args, **kwargs):
        raise AssertionError("download attempted")
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    monkeypatch.setattr(tv_utils, "download_url", no_network)
    train, test = load_dataset("fashion-mnist", None, download=True)
    assert len(train.labels) == 60000


# --- the last incomplete batch

def test_the_last_incomplete_batch_is_kept_as_the_official_codes_keep_it():
    """CIFAR-100 at batch 128: 391 steps, the last of 80 images (DataLoader(drop_last=False) in every official
    code); under DDP every rank takes the same number of steps; --cuda-graph (drop_last) drops it; a last batch
    of one sample is dropped (batch norm cannot train on one)."""
    from data.loaders import Schedule
    one = Schedule(50000, 128, True, 0, 0, 1)
    assert (one.num_batches, one.num_samples, len(one.positions())) == (391, 50000, 50000)
    two = [Schedule(50000, 128, True, 0, r, 2) for r in (0, 1)]
    assert [s.num_batches for s in two] == [196, 196] and [s.num_samples for s in two] == [25000, 25000]
    graphed = Schedule(50000, 128, True, 0, 0, 1, drop_last=True)
    assert (graphed.num_batches, graphed.num_samples) == (390, 49920)
    assert Schedule(257, 128, True, 0, 0, 1).num_batches == 2                    # 128 + 128 (+ 1 dropped)
    loader = DeviceLoader(ArraySplit(torch.zeros(100, 3, 8, 8, dtype=torch.uint8), torch.arange(100) % 10),
                          dataset_info("synthetic"), 32, "cpu", train=True)
    sizes = [len(b.labels) for b in loader]
    assert sizes == [32, 32, 32, 4] and len(loader) == 4
    assert sorted(torch.cat([b.index for b in loader]).tolist()) == list(range(100))   # every sample, once
