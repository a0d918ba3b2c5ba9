"""What a run leaves behind: the per-epoch history and best epoch, checkpoints (always in the plain
layout, see engine/layout.py), resuming from one, and results.json with the record of every process that
trained the run; the run directory's lock (engine/run_dir.py) around all of it."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from . import run_dir
from .checkpoint import (FORMAT, atomic_copy, atomic_save, atomic_write_text, clean_temp_files, load_checkpoint,
                         rng_state, set_rng_state)
from .cli import RECIPE_KEYS, RECIPES
from .distributed import all_reduce_sum
from .errors import UserError

REPO = Path(__file__).resolve().parent.parent


def runs_root() -> Path:
    """Where run directories go without --out: ``$OKD_RUNS`` if set, else ``./runs`` in the current directory
    (the same rule as the datasets' ``$OKD_DATASETS`` / ``./datasets``)."""
    return Path(os.environ.get("OKD_RUNS") or "runs")


PLAIN = "plain"   # ckpt["layout"]; checkpoints without it were written grouped when args.grouped_peers was set


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
        "run_id": trainer.run_id, "world_size": trainer.dist.world_size, "processes": trainer.processes,
    }


def save_epoch(trainer, epochs_done: int, improved: bool) -> None:
    """last.pt (and best.pt when ``improved``), written atomically by rank 0, which then records what it
    holds (``trainer.saved``); Ctrl-C and SIGTERM wait for both. last.pt first: a kill between the two leaves an
    older best.pt, which resume rebuilds from last.pt (that epoch is then the best one). The other ranks
    record it after the barrier that follows (``epoch_saved``), so none claims a file still being written."""
    if trainer.is_main:
        paths = [trainer.out / "last.pt"] + ([trainer.out / "best.pt"] if improved else [])
        with run_dir.signals_held():
            atomic_save(checkpoint(trainer, epochs_done), *paths)
            epoch_saved(trainer, epochs_done)


def epoch_saved(trainer, epochs_done: int) -> None:
    """Record that ``trainer.out``/last.pt holds ``epochs_done`` epochs and the history as it stands."""
    trainer.saved = Saved(epochs_done, trainer.out / "last.pt", copy.deepcopy(trainer.history))


class Saved(NamedTuple):
    """What the run can continue from: ``epochs`` finished and checkpointed in ``path`` (None: nothing yet),
    and the history as it stood then. results.json of a run that stops lists these epochs, no later one."""
    epochs: int
    path: Optional[Path]
    history: "History"


def resume_path(args, out: Path) -> Optional[Path]:
    if not args.resume:
        return None
    if args.resume == "auto":
        path = out / "last.pt"
        return path if path.is_file() else None
    return Path(args.resume)


def _saved_options(trainer, ckpt: dict) -> dict:
    """A checkpoint's options as run_dir compares them (a loader left to its default: the default)."""
    saved = dict(ckpt["args"], world_size=ckpt.get("world_size", 1))
    if saved.get("loader") is None:
        saved.pop("loader", None)
    return saved


