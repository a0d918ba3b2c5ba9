"""What a run leaves behind: the per-epoch history and best epoch, checkpoints (always in the plain
layout, see engine/layout.py), resuming from one, and results.json."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import FORMAT, atomic_save, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from .cli import RECIPE_KEYS, RECIPES
from .errors import UserError

REPO = Path(__file__).resolve().parent.parent


def runs_root() -> Path:
    """Where run directories go without --out: ``$OKD_RUNS`` if set, else ``./runs`` in the current directory
    (the same rule as the datasets' ``$OKD_DATASETS`` / ``./datasets``)."""
    return Path(os.environ.get("OKD_RUNS") or "runs")
# Arguments that fix what a checkpoint holds, with their value in checkpoints that predate them: a resumed
# run must agree on them. (--grouped-peers does not: checkpoints hold the plain layout either way.)
RESUME_KEYS = {"arch": None, "dataset": None, "num_peers": None, "subset": None, "val_split": 0}
PLAIN = "plain"   # ckpt["layout"]; checkpoints without it were written grouped when args.grouped_peers was set


def saved_arg(ckpt: dict, key: str):
    """The value of RESUME_KEYS argument ``key`` a checkpoint was trained with (its default if it predates it)."""
    return ckpt["args"].get(key, RESUME_KEYS[key])


def written_grouped(ckpt: dict) -> bool:
    """True for a checkpoint of an older version that holds grouped peers in the grouped layout."""
    return ckpt.get("layout") != PLAIN and bool(ckpt["args"].get("grouped_peers", False))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions(device: torch.device) -> dict:
    import torchvision
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "numpy": np.__version__,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    if device.type == "cuda":
        versions["device"] = torch.cuda.get_device_name(device)
    else:
        versions["device"] = platform.processor() or platform.machine()
    return versions


@dataclass
class History:
    """Per-epoch records, the best epoch (selected on ``split``'s ``metric``) and the per-head maximum
    test accuracy over epochs; training time and samples for the throughput."""
    split: str
    metric: str
    records: list = field(default_factory=list)
    best: Optional[dict] = None
    max_test: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    train_samples: int = 0

    def add(self, record: dict) -> bool:
        """Append an epoch's record; True when it is the new best epoch."""
        for k, v in record["test"].items():
            self.max_test[k] = max(v, self.max_test.get(k, -1.0))
        improved = self.best is None or record[self.split][self.metric] > self.best[self.split][self.metric]
        if improved:
            self.best = {"epoch": record["epoch"], "test": record["test"],
                         **({"val": record["val"]} if "val" in record else {})}
        self.records.append(record)
        return improved

    def state(self) -> dict:
        return {"best": self.best, "max_test": self.max_test, "history": self.records,
                "train_seconds": self.train_seconds, "train_samples": self.train_samples}

    def load(self, ckpt: dict) -> None:
        self.best, self.max_test, self.records = ckpt["best"], ckpt["max_test"], ckpt["history"]
        self.train_seconds, self.train_samples = ckpt["train_seconds"], ckpt["train_samples"]


# ---- the layout of the method's and the optimizers' state -------------------------------------------

def _method_modules(method) -> dict:
    return {"model": method.model, **method.extra_modules()}


def plain_method_state(method) -> dict:
    """``method.state_dict()`` with grouped peers split per peer (unchanged without --grouped-peers)."""
    from models.grouped import plain_state
    modules = _method_modules(method)
    return {k: plain_state(modules[k], s) if k in modules else s for k, s in method.state_dict().items()}


def load_method_state(method, ckpt: dict, path: Path) -> None:
    """Load a checkpoint's method state, in either layout, into the method's layout."""
    from models.grouped import convert_state, peer_blocks
    modules = _method_modules(method)
    state = {k: convert_state(s, modules[k].state_dict(), peer_blocks(modules[k])) if k in modules else s
             for k, s in ckpt["state"].items()}
    try:
        method.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not fit this model ({str(e).splitlines()[0][:300]}); "
                        "check --arch, --num-peers and the method's flags") from None


def _grouped(model) -> bool:
    from models.grouped import GroupedBackbones
    return any(isinstance(m, GroupedBackbones) for m in model.modules())


def optimizer_states(trainer) -> dict:
    """Every optimizer's state dict, in the plain layout."""
    from .layout import param_names, plain_optimizer_state
    model = trainer.method.model
    out = {}
    for name, opt in trainer.optimizers.items():
        state = opt.state_dict()
        out[name] = plain_optimizer_state(state, param_names(opt, model), model) if _grouped(model) else state
    return out


def load_optimizer_states(trainer, ckpt: dict) -> None:
    from .layout import grouped_optimizer_state, param_names
    model = trainer.method.model
    for name, opt in trainer.optimizers.items():
        state = ckpt["optimizers"][name]
        if _grouped(model) and not written_grouped(ckpt):
            state = grouped_optimizer_state(state, param_names(opt, model), model)
        opt.load_state_dict(state)


