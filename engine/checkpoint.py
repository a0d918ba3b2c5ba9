"""Checkpoint files: written atomically (``data.files``; a failed write, a full disk or a read-only folder, is a
:class:`UserError` naming the path and leaves the previous file as it was), checksummed, loaded ``weights_only``.

A checkpoint carries ``sha256``: a digest of its content (every tensor's dtype, shape and bytes, and every
other value), checked on load, so bytes flipped on disk after the write are refused instead of trained on. It
is a plain ``torch.save`` dict with every tensor on the CPU: ``torch.load(path)["state"]["model"]`` works outside
this repository, on a machine without a GPU too.
"""
from __future__ import annotations

import shlex
import warnings
from pathlib import Path

import torch

from data.files import RUN_CHECKPOINTS, checksummed, os_error_message, verified, write_atomically

from .errors import UserError

FORMAT = 1
# Keys every training checkpoint of this engine holds (a dict without them is not one).
REQUIRED_KEYS = ("format", "method", "epoch", "state", "args")
# What to do instead of using a checkpoint that cannot be read (a damaged last.pt stays where it is: its folder
# takes no other state of the run).
INSTEAD = ("use the run's other checkpoint (best.pt / last.pt: --eval-only it, or continue it with --resume IT "
           "--out NEW_DIR) or start a new run with another --out")


def atomic_write(path: Path, data) -> None:
    """Write ``data`` (bytes, or text) to ``path`` atomically (:func:`~data.files.write_atomically`). An OS
    error (a full disk, a read-only folder) is a one-line UserError naming the path; the previous file, if
    any, is left as it was."""
    try:
        write_atomically(path, "w" if isinstance(data, str) else "wb", lambda f: f.write(data))
    except OSError as e:
        raise UserError(os_error_message(Path(path), e) + f"; the previous {Path(path).name}, if any, is "
                        "unchanged") from None


def atomic_save(obj: dict, *paths: Path) -> None:
    """Add the content checksum (``sha256``), serialise ``obj`` once and write it atomically to every path,
    in the order given."""
    data = checksummed(obj).getbuffer()
    for path in paths:
        atomic_write(path, data)


def load_checkpoint(path: Path, instead: str = INSTEAD) -> dict:
    """Load a checkpoint written by this engine. A missing, empty, truncated, foreign or damaged file (its
    content no longer matches the checksum written with it) is a one-line UserError naming the path, and, for an
    empty or unreadable one, what to do ``instead`` (default: the training scripts' way, :data:`INSTEAD`)."""
    path = Path(path)
    if path.is_dir():
        held = [str(path / name) for name in RUN_CHECKPOINTS if (path / name).is_file()]
        resume = f"; to continue that run: --out {path} --resume auto" if (path / "last.pt").is_file() else ""
        raise UserError(f"checkpoint {path} is a folder, not a file; " + (
            f"name the checkpoint in it ({' or '.join(held)}{resume})" if held else
            "it holds no checkpoint (last.pt, best.pt): name a checkpoint file"))
    if not path.is_file():
        raise UserError(f"checkpoint {path} " + ("is not a file (a device, pipe or socket); name a checkpoint file "
                                                 "(a run's last.pt or best.pt)" if path.exists() else "does not exist"))
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is an empty file (0 bytes): a copy or a write that did not finish; "
                        + instead)
    try:
        with warnings.catch_warnings():    # (torch's warnings about a file it then refuses: the line below says it)
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle...
        raise UserError(f"checkpoint {path} cannot be read: torch.load refused it ({type(e).__name__}), so it is "
                        "truncated, damaged or not a checkpoint of this repository; " + instead) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this repository (expected format {FORMAT}; "
                        + (f"it has no {', '.join(missing)})" if missing else f"it has format {ckpt.get('format')})"))
    if not verified(ckpt):
        raise UserError(f"checkpoint {path} is damaged: its content does not match the sha256 written with it "
                        "(the file changed on disk after it was saved); " + instead)
    return ckpt


def saved_by(record: dict) -> str:
    """The script that trained the run of ``record`` (a checkpoint, or results.json): the first word of its
    command; train_<method>.py for a record without one (older versions, a hand-edited file)."""
    command = record.get("command")
    try:            # (shlex.split(None) would read stdin)
        return shlex.split(command)[0] if isinstance(command, str) else f"train_{record['method']}.py"
    except (ValueError, IndexError):
        return f"train_{record['method']}.py"


def check_saved_by(ckpt: dict, path: Path, method: str, doing: str) -> None:
    """Refuse (one line) a checkpoint that another method than ``method`` saved, naming the script that saved it
    (:func:`saved_by`) and what to ``do`` with it."""
    if ckpt["method"] != method:
        raise UserError(f"{path} was saved by {saved_by(ckpt)}; {doing} it with that script (a method is its file "
                        f"name, in any folder: train_{ckpt['method']}.py)")
