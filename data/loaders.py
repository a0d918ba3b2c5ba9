"""Loaders: GPU-resident (``device``) or ``torch.utils.data.DataLoader`` (``torch``), one contract.

Every loader has ``__len__`` (batches per epoch), ``__iter__`` yielding :class:`Batch`, ``set_epoch(e)``,
``num_samples`` (samples this rank sees per epoch) and ``labels`` (CPU int64 labels of its whole set,
indexed by ``Batch.index``).

* **Order.** Training: one permutation per epoch from a generator seeded by (seed, epoch), the same on
  every rank; rank r takes ``perm[r : (n // world_size) * world_size : world_size]`` (the
  ``DistributedSampler(drop_last=True)`` contract: every rank the same number of samples, hence of steps).
  The last incomplete batch is kept, as the official codes' DataLoaders keep it (CIFAR-100 at batch 128:
  391 steps, the last of 80 images), unless ``drop_last`` (``--cuda-graph``, which needs one batch shape)
  or it would hold a single sample (batch norm cannot train on one). Evaluation: no shuffling, nothing
  dropped, rank r gets samples ``r::world_size``.
* **Augmentation** of epoch e on rank r is drawn from a generator seeded by (seed, e, r), so the data of
  an epoch is a pure function of (seed, epoch, rank): a resumed run sees what an uninterrupted one saw.
  Call ``set_epoch`` before iterating (it is not advanced automatically, as ``DistributedSampler``).
* ``Batch.index`` is the sample's position in the set the loader serves (0..n_train-1 for training,
  after the validation hold-out and ``--subset``), on the training device: the memory-bank index.
* **Subsets.** ``--val-split N`` holds out N training samples, ``--subset N`` then trains on N of the
  rest, ``--eval-subset N`` tests on N test samples: each a seeded stratified random sample (every class
  in proportion to its size, :func:`stratified_split`), never the first N (the first N of a class-sorted
  set are a few classes). A method that needs every class (``Method.needs_every_class``) refuses a
  ``--subset`` that leaves one out. The counts found, the official counts and the subsets are printed and
  returned as ``Loaders.record`` (results.json's ``data``).

``device`` loader (all datasets but ImageNet and the folders that are streamed from their files, see
:mod:`data.folder`): uint8 images and labels live on the device; per epoch the
order, crop offsets and flip flags are drawn on the CPU and moved once; per batch a gather does
pad + crop + flip, then float, /255 and Normalize, all on the device, with no host sync. Its
distribution equals torchvision's RandomCrop(size, padding, padding_mode) + RandomHorizontalFlip(0.5):
offsets uniform on 0..2*padding in each axis, flip with p = 0.5, padding before normalisation, with zeros
(``pad_mode='zero'``, the default) or the border reflected without repeating the edge (``'reflect'``, the
``Pad(4, padding_mode='reflect')`` of the FFL, DCCL and CMFF codes) (tests/test_data.py).

``torch`` loader: a DataLoader over the same uint8 arrays with torchvision transforms (RandomCrop(size,
padding, padding_mode) + RandomHorizontalFlip on uint8 tensors, ConvertImageDtype (/255), Normalize), or the PIL
ImageNet transforms of :mod:`data.imagenet`, or for a folder streamed from its files the same steps after
decoding and framing each file (:func:`data.folder.transform`). Each sample's transform runs under its own
seed, drawn from the (seed, epoch, rank) generator, so augmentation does not depend on the number of workers or on
persistent workers, and the training process's global RNG is left untouched.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .common import (DATASET_NAMES, PAD_MODES, ArraySplit, BadDatasetError, DataFlagError, DatasetError,
                     DatasetInfo, array_transforms, check_download, printable, static_info)

# Tags that keep the random streams derived from one seed apart.
_ORDER, _AUG, _WORKERS, _VAL, _SUBSET, _EVAL_SUBSET = range(6)


class Batch(NamedTuple):
    images: Union[torch.Tensor, list]  # float, normalised, on the device; a list of `views` tensors if views > 1
    labels: torch.Tensor               # int64
    index: torch.Tensor                # int64 position of each sample in the loader's set


class Loaders(NamedTuple):
    train: "DeviceLoader | TorchLoader"
    val: Optional["DeviceLoader | TorchLoader"]  # held-out training samples, test-time transforms
    test: "DeviceLoader | TorchLoader"
    info: DatasetInfo
    n_train: int
    record: Optional[dict] = None  # images found vs official, subsets: JSON-ready, results.json's "data"


def mix_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(k) % 2 ** 64 for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2 ** 63 - 1)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*keys))


def stratified_split(labels: torch.Tensor, n_val: int, seed: int, stream: int = _VAL,
                     flag: str = "--val-split") -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``n_val`` samples, each class in proportion to its size (largest remainder), chosen at
    random from a generator seeded by (``seed``, ``stream``). Returns (rest, held-out) index tensors, each
    sorted. ``flag`` names the option in the error for an ``n_val`` outside 1..n-1."""
    n = len(labels)
    if not 0 < n_val < n:
        raise ValueError(f"{flag} must be between 1 and {n - 1} (the set has {n} samples), got {n_val}")
    counts = torch.bincount(labels)
    exact = counts.double() * n_val / n
    quota = exact.floor().long()
    leftover = n_val - int(quota.sum())
    quota[torch.argsort(quota - exact, stable=True)[:leftover]] += 1   # largest fractional parts first
    perm = torch.randperm(n, generator=_generator(seed, stream))
    grouped = perm[torch.argsort(labels[perm], stable=True)]           # by class, random within class
    cls = labels[grouped]
    rank_in_class = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[cls]
    is_val = rank_in_class < quota[cls]
    return grouped[~is_val].sort().values, grouped[is_val].sort().values


