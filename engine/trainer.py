"""The one training loop every method uses.

``Trainer(method_cls, args)`` sets a run up: the configuration resolved and frozen (engine/config.py), the
device, seeding and DDP, the data, the method's model and its optimizers (engine/optim.py), and the
:class:`~engine.run.Run` that owns the run directory. ``fit()`` trains: for every epoch ``train_epoch``,
the method's ``on_epoch_end``, a check that nothing became NaN or inf, ``evaluate`` on the test (and
validation) split, the console and TensorBoard line (engine/reporting.py), then the Run saves the state the
loop hands it. ``evaluate_only()`` evaluates a checkpoint. ``main()`` is the command line: errors that are the
user's to fix, interrupts and warnings print as one line.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import platform
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import check_saved_by
from .cli import parse_args, resume_path
from .config import from_checkpoint, resolve, run_directory
from .cuda_graph import CaptureError, GraphedStep
from .distributed import all_reduce_sum, barrier, broadcast_buffers, init_distributed, shutdown_distributed
from models.temporal_mean import TemporalMean
from .errors import UserError
from .method import REPOSITORY, Method, StepContext, checked_terms, hook_name
from .optim import Optimization
from .reporting import Reporter
from .run import NOT_READ, Run, read_checkpoint
from .signals import Interrupted, stop_on_signals, stop_signal


class Evaluator(NamedTuple):
    """What ``Method.on_epoch_end`` gets: ``predict(split)``, every head's logits on a split and its labels
    (Trainer.predict)."""
    predict: Callable[[str], tuple]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[number correct at top-1, number correct at top-k] as a device tensor (no host sync)."""
    k = min(k, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


class Trainer:
    """Builds data, method and optimizers from the parsed arguments; ``fit()`` trains, ``evaluate_only()``
    evaluates."""

    def __init__(self, method_cls: type[Method], args, argv: Optional[Sequence[str]] = None):
        from data import build_loaders
        from models.grouped import NotGroupableError
        from models.peers import Peers, peer_archs

        self.method_cls = method_cls
        argv = list(sys.argv[1:] if argv is None else argv)   # the command, for the record
        if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):   # (no OSError: a name too long)
            raise UserError(f"--out {args.out} is a file, not a folder; choose another --out")
        # trained or evaluated as its checkpoint was (--resume auto: the run's folder is known here only with --out)
        source = args.eval_only or resume_path(args.resume, args.out)
        read = read_checkpoint(source) if source else NOT_READ      # read once (a missing or damaged file: one line)
        self.ckpt = read.ckpt                        # the checkpoint --resume PATH or --eval-only names
        if source:
            check_saved_by(self.ckpt, source, method_cls.name, "evaluate" if args.eval_only else "resume")
            args = from_checkpoint(method_cls, args, argv, self.ckpt, Path(source), bool(args.eval_only))
        self.args = args = resolve(method_cls, args)   # read-only from here on
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = select_device(args)
        self.dist = init_distributed(self.device.type == "cuda")
        self.is_main = self.dist.rank == 0
        random.seed(args.seed)       # every generator the run draws from (torch: the GPUs' too)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        # the run directory, checked against this command before the data are read
        self.run = Run(run_directory(method_cls, args, self.dist.world_size), method_cls, args, argv,
                       self.dist.world_size, self.dist.rank, read)
        if args.eval_only:
            self.run.check_evaluation(Path(args.eval_only), self.ckpt)
        checkpoint = self.ckpt if args.eval_only else self.run.check()   # (--resume auto: the one check() found)
        # a folder dataset is normalised as the checkpoint resumed or evaluated was (its record's mean and std)
        trained_on = ((checkpoint or {}).get("data") or {}).get("folder") or {}
        try:
            self.loaders = build_loaders(args, self.device, self.dist.rank, self.dist.world_size,
                                         needs_every_class=method_cls.needs_every_class, drop_last=args.cuda_graph,
                                         normalization=trained_on if "mean" in trained_on else None)
        except ValueError as e:  # a data flag that does not fit the dataset (--val-split, --subset, --loader)
            raise UserError(str(e)) from None
        info = self.loaders.info
        self.method = method_cls(args, info.num_classes, self.loaders.n_train, info.image_size,
                                 train_labels=self.loaders.train.labels)
        # (the loaders drop a last batch of one sample too; --sync-bn on 2+ processes normalises over all of them)
        if args.batch_size == 1 and not args.eval_only and not (args.sync_bn and self.dist.world_size > 1):
            one_sample = next((f"{key}.{name}" for key, module in self.modules.items()
                               for name, m in module.named_modules() if isinstance(m, nn.BatchNorm1d)), None)
            if one_sample:
                raise UserError(f"--batch-size 1: {one_sample} normalises over the batch (BatchNorm1d), which cannot "
                                "train on one sample; give --batch-size 2 or more")
        if args.grouped_peers:   # every Peers of the method's modules (a temporal mean of the model too)
            try:
                for peers in [m for module in self.modules.values() for m in module.modules() if isinstance(m, Peers)]:
                    peers.group_branches()
            except NotGroupableError as e:
                raise UserError(f"--grouped-peers with --arch {args.arch}: {e}") from None
        self.memory_format = torch.channels_last if args.channels_last else None
        for key, module in self.modules.items():
            module.to(self.device)
            if self.memory_format is not None and (key == "model" or isinstance(module, TemporalMean)):
                module.to(memory_format=self.memory_format)   # a temporal mean is a copy of (part of) the model
        self.model = wrap(self.method.model, args, self.dist, self.device)
        if args.compile:
            self.model = torch.compile(self.model, mode=None if args.compile == "default" else args.compile)
        self.optimization = Optimization(self.method.optim_groups(), args, self.dist.world_size, self.device)
        self.optimizers = self.optimization.optimizers
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.step_context = StepContext(self.optimizers, self.scaler, self.device.type,
                                        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp))
        self.means = [m for m in self.modules.values() if isinstance(m, TemporalMean)]
        self.graphed = (GraphedStep(self._captured_step, list(self.optimizers.values()), self.device)
                        if args.cuda_graph else None)
        self.best_head = method_cls.best_metric if args.best_metric is None else args.best_metric
        archs = ({f"peer{i + 1}": n for i, n in enumerate(peer_archs(args.arch, args.num_peers))}
                 if method_cls.num_peers is not None else None)
        self.run.describe(("val" if self.loaders.val is not None else "test", f"{self.best_head}/top1"),
                          {"peer_archs": archs, "classes": list(info.classes) if info.classes else None,
                           "image_size": info.image_size, "data": self.loaders.record,
                           "git_commit": git_commit(method_cls.script), "versions": library_versions(self.device)})
        self.report = Reporter(self.run)

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The method's state: its model and the modules named in its ``state_keys``."""
        return {"model": self.method.model, **{k: getattr(self.method, k) for k in self.method.state_keys}}

    # ---- one step -------------------------------------------------------------------------------
    def _format(self, images):
        if self.memory_format is None:
            return images
        if isinstance(images, (list, tuple)):
            return [im.contiguous(memory_format=self.memory_format) for im in images]
        return images.contiguous(memory_format=self.memory_format)

    def _captured_step(self, batch, epoch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The part of a step --cuda-graph captures: the method's train_step (by default its loss terms, one
        backward, every optimizer), the scaler's update, then its after_step; returns (terms, their sum)."""
        terms = checked_terms(self.method.train_step(self.model, batch, epoch, self.step_context),
                              hook_name(self.method_cls, "train_step"))
        self.scaler.update()
        with torch.no_grad():
            self.method.after_step(self.model, batch, epoch)
        return terms, sum(terms.values())

    def train_batch(self, batch, epoch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One training step on a loader's batch: in the memory format, replayed from the CUDA graph with
        --cuda-graph, else eagerly; then the method's temporal means are updated (eagerly)."""
        batch = batch._replace(images=self._format(batch.images))
        try:
            out = self._captured_step(batch, epoch) if self.graphed is None else self.graphed(batch, epoch)
        except CaptureError as e:            # (raised by the graphed step only)
            raise UserError(f"--cuda-graph: {self.method_cls.name}'s training step could not be captured as a CUDA "
                            f"graph ({e}). {self.run.folder / 'last.pt'} holds the last finished epoch; a run trained "
                            "with --cuda-graph continues only with it (it drops each epoch's last incomplete batch): "
                            "start a new run without it (another --out)") from None
        for mean in self.means:
            mean.update()
        return out

    # ---- one epoch ------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[dict[str, float], dict[str, float]]:
        """Train one epoch; returns the mean of every loss term (and ``loss``, their sum) over the epoch and
        every rank, and its speed: the ``steps`` of one rank, the ``images`` trained (all ranks), ``epoch_s`` and
        ``images_per_s``."""
        from tqdm import tqdm

        self.model.train()
        loader = self.loaders.train
        loader.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{self.args.epochs}", leave=False,
                   disable=self.args.no_progress or not self.is_main or not sys.stderr.isatty(), dynamic_ncols=True)
        start = time.perf_counter()
        for batch in bar:
            terms, total = self.train_batch(batch, epoch)
            for name, value in {**terms, "loss": total}.items():  # accumulated on the device: no host sync per step
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        names = list(sums)
        values = all_reduce_sum(torch.stack([sums[n] for n in names])) / (max(steps, 1) * self.dist.world_size)
        images = loader.num_samples * self.dist.world_size
        return (dict(zip(names, values.tolist())), {"steps": steps, "images": images, "epoch_s": seconds,
                                                    "images_per_s": images / max(seconds, 1e-9)})

    def _stop_if_non_finite(self, epoch: int, terms: dict) -> None:
        """After an epoch (and the method's on_epoch_end), before anything of it is saved: a NaN or inf in the
        epoch's mean losses (the same on every rank), or in any parameter or buffer of the method's modules (a
        loss stays finite when the epoch's last step writes NaN into the weights), stops the run on every rank
        with one line."""
        bad = [f"{n}={v}" for n, v in terms.items() if not math.isfinite(v)]
        modules = {"the model" if k == "model" else k: m for k, m in self.modules.items()}
        zero = torch.zeros((), device=self.device)
        # a sum is NaN or inf when any of its terms is (float32 sums: one scalar per tensor, no full-size temporary)
        sums = torch.stack([sum((t.detach().sum(dtype=torch.float32) for t in [*m.parameters(), *m.buffers()]
                                 if t.is_floating_point()), zero) for m in modules.values()])
        flagged = all_reduce_sum((~sums.isfinite()).float())   # BN buffers differ between ranks: agree first
        bad += [f"{name} holds NaN or inf" for name, f in zip(modules, flagged.tolist()) if f > 0]
        if not bad:
            return
        kept = self.run.saved_state() if self.run.epochs else "no earlier epoch was saved"
        own = "train_step" if self.method_cls.train_step is not Method.train_step else "loss"   # (AMLN: its step)
        fixes = "a lower --lr" + (", or --amp bf16 (or off) instead of fp16" if self.args.amp == "fp16" else "")
        raise UserError(f"training became non-finite in epoch {epoch + 1} ({', '.join(bad)}). Nothing of that "
                        f"epoch was saved; {kept}. Start a new run (another --out) with {fixes}, after checking "
                        "this command's flags for out-of-range values (a resumed run keeps its training flags) and "
                        f"any edit of {hook_name(self.method_cls, own)} (the terms named here).")

    # ---- evaluation -----------------------------------------------------------------------------
    def _eval_batches(self, loader):
        """(heads, batch) for every batch of this rank's share of ``loader``: ``eval_logits`` in eval mode,
        under no_grad, with every rank holding rank 0's buffers first."""
        model = self.method.model
        modules = [model] + self.means
        was_training = [m.training for m in modules]
        for m in modules:
            broadcast_buffers(m)
            m.eval()
        loader.set_epoch(0)
        try:
            with torch.no_grad():
                for batch in loader:
                    with self.step_context.autocast():
                        heads = self.method.eval_logits(model, self._format(batch.images))
                    yield heads, batch
        finally:
            for m, was in zip(modules, was_training):
                m.train(was)

    def predict(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every head's float32 logits (N x C, on the device) and the labels (N) of split "val" or "test",
        in the split's order, gathered over every rank (each sample is evaluated by one rank). The
        ``evaluator`` of ``Method.on_epoch_end``."""
        if split not in ("val", "test"):
            raise UserError(f"predict: the split is 'val' or 'test'; got {split!r}")
        loader = self.loaders.val if split == "val" else self.loaders.test
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
        acc = (totals[:-1].view(-1, 2) * 100.0 / max(totals[-1].item(), 1)).tolist()
        return {f"{name}/{k}": v for name, (top1, top5) in zip(names, acc)
                for k, v in (("top1", top1), ("top5", top5))}

    def _check_heads(self) -> None:
        """--best-metric (or the method's ``best_metric``) names a head the method evaluates (one test batch, on
        every rank)."""
        batches = self._eval_batches(self.loaders.test)
        heads, _ = next(batches)
        batches.close()
        if self.best_head not in heads:
            given = "--best-metric" if self.args.best_metric is not None else hook_name(self.method_cls, "best_metric")
            raise UserError(f"{given} {self.best_head!r} is not an evaluated head; choose one of: {', '.join(heads)}")

    # ---- the state a checkpoint holds -------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run continues from: the method's modules (in the plain layout of
        ``--grouped-peers``, so either layout resumes), the optimizers, the fp16 scaler and every random
        generator."""
        from models.grouped import plain_state
        return {"state": {k: plain_state(m, m.state_dict()) for k, m in self.modules.items()},
                "optimizers": self.optimization.state_dict(self.method.model),
                "scaler": self.scaler.state_dict(), "rng": rng_state(self.device)}

    def load_method_state(self, state: dict, path) -> None:
        """Load the method's modules from a checkpoint's ``state``, in either layout."""
        from models.grouped import convert_state, peer_blocks
        try:
            for key, module in self.modules.items():
                module.load_state_dict(convert_state(state[key], module.state_dict(), peer_blocks(module)))
        except (RuntimeError, KeyError) as e:
            raise UserError(f"{path} does not fit this model ({str(e).splitlines()[0][:300]}); "
                            "check --arch, --num-peers and the method's flags") from None

    def load_state_dict(self, ckpt: dict, path) -> None:
        self.load_method_state(ckpt["state"], path)
        self.optimization.load_state_dict(ckpt["optimizers"], self.method.model)
        if ckpt["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], self.device)

    # ---- entry points ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train the run, from its checkpoint when resuming. The run directory is locked meanwhile; how the
        process ended (finished, interrupted, failed) is recorded in results.json."""
        self._check_heads()   # before the RNG state of a resumed run is restored
        try:
            ckpt = self.run.open()
            if ckpt is not None and self.run.done_after(ckpt["epoch"]):
                self.run.close(None)
                return self.run.recorded()
            if ckpt is not None:
                self.load_state_dict(ckpt, self.run.saved)
            self.run.begin(ckpt)
            return self._train(ckpt["epoch"] if ckpt else 0)
        except BaseException as e:
            message = self.run.close(e)
            if message is not None:
                raise Interrupted(stop_signal(e), message) from None
            raise

    def _train(self, start_epoch: int) -> dict:
        """The epochs from ``start_epoch`` to --epochs: train, evaluate, save; returns the run's record."""
        a = self.args
        n_params = sum(p.numel() for p in self.method.model.parameters())
        self.run.log(f"{self.method_cls.name}: {a.arch} on {a.dataset} ({self.loaders.n_train} train images), "
                     f"{n_params / 1e6:.3f}M parameters, device {self.device}, amp {a.amp}, "
                     f"global batch {a.batch_size * self.dist.world_size} "
                     f"({a.batch_size} x {self.dist.world_size} process(es)"
                     + (f"; more than the {self.loaders.n_train} training images: one smaller batch an epoch"
                        if a.batch_size * self.dist.world_size > self.loaders.n_train else "")
                     + f"), recipe {a.recipe}"
                     + (f" ({a.schedule_note})" if a.schedule_note else "") + f", out {self.run.folder}")
        for epoch in range(start_epoch, a.epochs):
            self.optimization.set_epoch(epoch)
            lr = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
            terms, speed = self.train_epoch(epoch)
            record = {"epoch": epoch + 1, "lr": lr, "train": terms, "speed": speed}
            self.method.on_epoch_end(epoch, Evaluator(self.predict))
            self._stop_if_non_finite(epoch, terms)
            record["test"] = self.evaluate(self.loaders.test)
            if self.loaders.val is not None:
                record["val"] = self.evaluate(self.loaders.val)
            # TensorBoard and the console first: an epoch in a checkpoint or results.json is always in the
            # event file too (a resumed run purges the steps after its checkpoint).
            self.report.epoch(epoch, record)
            self.run.save(record, self.state_dict())
        self.run.close(None)
        results = self.run.results("finished")
        self.report.close()
        barrier()
        self.report.final_table(results)
        return results

    def evaluate_only(self) -> dict:
        """Evaluate the --eval-only checkpoint as trained (the Trainer was built with its options; either
        layout, with or without --grouped-peers) on the test split, and on the held-out split with
        --val-split. Only what is evaluated is read from it: the model and the temporal means (training
        state such as optimizers or MCL-OKD's memory banks need not be in the file). Writes the result into
        the checkpoint's folder (:meth:`Run.write_evaluation`), naming the dataset, the splits and the precision."""
        path, ckpt, a = Path(self.args.eval_only), self.ckpt, self.args
        self.run.check_data(ckpt, path)
        evaluated = ["model"] + [k for k in self.method.state_keys if isinstance(getattr(self.method, k), TemporalMean)]
        missing = [k for k in evaluated if k not in ckpt["state"]]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}, which --eval-only evaluates")
        own = {k: m.state_dict() for k, m in self.modules.items()}   # training-only modules keep their own
        self.load_method_state({**own, **{k: ckpt["state"][k] for k in evaluated}}, path)
        described = self.loaders.record.get("folder", {}).get("splits", {})     # (a folder: which of its folders)
        test = described.get("test") or f"the {a.dataset} test set"
        splits = {"test": f"{a.eval_subset} images of {test} (stratified, seed {a.seed})" if a.eval_subset else test}
        result = {"checkpoint": str(path.absolute()), "run_id": ckpt.get("run_id"), "method": ckpt["method"],
                  "epoch": ckpt["epoch"], "arch": a.arch, "dataset": a.dataset, "data": a.data,
                  "source": self.loaders.record["source"],
                  "image_size": self.loaders.info.image_size, "splits": splits, "amp": a.amp,
                  "images_used": self.loaders.record["images_used"], "test": self.evaluate(self.loaders.test)}
        if self.loaders.val is not None:
            splits["val"] = (described.get("val")
                             or f"{a.val_split} samples held out of the {a.dataset} training set (seed {a.seed})")
            result["val"] = self.evaluate(self.loaders.val)
        for split in ("val", "test"):
            if split in result:
                self.run.log(f"{split} ({path.name}, epoch {ckpt['epoch']}): "
                             + " ".join(f"{k} {v:.2f}" for k, v in result[split].items()))
        self.run.write_evaluation(result)
        return result

# ---- setting a run up ----------------------------------------------------------------------------------

def select_device(args) -> torch.device:
    """``--gpu -1``: the CPU; else the CUDA device ``--gpu`` (under torchrun: ``LOCAL_RANK``, whatever --gpu),
    with cuDNN autotuning, and TF32 as --tf32 says (unset: PyTorch's defaults). Without CUDA the CPU, with a
    warning only where a GPU was asked for."""
    if args.gpu is not None and args.gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if args.gpu is not None:
            warnings.warn(f"CUDA is not available: training on the CPU (--gpu {args.gpu}; pass --gpu -1 to silence "
                          "this).")
        return torch.device("cpu")
    local_rank, count = os.environ.get("LOCAL_RANK"), torch.cuda.device_count()
    gpu = int(local_rank) if local_rank is not None else args.gpu or 0
    if gpu >= count:
        raise UserError(f"--gpu {gpu} does not exist: this machine has {count} CUDA device(s)" if local_rank is None
                        else f"torchrun started a process for GPU {gpu} (LOCAL_RANK), but this machine has {count} "
                             f"CUDA device(s): give --nproc_per_node={count} or fewer")
    device = torch.device("cuda", gpu)
    torch.cuda.set_device(device)   # streams, graphs and new tensors without a device go to this GPU
    torch.backends.cudnn.benchmark = True
    if args.tf32 is not None:     # unset: PyTorch's defaults (float32 matmuls, TF32 cuDNN convolutions)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    return device


def git_commit(script: Optional[str] = None) -> str:
    """The repository's commit, for the record, with ``-dirty`` when the code that runs may differ from it: a
    changed or untracked ``.py`` file in the repository (a method copied and not yet committed), or the method's
    ``script`` outside it; "unknown" outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--verify", "-q", "HEAD")
        changed = git("status", "--porcelain", "-uall", "--", "*.py")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    outside = script is not None and REPOSITORY not in Path(script).resolve().parents
    return "unknown" if not commit else commit + ("-dirty" if changed or outside else "")


def library_versions(device: torch.device) -> dict:
    """The versions of python, torch, torchvision, numpy, CUDA and cuDNN, and the device's name (plain types:
    a checkpoint holds them)."""
    import torchvision
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "numpy": np.__version__,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    cuda = device.type == "cuda"
    versions["device"] = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    return {k: str(v) if isinstance(v, str) else v for k, v in versions.items()}   # TorchVersion: a str


def rng_state(device: torch.device) -> dict:
    """Every RNG the training may draw from, in a form ``weights_only`` loading accepts. For CUDA only the
    training device's generator (all ranks share one state, so rank 0's stands for every rank)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             "python": random.getstate()}
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


