"""Setting a run up: the engine's flag checks, the device, seeding, grouped peers, the DDP wrapper, the
optimizers and their lr schedules."""
from __future__ import annotations

import argparse
import math
import os
import random
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import run_dir
from .errors import UserError


def check_args(a, method_cls) -> None:
    """Raise UserError for engine flags that conflict (before anything heavy runs)."""
    m = method_cls
    if a.resume and a.eval_only:
        raise UserError("--resume and --eval-only conflict: --eval-only evaluates a checkpoint without training")
    if a.extend_epochs and not (a.resume and (a.out or a.resume != "auto")):
        raise UserError("--extend-epochs continues an existing run: name it with --resume PATH/TO/last.pt (or "
                        "--out DIR --resume auto); the default run directory depends on --epochs")
    if a.lr_schedule == "multistep" and not a.milestones:
        raise UserError("--lr-schedule multistep needs --milestones, e.g. --milestones 150 225")
    if m.num_peers is not None and a.num_peers < m.min_peers:
        raise UserError(f"{m.name} needs --num-peers >= {m.min_peers}; got {a.num_peers}")
    if "," in a.arch and not m.mixed_archs:
        raise UserError(f"--arch {a.arch}: {m.name}'s peers share layers, so they have one architecture; "
                        "give one name")
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


def select_device(args) -> torch.device:
    """``--gpu -1``: the CPU; else the CUDA device (LOCAL_RANK under torchrun), with cuDNN autotuning and TF32."""
    if args.gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        warnings.warn("CUDA is not available: training on the CPU (pass --gpu -1 to silence this).")
        return torch.device("cpu")
    if args.gpu >= torch.cuda.device_count():
        raise UserError(f"--gpu {args.gpu} does not exist: this machine has "
                        f"{torch.cuda.device_count()} CUDA device(s)")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", args.gpu)))
    torch.cuda.set_device(device)   # streams, graphs and new tensors without a device go to this GPU
    torch.backends.cudnn.benchmark = True
    if args.tf32 is not None:     # unset: PyTorch's defaults (float32 matmuls, TF32 cuDNN convolutions)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def group_peers(method, arch: str) -> None:
    """--grouped-peers: every Peers of the method (in its model and in its extra modules, e.g. a temporal
    mean of the model) runs its branches as one grouped network."""
    from models.grouped import NotGroupableError
    from models.peers import Peers
    name = method.name
    if not method.groupable_peers:
        raise UserError(f"{name} reaches into its peers' layers, so it cannot run them grouped; "
                        "leave out --grouped-peers")
    peers = [m for m in method.model.modules() if isinstance(m, Peers)]
    if not peers:
        raise UserError(f"{name} trains a single network: --grouped-peers has nothing to group; leave it out")
    peers += [m for module in method.extra_modules().values() for m in module.modules() if isinstance(m, Peers)]
    try:
        for p in peers:
            p.group_branches()
    except NotGroupableError as e:
        raise UserError(f"--grouped-peers with --arch {arch}: {e}") from None


def wrap(method, args, dist, device: torch.device) -> nn.Module:
    """The module the loop calls: the method's model, in DistributedDataParallel under torchrun."""
    model = method.model
    if not dist.enabled:
        if args.sync_bn:
            warnings.warn("--sync-bn does nothing in a single process")
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        method.model = model
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=method.find_unused_parameters)


def lr_factor(epoch: int, args) -> float:
    """Multiplier of the peak lr during 0-based ``epoch``: per-epoch cosine to 0, x0.1 per milestone, or SGDR
    (Loshchilov & Hutter, ICLR 2017) with cycles of T0, 2 T0, 4 T0, ... epochs (``--sgdr-t0``), each a cosine
    from the peak to 0, as the MCL-OKD repository's ``adjust_lr`` computes it once per epoch."""
    if args.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    if args.lr_schedule == "sgdr":
        start, length = 0, args.sgdr_t0 or args.epochs
        while epoch >= start + length:          # the cycle holding this epoch
            start, length = start + length, 2 * length
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / length))
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