def load_training_state(trainer, path: Path) -> bool:
    """Check the checkpoint at ``path`` against this command, then load everything a resumed run continues
    from: weights, optimizers, schedules, scaler, RNGs, history, the process record. False when the run is
    already finished (then nothing is loaded or written)."""
    ckpt = load_checkpoint(path)
    if ckpt["method"] != trainer.method_cls.name:
        raise UserError(f"{path} was saved by train_{ckpt['method']}.py; resume it with that script")
    if written_grouped(ckpt) and not trainer.args.grouped_peers:
        raise UserError(f"{path} was written by an older version in the grouped layout; resume it with "
                        "--grouped-peers (its next checkpoint is in the plain layout, which resumes either way)")
    from .setup import default_options
    diffs = run_dir.config_differences(_saved_options(trainer, ckpt),
                                       dict(trainer.args.as_dict(), world_size=trainer.dist.world_size),
                                       default_options(trainer.method_cls, trainer.args),
                                       extend_epochs=trainer.args.extend_epochs)
    if diffs:
        raise UserError(run_dir.describe_differences(path, diffs))
    check_target(trainer.out, path, ckpt)
    if trainer.is_main:
        repair_best(trainer, path, ckpt)
    if ckpt["epoch"] >= trainer.args.epochs:
        trainer.report.log(f"{path}: the run is already finished ({ckpt['epoch']} of {trainer.args.epochs} "
                           "epochs); nothing to do, nothing changed. To train longer: a larger --epochs with "
                           "--extend-epochs")
        return False
    load_method_state(trainer.method, ckpt, path)
    load_optimizer_states(trainer, ckpt)
    for k, s in trainer.schedulers.items():
        s.load_state_dict(ckpt["schedulers"][k])
    trainer.optimization.apply_current_hyperparameters()
    if ckpt["scaler"] and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], trainer.device)
    trainer.start_epoch = ckpt["epoch"]
    trainer.history.load(ckpt)
    trainer.run_id = ckpt.get("run_id", trainer.run_id)
    trainer.processes = run_dir.merge_processes(ckpt.get("processes", []), recorded_processes(trainer))
    trainer.report.log(f"resumed from {path} after epoch {trainer.start_epoch}")
    return True


def check_target(out: Path, path: Path, ckpt: dict) -> None:
    """Never write into a directory that holds another run's last.pt (or a later state of this run)."""
    last = out / "last.pt"
    if not last.is_file() or os.path.samefile(last, path):
        return
    other = load_checkpoint(last)
    same_run = other.get("run_id") == ckpt.get("run_id") is not None
    if same_run and other["epoch"] == ckpt["epoch"]:
        return   # a copy of the same state
    what = ("a later state of this run" if same_run
            else f"another run ({other['method']}, {other['args'].get('arch')} on {other['args'].get('dataset')})")
    raise UserError(f"{out} holds {what} in last.pt (epoch {other['epoch']}); continuing {path} "
                    f"(epoch {ckpt['epoch']}) there would overwrite it. Give another --out to continue {path}")


