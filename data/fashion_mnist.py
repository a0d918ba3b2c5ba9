"""Fashion-MNIST from its raw IDX files (gzipped or not), parsed here.

Files: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, looked for in ``--data`` (and its
``FashionMNIST/raw`` subfolder, torchvision's layout), else ``./datasets/fashion-mnist`` (or under
``$OKD_DATASETS``), else ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install
dataset-fashion-mnist``). ``--download`` fetches them with torchvision.

So that the 32x32 CIFAR backbones run unchanged, every 28x28 grey image is **zero-padded by 2 pixels on
each side to 32x32 and its channel replicated 3 times** (uint8 N x 3 x 32 x 32). Training augmentation
(in :mod:`data.loaders`): RandomCrop(32, padding=4; zero fill, or reflect with --pad-mode) +
RandomHorizontalFlip(0.5); then /255 and Normalize with the usual Fashion-MNIST statistics (0.2860,) / (0.3530,)
replicated to 3 channels. They are those of the 28x28 originals: the padded 32x32 training images have mean 0.2190
and std 0.3318, so the normalised inputs have mean -0.19 and std 0.94 (the usual constants kept: any fixed affine
map trains alike, and no paper's protocol exists for this dataset). Test: /255 + Normalize.

Every file is parsed and checked when read (gzip stream complete, IDX header, sizes, labels 0..9); a
damaged one is one :class:`~data.common.BadDatasetError` naming every bad file. With ``--download`` the
files present are also checked against the published MD5s (Zalando's ``.gz`` files, as torchvision's
``FashionMNIST.resources``; a re-compressed copy such as Debian's is checked by the MD5 of its IDX content,
:data:`CONTENT_MD5`) and a bad or missing one is fetched again.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import ArraySplit, BadDatasetError, DatasetNotFoundError, datasets_root, download_or_explain

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# MD5 of each file's decompressed IDX content (the published MD5s are of the .gz files, which differ when a
# distribution re-compresses them): measured on Debian's dataset-fashion-mnist 0.0~git20200523.55506a9, whose
# .gz files decompress to the official 60,000 / 10,000 images with 6,000 / 1,000 per class.
CONTENT_MD5 = {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
               "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
               "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
               "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"}


def read_idx(path: os.PathLike | str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzip detected from its magic bytes, not its name).

    Header: two zero bytes, the type code 0x08 (uint8), the number of dimensions, then each
    dimension as a big-endian int32; then the data. Raises ``ValueError`` naming the file otherwise.
    """
    raw = _content(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'empty'}, "
                         f"expected 000008xx)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {dims} ({int(np.prod(dims))} bytes) "
                         f"but the file holds {len(raw) - start} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _content(path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic; a damaged gzip stream (truncated,
    bad CRC) raises ``ValueError`` naming the file."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{path}: damaged gzip stream ({str(e).splitlines()[0] or type(e).__name__}); "
                             "the file is probably a partial download") from None
    return raw


def _published_md5() -> dict:
    from torchvision.datasets import FashionMNIST
    return dict(FashionMNIST.resources)


def _checksum_ok(path: Path) -> bool:
    """The .gz's MD5 is the published one, or its content's MD5 is the official content's."""
    raw = path.read_bytes()
    if hashlib.md5(raw).hexdigest() == _published_md5().get(path.name):
        return True
    try:
        return hashlib.md5(_content(path)).hexdigest() == CONTENT_MD5[path.name.removesuffix(".gz")]
    except ValueError:
        return False


def _find(folder: Path, stem: str):
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def candidate_dirs(data=None) -> list[Path]:
    if data:
        return [Path(data), Path(data) / "FashionMNIST" / "raw"]
    local = datasets_root() / "fashion-mnist"
    return [local, local / "FashionMNIST" / "raw", SYSTEM_DIR]


