"""The one training loop every method uses.

``Trainer(method_cls, args)`` sets a run up (engine/setup.py: device, seeding, DDP, optimizers; the
configuration resolved and frozen, engine/config.py); ``fit()`` trains: for every epoch ``train_epoch``,
the method's ``on_epoch_end``, ``evaluate`` on the test (and validation) split, then the run's records
(engine/records.py: checkpoints, results.json) and reports (engine/reporting.py: console, TensorBoard).
``evaluate_only()`` evaluates a checkpoint.
"""
from __future__ import annotations

import json
import math
import shlex
import signal
import sys
import time
import uuid
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import records
from .checkpoint import load_checkpoint
from .cli import parse_args
from .config import resolve
from .distributed import DistEnv, all_reduce_sum, barrier, broadcast_buffers, init_distributed, shutdown_distributed
from .ema import temporal_means
from .errors import UserError
from .method import Method, StepContext
from .run_dir import Interrupted, raise_interrupted
from .reporting import Reporter
from .setup import (Optimization, as_trained, check_args, group_peers, lr_factor, run_directory, seed_everything,
                    select_device, sgd_implementation, wrap)

__all__ = ["Trainer", "train", "main", "lr_factor", "sgd_implementation", "topk_correct"]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[number correct at top-1, number correct at top-k] as a device tensor (no host sync)."""
    k = min(k, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


class Trainer:
    """Builds data, method and optimizers from the parsed arguments; ``fit()`` trains, ``evaluate_only()`` evaluates."""

    def __init__(self, method_cls: type[Method], args, argv: Optional[Sequence[str]] = None):
        from data import build_loaders, dataset_info
        from models import check_image_size, model_entry
        from models.peers import arch_names

        self.method_cls = method_cls
        self.argv = list(sys.argv[1:] if argv is None else argv)   # the command, for the record
        self.eval_ckpt = None
        if args.eval_only and not args.resume:   # evaluated as trained: the checkpoint's options
            self.eval_ckpt = load_checkpoint(args.eval_only)
            args = as_trained(method_cls, args, self.argv, self.eval_ckpt)
        check_args(args, method_cls)
        self.args = args = resolve(method_cls, args)   # read-only from here on
        size = dataset_info(args.dataset, args.data, image_size=args.image_size, classes=args.classes).image_size
        for name in arch_names(args.arch):
            model_entry(name)  # unknown architecture: the listing error before anything heavy
            check_image_size(name, size)  # folder data: a backbone that cannot take the size, before decoding
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = select_device(args)
        self.dist: DistEnv = init_distributed(self.device.type == "cuda")
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.is_main = self.dist.is_main
        seed_everything(args.seed)
        try:
            self.loaders = build_loaders(args, self.device, self.dist.rank, self.dist.world_size,
                                         needs_every_class=method_cls.needs_every_class)
        except ValueError as e:  # a data flag that does not fit the dataset (--val-split, --subset, --loader)
            raise UserError(str(e)) from None
        info = self.loaders.info
        self.method = method_cls(args, info.num_classes, self.loaders.n_train, info.image_size,
                                 train_labels=self.loaders.train.labels)
        if args.grouped_peers:
            group_peers(self.method, args.arch)
        self.memory_format = torch.channels_last if args.channels_last else None
        self.method.to(self.device, self.memory_format)
        self.model = wrap(self.method, args, self.dist, self.device)
        if args.compile:
            self.model = torch.compile(self.model, mode=None if args.compile == "default" else args.compile)
        self.optimization = Optimization(self.method.optim_groups(), args, self.dist.world_size, self.device)
        self.optimizers, self.schedulers = self.optimization.optimizers, self.optimization.schedulers
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        self.step_context = StepContext(self.optimizers, self.scaler, self.device.type, self.autocast_dtype)
        self.means = temporal_means(self.method.extra_modules())
        self.graphed = None
        if args.cuda_graph:
            from .cuda_graph import GraphedStep
            self.graphed = GraphedStep(self._step, list(self.optimizers.values()), self.device)
        self.best_head = args.best_metric or method_cls.best_metric
        self.out = run_directory(method_cls, args, self.dist.world_size).absolute()
        self.start_epoch = 0
        self.history = records.History("val" if self.loaders.val is not None else "test", f"{self.best_head}/top1")
        self.report = Reporter(self.out, self.is_main, args.epochs, self.best_head)
        self.provenance = {"git_commit": records.git_commit(),   # once, not per epoch
                           "versions": records.library_versions(self.device)}
        self.run_id = uuid.uuid4().hex      # a resumed run takes its checkpoint's
        self.processes: list[dict] = []     # every process that trained the run (results.json)
        self.process: Optional[dict] = None
        self.lock = None

    @property
    def script_name(self) -> str:
        return Path(self.method_cls.script or sys.argv[0]).name

    @property
    def command(self) -> str:
        return shlex.join([self.script_name] + self.argv)

    # ---- one step -------------------------------------------------------------------------------
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

    # ---- one epoch ------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        self.model.train()
        self.method.on_epoch_start(epoch)
        loader = self.loaders.train
        loader.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{self.args.epochs}", leave=False,
                   disable=self.args.no_progress or not self.is_main or not sys.stderr.isatty(), dynamic_ncols=True)
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
        self.history.train_seconds += seconds
        self.history.train_samples += samples
        stats["images_per_s"] = samples / max(seconds, 1e-9)
        stats["epoch_s"] = seconds
        return stats

    def _stop_if_non_finite(self, epoch: int, stats: dict) -> None:
        """After an epoch (and the method's on_epoch_end), before anything of it is saved: a NaN or inf in the
        epoch's mean losses (the same on every rank), or in any parameter or buffer of the model or the
        method's extra modules (a loss stays finite when the epoch's last step writes NaN into the weights),
        stops the run on every rank with one line."""
        bad = [f"{n}={v}" for n, v in stats.items() if isinstance(v, float) and not math.isfinite(v)]
        modules = {"the model": self.method.model, **self.method.extra_modules()}
        zero = torch.zeros((), device=self.device)
        # a sum is NaN or inf when any of its terms is (float32 sums: one scalar per tensor, no full-size temporary)
        sums = torch.stack([sum((t.detach().sum(dtype=torch.float32) for t in [*m.parameters(), *m.buffers()]
                                 if t.is_floating_point()), zero) for m in modules.values()])
        flagged = all_reduce_sum((~sums.isfinite()).float())   # BN buffers differ between ranks: agree first
        bad += [f"{name} holds NaN or inf" for name, f in zip(modules, flagged.tolist()) if f > 0]
        if not bad:
            return
        kept = records.saved_state(self) if self.saved.epochs else "no earlier epoch was saved"
        fixes = "a lower --lr" + (", or --amp bf16 (or off) instead of fp16" if self.args.amp == "fp16" else "")
        raise UserError(f"training became non-finite in epoch {epoch + 1} ({', '.join(bad)}). Nothing of that "
                        f"epoch was saved; {kept}. Start a new run (another --out) with {fixes}, after checking "
                        "this command's flags for out-of-range values (a resumed run keeps its training flags).")

    # ---- evaluation -----------------------------------------------------------------------------
    def _eval_batches(self, loader):
        """(heads, batch) for every batch of this rank's share of ``loader``: ``eval_logits`` in eval mode,
        under no_grad, with every rank holding rank 0's buffers first."""
        model = self.method.model
        modules = [model] + self.means
        for m in modules:
            broadcast_buffers(m)
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
        in the split's order, gathered over every rank (each sample is evaluated by one rank). The
        ``evaluator`` of ``Method.on_epoch_end``."""
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

    # ---- entry points ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train the run, from its checkpoint when resuming. The run directory is locked meanwhile; how the
        process ended (finished, interrupted, failed) is recorded in results.json."""
        self._check_heads()   # before the RNG state of a resumed run is restored
        try:
            if records.open_run(self):
                results = self._train()
            else:   # already finished: what it recorded
                recorded = self.out / "results.json"
                results = json.loads(recorded.read_text()) if recorded.is_file() else records.results(self, "finished")
        except BaseException as e:
            message = records.close_run(self, e)
            if message is not None:
                raise Interrupted(getattr(e, "signal_name", "SIGINT"), message) from None
            raise
        records.close_run(self, None)
        return results

    def _train(self) -> dict:
        a = self.args
        n_params = sum(p.numel() for p in self.method.model.parameters())
        self.report.log(f"{self.method_cls.name}: {a.arch} on {a.dataset} ({self.loaders.n_train} train images), "
                        f"{n_params / 1e6:.3f}M parameters, device {self.device}, amp {a.amp}, "
                        f"global batch {a.batch_size * self.dist.world_size} "
                        f"({a.batch_size} x {self.dist.world_size} process(es)), recipe {a.recipe}, out {self.out}")
        for epoch in range(self.start_epoch, a.epochs):
            lr = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
            record = {"epoch": epoch + 1, "lr": lr, "train": self.train_epoch(epoch)}
            self.method.on_epoch_end(epoch, self)
            self._stop_if_non_finite(epoch, record["train"])
            record["test"] = self.evaluate(self.loaders.test)
            if self.loaders.val is not None:
                record["val"] = self.evaluate(self.loaders.val)
            improved = self.history.add(record)
            # TensorBoard and the console first: an epoch in a checkpoint or results.json is always in the
            # event file too (a resumed run purges the steps after its checkpoint).
            self.report.epoch(epoch, record)
            records.save_epoch(self, epoch + 1, improved)
            records.write_results(self, "finished" if epoch + 1 == a.epochs else "running")
            barrier()  # no rank starts the next epoch before rank 0 has written this one's checkpoint
            if not self.is_main:
                records.epoch_saved(self, epoch + 1)
        records.write_results(self, "finished")
        self.report.close()
        barrier()
        self.report.final_table(self.history, records.peer_archs(self.method_cls, self.args) if "," in self.args.arch
                                else None)
        return records.results(self, "finished")

    def evaluate_only(self) -> dict:
        """Evaluate the --eval-only checkpoint as trained (the Trainer was built with its options; either
        layout, with or without --grouped-peers) on the test split, and on the held-out split with
        --val-split. What is evaluated is loaded: the model and the temporal means; training state
        (optimizers, MCL-OKD's memory banks) need not be in the file. Writes
        ``eval-<checkpoint>-<dataset>[-test<N>][-<amp>].json`` (N: --eval-subset; amp: bf16 or fp16), naming the
        dataset, the splits and the precision."""
        path, ckpt, a = Path(self.args.eval_only), self.eval_ckpt, self.args
        records.load_method_state(self.method, dict(ckpt, state=records.evaluated_state(self, ckpt, path)), path)
        splits = {"test": f"the {a.dataset} test set" if not a.eval_subset else
                  f"{a.eval_subset} images of the {a.dataset} test set (stratified, seed {a.seed})"}
        result = {"checkpoint": str(path), "method": ckpt["method"], "epoch": ckpt["epoch"], "arch": a.arch,
                  "dataset": a.dataset, "data": a.data, "splits": splits, "amp": a.amp,
                  "test": self.evaluate(self.loaders.test)}
        if self.loaders.val is not None:
            splits["val"] = f"{a.val_split} samples held out of the {a.dataset} training set (seed {a.seed})"
            result["val"] = self.evaluate(self.loaders.val)
        for split in ("val", "test"):
            if split in result:
                self.report.log(f"{split}: " + " ".join(f"{k} {v:.2f}" for k, v in result[split].items()))
        records.write_evaluation(self, result)
        return result


def train(method_cls: type[Method], argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` (default: sys.argv), then train or evaluate. Raises UserError on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    """Command-line entry point: errors that are the user's to fix print as one line, not a traceback.
    SIGTERM (what SLURM and Kubernetes send before a kill) stops the run as Ctrl-C does."""
    from data import DatasetError
    from models import UnknownModelError
    warnings.formatwarning = one_line_warning
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        train(method_cls, argv)
    except (UserError, DatasetError, UnknownModelError) as e:
        # one write per line: under torchrun every rank shares stderr, and print's separate "\n" lets the
        # ranks' lines run together
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt as e:
        message = getattr(e, "message", "") or (f"interrupted ({getattr(e, 'signal_name', 'SIGINT')}) while "
                                                "starting: nothing was written")
        sys.stderr.write("\n" + message + "\n")
        sys.stderr.flush()
        sys.exit(130 if getattr(e, "signal_name", "SIGINT") == "SIGINT" else 143)
    finally:
        signal.signal(signal.SIGTERM, previous)
