#!/usr/bin/env python
"""Check a whole dataset folder in one pass: its layout, then every image decoded, in parallel, with a
progress bar; every file that does not decode is listed (one line each: path, reason).

The training loaders check the layout of every dataset and decode CIFAR, Fashion-MNIST, TinyImageNet and
small class folders completely on first read, but ImageNet's 1.33 million images (and a large or
high-resolution folder dataset's) are decoded only as training meets them (a bad one then stops the run
with one line naming it). Run this once after extracting ImageNet or copying your own images, or when a
run stopped on a bad file, to find every bad file at once::

    python scripts/check_dataset.py --dataset imagenet --data /data/imagenet --workers 16
    python scripts/check_dataset.py --dataset tinyimagenet --data datasets/tinyimagenet --out bad.txt
    python scripts/check_dataset.py --dataset folder --data ~/my_images [--classes subset.txt]

For CIFAR and Fashion-MNIST it parses every file. ``--download`` does what it does in training, for the datasets
training downloads: CIFAR and Fashion-MNIST files are compared with the published checksums and fetched again
when they differ; TinyImageNet is fetched when it is missing and extracted again from its zip when its layout
is damaged or an image does not decode (then decoded again). ImageNet and folder datasets have nothing to
download: ``--download`` is refused for them. ``--out FILE`` is checked before anything is read (an existing
file is refused without ``--force``; a file inside the dataset folder, or one of a run directory's own files,
is refused even with it) and written whole or not at all. Exit status: 0 all good, 1 bad files
(listed), 2 bad input, a layout or missing-data problem (one line).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

if __name__ == "__main__":     # run as a file: the repository's packages are one folder up (imported: already found)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.common import (DATASET_NAMES, BadDatasetError, DataFlagError, DatasetError, check_download,  # noqa: E402
                         default_dir, image_problem, printable, read_class_list)
from data.files import NameTaken, os_error_message, output_problem, write_atomically  # noqa: E402
from engine.cli import Parser, dataset_folder, non_empty_path, path_given, process_count, run_tool  # noqa: E402

def check_flags(args) -> None:
    """The flag combinations refused before anything is read (one DataFlagError line each)."""
    if args.classes and args.dataset not in ("imagenet", "folder"):
        raise DataFlagError(f"--classes picks class folders of --dataset folder or imagenet, not {args.dataset}")
    if args.classes:
        read_class_list(args.classes)           # a missing file, a folder, a bad list: one line
    check_download(args.dataset, args.download)
    if args.out is not None and args.dataset not in ("imagenet", "tinyimagenet", "folder"):
        raise DataFlagError(f"--out lists the images that do not decode, for --dataset imagenet, tinyimagenet or "
                            f"folder; {args.dataset}'s files are parsed whole and a bad one is named in the error. "
                            "Fix: leave --out out")
    if args.force and args.out is None:
        raise DataFlagError("--force replaces an existing --out file; give --out FILE too, or leave --force out")
    reads = [("the dataset folder being checked", checked_folder(args.dataset, args.data))]
    problem = args.out is not None and output_problem(args.out, "--out", args.force, "bad.txt", reads)
    if problem:
        raise DataFlagError(problem)


def checked_folder(dataset: str, data: Optional[str]) -> Path:
    """The folder whose files are checked, which --out may not write into (a list written over an image turns a
    training image into text): --data or its default, or for TinyImageNet the tiny-imagenet-200 folder found in
    it (--data may be its parent, a place for the list as good as any)."""
    if dataset == "tinyimagenet":
        try:
            return tinyimagenet_root(data)
        except DatasetError:                    # not there (yet): nothing in it to protect beyond --data itself
            pass
    return default_dir(dataset, data)


def tinyimagenet_root(data: Optional[str], download: bool = False) -> Path:
    """The tiny-imagenet-200 folder (fetched first with ``download`` when missing, as training does)."""
    from data.tinyimagenet import find_root
    return find_root(data, download)


def reextract_tinyimagenet(root: Path) -> None:
    """--download on a damaged TinyImageNet: extract the zip again (fetched again if its MD5 differs), as
    training does (data.tinyimagenet.load_tinyimagenet)."""
    from data import tinyimagenet
    print(f"--download: extracting {tinyimagenet.FOLDER}.zip again into {root.parent}", flush=True)
    tinyimagenet.fetch(root.parent)


def image_list(dataset: str, data: Optional[str], classes: Optional[str] = None, download: bool = False) -> list[Path]:
    """Every image the loaders would read, after their layout checks (DatasetError otherwise); ``download``:
    TinyImageNet fetched when missing and extracted again when its layout is damaged, as in training."""
    if dataset == "imagenet":
        from data.imagenet import load_imagenet
        train, val = load_imagenet(data, classes)
        return [p for p, _ in train.samples + val.samples]
    if dataset == "folder":
        from data.folder import scan
        tree = scan(data, classes)
        for note in tree.warnings:
            print(f"warning: {printable(note)}")
        shown = ", ".join(tree.classes[:5]) + (f" and {len(tree.classes) - 5} more" if len(tree.classes) > 5 else "")
        print(printable(f"folder: {len(tree.classes)} classes ({shown}); ")
              + ", ".join(f"{len(items)} images in {split}/" for split, items in tree.samples.items()))
        if not tree.eval_splits:
            print("note: no val/ or test/ folder: training needs --val-split N, which holds out N training images "
                  "as the evaluation set")
        return [Path(p) for items in tree.samples.values() for p, _ in items]
    from data.tinyimagenet import file_lists
    root = tinyimagenet_root(data, download)
    try:
        train, val = file_lists(root)
    except BadDatasetError as e:
        if not download:
            raise
        print(f"tinyimagenet: {printable(e)}", flush=True)
        reextract_tinyimagenet(root)
        train, val = file_lists(root)
    return [p for p, _ in train + val]


def decode_all(paths: Sequence[Path], workers: int, progress: bool = True) -> list[tuple[Path, str]]:
    """(path, reason) of every file that does not decode completely, as training decodes it
    (:func:`data.common.image_problem`); ``workers`` processes (0: this one)."""
    from tqdm import tqdm
    bar = tqdm(total=len(paths), unit="img", disable=not progress, dynamic_ncols=True, desc="decoding")
    bad = []
    if workers > 0:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(image_problem, paths, chunksize=max(1, min(256, len(paths) // (8 * workers))))
            for path, reason in zip(paths, results):
                bar.update()
                if reason is not None:
                    bad.append((path, reason))
    else:
        for path in paths:
            reason = image_problem(path)
            bar.update()
            if reason is not None:
                bad.append((path, reason))
    bar.close()
    return bad


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=[n for n in DATASET_NAMES if n != "synthetic"])
    parser.add_argument("--data", type=dataset_folder, default=None, metavar="DIR",
                        help="dataset folder, as for training (default: $OKD_DATASETS/<name> or ./datasets/<name>)")
    parser.add_argument("--workers", type=process_count("decoding processes"), default=os.cpu_count() or 1,
                        help="decoding processes (0: decode in this process)")
    parser.add_argument("--classes", type=non_empty_path, default=None, metavar="FILE",
                        help="folder, imagenet: only the class folders listed in FILE, as for training")
    parser.add_argument("--download", action="store_true",
                        help="as in training: CIFAR / Fashion-MNIST: also compare with the published checksums, "
                             "fetch bad files again; TinyImageNet: fetch it when missing, extract its zip again "
                             "when damaged (not for imagenet or folder)")
    parser.add_argument("--out", type=path_given, default=None, metavar="FILE",
                        help="imagenet, tinyimagenet, folder: also write the bad files' paths here, one a line "
                             "(an existing file is refused unless --force, a file inside the checked images' folder "
                             "always: --data, or TinyImageNet's tiny-imagenet-200/ in it; written whole or not at all)")
    parser.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        check_flags(args)                       # before anything is read or decoded
        if args.dataset not in ("imagenet", "tinyimagenet", "folder"):
            from data import load_dataset
            train, test = load_dataset(args.dataset, args.data, args.download)
            print(f"{args.dataset}: every file parses: {len(train.labels)} train and {len(test.labels)} test images")
            return 0
        paths = image_list(args.dataset, args.data, args.classes, args.download)
        print(f"{args.dataset}: layout good; decoding {len(paths)} images with {args.workers} worker(s)", flush=True)
        bad = decode_all(paths, args.workers, not args.no_progress)    # 16-bit images refused, as in training
        if bad and args.download and args.dataset == "tinyimagenet":   # as training: extract again, then decode
            print(f"tinyimagenet: {len(bad)} of {len(paths)} images cannot be decoded", flush=True)
            try:
                reextract_tinyimagenet(tinyimagenet_root(args.data))
            except DatasetError as e:           # (no internet, a bad zip): report the first pass's list
                print(f"error: {printable(e)}", file=sys.stderr)
            else:
                paths = image_list(args.dataset, args.data, download=False)
                bad = decode_all(paths, args.workers, not args.no_progress)
    except DatasetError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    for path, reason in bad:
        print(printable(f"{path}: {reason}"))
    print(f"{len(bad)} of {len(paths)} images cannot be decoded" if bad else f"all {len(paths)} images decode",
          file=sys.stderr if bad else sys.stdout)
    if args.out is not None:
        text = b"".join(os.fsencode(p) + b"\n" for p, _ in bad)   # the names' own bytes, UTF-8 or not
        try:                                    # without --force never replaces a file, even one that appeared
            write_atomically(args.out, "wb", lambda f: f.write(text), replace=args.force)
        except NameTaken:
            print(f"error: --out {args.out} appeared while decoding; the list is above (add --force to replace "
                  "the file, or give another name)", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"error: {os_error_message(args.out, e)}; the list is above", file=sys.stderr)
            return 2
    return 1 if bad else 0


if __name__ == "__main__":
    run_tool(main)