def load_fashion_mnist(data=None, download: bool = False) -> tuple[ArraySplit, ArraySplit]:
    """Return (train, test) as uint8 N x 3 x 32 x 32 (padded, grey replicated) and int64 labels."""
    dirs = candidate_dirs(data)
    wanted = [stem for pair in FILES.values() for stem in pair]
    folder = next((d for d in dirs if all(_find(d, stem) for stem in wanted)), None)
    if download:
        folder = _download_bad_or_missing(folder, dirs, wanted)
    if folder is not None:
        paths = {stem: _find(folder, stem) for stem in wanted}
        parsed, bad = {}, []
        for stem, path in paths.items():
            try:
                parsed[stem] = read_idx(path)
            except (OSError, ValueError) as e:
                bad.append((path, str(e).split(": ", 1)[-1]))
        if bad:
            raise BadDatasetError.files(
                "fashion-mnist", bad, f"delete {'it' if len(bad) == 1 else 'them'} and run again with --download "
                "(fetches the published files and checks their MD5), or copy them again from "
                "https://github.com/zalandoresearch/fashion-mnist", what="IDX files")
        bad = [p for i, l in FILES.values() for p in _pair_problems(paths[i], paths[l], parsed[i], parsed[l])]
        if bad:                                      # (every bad file of both splits, in one line)
            raise BadDatasetError.files("fashion-mnist", bad, "copy them again from "
                                        "https://github.com/zalandoresearch/fashion-mnist (or --download)",
                                        what="IDX files")
        return tuple(_split(paths[i], parsed[i], parsed[l]) for i, l in FILES.values())
    partial = next((d for d in dirs if any(_find(d, stem) for stem in wanted)), None)   # (some files copied)
    missing = [stem for stem in wanted if partial is None or not _find(partial, stem)]
    raise DatasetNotFoundError(
        "fashion-mnist", f"the IDX file{'s' if len(missing) > 1 else ''} {', '.join(missing)} (optionally .gz) "
        f"{'are' if len(missing) > 1 else 'is'} missing" + (f" from {partial}" if partial else ""), dirs,
        "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), "
        + ("" if download else "or pass --download, ") + "or put the files from "
        "https://github.com/zalandoresearch/fashion-mnist "
        "into a folder and point --data at it.")


def _download_bad_or_missing(folder, dirs: list[Path], wanted: list[str]):
    """--download: fetch what is missing, or what differs from the published checksums, then return the
    folder that holds the four files. A read-only folder (Debian's) is left alone: the files go to dirs[0]."""
    from torchvision.datasets import FashionMNIST
    bad = wanted if folder is None else [s for s in wanted if not _checksum_ok(_find(folder, s))]
    if not bad:
        return folder
    target = folder if folder is not None and os.access(folder, os.W_OK) else dirs[0]
    if target != folder:
        bad = wanted
    if folder is not None:
        print(f"fashion-mnist: {', '.join(bad)} differ from the published checksums; fetching them again "
              f"into {target}", flush=True)
    for stem in bad:
        old = _find(target, stem)
        if old is not None and old.suffix != ".gz":
            old.unlink()                                    # else _find would keep preferring it
        name = stem + ".gz"
        download_or_explain("fashion-mnist", target, lambda: _fetch(FashionMNIST.mirrors, name, target))
    return target if all(_find(target, stem) for stem in wanted) else None


def _fetch(mirrors: list[str], name: str, target: Path) -> None:
    """torchvision's download (it checks the published MD5), trying each mirror in turn."""
    from torchvision.datasets import utils
    md5 = _published_md5()[name]
    for i, mirror in enumerate(mirrors):
        try:
            return utils.download_url(mirror + name, str(target), filename=name, md5=md5)
        except Exception:  # noqa: BLE001 -- the next mirror, else the last error
            if i == len(mirrors) - 1:
                raise


def _pair_problems(images_path: Path, labels_path: Path, images: np.ndarray, labels: np.ndarray) -> list[tuple]:
    """[(file, reason)] for a split's IDX pair that does not hold N x 28 x 28 images and N labels in 0..9."""
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
        return [(f"{images_path} / {labels_path}", f"{images.shape} images and {labels.shape} labels, expected "
                                                   "N x 28 x 28 and N")]
    return [(labels_path, f"label {labels.max()}, outside 0..9")] if len(labels) and labels.max() > 9 else []


def _split(images_path: Path, images: np.ndarray, labels: np.ndarray) -> ArraySplit:
    """The split as uint8 N x 3 x 32 x 32 (zero-padded, grey replicated) with int64 labels."""
    x = F.pad(torch.from_numpy(images.copy()), (2, 2, 2, 2))          # 28x28 -> 32x32, zeros
    x = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()             # grey -> 3 equal channels
    return ArraySplit(x, torch.from_numpy(labels.astype(np.int64)), str(Path(images_path).parent.absolute()))