class Optimization:
    """One SGD optimizer and one per-epoch lr schedule per :class:`~engine.method.OptimGroup`."""

    def __init__(self, groups, args, world_size: int, device: torch.device):
        self.groups, self.args, self.world_size = groups, args, world_size
        self.kernels = sgd_implementation(args.sgd_impl, device)   # probed once, used by every sgd()
        self.optimizers = {g.name: self.optimizer(g) for g in groups}
        self.schedulers = {
            g.name: torch.optim.lr_scheduler.LambdaLR(
                self.optimizers[g.name], (lambda e: lr_factor(e, args)) if g.scheduled else (lambda e: 1.0))
            for g in groups}

    def optimizer(self, group) -> torch.optim.Optimizer:
        """The group's own optimizer class (``OptimGroup.optimizer``), or the run's SGD (momentum, Nesterov,
        --sgd-impl kernels)."""
        a = self.args
        scale = self.world_size if a.lr_scale == "linear" else 1
        lr = scale * (group.lr if group.lr is not None else a.lr)
        weight_decay = group.weight_decay if group.weight_decay is not None else a.weight_decay
        if group.optimizer is not None:
            return group.optimizer(group.params, lr=lr, weight_decay=weight_decay, **group.extra)
        return torch.optim.SGD(group.params, lr=lr, momentum=a.momentum, nesterov=a.nesterov and a.momentum > 0,
                               weight_decay=weight_decay, **{**self.kernels, **group.extra})

    def apply_current_hyperparameters(self) -> None:
        """The optimizer state (momentum buffers) comes from the checkpoint, the hyper-parameters from the
        current flags. They are the checkpoint's (resume checks it) except two: --epochs grown with
        --extend-epochs (from the resumed epoch on, the lr follows the schedule of the new --epochs; without
        this the first resumed epoch would keep the old schedule's lr) and the SGD kernels (--sgd-impl)."""
        for group in self.groups:
            fresh = self.optimizer(group).param_groups[0]
            sched = self.schedulers[group.name]
            for g in self.optimizers[group.name].param_groups:
                for key, value in fresh.items():   # weight decay, momentum / betas, kernels, ...
                    if key not in ("params", "lr", "initial_lr"):
                        g[key] = value
                g["initial_lr"] = fresh["lr"]
                g["lr"] = fresh["lr"] * sched.lr_lambdas[0](sched.last_epoch)
            sched.base_lrs = [fresh["lr"]] * len(sched.base_lrs)


def default_options(method_cls, args) -> dict:
    """The method's default training options for ``args``' arch and dataset, resolved as a run resolves
    them (MCL-OKD's K and tau depend on them), for one process."""
    from .cli import parse_args
    from .config import resolve
    defaults = parse_args(method_cls, ["--arch", args.arch, "--dataset", args.dataset])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            defaults = resolve(method_cls, defaults).as_dict()
    except UserError:
        defaults = vars(defaults)
    return run_dir.training_options({**defaults, "world_size": 1})


def default_run_name(method_cls, args, world_size: int = 1) -> str:
    """``runs/`` name of a run (engine.run_dir.run_name): readable, plus a hash of its non-default options."""
    if not hasattr(args, "as_dict"):   # a parsed namespace: resolved as a run resolves it
        from .config import resolve
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = resolve(method_cls, args)
    options = run_dir.training_options({**args.as_dict(), "world_size": world_size})
    return run_dir.run_name(method_cls.name, options, default_options(method_cls, args))


def run_directory(method_cls, args, world_size: int) -> Path:
    """--out; else the directory of the checkpoint given to --resume or --eval-only; else runs/<name>."""
    from .records import runs_root
    if args.out:
        return Path(args.out)
    if args.eval_only:
        return Path(args.eval_only).parent
    if args.resume and args.resume != "auto":
        return Path(args.resume).parent
    return runs_root() / default_run_name(method_cls, args, world_size)


def as_trained(method_cls, args, argv: Sequence[str], ckpt: dict) -> argparse.Namespace:
    """--eval-only: the parsed flags with the checkpoint's training options (arch, dataset, peers, subset,
    method flags...) in place of the command's defaults. An option given on the command line that disagrees
    is an error, except where the data is read from and how it is evaluated."""
    path = Path(args.eval_only)
    if ckpt["method"] != method_cls.name:
        raise UserError(f"{path} was saved by train_{ckpt['method']}.py; evaluate it with that script")
    given = run_dir.given_options(method_cls, argv)
    saved = run_dir.training_options(ckpt["args"])
    free = run_dir.NOT_TRAINING | run_dir.SPEED | run_dir.BUNDLES | {"amp", "loader", "eval_subset"}
    wrong = [(k, saved[k], given[k]) for k in given if k in saved and k not in free and given[k] != saved[k]]
    if wrong:
        raise UserError(f"--eval-only evaluates {path} as trained: " + "; ".join(
            f"it was trained with {run_dir.flag(k)} {s}, not {n}" for k, s, n in wrong)
            + ". Leave these flags out (only --data and evaluation options may be given)")
    values = args.as_dict() if hasattr(args, "as_dict") else vars(args)
    # the checkpoint's options, except the evaluation options this command gives (e.g. --eval-subset, --amp)
    kept = {k: v for k, v in saved.items() if k in values and not (k in given and k in free)}
    return argparse.Namespace(**{**values, **kept})
