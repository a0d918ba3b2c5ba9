"""Writing files so that nothing is ever half-written or silently damaged: every file this repository writes
(checkpoints, ``results.json``, exports, caches, summary pages) goes through :func:`write_atomically`, and
every torch file it writes carries a checksum of its content (:func:`checksummed`, :func:`verified`).

The content goes to a temporary ``.<name>.<random>.tmp`` in the same folder, is flushed to disk, then
replaces the target in one ``os.replace``: a reader (or a run resumed after a kill) sees the old file or the
new one, never half of one. The file gets the permissions of the user's umask. A failed write leaves the
previous file as it was and no temporary file behind.
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import io
import os
import secrets
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils._pytree import tree_map

TMP_SUFFIX = ".tmp"


class NameTaken(FileExistsError):
    """``write_atomically(..., replace=False)`` found a file already under the name."""


# The files of a run directory (engine/run.py), named once here, below the engine, for every writer to respect.
RUN_LOCK = ".lock"                                 # the one writer's lock file; every run directory keeps it
RUN_CHECKPOINTS = ("last.pt", "best.pt")          # the resume point and the best epoch
RUN_FILES = {"last.pt": "its latest checkpoint (its resume point)", "best.pt": "its best epoch's checkpoint",
             "results.json": "its record", RUN_LOCK: "its lock file"}
RUN_EVALUATIONS = "eval-*.json"                    # engine.run: --eval-only's results, beside the checkpoint
RUN_TENSORBOARD = "tensorboard"                    # engine.reporting: the run's event files


def run_file_role(name: str) -> Optional[str]:
    """What a file named ``name`` is in a run directory (engine.run), e.g. "its record"; None for
    a name a run does not use. Case-insensitive: on such a disk LAST.PT is last.pt."""
    name = name.lower()
    if name in RUN_FILES:
        return RUN_FILES[name]
    return "an evaluation of its checkpoints" if fnmatch.fnmatch(name, RUN_EVALUATIONS) else None


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` is a run directory: the lock file every run keeps, with a checkpoint or a record beside
    it (a last.pt or results.json alone, a kept copy or another tool's, does not make one: no run trains or
    resumes there by itself; :func:`output_problem` protects a copy's files all the same)."""
    folder = Path(folder)
    return (folder / RUN_LOCK).is_file() and any((folder / name).is_file() for name in RUN_FILES if name != RUN_LOCK)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def output_problem(path: Path, flag: str, force: bool, example: str,
                   reads: Sequence[tuple[str, Path]] = ()) -> Optional[str]:
    """Why the output file ``path`` (given as ``flag``, e.g. ``-o``) cannot be written by
    :func:`write_atomically`, checked before any work is done; None when it can (missing parent folders are
    created). Every script that writes a file asks this first, so that what one command wrote is never lost
    to another.

    Refused whatever ``force`` says: one of the files or folders the command reads (``reads``: (what, path)
    pairs such as ("the checkpoint being read", ckpt)), or a file inside such a folder; one of a run
    directory's own files (:func:`run_file_role`) in a folder that holds a run or a copy of one (a last.pt or
    best.pt: ``cp run/* copy/`` leaves the hidden lock file behind), or a file in the run's tensorboard/ folder
    (a run's checkpoint, record, lock or evaluations would be replaced by something else).
    Refused unless ``force``: an existing file. Always refused: a folder (``example``: a file name to
    suggest in it), something that is not a regular file, a parent that is a file, a folder without write
    permission."""
    path = Path(path)
    real = Path(os.path.realpath(path.parent)) / path.name     # through links to folders, as the write goes
    for what, read in reads:
        read_real = Path(os.path.realpath(read))
        if real == read_real or (path.exists() and Path(read).exists() and os.path.samefile(path, read)):
            return f"{flag} {path} is {what} ({read}); write to another file (e.g. {example}), --force or not"
        if Path(read).is_dir() and _inside(real, read_real):
            return (f"{flag} {path} lies inside {what} ({read}); write it outside that folder (e.g. {example} "
                    "elsewhere), --force or not")
    role = run_file_role(path.name)
    if role and (holds_run(real.parent) or any((real.parent / name).is_file() for name in RUN_CHECKPOINTS)):
        return (f"{flag} {path}: {path.parent} holds a run (or a copy of one) and {path.name} is {role}; give "
                f"another file name (e.g. {path.parent / example}), --force or not")
    if real.parent.name.lower() == RUN_TENSORBOARD and holds_run(real.parent.parent):
        return (f"{flag} {path} is inside the tensorboard/ folder of the run in {path.parent.parent}; give a file "
                f"outside it (e.g. {path.parent.parent / example}), --force or not")
    if path.is_dir():
        in_tensorboard = real.name.lower() == RUN_TENSORBOARD and holds_run(real.parent)   # (not a file there)
        suggested = (path.parent if in_tensorboard else path) / example
        return f"{flag} {path} is a folder; give a file name (e.g. {suggested})"
    if path.exists() or path.is_symlink():
        if not force:
            return f"{flag} {path} exists; add --force to replace it, or give another file name"
        if path.exists() and not path.is_file():
            return f"{flag} {path} is not a regular file (a device, a pipe...); give a file name"
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is not a folder; choose another {flag}"
    try:                 # a probe: os.access calls a virtual file system (/proc) or some network ones writable
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        return f"{flag}: {os_error_message(path, e, flag)}"
    return None