def wrap(model: nn.Module, args, dist, device: torch.device) -> nn.Module:
    """The module the loop calls: the method's ``model``, in DistributedDataParallel under torchrun (parameters
    that never get a gradient, such as a frozen module's, have ``requires_grad=False`` and are skipped), its
    batch norms made SyncBatchNorm in place with ``--sync-bn``."""
    if dist.world_size <= 1:
        if args.sync_bn:
            warnings.warn("--sync-bn does nothing in a single process")
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    if args.sync_bn:     # (in place: the model is a container, never a batch norm itself)
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---- the command line -------------------------------------------------------------------------------------

def train(method_cls: type[Method], argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` (default: sys.argv), then train or evaluate. Raises UserError on bad input."""
    args = parse_args(method_cls, argv)
    try:
        trainer = Trainer(method_cls, args, argv)
        return trainer.evaluate_only() if args.eval_only else trainer.fit()
    finally:
        shutdown_distributed()


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` of the command line: ``warning: <message>``, without the source line."""
    return f"warning: {message}\n"


def main(method_cls: type[Method], argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point: errors that are the user's to fix print as one line, not a traceback; so do
    warnings, and running out of memory. SIGTERM (what SLURM and Kubernetes send before a kill) and SIGHUP (a
    closed terminal or ssh session) stop the run as Ctrl-C does; so does a closed output pipe (``... | head``).
    The exit status is 2 for bad input, 1 for out of memory, 128 + the signal's number for a stopped run; a bug
    is raised (its traceback)."""
    from data import DatasetError
    from models import UnknownModelError
    previous, status = warnings.formatwarning, 0
    warnings.formatwarning = one_line_warning
    children = set(multiprocessing.active_children())     # (a caller's own: never this run's loader workers)
    try:
        with stop_on_signals():
            train(method_cls, argv)
    except (UserError, DatasetError, UnknownModelError) as e:
        _say(f"error: {e}")
        status = 2
    except (KeyboardInterrupt, BrokenPipeError) as e:
        sig = stop_signal(e)
        if os.environ.get("RANK", "0") == "0":    # (under torchrun every rank stops the same way: one says so)
            _say("\n" + (getattr(e, "message", "") or f"interrupted ({sig}) while starting: nothing was written"))
        status = 128 + signal.Signals[sig].value
    except Exception as e:
        if not out_of_memory(e):
            _end_loader_workers(children)
            raise                   # a bug: its traceback
        _say(f"error: out of memory ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); lower "
             "--batch-size or --eval-batch-size, or what this command makes large (--image-size, --num-peers, the "
             "method's sizes such as a memory bank or the number of heads)")
        status = 1
    finally:
        warnings.formatwarning = previous
    if status:
        _end_loader_workers(children)
        sys.exit(status)


def _end_loader_workers(children: set) -> None:
    """End the data loader's worker processes that a stopped run leaves behind: the daemon processes started
    since ``children`` (this process's children before the run) were listed. After an error in a worker (an
    image that cannot be read) torch's loader ends its workers with SIGTERM, which they ignore (the stop signals
    are the training process's: data/loaders.py), and the exit would wait for them for ever; they are killed
    instead. Torch's SIGCHLD handler, which takes a worker's end for a failure, waits meanwhile."""
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for worker in multiprocessing.active_children():
            if worker.daemon and worker not in children:       # (a loader's workers are daemons)
                worker.kill()
                worker.join()
    finally:
        signal.signal(signal.SIGCHLD, previous)


def out_of_memory(error: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError
    (which has no class of its own: "DefaultCPUAllocator: can't allocate memory")."""
    return (isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError))
            or "can't allocate memory" in str(error) or "out of memory" in str(error).lower())


def _say(line: str) -> None:
    """One line on stderr in one write (under torchrun every rank shares stderr, and print's separate "\n"
    lets the ranks' lines run together); a closed terminal or pipe takes nothing and raises nothing (stdout,
    if it is the closed pipe, is sent to /dev/null so that the exit's flush raises nothing either)."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except OSError:
        pass
    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
