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

For CIFAR and Fashion-MNIST it parses every file (and with ``--download`` compares them with the published
checksums, as training does). Exit status: 0 all good, 1 bad files (listed), 2 a layout or missing-data
problem (one line).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.common import DATASET_NAMES, DataFlagError, DatasetError, image_problem  # noqa: E402
from engine.cli import Parser, non_negative_int  # noqa: E402


def image_list(dataset: str, data: Optional[str], classes: Optional[str] = None) -> list[Path]:
    """Every image the loaders would read, after their layout checks (DatasetError otherwise)."""
    if dataset == "imagenet":
        from data.imagenet import load_imagenet
        train, val = load_imagenet(data, classes)
        return [p for p, _ in train.samples + val.samples]
    if dataset == "folder":
        from data.folder import scan
        tree = scan(data, classes)
        for note in tree.warnings:
            print(f"warning: {note}")
        shown = ", ".join(tree.classes[:5]) + (f" and {len(tree.classes) - 5} more" if len(tree.classes) > 5 else "")
        print(f"folder: {len(tree.classes)} classes ({shown}); "
              + ", ".join(f"{len(items)} images in {split}/" for split, items in tree.samples.items()))
        return [Path(p) for items in tree.samples.values() for p, _ in items]
    from data.tinyimagenet import file_lists, find_root
    train, val = file_lists(find_root(data))
    return [p for p, _ in train + val]


def decode_all(paths: Sequence[Path], workers: int, progress: bool = True,
               image_problem=image_problem) -> list[tuple[Path, str]]:
    """(path, reason) of every file that does not decode completely (``image_problem``: path -> reason or None,
    picklable); ``workers`` processes (0: this one)."""
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
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="dataset folder, as for training (default: $OKD_DATASETS/<name> or ./datasets/<name>)")
    parser.add_argument("--workers", type=non_negative_int, default=os.cpu_count() or 1,
                        help="decoding processes (0: decode in this process)")
    parser.add_argument("--classes", default=None, metavar="FILE",
                        help="folder, imagenet: only the class folders listed in FILE, as for training")
    parser.add_argument("--download", action="store_true",
                        help="CIFAR / Fashion-MNIST: also compare with the published checksums, fetch bad files again")
    parser.add_argument("--out", type=Path, default=None, help="also write the bad files' paths here, one a line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        if args.classes and args.dataset not in ("imagenet", "folder"):
            raise DataFlagError(f"--classes picks class folders of --dataset folder or imagenet, not {args.dataset}")
        if args.dataset not in ("imagenet", "tinyimagenet", "folder"):
            from data import load_dataset
            train, test = load_dataset(args.dataset, args.data, args.download)
            print(f"{args.dataset}: every file parses: {len(train.labels)} train and {len(test.labels)} test images")
            return 0
        paths = image_list(args.dataset, args.data, args.classes)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: layout good; decoding {len(paths)} images with {args.workers} worker(s)", flush=True)
    if args.dataset == "folder":
        from data.folder import image_problem as folder_problem   # also refuses 16-bit images, as training does
        bad = decode_all(paths, args.workers, not args.no_progress, folder_problem)
    else:
        bad = decode_all(paths, args.workers, not args.no_progress)
    for path, reason in bad:
        print(f"{path}: {reason}")
    if args.out is not None:
        args.out.write_text("".join(f"{p}\n" for p, _ in bad))
    print(f"{len(bad)} of {len(paths)} images cannot be decoded" if bad else f"all {len(paths)} images decode",
          file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