class Schedule:
    """Which positions (into a loader's set) a rank visits in an epoch, and the epoch's augmentation
    generator; see the module docstring. Its own object so that a DataLoader's batch sampler can hold
    it without a reference cycle back to the loader (a cycle would leave worker shutdown to the GC)."""

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, rank: int, world_size: int,
                 drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.batch_size, self.train = n, batch_size, train
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        if train:
            full, rest = divmod(n // world_size, batch_size)
            keep_rest = not drop_last and rest > 1          # one sample cannot train batch norm
            self.num_batches = full + keep_rest
            self.num_samples = full * batch_size + (rest if keep_rest else 0)
        else:
            self.num_samples = len(range(rank, n, world_size))
            self.num_batches = math.ceil(self.num_samples / batch_size)

    def positions(self) -> torch.Tensor:
        """Positions this rank visits this epoch, in order (CPU int64)."""
        if not self.train:
            return torch.arange(self.rank, self.n, self.world_size)
        perm = torch.randperm(self.n, generator=_generator(self.seed, _ORDER, self.epoch))
        return perm[self.rank: (self.n // self.world_size) * self.world_size: self.world_size][: self.num_samples]

    def aug_generator(self) -> torch.Generator:
        return _generator(self.seed, _AUG, self.epoch, self.rank)


class _Loader:
    """What both loader kinds share: ``labels``, ``num_samples``, ``set_epoch``, ``__len__``."""

    def __init__(self, labels: torch.Tensor, batch_size: int, train: bool, seed: int, rank: int,
                 world_size: int, views: int, drop_last: bool = False):
        self.labels, self.batch_size, self.train, self.views = labels, batch_size, train, max(1, views)
        self.schedule = Schedule(len(labels), batch_size, train, seed, rank, world_size, drop_last)
        self.num_samples, self.num_batches = self.schedule.num_samples, self.schedule.num_batches

    @property
    def epoch(self) -> int:
        return self.schedule.epoch

    def set_epoch(self, epoch: int) -> None:
        self.schedule.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def positions(self) -> torch.Tensor:
        return self.schedule.positions()


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              padding: int, pad_mode: str = "zero") -> torch.Tensor:
    """Batched RandomCrop(size, padding, padding_mode) + horizontal flip by one gather.

    ``images`` B x C x H x W; ``dy``, ``dx`` offsets in 0..2*padding into the padded image; ``flip``
    bool. Output pixel (i, j) = padded[dy + i, dx + j], or padded[dy + i, dx + W - 1 - j] when flipped
    (crop, then flip: torchvision's order). ``pad_mode`` 'zero' pads with 0; 'reflect' reads padded
    position p (0-based, p - padding outside 0..H-1) at the reflected index without repeating the edge
    (torch's / torchvision's 'reflect'), gathered from the unpadded images (needs padding < H, W)."""
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}; got {pad_mode!r}")
    b, c, h, w = images.shape
    ar_h, ar_w = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    rows = dy[:, None] + ar_h                                                      # B x H
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)            # B x W
    if pad_mode == "reflect" and padding:
        if padding >= min(h, w):
            raise ValueError(f"reflect padding {padding} needs images larger than it; got {h}x{w}")
        rows, cols = _reflect(rows - padding, h), _reflect(cols - padding, w)
        padded = images
    else:
        padded = F.pad(images, (padding,) * 4) if padding else images
    return padded[torch.arange(b, device=images.device)[:, None, None, None],
                  torch.arange(c, device=images.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Index into 0..size-1 of position ``index`` (-size < index < 2*size - 1) reflected at the borders
    without repeating the edge: -1 -> 1, size -> size - 2."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


class DeviceLoader(_Loader):
    """Whole split resident on ``device`` as uint8; augmentation batched on the device (module docstring)."""

    def __init__(self, split: ArraySplit, info: DatasetInfo, batch_size: int, device, *, train: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, views: int = 1, pad_mode: str = "zero",
                 drop_last: bool = False):
        super().__init__(split.labels, batch_size, train, seed, rank, world_size, views, drop_last)
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}; got {pad_mode!r}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.device_labels = split.labels.to(self.device)
        self.padding, self.pad_mode = info.crop_padding, pad_mode
        self.mean = torch.tensor(info.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=self.device).view(1, -1, 1, 1)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        """ToTensor's /255, then Normalize(mean, std)."""
        return images_u8.float().div_(255).sub_(self.mean).div_(self.std)

    def __iter__(self):
        order = self._to_device(self.positions())
        augs = []
        if self.train:
            g, n, span = self.schedule.aug_generator(), len(order), 2 * self.padding + 1
            for _ in range(self.views):
                draw = torch.stack([torch.randint(span, (n,), generator=g), torch.randint(span, (n,), generator=g),
                                    torch.randint(2, (n,), generator=g)])
                augs.append(self._to_device(draw))
        bs = self.batch_size
        for i in range(self.num_batches):
            index = order[i * bs:(i + 1) * bs]
            x = self.images[index]
            if self.train:
                views = [self.normalize(crop_flip(x, a[0, i * bs:(i + 1) * bs], a[1, i * bs:(i + 1) * bs],
                                                  a[2, i * bs:(i + 1) * bs].bool(), self.padding, self.pad_mode))
                         for a in augs]
                images = views[0] if self.views == 1 else views
            else:
                images = self.normalize(x)
            yield Batch(images, self.device_labels[index], index)


class ArraySource(Dataset):
    """An :class:`ArraySplit` as a dataset of (uint8 C x H x W tensor, int label)."""

    def __init__(self, split: ArraySplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int):
        return self.split.images[i], int(self.split.labels[i])


@contextlib.contextmanager
def _seeded(seed: int):
    """Run torchvision's random transforms (global CPU RNG) under ``seed``; in the main process
    (workers=0) the caller's RNG state is restored afterwards."""
    if get_worker_info() is None:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    else:
        torch.random.default_generator.manual_seed(seed)
        yield


class _TransformedSubset(Dataset):
    """Key (position, seed or None) -> (transformed image or list of views, label, position)."""

    def __init__(self, source, indices: torch.Tensor, transform, views: int):
        self.source, self.indices, self.transform, self.views = source, indices.tolist(), transform, views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        position, seed = key
        image, label = self.source[self.indices[position]]
        if seed is None:
            return self.transform(image), label, position
        with _seeded(seed):
            views = [self.transform(image) for _ in range(self.views)]
        return (views[0] if self.views == 1 else views), label, position


class _BatchKeys:
    """The DataLoader's batch_sampler: this epoch's positions (and per-sample seeds when training)."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def __len__(self) -> int:
        return self.schedule.num_batches

    def __iter__(self):
        schedule, bs = self.schedule, self.schedule.batch_size
        positions = schedule.positions().tolist()
        seeds = [None] * len(positions)
        if schedule.train:
            seeds = torch.randint(2 ** 62, (len(positions),), generator=schedule.aug_generator()).tolist()
        for i in range(schedule.num_batches):
            yield list(zip(positions[i * bs:(i + 1) * bs], seeds[i * bs:(i + 1) * bs]))


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A worker ignores SIGINT, SIGTERM and SIGHUP: sent to the whole process group (Ctrl-C, SLURM's pre-emption,
    a closed terminal), they stop the training process, which then shuts its workers down; a worker killed by
    one would fail the run instead."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)


class TorchLoader(_Loader):
    """``torch.utils.data.DataLoader`` over ``source[indices]`` with ``transform`` (module docstring)."""

    def __init__(self, source, indices: torch.Tensor, labels: torch.Tensor, transform, batch_size: int, device,
                 *, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1, views: int = 1,
                 workers: int = 0, drop_last: bool = False):
        super().__init__(labels, batch_size, train, seed, rank, world_size, views, drop_last)
        self.device = torch.device(device)
        self.dataloader = DataLoader(
            _TransformedSubset(source, indices, transform, self.views), batch_sampler=_BatchKeys(self.schedule),
            num_workers=workers, pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            # only for the workers' base seed, which the per-sample seeds make irrelevant; passing it keeps
            # the creation of an iterator from drawing on the global RNG
            generator=_generator(seed, _WORKERS), worker_init_fn=_leave_stop_signals_to_the_main_process)

    def __iter__(self):
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        for images, labels, index in self.dataloader:
            images = [move(v) for v in images] if isinstance(images, list) else move(images)
            yield Batch(images, move(labels), move(index))


def dataset_info(name: str, data: Optional[os.PathLike | str] = None, *, image_size: Optional[int] = None,
                 classes: Optional[os.PathLike | str] = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (one of :data:`DATASET_NAMES`) under ``--image-size`` and
    ``--classes`` (None: not given).

    Built-in datasets: their static facts, no file read; ``--image-size`` (any size of at least 8) and
    ``--classes FILE`` (a subset of the class folders, checked against ``train/`` and ``val/`` by listing
    them) are for ImageNet only, and another dataset refuses them (:class:`DataFlagError`). ``folder``:
    read from ``--data`` by listing the tree and reading up to 1,000 image headers, nothing decoded
    (:func:`data.folder.describe`): classes, image size, protocol, loader; the layout problems raise
    :class:`DatasetError` (one line), as ``build_loaders`` would."""
    if name == "folder":
        from .folder import describe
        return describe(data, image_size, classes)
    info = static_info(name)
    if image_size is not None and image_size != info.image_size:
        if name != "imagenet":
            raise DataFlagError(f"--image-size {image_size}: {name}'s images are {info.image_size}x{info.image_size}; "
                                "--image-size is for --dataset folder and imagenet. Fix: leave it out")
        info = replace(info, image_size=image_size)
    if classes is not None:
        if name != "imagenet":
            raise DataFlagError(f"--classes picks class folders of --dataset folder or imagenet; {name} has fixed "
                                "classes. Fix: leave --classes out (or save the classes as a folder tree and use "
                                "--dataset folder)")
        from .imagenet import subset_classes
        names = subset_classes(data, classes)
        info = replace(info, num_classes=len(names), classes=tuple(names), official_train=None, official_test=None)
    return info


def load_dataset(name: str, data=None, download: bool = False, *, image_size: Optional[int] = None,
                 classes=None, loader: Optional[str] = None, held_out: tuple[int, int] = (0, 0),
                 keep: Optional[torch.Tensor] = None):
    """(train, test) of ``name``: :class:`ArraySplit` pairs, or ImageFolder pairs for ImageNet (``classes``:
    a ``--classes`` file, a subset of its class folders); for ``folder`` a :class:`data.folder.FolderData`
    (``image_size``, ``classes`` and ``loader`` as ``--image-size``, ``--classes``, ``--loader``; ``held_out``
    (``--val-split``, ``--seed``) and ``keep``, the training images its mean and std leave out and those they
    measure: :func:`training_indices`)."""
    if name not in DATASET_NAMES:
        dataset_info(name)  # the unknown-name error
    check_download(name, download)
    if name == "folder":
        from .folder import load_folder
        return load_folder(data, image_size, classes, loader, held_out, keep)
    if name in ("cifar10", "cifar100"):
        from .cifar import load_cifar
        return load_cifar(name, data, download)
    if name == "tinyimagenet":
        from .tinyimagenet import load_tinyimagenet
        return load_tinyimagenet(data, download)
    if name == "fashion-mnist":
        from .fashion_mnist import load_fashion_mnist
        return load_fashion_mnist(data, download)
    if name == "synthetic":
        from .synthetic import make_synthetic
        return make_synthetic()
    from .imagenet import load_imagenet
    return load_imagenet(data, classes)


def _load_once(name: str, data, download: bool, rank: int, world_size: int, **options):
    """Under an initialised process group rank 0 loads first (it alone downloads, checks the files, and
    writes the TinyImageNet or folder cache the others then read); the other ranks wait for its verdict, and
    when rank 0 found the dataset missing or damaged they stop with the same one-line error instead of waiting."""
    import torch.distributed as dist
    if not (world_size > 1 and dist.is_available() and dist.is_initialized()):
        return load_dataset(name, data, download, **options)
    verdict = [None]
    if rank == 0:
        try:
            result = load_dataset(name, data, download, **options)
        except DatasetError as e:
            verdict = [str(e)]
            dist.broadcast_object_list(verdict, src=0)
            raise
        dist.broadcast_object_list(verdict, src=0)
        return result
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise BadDatasetError(verdict[0].replace("\n", " "))
    return load_dataset(name, data, False, **options)


def _subset(labels: torch.Tensor, idx: torch.Tensor, n: Optional[int], seed: int, stream: int, flag: str,
            pool: str) -> tuple[torch.Tensor, Optional[dict]]:
    """``n`` of the samples ``idx`` (stratified, seeded), and its description for the record."""
    if not n:
        return idx, None
    if n > len(idx):
        raise ValueError(f"{flag} {n} exceeds the {len(idx)} {pool} samples")
    drawn_from = len(idx)
    if n < len(idx):
        idx = idx[stratified_split(labels[idx], n, seed, stream, flag)[1]]
    return idx, {"size": n, "of": drawn_from, "selection": "stratified random (each class in proportion to its "
                 "size)", "seed": seed, "classes": int(labels[idx].unique().numel())}


def _classes_left_out(labels: torch.Tensor, idx: torch.Tensor, num_classes: int) -> list[int]:
    """The classes that ``labels`` holds and its samples ``idx`` do not."""
    present = torch.bincount(labels, minlength=num_classes) > 0
    return torch.nonzero(present & (torch.bincount(labels[idx], minlength=num_classes) == 0)).flatten().tolist()


def _check_every_class(labels: torch.Tensor, pool: torch.Tensor, train_idx: torch.Tensor, num_classes: int,
                       subset: Optional[int]) -> None:
    """ValueError when a class of the training set has no sample left in ``train_idx``."""
    empty = len(_classes_left_out(labels, train_idx, num_classes))
    if not empty:
        return
    need = "this method needs every class (its negatives are drawn by class)"
    if subset:
        counts = torch.bincount(labels[pool])
        enough = -(-len(pool) // int(counts[counts > 0].min()))       # every class's share >= 1 sample
        raise ValueError(f"--subset {subset} leaves {empty} of {num_classes} classes without a training sample, "
                         f"and {need}; use --subset {enough} or more")
    raise ValueError(f"--val-split leaves {empty} of {num_classes} classes without a training sample, and {need}; "
                     "use a smaller --val-split")


def _describe(info: DatasetInfo, source: Optional[str], found: dict, used: dict, subsets: dict, rank: int,
              notes: tuple = ()) -> dict:
    """Print where the data came from and the counts found and used (rank 0), warn where they differ from the
    official release (and the dataset's own ``notes``), and return the record for results.json."""
    official = {"train": info.official_train, "test": info.official_test}
    notes = [f"{info.name}: found {found[k]} {k} images, the official release has {official[k]}; results are "
             "not comparable with published ones" for k in found if official.get(k) is not None
             and found[k] != official[k]] + list(notes)
    if rank == 0:
        line = f"{info.name} from {source}: found " + " / ".join(f"{n} {k}" for k, n in found.items()) + " images"
        if official["train"] is not None:
            line += f" (official {official['train']} / {official['test']})"
        line += f"; using {used['train']} train, {used['val']} val, {used['test']} test"
        for name, flag in (("subset", "--subset"), ("eval_subset", "--eval-subset")):
            if subsets[name]:
                line += f"; {flag} {subsets[name]['size']}: {subsets[name]['classes']} of {info.num_classes} classes"
        print(line, flush=True)
        for note in notes:
            warnings.warn(note)
    return {"source": source, "images_found": found, "official": official if official["train"] is not None else None,
            "images_used": used, **subsets, "warnings": notes}


def _targets(split) -> torch.Tensor:
    return torch.as_tensor(split.labels if isinstance(split, ArraySplit) else split.targets, dtype=torch.int64)


def _folder_splits(args, tree) -> dict:
    """Which folder serves which loader (module docstring of data.folder), refusing before anything is
    decoded a tree without an evaluation folder and no --val-split, and a --val-split beside val/ and test/."""
    root, n = tree.root, args.val_split
    evals = tree.eval_splits
    if not evals and not n:
        hold_out = ("" if args.eval_only else   # (--eval-only: the checkpoint's --val-split is its own)
                    ", or pass --val-split N to hold out N training images (stratified, seeded) as the evaluation set")
        files = " and ".join(f"{s}/ is a file" for s in ("val", "test") if (root / s).is_file())
        raise BadDatasetError(f"dataset 'folder': {root} has no val/ or test/ folder to evaluate on"
                              f"{f' ({files})' if files else ''}. Fix: add {root}/val/<class>/ with images{hold_out}")
    if len(evals) == 2 and n:
        raise DataFlagError(f"--val-split {n}: {root} has val/, which chooses the best epoch, and test/, which is "
                            "reported; a hold-out of train/ would be a third set. Fix: leave --val-split out (or move "
                            "val/ away)")
    held = f"--val-split {n}: {n} images held out of train/ (stratified, seeded)"
    if len(evals) == 2:
        return {"train": "train/", "val": "val/ (chooses best)", "test": "test/ (reported)"}
    if evals:
        return {"train": "train/", "val": f"{held}, chooses best" if n else None, "test": f"{evals[0]}/"}
    return {"train": "train/", "val": None, "test": f"{held}: the evaluation set"}


def training_indices(tree, n: int, seed: int) -> Optional[torch.Tensor]:
    """Indices (sorted, int64) of a folder tree's training images that ``--val-split n`` (seeded by ``seed``)
    leaves to train on, as :func:`build_loaders` draws them from the loaded set (the same labels in the same
    order); None when nothing is held out. ValueError naming train/ and the largest N for an ``n`` outside
    1..n-1 of its n images, before anything is decoded."""
    if not n:
        return None
    total = len(tree.samples["train"])
    if not 0 < n < total:
        raise ValueError(f"--val-split {n} must be between 1 and {total - 1} (the {total} images of "
                         f"{printable(tree.root / 'train')}); give --val-split {total - 1} or less")
    return stratified_split(torch.tensor([y for _, y in tree.samples["train"]], dtype=torch.int64), n, seed)[0]


def _check_folder_counts(args, tree) -> None:
    """A ``--subset`` or ``--eval-subset`` larger than the images the scan counted: the ValueError that
    :func:`_subset` would raise once every image was decoded, raised before, naming the folder that holds them."""
    root, n_val, evals = tree.root, args.val_split or 0, tree.eval_splits
    n_train = len(tree.samples["train"]) - n_val
    if args.subset and args.subset > n_train:
        less = f", less the {n_val} --val-split holds out" if n_val else ""
        raise ValueError(f"--subset {args.subset} exceeds the {n_train} available training samples (the images of "
                         f"{root / 'train'}{less}); give --subset {n_train} or less")
    if not args.eval_subset:
        return
    if evals:
        split = "test" if len(evals) == 2 else evals[0]
        n_test, where = len(tree.samples[split]), f"the images of {root / split}"
    else:
        n_test, where = n_val, f"the {n_val} images --val-split holds out of {root / 'train'}"
    if args.eval_subset > n_test:
        raise ValueError(f"--eval-subset {args.eval_subset} exceeds the {n_test} test samples ({where}); give "
                         f"--eval-subset {n_test} or less")


def _evaluable(n: int, world_size: int, split: str, flag: Optional[str]) -> None:
    """Every process evaluates at least one image of a split (one with none has no heads to add to the others'):
    else a ValueError naming the split, how many processes it takes, and ``flag``, the option that drew it."""
    if 0 < n < world_size:
        raise ValueError(f"{n} {split} images over {world_size} processes leave a process none to evaluate; "
                         + (f"give a larger {flag}, or " if flag else "") + f"start at most {n} processes")


def _folder_record(loaded, splits: dict, args) -> dict:
    from .folder import protocol_text
    info, tree = loaded.info, loaded.tree
    return {"root": str(tree.root), "classes_file": str(tree.classes_file) if tree.classes_file else None,
            "splits": splits, "image_size": info.image_size,
            "image_size_from": "--image-size" if args.image_size is not None else tree.size_note,
            "protocol": protocol_text(info), "mean": list(info.mean), "std": list(info.std),
            "mean_std_of": loaded.stats_of, "decoded_in_memory": loaded.in_memory}


def build_loaders(args, device, rank: int = 0, world_size: int = 1, needs_every_class: bool = False,
                  drop_last: bool = False, normalization: Optional[dict] = None) -> Loaders:
    """Training, validation (or None) and test loaders for ``args`` (see the module docstring).

    Reads ``args.dataset``, ``data``, ``download``, ``subset`` (train on N samples, stratified random, after
    the hold-out), ``eval_subset`` (test on N samples, stratified random), ``val_split`` (hold out N
    training samples, stratified; evaluated with test-time transforms), all seeded by ``seed``,
    ``batch_size`` (per process), ``eval_batch_size``, ``workers``, ``loader`` ('device' or 'torch', resolved
    by the engine: unset, the dataset's ``default_loader``, engine/config.py), ``views`` (default 1),
    ``pad_mode`` ('zero' default, or 'reflect'; ImageNet's RandomResizedCrop does not pad), ``image_size``
    (``--image-size``; None: the dataset's, or for ``folder`` chosen from the images), ``classes``
    (``--classes FILE``, folder and ImageNet; None: every class folder) and ``eval_only`` (a checkpoint is
    evaluated: no advice to change its --val-split).
    ``needs_every_class``: refuse (ValueError) a subset that leaves a class without training samples;
    ``drop_last``: drop the last incomplete training batch (one batch shape for ``--cuda-graph``).
    ``normalization``: for ``folder``, the ``mean`` and ``std`` a checkpoint was trained with (its record's
    ``data.folder``), used instead of those of this copy's training images: a checkpoint is evaluated, or its run
    continued, as it was trained.
    Dataset problems raise DatasetNotFoundError or BadDatasetError; flags that do not fit the dataset raise
    ValueError (DataFlagError is both). Every field must exist (a missing one is an AttributeError, not a
    silent default); None means the default where stated.

    ``Loaders.info`` is the dataset's :class:`DatasetInfo` as loaded: for ``folder`` with the class names, the
    chosen size and the measured mean and std; for ImageNet with its class names (wnids). For ``folder`` the
    evaluation split is ``val/`` or ``test/``; with both, ``val/`` is the validation loader and ``test/`` the
    test loader; with neither, ``--val-split N`` holds out the test loader's samples (see data/folder.py).
    ``Loaders.record`` adds ``classes`` (when the info has them) and, for ``folder``, ``folder`` (its root,
    which folder serves which split, the size and how it was chosen, the protocol, mean and std).
    """
    name = args.dataset
    info = dataset_info(name, args.data, image_size=args.image_size, classes=args.classes)
    kind = args.loader
    if kind not in ("device", "torch"):
        raise ValueError(f"unknown loader {kind!r}; choose 'device' or 'torch'")
    if name == "imagenet" and kind == "device":
        raise ValueError("ImageNet does not fit in device memory as decoded images; use --loader torch")
    folder_splits = None
    if name == "folder":
        from .folder import scan
        tree = scan(args.data, args.classes)
        folder_splits = _folder_splits(args, tree)   # before anything is decoded
        keep = training_indices(tree, args.val_split or 0, args.seed)   # (a --val-split out of range: refused here)
        _check_folder_counts(args, tree)
    batch_size = args.batch_size
    eval_batch_size = args.eval_batch_size
    views, seed, workers, pad_mode = args.views, args.seed, args.workers, args.pad_mode

    folder_options = {"held_out": (args.val_split or 0, seed), "keep": keep} if name == "folder" else {}
    loaded = _load_once(name, args.data, bool(args.download), rank, world_size, image_size=args.image_size,
                        classes=args.classes, loader=kind, **folder_options)
    val_set, notes = None, ()
    if name == "folder":
        if normalization is not None:
            measured = (list(loaded.info.mean), list(loaded.info.std))
            trained = (list(normalization["mean"]), list(normalization["std"]))
            if measured != trained and rank == 0:
                print(f"folder: normalised with the checkpoint's mean {trained[0]} and std {trained[1]} (this "
                      f"folder's training images give {measured[0]} and {measured[1]})", flush=True)
            loaded = loaded._replace(info=replace(loaded.info, mean=tuple(trained[0]), std=tuple(trained[1])),
                                     stats_of=normalization.get("mean_std_of") or "the checkpoint's (its record does "
                                     "not say which images they were measured on)")
        info, notes = loaded.info, loaded.tree.warnings
        train_set = loaded.train
        if loaded.val is not None and loaded.test is not None:
            val_set, test_set = loaded.val, loaded.test
        else:
            test_set = loaded.val if loaded.val is not None else loaded.test     # None: held out of train/
    else:
        train_set, test_set = loaded
        if name == "imagenet":
            info = replace(info, classes=tuple(train_set.classes))
    labels = _targets(train_set)
    train_idx, val_idx = torch.arange(len(labels)), None
    if args.val_split:
        train_idx, val_idx = stratified_split(labels, args.val_split, seed)
        emptied = [info.classes[c] if info.classes else str(c)
                   for c in _classes_left_out(labels, train_idx, info.num_classes)]
        if emptied:     # (a class of one or two images: the largest remainder gives them to the hold-out)
            notes = (*notes, f"--val-split {args.val_split} holds out every training image of {len(emptied)} "
                             f"class(es) ({', '.join(emptied[:5])}{', ...' if len(emptied) > 5 else ''}): the network "
                             "never trains on them; lower --val-split, or add training images")
    if test_set is None:                      # the held-out samples are the evaluation set
        test_set, test_labels, test_pool, val_idx = train_set, labels, val_idx, None
    else:
        test_labels = _targets(test_set)
        test_pool = torch.arange(len(test_labels))
    pool = train_idx
    train_idx, subset = _subset(labels, pool, args.subset, seed, _SUBSET, "--subset",
                                "available training")
    test_idx, eval_subset = _subset(test_labels, test_pool, args.eval_subset, seed, _EVAL_SUBSET, "--eval-subset",
                                    "test")
    if needs_every_class:
        _check_every_class(labels, pool, train_idx, info.num_classes, args.subset)

    def make(split, split_labels, idx: torch.Tensor, train: bool):
        common = dict(train=train, seed=seed, rank=rank, world_size=world_size, views=views if train else 1,
                      drop_last=drop_last)
        bs = batch_size if train else eval_batch_size
        if kind == "device":
            whole = len(idx) == len(split_labels)  # skip a copy of the whole set
            sub = split if whole else ArraySplit(split.images[idx], split_labels[idx])
            return DeviceLoader(sub, info, bs, device, pad_mode=pad_mode, **common)
        if isinstance(split, ArraySplit):
            source, transform = ArraySource(split), array_transforms(info, train, pad_mode)
        elif name == "folder":
            from .folder import transform as folder_transform
            source, transform = split, folder_transform(info, train, streamed=True, pad_mode=pad_mode)
        else:
            from .imagenet import test_transform, train_transform
            source = split
            transform = train_transform(info.image_size, info.mean, info.std) if train else \
                test_transform(info.image_size, info.test_resize, info.mean, info.std)
        return TorchLoader(source, idx, split_labels[idx], transform, bs, device, workers=workers, **common)

    train = make(train_set, labels, train_idx, True)
    if len(train) == 0:
        fix = ("lower --batch-size" if len(train_idx) // world_size >= 2 else   # (a batch of one is dropped)
               "train on more samples" + (" (--subset)" if args.subset else "")
               + (" or start fewer processes" if world_size > 1 else ""))
        raise ValueError(f"{len(train_idx)} training samples over {world_size} process(es) give no training batch "
                         f"(a batch of {batch_size} under --cuda-graph, else of 2 or more); {fix}")
    if val_set is not None:
        val_labels = _targets(val_set)
        val = make(val_set, val_labels, torch.arange(len(val_labels)), False)
    else:
        val = make(train_set, labels, val_idx, False) if val_idx is not None else None
    _evaluable(len(test_idx), world_size, "test", "--eval-subset" if args.eval_subset else None)
    if val is not None:
        _evaluable(len(val.labels), world_size, "validation", "--val-split" if val_set is None else None)
    found = {"train": len(labels)}
    if name != "folder":
        found["test"] = len(test_labels)
    else:
        found.update({s: len(loaded.tree.samples[s]) for s in loaded.tree.eval_splits})
    used = {"train": len(train_idx), "val": 0 if val is None else len(val.labels), "test": len(test_idx)}
    source = getattr(train_set, "source", None)         # where the family loader read it, or the folder it was given
    where = loaded.tree.root if name == "folder" else getattr(train_set, "root", None) or args.data
    if source is None and where:                       # (a folder dataset: --data, or the default place)
        source = str(Path(where).absolute())
    record = _describe(info, source, found, used, {"subset": subset, "eval_subset": eval_subset}, rank, notes)
    if info.classes is not None:
        record["classes"] = list(info.classes)
    if name == "folder":
        record["folder"] = _folder_record(loaded, folder_splits, args)
    return Loaders(train, val, make(test_set, test_labels, test_idx, False), info, len(train_idx), record)
