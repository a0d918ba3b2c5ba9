#!/usr/bin/env python
"""Move the 50,000 flat ILSVRC-2012 validation images into one folder per wnid (ImageFolder layout).

Labels come from either

* ``LOC_val_solution.csv`` (Kaggle's ImageNet object-localization challenge): rows
  ``ILSVRC2012_val_00000001,n01751748 x y x y ...``; the first wnid of the row is the class; or
* the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (line i = ILSVRC2012_ID of image i, 1-based)
  together with ``meta.mat`` (ILSVRC2012_ID -> wnid; reading it needs scipy, which requirements.txt does not
  install: ``pip install scipy``; default: ``meta.mat`` next to the txt).

Usage::

    python scripts/prepare_imagenet_val.py --val-dir /data/imagenet/val --labels LOC_val_solution.csv
    python scripts/prepare_imagenet_val.py --val-dir /data/imagenet/val \\
        --labels ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt --dry-run

``--dry-run`` prints what would move and changes nothing (with the exit status of the real run). Images
already in class folders are left alone, so the script can be re-run after an interruption; a flat image whose
class folder already holds a file of its name stays put (counted, exit status 1): nothing is replaced. The label
file is checked before anything moves: a missing file, a malformed row (a file cut short) or a wnid with no
class folder in the sibling ``train/`` stops the script with one line (exit status 2), and so do a file named
like a class folder and a ``--val-dir`` that holds no flat image but a ``val/`` (the dataset's root). Flat images
without a label are counted and left in place (exit status 1; a label file cut short at the end of a row lists too
few images: the line says how many it has of the release's 50,000), and the dataset is refused until they are
moved into their class folder or deleted; the script moves them once given the whole file.
"""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import NoReturn

if __name__ == "__main__":     # run as a file: the repository's packages are one folder up (imported: already found)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.cli import Parser, non_empty_path, run_tool  # noqa: E402


WNID = re.compile(r"n\d{8}")
RELEASE = 50_000                 # validation images of ILSVRC-2012, as many rows as the label files hold


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr naming the file and the fix, exit status 2, before anything moves."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def labels_from_csv(path: Path) -> dict[str, str]:
    """{image stem: wnid} from LOC_val_solution.csv; a malformed row (a file cut short, a wrong column)
    stops the script with one line naming the file and the line."""
    labels = {}
    with open(path, newline="", encoding="utf-8-sig") as f:     # (utf-8-sig: a CSV saved with a BOM, as Excel does)
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            fail(f"{path} has no 'ImageId,PredictionString' header: is it LOC_val_solution.csv?")
        for row in reader:
            words = (row.get("PredictionString") or "").split()
            if not row.get("ImageId") or not words or not WNID.fullmatch(words[0]):
                fail(f"{path} line {reader.line_num} is malformed ({','.join(map(str, row.values()))[:80]!r}): "
                         "expected ImageId,<wnid> <box> ...; the file may be cut short: download it again")
            if row["ImageId"] in labels:
                fail(f"{path} line {reader.line_num} labels {row['ImageId']} a second time")
            labels[row["ImageId"]] = words[0]
    return labels