def recorded_processes(trainer) -> Optional[list]:
    """The processes results.json lists, if it is this run's record."""
    try:
        recorded = json.loads((trainer.out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return recorded.get("processes") if recorded.get("run_id") == trainer.run_id else None


def repair_best(trainer, path: Path, ckpt: dict) -> None:
    """best.pt must hold the best epoch that last.pt names. A kill between the writes of last.pt and
    best.pt leaves an older best.pt: then the best epoch is last.pt's own epoch, and last.pt is copied."""
    if not ckpt["best"]:
        return
    epoch, best = ckpt["best"]["epoch"], trainer.out / "best.pt"
    try:
        if best.is_file() and load_checkpoint(best)["epoch"] == epoch:
            return
    except UserError:
        pass   # a damaged best.pt is rewritten below when it can be
    source_best = path.parent / "best.pt"
    existed = best.exists()      # a stale or damaged best.pt of this run, not a new --out's first one
    if epoch == ckpt["epoch"]:
        atomic_copy(path, best)
    elif path.parent != trainer.out and source_best.is_file() and load_checkpoint(source_best)["epoch"] == epoch:
        atomic_copy(source_best, best)
    else:
        warnings.warn(f"{best} does not hold the best epoch ({epoch}) and it cannot be rebuilt; it will be "
                      "written again when an epoch improves on it")
        return
    trainer.report.log(f"{best} repaired: it now holds the best epoch, {epoch}" if existed else
                       f"{best} written from the resumed run: it holds the best epoch, {epoch}")


# ---- the run directory: one writer, start and end of a process ---------------------------------------

def lock(trainer) -> None:
    """Rank 0 takes the run directory's lock (every rank stops if it could not), then removes the temporary
    files of interrupted writes."""
    error = None
    if trainer.is_main:
        trainer.lock = run_dir.RunLock(trainer.out, trainer.command)
        try:
            trainer.lock.acquire()
        except UserError as e:
            trainer.lock, error = None, e
    import torch
    failed = all_reduce_sum(torch.tensor([float(error is not None)], device=trainer.device)).item()
    if error is not None:
        raise error
    if failed:
        raise UserError(f"rank 0 could not lock {trainer.out}; see its message")
    if trainer.is_main:
        if trainer.lock.stale:
            trainer.report.log(f"{trainer.out}: process {trainer.lock.stale.get('pid')} that held it ended "
                               "without unlocking (stale lock taken over)")
        for tmp in clean_temp_files(trainer.out):
            trainer.report.log(f"removed {tmp}, left by an interrupted write")


def earlier_run_files(out: Path) -> list[str]:
    """What of an earlier run ``out`` holds besides last.pt: best.pt, and a results.json unless it is this
    repository's record of a run that saved no epoch (one stopped in its first epoch, which a new run simply
    replaces). A new run there would overwrite them."""
    found = ["best.pt"] if (out / "best.pt").exists() else []
    record = out / "results.json"
    if record.exists():
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = None                     # unreadable: keep it, it may be all that is left of a run
        if not (isinstance(saved, dict) and "method" in saved and saved.get("history") == []):
            found.append("results.json")
    return found


def open_run(trainer) -> bool:
    """Lock the run directory, then resume or start the run (never overwriting one); False when it is
    already finished."""
    lock(trainer)
    resume = resume_path(trainer.args, trainer.out)
    if resume is None and (trainer.out / "last.pt").exists():
        raise UserError(f"{trainer.out} already holds a run (last.pt). Continue it with --resume auto, "
                        "or start a new run with another --out; nothing is overwritten.")
    if resume is None:
        earlier = earlier_run_files(trainer.out)
        if earlier:
            raise UserError(f"{trainer.out} holds {' and '.join(earlier)} of an earlier run but no last.pt to "
                            "continue it from; start this run with another --out (or move that folder away); "
                            "nothing is overwritten.")
    if resume is not None:
        if not load_training_state(trainer, resume):
            return False
    elif trainer.args.resume == "auto":
        trainer.report.log(f"--resume auto: no checkpoint in {trainer.out}, starting a new run")
    trainer.saved = Saved(trainer.start_epoch, resume, copy.deepcopy(trainer.history))
    trainer.process = run_dir.new_process(trainer.command, trainer.start_epoch)
    trainer.processes.append(trainer.process)
    return True


def close_run(trainer, error: Optional[BaseException]) -> Optional[str]:
    """Record how this process ended in results.json (rank 0) and unlock. For an interrupt (Ctrl-C,
    SIGTERM) returns the one line for the user: what is saved and the command that continues the run."""
    message = None
    try:
        if trainer.process is not None and error is not None:
            # the record keeps the checkpointed epochs only: an epoch whose save was cut short is trained again
            trainer.history = trainer.saved.history
            if isinstance(error, KeyboardInterrupt) and trainer.saved.epochs >= trainer.args.epochs:
                # stopped after its last epoch was saved: the run is complete, whatever the process was doing
                sig = getattr(error, "signal_name", "SIGINT")
                message = (f"interrupted ({sig}) after the last epoch was saved: {saved_state(trainer)}; "
                           "the run is finished")
                _record_end(trainer, "finished")
            elif isinstance(error, KeyboardInterrupt):
                sig = getattr(error, "signal_name", "SIGINT")
                message = (f"interrupted ({sig}) during epoch {trainer.saved.epochs + 1}: {saved_state(trainer)}. "
                           "Continue with: " + continue_command(trainer))
                _record_end(trainer, "interrupted", signal=sig)
            else:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                if not isinstance(error, UserError):
                    reason = f"{type(error).__name__}: {reason}"
                _record_end(trainer, "failed", reason=reason)
    finally:
        trainer.process = None
        if trainer.lock is not None:
            trainer.lock.release()
            trainer.lock = None
    return message


def saved_state(trainer) -> str:
    """What a stopped run keeps, for the user: '<checkpoint> holds epoch N' or 'no epoch had been saved'."""
    epochs, path, _ = trainer.saved
    return f"{path} holds epoch {epochs}" if epochs else "no epoch had been saved"


def continue_command(trainer) -> str:
    """The command that continues a stopped run: from its own last.pt (--resume auto), or, while it has none
    yet, from the checkpoint it was resumed from (--resume PATH --out OUT, e.g. after --extend-epochs into a
    new --out)."""
    path = trainer.saved.path
    source = path if path is not None and path != trainer.out / "last.pt" else None
    return run_dir.continue_command(trainer.argv, trainer.script_name, trainer.out, trainer.dist.world_size,
                                    resume=source)


def _record_end(trainer, status: str, **extra) -> None:
    try:
        write_results(trainer, status, **extra)
    except UserError:
        pass   # the disk that failed the run may fail its record too; the one-line error says why


# ---- results.json ------------------------------------------------------------------------------------

def peer_archs(method_cls, args) -> Optional[dict]:
    """``{"peer1": arch, ...}`` for a method with peers (different ones with an --arch list), else None."""
    if method_cls.num_peers is None:
        return None
    from models.peers import peer_archs as names
    return {f"peer{i + 1}": name for i, name in enumerate(names(args.arch, args.num_peers))}


def results(trainer, status: str) -> dict:
    a, h = trainer.args, trainer.history
    final = trainer.processes[-1] if trainer.processes else {}
    return {
        "status": status, **{k: final[k] for k in ("signal", "reason") if k in final},
        "method": trainer.method_cls.name, "arch": a.arch, "peer_archs": peer_archs(trainer.method_cls, a),
        "dataset": a.dataset, "run_id": trainer.run_id,
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
        "wall_time_s": run_dir.wall_time(trainer.processes),
        "train_time_s": h.train_seconds,
        "train_images_per_s": h.train_samples / max(h.train_seconds, 1e-9),
        "world_size": trainer.dist.world_size,
        "data": trainer.loaders.record,
        "git_commit": trainer.provenance["git_commit"], "versions": trainer.provenance["versions"],
        "command": trainer.command,
        "processes": trainer.processes,
        "args": a.as_dict(),
        "history": h.records,
    }


def write_results(trainer, status: str, **extra) -> None:
    """Bring this process's record up to date (its status, and the signal or reason it ended with), then
    write results.json (rank 0)."""
    if trainer.process is not None:
        run_dir.update_process(trainer.process, len(trainer.history.records), status, **extra)
    if trainer.is_main:
        atomic_write_text(json.dumps(results(trainer, status), indent=2, default=str) + "\n",
                          trainer.out / "results.json")


# ---- --eval-only ---------------------------------------------------------------------------------------

def evaluated_state(trainer, ckpt: dict, path: Path) -> dict:
    """What --eval-only loads: the checkpoint's model and temporal means (they must be there), and this
    method's own state for the training-only modules (memory banks, discriminators: never evaluated, so never
    read from the file, and a method may build them empty for evaluation)."""
    from .ema import TemporalMean
    needed = {"model"} | {k for k, m in trainer.method.extra_modules().items() if isinstance(m, TemporalMean)}
    missing = sorted(needed - set(ckpt["state"]))
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}, which --eval-only evaluates")
    own = plain_method_state(trainer.method)
    return {**{k: v for k, v in own.items() if k not in needed}, **{k: ckpt["state"][k] for k in needed}}


def write_evaluation(trainer, result: dict) -> None:
    """``eval-<checkpoint>-<dataset>[-test<N>][-<amp>][-<hash of --data>].json`` in the run directory (rank 0):
    evaluations of another dataset, of another --eval-subset, in another precision or of another copy of the
    data never overwrite each other."""
    if not trainer.is_main:
        return
    a = trainer.args
    name = f"eval-{Path(a.eval_only).stem}-{a.dataset}"
    if a.eval_subset:
        name += f"-test{a.eval_subset}"
    if a.amp in ("bf16", "fp16"):
        name += f"-{a.amp}"
    if a.data:
        name += "-" + hashlib.sha256(str(Path(a.data).resolve()).encode()).hexdigest()[:6]
    atomic_write_text(json.dumps(result, indent=2) + "\n", trainer.out / f"{name}.json")
    trainer.report.log(f"results: {trainer.out / (name + '.json')}")
