"""The one training loop every method uses."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import time
import uuid
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import run_dir
from .checkpoint import (atomic_copy, atomic_save, atomic_write_text, clean_temp_files, load_checkpoint, rng_state,
                         set_rng_state, FORMAT)
from .cli import RECIPE_KEYS, RECIPES, parse_args
from .distributed import (DistEnv, all_reduce_sum, barrier, broadcast_buffers, init_distributed,
                          shutdown_distributed)
from .errors import UserError
from .ema import TemporalMean, temporal_means
from .method import Method, StepContext
from .run_dir import given_options

REPO = Path(__file__).resolve().parent.parent
# Arguments that fix what a checkpoint holds, with their value in checkpoints that predate them: a resumed
# run must agree on them. --grouped-peers changes the layout of the weights and of the optimizer state.
RESUME_KEYS = {"arch": None, "dataset": None, "num_peers": None, "subset": None, "val_split": 0,
               "grouped_peers": False}


def saved_arg(ckpt: dict, key: str):
    """The value of RESUME_KEYS argument ``key`` a checkpoint was trained with (its default if it predates it)."""
    return ckpt["args"].get(key, RESUME_KEYS[key])


def lr_factor(epoch: int, args) -> float:
    """Multiplier of the peak lr during 0-based ``epoch``: per-epoch cosine to 0, or x0.1 per milestone."""
    if args.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    return 0.1 ** sum(epoch >= m for m in args.milestones)


def sgd_implementation(choice: str, device: torch.device) -> dict:
    """SGD keywords for ``--sgd-impl``: 'fused' (one fused kernel over all parameters, where this torch has
    it for the device; otherwise foreach), 'foreach' (multi-tensor kernels) or 'for-loop' (one parameter at
    a time, as the official codes' torch did). All three apply the same update."""
    if choice == "fused":
        try:  # torch checks the device at the first step, not at construction: take one
            probe = torch.zeros(1, device=device, requires_grad=True)
            probe.grad = torch.zeros_like(probe)
            torch.optim.SGD([probe], lr=0.1, momentum=0.9, fused=True).step()
            return {"fused": True}
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            choice = "foreach"
    return {"foreach": choice == "foreach"}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[number correct at top-1, number correct at top-k] as a device tensor (no host sync)."""
    k = min(k, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


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


def default_options(method_cls: type[Method], args) -> dict:
    """The method's default training options for ``args``' arch and dataset, resolved as its check_args
    resolves them (MCL-OKD's K and tau depend on them), for one process."""
    defaults = parse_args(method_cls, ["--arch", args.arch, "--dataset", args.dataset])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method_cls.check_args(defaults)
    except UserError:
        pass
    return run_dir.training_options({**vars(defaults), "world_size": 1})


def default_run_name(method_cls: type[Method], args, world_size: int = 1) -> str:
    """``runs/`` name of a run (engine.run_dir.run_name): readable, plus a hash of its non-default options."""
    options = run_dir.training_options({**vars(args), "world_size": world_size})
    return run_dir.run_name(method_cls.name, options, default_options(method_cls, args))


class Trainer:
    """Builds data, method and optimizers from the parsed arguments; ``fit()`` trains, ``evaluate_only()`` evaluates."""

    def __init__(self, method_cls: type[Method], args, argv: Optional[Sequence[str]] = None):
        from data import build_loaders
        from models import model_entry

        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.method_cls = method_cls
        self.eval_ckpt = None
        if args.resume and args.eval_only:
            raise UserError("--resume and --eval-only conflict: --eval-only evaluates a checkpoint without training")
        if args.eval_only:
            self.eval_ckpt = load_checkpoint(args.eval_only)
            args = self._as_trained(args, self.eval_ckpt)
        self.args = args
        self._check_args()
        model_entry(args.arch)  # unknown architecture: the listing error before anything heavy
        self.device = self._select_device()
        self.dist: DistEnv = init_distributed(self.device.type == "cuda")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.is_main = self.dist.is_main
        self._seed(args.seed)
        args.views = method_cls.views
        try:
            self.loaders = build_loaders(args, self.device, self.dist.rank, self.dist.world_size)
        except ValueError as e:  # a data flag that does not fit the dataset (--val-split, --subset, --loader)
            raise UserError(str(e)) from None
        info = self.loaders.info
        if args.num_classes is not None and args.num_classes != info.num_classes:
            raise UserError(f"--num-classes {args.num_classes} disagrees with {info.name}, which has "
                            f"{info.num_classes} classes; leave --num-classes out")
        args.num_classes = info.num_classes
        self.method = method_cls(args, info.num_classes, self.loaders.n_train, info.image_size,
                                 train_labels=self.loaders.train.labels)
        if args.grouped_peers:
            self._group_peers()
        self.memory_format = torch.channels_last if args.channels_last else None
        self.method.to(self.device, self.memory_format)
        self.model = self._wrap(self.method.model)
        if args.compile:
            self.model = torch.compile(self.model, mode=None if args.compile == "default" else args.compile)
        self.groups = self.method.optim_groups()
        self.sgd_kernels = sgd_implementation(args.sgd_impl, self.device)   # probed once, used by every _sgd
        self.optimizers = {g.name: self._sgd(g) for g in self.groups}
        self.schedulers = {
            g.name: torch.optim.lr_scheduler.LambdaLR(
                self.optimizers[g.name], (lambda e: lr_factor(e, args)) if g.scheduled else (lambda e: 1.0))
            for g in self.groups}
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        self.step_context = StepContext(self.optimizers, self.scaler, self.device.type, self.autocast_dtype)
        self.means = temporal_means(self.method.extra_modules())
        self.graphed = None
        if args.cuda_graph:
            from .cuda_graph import GraphedStep
            self.graphed = GraphedStep(self._step, list(self.optimizers.values()), self.device)
        self.select_split = "val" if self.loaders.val is not None else "test"
        self.best_head = args.best_metric or method_cls.best_metric
        self.out = self._run_directory()
        self.start_epoch = 0
        self.history: list[dict] = []
        self.best: Optional[dict] = None
        self.max_test: dict[str, float] = {}
        self.train_seconds = 0.0
        self.train_samples = 0
        self.provenance = {"git_commit": git_commit(), "versions": library_versions(self.device)}  # once, not per epoch
        self.writer = None
        self.lock: Optional[run_dir.RunLock] = None
        self.run_id = uuid.uuid4().hex
        self.processes: list[dict] = []
        self.process: Optional[dict] = None

    # ---- set-up ---------------------------------------------------------------------------------
    def _check_args(self) -> None:
        a, m = self.args, self.method_cls
        if a.extend_epochs and not (a.resume and (a.out or a.resume != "auto")):
            raise UserError("--extend-epochs continues an existing run: name it with --resume PATH/TO/last.pt (or "
                            "--out DIR --resume auto); the default run directory depends on --epochs")
        if a.lr_schedule == "multistep" and not a.milestones:
            raise UserError("--lr-schedule multistep needs --milestones, e.g. --milestones 150 225")
        if m.num_peers is not None and a.num_peers < m.min_peers:
            raise UserError(f"{m.name} needs --num-peers >= {m.min_peers}; got {a.num_peers}")
        if a.val_split < 0:
            raise UserError("--val-split must be >= 0")
        if a.sync_bn and not (torch.cuda.is_available() and a.gpu >= 0):
            raise UserError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation); leave it out")
        if a.amp == "fp16" and not (torch.cuda.is_available() and a.gpu >= 0):
            raise UserError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or --amp off")
        if a.cuda_graph:
            if not (torch.cuda.is_available() and a.gpu >= 0):
                raise UserError("--cuda-graph needs a CUDA GPU; leave it out on the CPU")
            if a.amp == "fp16":
                raise UserError("--cuda-graph and --amp fp16 conflict: the fp16 loss scaler reads its overflow "
                                "check on the host every step; use --amp bf16")
            if a.compile:
                raise UserError("--cuda-graph and --compile conflict: for compiled graphs use --compile "
                                "reduce-overhead")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UserError("--cuda-graph is single-process for now (DDP's gradient all-reduce is not captured); "
                                "leave it out under torchrun")
        m.check_args(a)

    def _select_device(self) -> torch.device:
        if self.args.gpu < 0:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            warnings.warn("CUDA is not available: training on the CPU (pass --gpu -1 to silence this).")
            return torch.device("cpu")
        if self.args.gpu >= torch.cuda.device_count():
            raise UserError(f"--gpu {self.args.gpu} does not exist: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.args.gpu)))
        torch.cuda.set_device(device)   # streams, graphs and new tensors without a device go to this GPU
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return device

    def _group_peers(self) -> None:
        """--grouped-peers: every Peers of the method runs its branches as one grouped network."""
        from models.grouped import NotGroupableError
        from models.peers import Peers
        name = self.method_cls.name
        if not self.method_cls.groupable_peers:
            raise UserError(f"{name} reaches into its peers' layers, so it cannot run them grouped; "
                            "leave out --grouped-peers")
        peers = [m for m in self.method.model.modules() if isinstance(m, Peers)]
        if not peers:
            raise UserError(f"{name} trains a single network: --grouped-peers has nothing to group; leave it out")
        try:
            for p in peers:
                p.group_branches()
        except NotGroupableError as e:
            raise UserError(f"--grouped-peers with --arch {self.args.arch}: {e}") from None

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            if self.args.sync_bn:
                warnings.warn("--sync-bn does nothing in a single process")
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.method.model = model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=self.method.find_unused_parameters)

    def _sgd(self, group) -> torch.optim.SGD:
        a = self.args
        scale = self.dist.world_size if a.lr_scale == "linear" else 1
        return torch.optim.SGD(group.params, lr=scale * (group.lr if group.lr is not None else a.lr),
                               momentum=a.momentum, nesterov=a.nesterov and a.momentum > 0,
                               weight_decay=group.weight_decay if group.weight_decay is not None else a.weight_decay,
                               **{**self.sgd_kernels, **group.extra})

    def _options(self, args: Optional[dict] = None, world_size: Optional[int] = None) -> dict:
        """Argument values plus the number of processes (it sets the global batch), as run_dir compares them."""
        options = dict(vars(self.args) if args is None else args)
        options["world_size"] = self.dist.world_size if world_size is None else world_size
        return options

    def _default_run_name(self) -> str:
        return default_run_name(self.method_cls, self.args, self.dist.world_size)

    def _run_directory(self) -> Path:
        """--out; else the directory of the checkpoint given to --resume or --eval-only; else runs/<name>."""
        a = self.args
        if a.out:
            return Path(a.out)
        if a.eval_only:
            return Path(a.eval_only).parent
        if a.resume and a.resume != "auto":
            return Path(a.resume).parent
        return REPO / "runs" / self._default_run_name()

    def _as_trained(self, args, ckpt: dict):
        """--eval-only: the checkpoint's training options (arch, dataset, peers, subset, method flags...) in
        place of the command's defaults; an option given on the command line that disagrees is an error,
        except where the data is read from and how it is evaluated."""
        path = Path(args.eval_only)
        if ckpt["method"] != self.method_cls.name:
            raise UserError(f"{path} is a {ckpt['method']} checkpoint; evaluate it with train_{ckpt['method']}.py")
        given = given_options(self.method_cls, self.argv)
        saved = run_dir.training_options(ckpt["args"])
        free = run_dir.NOT_TRAINING | run_dir.SPEED | run_dir.BUNDLES | {"amp", "loader"}
        wrong = [(k, saved[k], given[k]) for k in given if k in saved and k not in free and given[k] != saved[k]]
        if wrong:
            raise UserError(f"--eval-only evaluates {path} as trained: " + "; ".join(
                f"it was trained with {run_dir.flag(k)} {s}, not {n}" for k, s, n in wrong)
                + ". Leave these flags out (only --data and evaluation options may be given)")
        for key, value in saved.items():
            if hasattr(args, key):
                setattr(args, key, value)
        return args

    def log(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    # ---- one epoch ------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _format(self, images):
        if self.memory_format is None:
            return images
        if isinstance(images, (list, tuple)):
            return [im.contiguous(memory_format=self.memory_format) for im in images]
        return images.contiguous(memory_format=self.memory_format)

    def _step(self, batch, epoch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The part of a step --cuda-graph captures: the method's train_step (by default its loss terms, one
        backward, every optimizer), the scaler's update, then its after_step; returns (terms, their sum)."""
        terms = self.method.train_step(self.model, batch, epoch, self.step_context)
        self.scaler.update()
        with torch.no_grad():
            self.method.after_step(self.model, batch, epoch)
        return terms, sum(terms.values())

    def train_step(self, batch, epoch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One training step on a loader's batch: in the memory format, replayed from the CUDA graph with
        --cuda-graph, else eagerly; then the method's temporal means are updated (eagerly)."""
        batch = batch._replace(images=self._format(batch.images))
        out = self._step(batch, epoch) if self.graphed is None else self._graphed_step(batch, epoch)
        for mean in self.means:
            mean.update()
        return out

    def _graphed_step(self, batch, epoch: int):
        from .cuda_graph import CaptureError
        try:
            return self.graphed(batch, epoch)
        except CaptureError as e:
            raise UserError(f"--cuda-graph: {self.method_cls.name}'s training step could not be captured as a CUDA "
                            f"graph ({e}). {self.out / 'last.pt'} holds the last finished epoch: continue "
                            "without --cuda-graph (--resume auto)") from None

    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        self.model.train()
        self.method.on_epoch_start(epoch)
        loader = self.loaders.train
        loader.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{self.args.epochs}", leave=False,
                   disable=self.args.no_progress or not self.is_main, dynamic_ncols=True)
        start = time.perf_counter()
        for batch in bar:
            terms, total = self.train_step(batch, epoch)
            for name, value in terms.items():  # accumulated on the device: no host sync per step
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            sums["loss"] = sums.get("loss", 0.0) + total.detach().float()
            steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        for sched in self.schedulers.values():
            sched.step()
        names = list(sums)
        values = all_reduce_sum(torch.stack([sums[n] for n in names])) / (max(steps, 1) * self.dist.world_size)
        stats = dict(zip(names, values.tolist()))
        samples = loader.num_samples * self.dist.world_size
        self.train_seconds += seconds
        self.train_samples += samples
        stats["images_per_s"] = samples / max(seconds, 1e-9)
        stats["epoch_s"] = seconds
        if not math.isfinite(stats["loss"]):
            bad = ", ".join(f"{n}={v}" for n, v in stats.items() if isinstance(v, float) and not math.isfinite(v))
            raise UserError(
                f"the training loss became non-finite in epoch {epoch + 1} ({bad}). Nothing of that epoch was "
                f"saved; {self.out / 'last.pt'} still holds the last good epoch. Lower --lr, use --amp off or "
                f"bf16 instead of fp16, then continue with --resume auto.")
        return stats

    def _eval_batches(self, loader):
        """(heads, batch) for every batch of this rank's share of ``loader``: ``eval_logits`` in eval mode,
        under no_grad, with every rank holding rank 0's buffers first."""
        model = self.method.model
        broadcast_buffers(model)
        for mean in self.means:
            broadcast_buffers(mean)
        modules = [model] + self.means
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        loader.set_epoch(0)
        try:
            with torch.no_grad():
                for batch in loader:
                    with self._autocast():
                        heads = self.method.eval_logits(model, self._format(batch.images))
                    yield heads, batch
        finally:
            for m, was in zip(modules, was_training):
                m.train(was)

    def predict(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every head's float32 logits (N x C, on the device) and the labels (N) of split "val" or "test",
        in the split's order, gathered over every rank (each sample is evaluated by one rank)."""
        loader = {"val": self.loaders.val, "test": self.loaders.test}.get(split)
        if split not in ("val", "test"):
            raise UserError(f"predict: the split is 'val' or 'test'; got {split!r}")
        if loader is None:
            raise UserError(f"{self.method_cls.name} needs the held-out split: pass --val-split N "
                            "(N training images held out for validation)")
        n = len(loader.labels)
        logits: dict[str, torch.Tensor] = {}
        for heads, batch in self._eval_batches(loader):
            for name, z in heads.items():
                if name not in logits:
                    logits[name] = torch.zeros(n, z.shape[1], device=self.device)
                logits[name][batch.index] = z.float()
        for z in logits.values():
            all_reduce_sum(z)   # zeros wherever another rank holds the sample
        return logits, loader.labels.to(self.device)

    def evaluate(self, loader) -> dict[str, float]:
        """Top-1/top-5 (%) of every head the method declares, over the whole split (all ranks)."""
        counts: dict[str, torch.Tensor] = {}
        seen = torch.zeros((), device=self.device)
        for heads, batch in self._eval_batches(loader):
            for name, logits in heads.items():
                c = topk_correct(logits.float(), batch.labels)
                counts[name] = counts[name] + c if name in counts else c
            seen += batch.labels.numel()
        names = list(counts)
        totals = all_reduce_sum(torch.cat([torch.stack([counts[n] for n in names]).flatten().float(), seen[None]]))
        n = totals[-1].item()
        acc = (totals[:-1].view(-1, 2) * 100.0 / max(n, 1)).tolist()
        metrics = {}
        for name, (top1, top5) in zip(names, acc):
            metrics[f"{name}/top1"] = top1
            metrics[f"{name}/top5"] = top5
        return metrics

    # ---- checkpoints and results ----------------------------------------------------------------
    def _checkpoint(self, epochs_done: int) -> dict:
        return {
            "format": FORMAT, "method": self.method_cls.name, "epoch": epochs_done,
            "state": self.method.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict(), "rng": rng_state(self.device),
            "best": self.best, "max_test": self.max_test, "history": self.history,
            "train_seconds": self.train_seconds, "train_samples": self.train_samples,
            "args": {k: v for k, v in vars(self.args).items()},
            "run_id": self.run_id, "world_size": self.dist.world_size, "processes": self.processes,
        }

    def _resume_path(self) -> Optional[Path]:
        if not self.args.resume:
            return None
        if self.args.resume == "auto":
            path = self.out / "last.pt"
            return path if path.is_file() else None
        return Path(self.args.resume)

    def _load_training_state(self, path: Path) -> bool:
        """Check the checkpoint at ``path`` against this command and load it; False if the run is finished."""
        ckpt = load_checkpoint(path)
        if ckpt["method"] != self.method_cls.name:
            raise UserError(f"{path} is a {ckpt['method']} checkpoint; resume it with train_{ckpt['method']}.py")
        for key in RESUME_KEYS:   # what the weights' shapes and layout (--grouped-peers) depend on
            saved, now = saved_arg(ckpt, key), getattr(self.args, key, None)
            if saved != now:
                raise UserError(f"{path} was trained with --{key.replace('_', '-')} {saved}, this run asks for "
                                f"{now}; resume with the same value or start a new run with another --out")
        diffs = run_dir.config_differences(self._options(ckpt["args"], ckpt.get("world_size", 1)), self._options(),
                                           default_options(self.method_cls, self.args),
                                           extend_epochs=self.args.extend_epochs)
        if diffs:
            raise UserError(run_dir.describe_differences(path, diffs))
        self._check_target(path, ckpt)
        if self.is_main:
            self._repair_best(path, ckpt)
        if ckpt["epoch"] >= self.args.epochs:
            self.log(f"{path}: the run is already finished ({ckpt['epoch']} of {self.args.epochs} epochs); nothing "
                     "to do, nothing changed. To train longer: a larger --epochs with --extend-epochs")
            return False
        self._load_state(ckpt, path)
        for k, o in self.optimizers.items():
            o.load_state_dict(ckpt["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(ckpt["schedulers"][k])
        self._apply_current_hyperparameters()
        if ckpt["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], self.device)
        self.start_epoch = ckpt["epoch"]
        self.best, self.max_test, self.history = ckpt["best"], ckpt["max_test"], ckpt["history"]
        self.train_seconds, self.train_samples = ckpt["train_seconds"], ckpt["train_samples"]
        self.run_id = ckpt.get("run_id", self.run_id)
        self.processes = run_dir.merge_processes(ckpt.get("processes", []), self._recorded_processes())
        self.log(f"resumed from {path} after epoch {self.start_epoch}")
        return True

    def _check_target(self, path: Path, ckpt: dict) -> None:
        """Never write into a directory that holds another run's last.pt (or a later state of this run)."""
        last = self.out / "last.pt"
        if not last.is_file() or os.path.samefile(last, path):
            return
        other = load_checkpoint(last)
        if other.get("run_id") == ckpt.get("run_id") is not None and other["epoch"] == ckpt["epoch"]:
            return   # a copy of the same state
        what = ("a later state of this run" if other.get("run_id") == ckpt.get("run_id") is not None
                else f"another run ({other['method']}, {other['args'].get('arch')} on {other['args'].get('dataset')})")
        raise UserError(f"{self.out} holds {what} in last.pt (epoch {other['epoch']}); continuing {path} "
                        f"(epoch {ckpt['epoch']}) there would overwrite it. Give another --out to continue {path}")

    def _recorded_processes(self) -> Optional[list]:
        """The processes results.json lists, if it is this run's record."""
        try:
            recorded = json.loads((self.out / "results.json").read_text())
        except (OSError, ValueError):
            return None
        return recorded.get("processes") if recorded.get("run_id") == self.run_id else None

    def _repair_best(self, path: Path, ckpt: dict) -> None:
        """best.pt must hold the best epoch that last.pt names. A kill between the writes of last.pt and
        best.pt leaves an older best.pt: then the best epoch is last.pt's own epoch, and last.pt is copied."""
        if not ckpt["best"]:
            return
        epoch, best = ckpt["best"]["epoch"], self.out / "best.pt"
        try:
            if best.is_file() and load_checkpoint(best)["epoch"] == epoch:
                return
        except UserError:
            pass   # a damaged best.pt is rewritten below when it can be
        if epoch == ckpt["epoch"]:
            atomic_copy(path, best)
        elif path.parent != self.out and (path.parent / "best.pt").is_file() \
                and load_checkpoint(path.parent / "best.pt")["epoch"] == epoch:
            atomic_copy(path.parent / "best.pt", best)
        else:
            warnings.warn(f"{best} does not hold the best epoch ({epoch}) and it cannot be rebuilt; it will be "
                          "written again when an epoch improves on it")
            return
        self.log(f"{best} repaired: it now holds the best epoch, {epoch}")

    def _apply_current_hyperparameters(self) -> None:
        """The optimizer state (momentum buffers) comes from the checkpoint, the hyper-parameters from the
        current flags. They are the checkpoint's (resume checks it) except two: --epochs grown with
        --extend-epochs (from the resumed epoch on, the lr follows the schedule of the new --epochs; without
        this the first resumed epoch would keep the old schedule's lr) and the SGD kernels (--sgd-impl)."""
        for group in self.groups:
            fresh = self._sgd(group).param_groups[0]
            sched = self.schedulers[group.name]
            for g in self.optimizers[group.name].param_groups:
                for key in ("weight_decay", "momentum", "nesterov", "foreach", "fused"):
                    g[key] = fresh[key]
                g["initial_lr"] = fresh["lr"]
                g["lr"] = fresh["lr"] * sched.lr_lambdas[0](sched.last_epoch)
            sched.base_lrs = [fresh["lr"]] * len(sched.base_lrs)

    def _evaluated_state(self, ckpt: dict, path: Path) -> dict:
        """The checkpoint's method state, with this method's own state standing in for the training-only
        modules it lacks (memory banks: never evaluated). The model and temporal means must be there."""
        state, needed = dict(ckpt["state"]), {"model"}
        needed |= {k for k, m in self.method.extra_modules().items() if isinstance(m, TemporalMean)}
        missing = sorted(needed - set(state))
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}, which --eval-only evaluates")
        return {**{k: v for k, v in self.method.state_dict().items() if k not in state}, **state}

    def _load_state(self, ckpt: dict, path: Path) -> None:
        try:
            self.method.load_state_dict(ckpt["state"])
        except (RuntimeError, KeyError) as e:
            raise UserError(f"{path} does not fit this model ({str(e).splitlines()[0][:300]}); "
                            "check --arch, --num-peers and the method's flags") from None

    def _results(self, status: str) -> dict:
        a = self.args
        final = self.processes[-1] if self.processes else {}
        return {
            "status": status, **{k: final[k] for k in ("signal", "reason") if k in final},
            "method": self.method_cls.name, "arch": a.arch, "dataset": a.dataset, "run_id": self.run_id,
            "epochs_done": len(self.history), "epochs": a.epochs,
            "recipe": {"name": a.recipe, **{k: getattr(a, k) for k in RECIPE_KEYS},
                       "same_as_recipe": all(getattr(a, k) == RECIPES[a.recipe][k] for k in RECIPE_KEYS)},
            "selection": {"split": self.select_split, "metric": f"{self.best_head}/top1",
                          "note": "best = the epoch with the highest selection metric; its test metrics are "
                                  "reported. max_over_epochs_test is what the official codes report when "
                                  "selecting on the test set."},
            "best": self.best,
            "last": self.history[-1] if self.history else None,
            "max_over_epochs_test": self.max_test,
            "wall_time_s": run_dir.wall_time(self.processes),
            "train_time_s": self.train_seconds,
            "train_images_per_s": self.train_samples / max(self.train_seconds, 1e-9),
            "world_size": self.dist.world_size,
            "git_commit": self.provenance["git_commit"], "versions": self.provenance["versions"],
            "command": self.command,
            "processes": self.processes,
            "args": {k: v for k, v in vars(a).items()},
            "history": self.history,
        }

    @property
    def script_name(self) -> str:
        return Path(self.method_cls.script or sys.argv[0]).name

    @property
    def command(self) -> str:
        return shlex.join([self.script_name] + self.argv)

    def _write_results(self, status: str, **extra) -> None:
        """Bring this process's record up to date, then write results.json (rank 0)."""
        if self.process is not None:
            run_dir.update_process(self.process, len(self.history), status, **extra)
        if self.is_main:
            atomic_write_text(json.dumps(self._results(status), indent=2, default=str) + "\n",
                              self.out / "results.json")

    def _tensorboard(self, epoch: int, record: dict) -> None:
        if not self.is_main:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=epoch + 1)
        for name, value in record["train"].items():
            self.writer.add_scalar(f"train/{name}", value, epoch + 1)
        for name, value in record["lr"].items():
            self.writer.add_scalar(f"lr/{name}", value, epoch + 1)
        for split in ("val", "test"):
            for name, value in record.get(split, {}).items():
                self.writer.add_scalar(f"{split}/{name}", value, epoch + 1)
        self.writer.flush()

    def _summary_line(self, record: dict) -> str:
        train = record["train"]
        terms = " ".join(f"{k} {v:.3f}" for k, v in train.items() if k not in ("loss", "images_per_s", "epoch_s"))
        heads = " ".join(f"{k[:-5]} {v:.2f}" for k, v in record["test"].items() if k.endswith("/top1"))
        val = ""
        if "val" in record:
            val = f" | val {record['val'][self.best_head + '/top1']:.2f}"
        lr = next(iter(record["lr"].values()))
        return (f"epoch {record['epoch']}/{self.args.epochs} lr {lr:.4g} loss {train['loss']:.3f} ({terms}) | "
                f"test top1 {heads}{val} | {train['epoch_s']:.1f}s {train['images_per_s']:.0f} img/s")

    # ---- entry points ---------------------------------------------------------------------------
    def _resume_path(self) -> Optional[Path]:
        if not self.args.resume:
            return None
        if self.args.resume == "auto":
            path = self.out / "last.pt"
            return path if path.is_file() else None
        return Path(self.args.resume)

    def _lock(self) -> None:
        """Rank 0 takes the run directory's lock; every rank stops if it could not."""
        error = None
        if self.is_main:
            self.lock = run_dir.RunLock(self.out, self.command)
            try:
                self.lock.acquire()
            except UserError as e:
                self.lock, error = None, e
        failed = all_reduce_sum(torch.tensor([float(error is not None)], device=self.device)).item()
        if error is not None:
            raise error
        if failed:
            raise UserError(f"rank 0 could not lock {self.out}; see its message")
        if self.is_main:
            if self.lock.stale:
                self.log(f"{self.out}: process {self.lock.stale.get('pid')} that held it ended without "
                         "unlocking (stale lock taken over)")
            for tmp in clean_temp_files(self.out):
                self.log(f"removed {tmp}, left by an interrupted write")

    def _open_run(self) -> bool:
        """Lock the run directory, then resume or start the run; False when it is already finished."""
        self._lock()
        resume = self._resume_path()
        if resume is None and (self.out / "last.pt").exists():
            raise UserError(f"{self.out} already holds a run (last.pt). Continue it with --resume auto, "
                            "or start a new run with another --out; nothing is overwritten.")
        if resume is not None:
            if not self._load_training_state(resume):
                return False
        elif self.args.resume == "auto":
            self.log(f"--resume auto: no checkpoint in {self.out}, starting a new run")
        self.process = run_dir.new_process(self.command, self.start_epoch)
        self.processes.append(self.process)
        return True

    def _close_run(self, error: Optional[BaseException]) -> None:
        """Record how this process ended (results.json, rank 0) and unlock. Interrupts and errors get the one
        line main() prints: what is saved and the command that continues the run."""
        if self.process is not None:
            saved = self.out / "last.pt"
            epochs = len(self.history)
            if isinstance(error, KeyboardInterrupt):
                sig = getattr(error, "signal_name", "SIGINT")
                state = (f"{saved} holds epoch {epochs}" if epochs else "no epoch had finished, nothing was saved")
                message = (f"interrupted ({sig}) during epoch {epochs + 1}: {state}. Continue with: "
                           + run_dir.continue_command(self.argv, self.script_name, self.out,
                                                      self.dist.world_size))
                self._record_end("interrupted", signal=sig)
                raise Interrupted(sig, message) from None
            if error is not None:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                if not isinstance(error, UserError):
                    reason = f"{type(error).__name__}: {reason}"
                self._record_end("failed", reason=reason)
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _record_end(self, status: str, **extra) -> None:
        try:
            self._write_results(status, **extra)
        except UserError:
            pass   # the disk that failed the run may fail its record too; the one-line error says why
        finally:
            self.process = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def _check_heads(self) -> None:
        batch = next(iter(self.loaders.test))
        with torch.no_grad():
            was = self.method.model.training
            self.method.model.eval()
            heads = self.method.eval_logits(self.method.model, self._format(batch.images[:2]))
            self.method.model.train(was)
        if self.best_head not in heads:
            raise UserError(f"--best-metric {self.best_head!r} is not an evaluated head; "
                            f"choose one of: {', '.join(heads)}")

    def fit(self) -> dict:
        a = self.args
        self.wall_start = time.time()
        self._check_heads()   # before the RNG state of a resumed run is restored
        try:
            if self._open_run():
                results = self._train()
            else:   # already finished: what it recorded
                recorded = self.out / "results.json"
                results = json.loads(recorded.read_text()) if recorded.is_file() else self._results("finished")
        except BaseException as e:
            self._close_run(e)
            raise
        self._close_run(None)
        return results

    def _train(self) -> dict:
        a = self.args
        n_params = sum(p.numel() for p in self.method.model.parameters())
        self.log(f"{self.method_cls.name}: {a.arch} on {a.dataset} ({self.loaders.n_train} train images), "
                 f"{n_params / 1e6:.3f}M parameters, device {self.device}, amp {a.amp}, "
                 f"global batch {a.batch_size * self.dist.world_size} "
                 f"({a.batch_size} x {self.dist.world_size} process(es)), recipe {a.recipe}, out {self.out}")
        for epoch in range(self.start_epoch, a.epochs):
            lr = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
            record = {"epoch": epoch + 1, "lr": lr, "train": self.train_epoch(epoch)}
            self.method.on_epoch_end(epoch, self)
            record["test"] = self.evaluate(self.loaders.test)
            if self.loaders.val is not None:
                record["val"] = self.evaluate(self.loaders.val)
            for k, v in record["test"].items():
                self.max_test[k] = max(v, self.max_test.get(k, -1.0))
            key = f"{self.best_head}/top1"
            improved = self.best is None or record[self.select_split][key] > self.best[self.select_split][key]
            if improved:
                self.best = {"epoch": epoch + 1, "test": record["test"], **({"val": record["val"]} if "val" in record else {})}
            self.history.append(record)
            # TensorBoard first: an epoch in a checkpoint or results.json is always in it too (a resumed run
            # purges the steps after its checkpoint).
            self._tensorboard(epoch, record)
            run_dir.update_process(self.process, len(self.history))
            if self.is_main:
                # last.pt, then best.pt: a kill between the two leaves an older best.pt, which resume repairs
                # from last.pt (that epoch is then the best one).
                paths = [self.out / "last.pt"] + ([self.out / "best.pt"] if improved else [])
                atomic_save(self._checkpoint(epoch + 1), *paths)
            self._write_results("finished" if epoch + 1 == a.epochs else "running")
            barrier()  # no rank starts the next epoch before rank 0 has written this one's checkpoint
            self.log(self._summary_line(record))
        self._write_results("finished")
        self.process = None
        if self.writer is not None:
            self.writer.close()
        barrier()
        self._print_final()
        return self._results("finished")

    def _print_final(self) -> None:
        if not self.history or self.best is None:
            return
        last = self.history[-1]["test"]
        heads = [k[:-5] for k in last if k.endswith("/top1")]
        lines = [f"{'head':<12} {'best top1':>9} {'last top1':>9} {'last top5':>9}   "
                 f"(best = epoch {self.best['epoch']}, selected on {self.select_split} {self.best_head}/top1)"]
        for h in heads:
            lines.append(f"{h:<12} {self.best['test'][h + '/top1']:9.2f} {last[h + '/top1']:9.2f} "
                         f"{last[h + '/top5']:9.2f}")
        self.log("\n".join(lines) + f"\nresults: {self.out / 'results.json'}")

    def evaluate_only(self) -> dict:
        """Evaluate the --eval-only checkpoint as trained (the Trainer was built with its options) on the test
        split, and on the held-out split with --val-split. What is evaluated is loaded: the model and the
        temporal means; training state (optimizers, MCL-OKD's memory banks) need not be in the file.
        Writes ``eval-<checkpoint>-<dataset>.json``."""
        path, ckpt = Path(self.args.eval_only), self.eval_ckpt
        if saved_arg(ckpt, "grouped_peers") != self.args.grouped_peers:
            flag = "with" if saved_arg(ckpt, "grouped_peers") else "without"
            raise UserError(f"{path} holds grouped peers' weights laid out as trained; evaluate it {flag} "
                            "--grouped-peers")
        self._load_state(dict(ckpt, state=self._evaluated_state(ckpt, path)), path)
        a = self.args
        splits = {"test": f"the {a.dataset} test set"}
        result = {"checkpoint": str(path), "method": ckpt["method"], "epoch": ckpt["epoch"], "arch": a.arch,
                  "dataset": a.dataset, "data": a.data, "splits": splits, "test": self.evaluate(self.loaders.test)}
        if self.loaders.val is not None:
            splits["val"] = f"{a.val_split} samples held out of the {a.dataset} training set (seed {a.seed})"
            result["val"] = self.evaluate(self.loaders.val)
        for split in ("val", "test"):
            if split in result:
                self.log(f"{split}: " + " ".join(f"{k} {v:.2f}" for k, v in result[split].items()))
        if self.is_main:
            name = f"eval-{path.stem}-{a.dataset}"
            if a.data:   # another copy or variant of the dataset: its own file
                name += "-" + hashlib.sha256(str(Path(a.data).resolve()).encode()).hexdigest()[:6]
            atomic_write_text(json.dumps(result, indent=2) + "\n", self.out / f"{name}.json")
            self.log(f"results: {self.out / (name + '.json')}")
        return result


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM (SLURM, Kubernetes); ``message`` is the line for the user."""

    def __init__(self, signal_name: str = "SIGINT", message: str = ""):
        super().__init__(message or signal_name)
        self.signal_name, self.message = signal_name, message


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def train(method_cls: type[Method], argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` (default: sys.argv), then train or evaluate. Raises UserError on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(method_cls, argv)
    try:
        trainer = Trainer(method_cls, args, argv)
        return trainer.evaluate_only() if args.eval_only else trainer.fit()
    finally:
        shutdown_distributed()


def main(method_cls: type[Method], argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point: errors that are the user's to fix print as one line, not a traceback.
    SIGTERM (what SLURM and Kubernetes send before a kill) stops the run as Ctrl-C does."""
    from data import DatasetNotFoundError
    from models import UnknownModelError
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        train(method_cls, argv)
    except (UserError, DatasetNotFoundError, UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        message = getattr(e, "message", "") or (f"interrupted ({getattr(e, 'signal_name', 'SIGINT')}) while "
                                                "starting: nothing was written")
        print("\n" + message, file=sys.stderr)
        sys.exit(130 if getattr(e, "signal_name", "SIGINT") == "SIGINT" else 143)
    finally:
        signal.signal(signal.SIGTERM, previous)