def write_atomically(path: Path, mode: str, write, replace: bool = True, permissions: Optional[int] = None) -> None:
    """``write(file)`` (``mode`` "w" or "wb") into a temporary file in ``path``'s folder, fsync, then publish it
    as ``path`` (with ``permissions``, e.g. the replaced file's, else the umask's). ``replace=False`` never
    replaces a file: the name is taken with a hard link, which fails (:class:`NameTaken`) when it exists, even
    if it appeared meanwhile (a file system without hard links: checked, then renamed). Raises OSError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)     # the umask applies, as to any new file
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if permissions is not None:
            os.chmod(tmp, permissions)
        if replace:
            os.replace(tmp, path)
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
    finally:
        if tmp.exists():
            tmp.unlink()


def clean_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files that interrupted writes left in ``folder`` (only while no writer can own
    them, e.g. under a run directory's lock). Returns what was removed."""
    removed = [tmp for tmp in Path(folder).glob(f".*{TMP_SUFFIX}") if tmp.is_file()]
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed


def os_error_message(path: Path, e: OSError, flag: str = "--out") -> str:
    """One line for an OS error while writing ``path``: the path, the problem and what to do (``flag``: the
    option that chooses the place)."""
    hint = {errno.ENOSPC: "the disk is full; free space",
            errno.EDQUOT: "the disk quota is exceeded; free space",
            errno.EROFS: f"the file system is read-only; choose another {flag}",
            errno.EACCES: f"no permission to write there; choose another {flag} or fix its permissions",
            errno.EPERM: f"no permission to write there; choose another {flag} or fix its permissions",
            errno.ENOTDIR: f"a part of the path is a file, not a folder; choose another {flag}",
            errno.EEXIST: f"a file of that name is in the way; choose another {flag}",
            }.get(e.errno, f"choose another {flag}")
    return f"cannot write {path}: {e.strerror or type(e).__name__} ({hint})"


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


def content_digest(obj) -> str:
    """sha256 (hex) of a torch file's content: tensors by dtype, shape and bytes, other values by repr."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def checksummed(obj: dict) -> io.BytesIO:
    """``obj`` with every tensor on the CPU and the checksum of its content (``sha256``, replacing any it had),
    serialised by ``torch.save``: a plain dict that a bare ``torch.load`` opens on a machine without a GPU."""
    obj = tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v,
                   {k: v for k, v in obj.items() if k != "sha256"})
    obj["sha256"] = content_digest(obj)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer


def verified(obj: dict) -> bool:
    """Pop a loaded dict's ``sha256`` and tell whether its content still matches it (True for a dict written
    without one): bytes flipped on disk after the write are refused instead of used."""
    saved = obj.pop("sha256", None)
    return saved is None or content_digest(obj) == saved
