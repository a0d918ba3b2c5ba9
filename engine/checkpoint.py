"""Checkpoints: atomic writes (temporary file, then rename) and ``weights_only`` loading."""
from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

FORMAT = 1


def _atomic_write(path: Path, mode: str, write) -> None:
    """``write(file)`` into a temporary file in the same folder, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, *paths: Path) -> None:
    """Serialise ``obj`` once and write it atomically to every path."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    for path in paths:
        _atomic_write(path, "wb", lambda f: f.write(buffer.getbuffer()))


def atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by this engine, with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle...
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                        "It may be truncated or not a checkpoint of this repository; use another one "
                        "(best.pt / last.pt of the run) or start a new run with --out.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this repository (format {FORMAT})")
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
