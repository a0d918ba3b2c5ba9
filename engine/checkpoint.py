"""Checkpoints: atomic writes (temporary file, then rename), a content checksum, ``weights_only`` loading.

Every file the engine writes goes through :func:`write_atomically`: a temporary ``.<name>.<random>.tmp`` in the
same folder, fsync, then ``os.replace`` over the target, so a reader (or a resumed run after a kill) sees the
old file or the new one, never half of one. The file gets the permissions of the user's umask (``mkstemp``
alone makes it 0600). A write that fails (full disk, read-only folder) leaves the previous file as it was
and is reported as a :class:`UserError` naming the path.

A checkpoint carries ``sha256``: a digest of its content (every tensor's dtype, shape and bytes, and every
other value), checked on load, so bytes flipped on disk after the write are refused instead of trained on.
It is still a plain ``torch.save`` dict: ``torch.load(path)["state"]["model"]`` works outside this repository.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .errors import UserError

FORMAT = 1
TMP_SUFFIX = ".tmp"
# Keys every training checkpoint of this engine holds (a dict without them is not one).
REQUIRED_KEYS = ("format", "method", "epoch", "state", "args")


def _umask() -> int:
    """The process umask, read without changing it (Linux: /proc; elsewhere set-and-restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def os_error_message(path: Path, e: OSError) -> str:
    """One line for an OS error while writing ``path``: the path, the problem and what to do."""
    hint = {errno.ENOSPC: "the disk is full; free space",
            errno.EDQUOT: "the disk quota is exceeded; free space",
            errno.EROFS: "the file system is read-only; choose another --out",
            errno.EACCES: "no permission to write there; choose another --out or fix its permissions",
            errno.EPERM: "no permission to write there; choose another --out or fix its permissions",
            errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --out",
            errno.EEXIST: "a file of that name is in the way; choose another --out",
            }.get(e.errno, "choose another --out")
    return f"cannot write {path}: {e.strerror or type(e).__name__} ({hint})"


class NameTaken(FileExistsError):
    """``write_atomically(..., replace=False)`` found a file already under the name."""


def write_atomically(path: Path, mode: str, write, replace: bool = True) -> None:
    """``write(file)`` into a temporary file in the same folder, fsync, then publish it as ``path``: a reader
    sees the old file or the new one, never half of one. ``replace=False`` never replaces a file: the name is
    taken with a hard link, which fails (:class:`NameTaken`) when it exists, even if it appeared meanwhile (a
    file system without hard links: checked, then renamed). Raises OSError; the temporary file never stays."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            tmp = None
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise NameTaken(errno.EEXIST, "File exists", str(path)) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if path.exists():
                raise NameTaken(errno.EEXIST, "File exists", str(path)) from None
            os.replace(tmp, path)
            tmp = None
    finally:
        _unlink_quietly(tmp)


def _atomic_write(path: Path, mode: str, write) -> None:
    """:func:`write_atomically` over ``path``; OS errors become one-line UserErrors."""
    try:
        write_atomically(path, mode, write)
    except OSError as e:
        raise UserError(os_error_message(Path(path), e) + f"; the previous {Path(path).name}, if any, is "
                        "unchanged") from None


def _unlink_quietly(path) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def clean_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes left in ``folder`` (call it only while
    holding the run directory's lock, so no live writer owns them). Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            _unlink_quietly(tmp)
            removed.append(tmp)
    return removed


def _feed(h, obj) -> None:
    """Feed a canonical byte form of ``obj`` (nested dicts/lists/tuples of tensors and plain values) to ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{%d" % len(obj))
        for key, value in obj.items():
            h.update(repr(key).encode())
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(b"(" if isinstance(obj, tuple) else b"[")
        h.update(b"%d" % len(obj))
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def content_digest(obj: Any) -> str:
    """sha256 (hex) of a checkpoint's content: tensors by dtype, shape and bytes, other values by repr."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def checksummed(obj: dict) -> io.BytesIO:
    """``obj`` with its content checksum (``sha256``, replacing any it had), serialised by ``torch.save``."""
    obj = {k: v for k, v in obj.items() if k != "sha256"}
    obj["sha256"] = content_digest(obj)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer


def atomic_save(obj: dict, *paths: Path) -> None:
    """Add the content checksum (``sha256``), serialise ``obj`` once and write it atomically to every path,
    in the order given."""
    buffer = checksummed(obj)
    for path in paths:
        _atomic_write(path, "wb", lambda f: f.write(buffer.getbuffer()))


def atomic_copy(source: Path, target: Path) -> None:
    """Copy a file atomically (the same guarantees as a save)."""
    data = Path(source).read_bytes()
    _atomic_write(target, "wb", lambda f: f.write(data))


def atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def load_checkpoint(path: Path, required: Iterable[str] = REQUIRED_KEYS) -> dict:
    """Load a checkpoint written by this engine. A missing, empty, truncated, foreign or damaged file (its
    content no longer matches the checksum written with it) is a one-line UserError naming the path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a file; name the checkpoint in it ({path / 'last.pt'} "
                        f"or {path / 'best.pt'}; to continue that run: --out {path} --resume auto)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is an empty file (0 bytes): a copy or a write that did not finish; "
                        "use another checkpoint of the run (last.pt / best.pt) or start a new run with --out")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle...
        raise UserError(f"checkpoint {path} cannot be read: torch.load refused it ({type(e).__name__}), so it is "
                        "truncated, damaged or not a checkpoint of this repository; use another one (best.pt / "
                        "last.pt of the run) or start a new run with --out.") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this repository (format {FORMAT}; "
                        + (f"missing {', '.join(missing)})" if missing else f"format {ckpt.get('format')})"))
    saved = ckpt.pop("sha256", None)
    if saved is not None and content_digest(ckpt) != saved:
        raise UserError(f"checkpoint {path} is damaged: its content does not match the sha256 written with it "
                        "(the file changed on disk after it was saved); use another checkpoint of the run "
                        "(best.pt / last.pt) or start a new run with --out")
    return ckpt


def rng_state(device: torch.device) -> dict:
    """Every RNG the training may draw from, in a form ``weights_only`` loading accepts. For CUDA only the
    training device's generator (all ranks share one state, so rank 0's stands for every rank)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