def check_known(labels: dict[str, str], train_dir: Path, source: Path) -> None:
    """Every wnid must be a class folder of ``train_dir`` (when it exists): else one line and exit."""
    if not train_dir.is_dir():
        return
    known = {p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    unknown = sorted({w for w in labels.values() if w not in known})
    if unknown:
        fail(f"{source} names {len(unknown)} wnid(s) with no class folder in {train_dir}: "
                 f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; nothing was moved")


def labels_from_devkit(ground_truth: Path, meta: Path) -> dict[str, str]:
    """{image stem: wnid} from the devkit's ground-truth txt and meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:
        fail("reading meta.mat needs scipy (pip install scipy), or use LOC_val_solution.csv instead")
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except FileNotFoundError:
        fail(f"--meta {meta} does not exist; give the devkit's meta.mat with --meta (default: next to --labels)")
    except Exception as e:  # noqa: BLE001 -- whatever scipy raises on a file that is not the devkit's meta.mat
        fail(f"--meta {meta} cannot be read as the devkit's meta.mat ({type(e).__name__}); give that file")
    ids = []
    for number, line in enumerate(ground_truth.read_text().splitlines(), start=1):
        if line.strip() and (not line.strip().isdigit() or int(line) not in id_to_wnid):
            fail(f"{ground_truth} line {number} is not an ILSVRC2012_ID of {meta} ({line.strip()[:40]!r}); is it "
                 "ILSVRC2012_validation_ground_truth.txt?")
        if line.strip():
            ids.append(int(line))
    return {f"ILSVRC2012_val_{i:08d}": id_to_wnid[c] for i, c in enumerate(ids, start=1)}


def plan_moves(val_dir: Path, labels: dict[str, str]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(moves as (source, destination), flat images with no label); hidden files (``._x.JPEG``) are skipped."""
    moves, unlabelled = [], []
    for image in sorted(p for p in val_dir.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".jpeg", ".jpg", ".png")):
        wnid = labels.get(image.stem)
        if wnid is None:
            unlabelled.append(image)
        else:
            moves.append((image, val_dir / wnid / image.name))
    return moves, unlabelled


def main(argv=None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val-dir", type=non_empty_path, required=True,
                        help="folder holding the flat validation images")
    parser.add_argument("--labels", type=non_empty_path, required=True,
                        help="LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt")
    parser.add_argument("--meta", type=non_empty_path, default=None,
                        help="the devkit's meta.mat (with a .txt --labels; reading it needs scipy: pip install scipy)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    args = parser.parse_args(argv)
    args.val_dir, args.labels = Path(args.val_dir), Path(args.labels)
    if not args.val_dir.is_dir():
        fail(f"--val-dir {args.val_dir} is not a folder; give the folder that holds the flat validation images")
    if not args.labels.is_file():
        fail(f"--labels {args.labels} is not a file; give LOC_val_solution.csv or the devkit's "
             "ILSVRC2012_validation_ground_truth.txt")

    if args.meta and args.labels.suffix.lower() == ".csv":
        fail(f"--meta is for the devkit's .txt labels; --labels {args.labels} names its classes itself: leave --meta "
             "out")
    try:
        if args.labels.suffix.lower() == ".csv":
            labels = labels_from_csv(args.labels)
        else:
            labels = labels_from_devkit(args.labels, Path(args.meta) if args.meta else args.labels.parent / "meta.mat")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        fail(f"--labels {args.labels} cannot be read ({reason}); give the label file itself")
    check_known(labels, args.val_dir.parent / "train", args.labels)
    moves, unlabelled = plan_moves(args.val_dir, labels)
    if not moves and not unlabelled and (args.val_dir / "val").is_dir():
        fail(f"--val-dir {args.val_dir} holds no flat image but a val/ folder (the dataset's root?); give --val-dir "
             f"{args.val_dir / 'val'}")
    taken = [(src, dst) for src, dst in moves if dst.exists() or dst.is_symlink()]     # never replaced
    kept = set(taken)
    moves = [(src, dst) for src, dst in moves if (src, dst) not in kept]
    classes = sorted({dst.parent.name for _, dst in moves})
    folders = [args.val_dir / wnid for wnid in classes]
    blocked = [d for d in folders if (d.exists() or d.is_symlink()) and not d.is_dir()]
    if blocked:
        fail(f"{blocked[0]} is a file where the class folder {blocked[0].name}/ goes; move it away (nothing was moved)")
    print(f"{len(moves)} images into {len(classes)} class folders under {args.val_dir}"
          + (f"; {len(unlabelled)} images have no label in {args.labels} and stay put (it labels {len(labels)} "
             f"images{'' if len(labels) >= RELEASE else f' of the release 50,000: cut short? download it again'})"
             if unlabelled else "")
          + (f"; {len(taken)} stay put because their class folder already holds a file of that name (e.g. "
             f"{taken[0][1]}): compare them and remove one" if taken else ""))
    if args.dry_run:
        for src, dst in moves[:10]:
            print(f"  {src.name} -> {dst.parent.name}/")
        if len(moves) > 10:
            print(f"  ... and {len(moves) - 10} more (dry run: nothing moved)")
    else:
        for wnid in classes:
            (args.val_dir / wnid).mkdir(exist_ok=True)
        for src, dst in moves:
            src.replace(dst)
    return 1 if unlabelled or taken else 0      # (images left in place: the dataset is refused until they go)


if __name__ == "__main__":
    run_tool(main)