# ---- checkpoints and resume ------------------------------------------------------------------------

def checkpoint(trainer, epochs_done: int) -> dict:
    return {
        "format": FORMAT, "layout": PLAIN, "method": trainer.method_cls.name, "epoch": epochs_done,
        "state": plain_method_state(trainer.method),
        "optimizers": optimizer_states(trainer),
        "schedulers": {k: s.state_dict() for k, s in trainer.schedulers.items()},
        "scaler": trainer.scaler.state_dict(), "rng": rng_state(trainer.device),
        **trainer.history.state(),
        "args": trainer.args.as_dict(),
    }


def save_epoch(trainer, epochs_done: int, improved: bool) -> None:
    """last.pt (and best.pt when ``improved``), written atomically by rank 0."""
    if trainer.is_main:
        paths = [trainer.out / "last.pt"] + ([trainer.out / "best.pt"] if improved else [])
        atomic_save(checkpoint(trainer, epochs_done), *paths)


def resume_path(args, out: Path) -> Optional[Path]:
    if not args.resume:
        return None
    if args.resume == "auto":
        path = out / "last.pt"
        return path if path.is_file() else None
    return Path(args.resume)


def load_training_state(trainer, path: Path) -> None:
    """Everything a resumed run continues from: weights, optimizers, schedules, scaler, RNGs, history."""
    ckpt = load_checkpoint(path)
    if ckpt["method"] != trainer.method_cls.name:
        raise UserError(f"{path} is a {ckpt['method']} checkpoint; resume it with train_{ckpt['method']}.py")
    for key in RESUME_KEYS:
        saved, now = saved_arg(ckpt, key), getattr(trainer.args, key, None)
        if saved != now:
            raise UserError(f"{path} was trained with --{key.replace('_', '-')} {saved}, this run asks for "
                            f"{now}; resume with the same value or start a new run with another --out")
    if written_grouped(ckpt) and not trainer.args.grouped_peers:
        raise UserError(f"{path} was written by an older version in the grouped layout; resume it with "
                        "--grouped-peers (its next checkpoint is in the plain layout, which resumes either way)")
    load_method_state(trainer.method, ckpt, path)
    load_optimizer_states(trainer, ckpt)
    for k, s in trainer.schedulers.items():
        s.load_state_dict(ckpt["schedulers"][k])
    trainer.optimization.apply_current_hyperparameters()
    if ckpt["scaler"] and trainer.scaler.is_enabled():  # an --amp change on resume starts a fresh scaler
        trainer.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], trainer.device)
    trainer.start_epoch = ckpt["epoch"]
    trainer.history.load(ckpt)
    trainer.report.log(f"resumed from {path} after epoch {trainer.start_epoch}")


def prepare_out(trainer) -> None:
    """Refuse to overwrite a run; resume when asked to."""
    resume = resume_path(trainer.args, trainer.out)
    if resume is None and (trainer.out / "last.pt").exists():
        raise UserError(f"{trainer.out} already holds a run (last.pt). Continue it with --resume auto, "
                        "or start a new run with another --out; nothing is overwritten.")
    if resume is not None:
        load_training_state(trainer, resume)
    elif trainer.args.resume == "auto":
        trainer.report.log(f"--resume auto: no checkpoint in {trainer.out}, starting a new run")


# ---- results.json ------------------------------------------------------------------------------------

def results(trainer, status: str) -> dict:
    a, h = trainer.args, trainer.history
    return {
        "status": status, "method": trainer.method_cls.name, "arch": a.arch, "dataset": a.dataset,
        "epochs_done": len(h.records), "epochs": a.epochs,
        "recipe": {"name": a.recipe, **{k: getattr(a, k) for k in RECIPE_KEYS},
                   "same_as_recipe": all(getattr(a, k) == RECIPES[a.recipe].get(k) for k in RECIPE_KEYS)},
        "selection": {"split": h.split, "metric": h.metric,
                      "note": "best = the epoch with the highest selection metric; its test metrics are "
                              "reported. max_over_epochs_test is what the official codes report when "
                              "selecting on the test set."},
        "best": h.best,
        "last": h.records[-1] if h.records else None,
        "max_over_epochs_test": h.max_test,
        "wall_time_s": time.time() - trainer.wall_start,
        "train_time_s": h.train_seconds,
        "train_images_per_s": h.train_samples / max(h.train_seconds, 1e-9),
        "world_size": trainer.dist.world_size,
        "data": trainer.loaders.record,
        "git_commit": trainer.provenance["git_commit"], "versions": trainer.provenance["versions"],
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "args": a.as_dict(),
        "history": h.records,
    }


def write_results(trainer, status: str) -> None:
    if trainer.is_main:
        atomic_write_text(json.dumps(results(trainer, status), indent=2, default=str) + "\n",
                          trainer.out / "results.json")
