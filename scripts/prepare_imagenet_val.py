#!/usr/bin/env python
"""Move the 50,000 flat ILSVRC-2012 validation images into one folder per wnid (ImageFolder layout).

Labels come from either

* ``LOC_val_solution.csv`` (Kaggle's ImageNet object-localization challenge): rows
  ``ILSVRC2012_val_00000001,n01751748 x y x y ...``; the first wnid of the row is the class; or
* the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (line i = ILSVRC2012_ID of image i, 1-based)
  together with ``meta.mat`` (ILSVRC2012_ID -> wnid; needs scipy; default: ``meta.mat`` next to the txt).

Usage::

    python scripts/prepare_imagenet_val.py --val-dir /data/imagenet/val --labels LOC_val_solution.csv
    python scripts/prepare_imagenet_val.py --val-dir /data/imagenet/val \\
        --labels ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt --dry-run

``--dry-run`` prints what would move and changes nothing. Images already in class folders are left alone,
so the script can be re-run after an interruption.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def labels_from_csv(path: Path) -> dict[str, str]:
    """{image stem: wnid} from LOC_val_solution.csv."""
    with open(path, newline="") as f:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}


def labels_from_devkit(ground_truth: Path, meta: Path) -> dict[str, str]:
    """{image stem: wnid} from the devkit's ground-truth txt and meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:
        sys.exit("reading meta.mat needs scipy (pip install scipy), or use LOC_val_solution.csv instead")
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    ids = [int(line) for line in ground_truth.read_text().split()]
    return {f"ILSVRC2012_val_{i:08d}": id_to_wnid[c] for i, c in enumerate(ids, start=1)}


def plan_moves(val_dir: Path, labels: dict[str, str]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(moves as (source, destination), flat images with no label)."""
    moves, unlabelled = [], []
    for image in sorted(p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg", ".png")):
        wnid = labels.get(image.stem)
        if wnid is None:
            unlabelled.append(image)
        else:
            moves.append((image, val_dir / wnid / image.name))
    return moves, unlabelled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val-dir", type=Path, required=True, help="folder holding the flat validation images")
    parser.add_argument("--labels", type=Path, required=True,
                        help="LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt")
    parser.add_argument("--meta", type=Path, default=None, help="the devkit's meta.mat (with a .txt --labels)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    args = parser.parse_args(argv)

    if args.labels.suffix.lower() == ".csv":
        labels = labels_from_csv(args.labels)
    else:
        labels = labels_from_devkit(args.labels, args.meta or args.labels.parent / "meta.mat")
    moves, unlabelled = plan_moves(args.val_dir, labels)
    classes = sorted({dst.parent.name for _, dst in moves})
    print(f"{len(moves)} images into {len(classes)} class folders under {args.val_dir}"
          + (f"; {len(unlabelled)} images have no label and stay put" if unlabelled else ""))
    if args.dry_run:
        for src, dst in moves[:10]:
            print(f"  {src.name} -> {dst.parent.name}/")
        if len(moves) > 10:
            print(f"  ... and {len(moves) - 10} more (dry run: nothing moved)")
        return 0
    for wnid in classes:
        (args.val_dir / wnid).mkdir(exist_ok=True)
    for src, dst in moves:
        src.replace(dst)
    return 1 if unlabelled else 0


if __name__ == "__main__":
    sys.exit(main())
