"""The run's configuration, read-only once resolved, and the run's identity, which is its configuration.

``resolve`` fills in every default that depends on other flags, on the method or on the dataset (the
method's ``check_args`` fills in its own, e.g. MCL-OKD's ``--nce-k`` from ``--arch``), checks the flags that
conflict, then freezes the result into a :class:`RunConfig`. Method code reads it (``self.args.kd_T``);
assigning to it raises, and so does reading a field that does not exist, so a misspelt name fails at once.

**Identity.** The default run directory is ``runs/<method>-<arch>-<dataset>[-n<peers>]-s<seed>`` (``-n<peers>``
for the methods with peers; a folder dataset is ``folder-<its name>-<6 hex digits of where it is>``), followed by
``-<hash>`` (8 hex digits of sha256) when any other *training option* differs from the method's defaults
(:func:`run_name`): two commands that train differently never share a directory. Training options are
every option except :data:`NOT_TRAINING` (what cannot change what is trained) and :data:`SPEED` (the same
maths by other kernels); a resumed run must agree on every one (:func:`differences`), except ``--epochs``,
which may grow with ``--extend-epochs``.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .cli import given_options, parse_args, shown, warn_unused_flags
from .errors import UserError

# Options that cannot change what is trained: where the run lives and what this process does (--out,
# --resume, --eval-only, --extend-epochs), a label (--tag), the device index (--gpu; -1 = the CPU), CPU
# threads, DataLoader processes (--workers: the augmentation of a sample does not depend on them, see
# data/loaders.py), the progress bar, where the dataset is read from (--data, --download: the dataset is
# --dataset), a check (--num-classes), and the evaluation batch (--eval-batch-size: batch norm runs in eval
# mode, so a prediction does not depend on the batch it is in).
NOT_TRAINING = frozenset({"out", "resume", "eval_only", "extend_epochs", "tag", "gpu", "workers", "threads",
                          "no_progress", "data", "download", "num_classes", "eval_batch_size"})
# Speed options: the same maths computed by other kernels (the rounding of floats may differ, the
# experiment does not). A run keeps its directory when one is switched on, and may be resumed with another
# (checkpoints hold the plain layout of --grouped-peers either way). --cuda-graph is not one: it needs one
# batch shape, so it drops the last incomplete batch of every epoch, which the other runs train on.
SPEED = frozenset({"channels_last", "compile", "sgd_impl", "grouped_peers"})
# Names of bundles of defaults (the values they set are compared, not the names), and what the engine fills in.
BUNDLES_AND_DERIVED = frozenset({"recipe", "preset", "views", "schedule_note"})
# What --eval-only may set besides NOT_TRAINING and SPEED: how a checkpoint is evaluated (--best-metric chooses
# the best epoch while training; an evaluation reports every head).
EVALUATION = frozenset({"amp", "loader", "eval_subset", "best_metric"})
# Options shown in the readable part of the name (not hashed).
NAMED = ("arch", "dataset", "num_peers", "seed")


class RunConfig(argparse.Namespace):
    """The resolved flags of one run (``config.lr``, ``config.kd_T``), read-only: assigning raises, and so
    does reading a field that does not exist (with the closest names)."""

    def __init__(self, fields: dict):
        self.__dict__.update(fields)

    def __getattr__(self, name: str) -> Any:          # only for names that are not fields
        close = difflib.get_close_matches(name, list(self.__dict__), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AttributeError(f"the run's configuration has no field {name!r}{hint}")

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"the run's configuration is read-only once resolved (setting {name!r}); resolve "
                             "defaults in the method's check_args, which runs before it is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("the run's configuration is read-only once resolved")

    def as_dict(self) -> dict:
        """A copy of every field (for checkpoints and results.json)."""
        return dict(vars(self))


def resolve(method_cls, args) -> RunConfig:
    """Resolve and freeze a parsed namespace (not modified; a RunConfig is accepted too): the engine's
    checks of flags that conflict, the method's ``check_args`` (its checks and its own defaults), then
    ``views`` (1 unless the method set it), ``num_classes`` (from the dataset; a given value must agree),
    ``loader`` (the dataset's default: 'torch' for ImageNet and for folders too large to decode, else
    'device') and ``eval_batch_size`` (2 x ``batch_size``). Raises ``UserError`` for flags that conflict,
    ``data.DatasetError`` for a dataset that is not there or does not fit its flags, and
    ``models.ImageSizeError`` for a backbone that cannot take the dataset's image size (a folder dataset is
    listed and a few image headers read, nothing decoded)."""
    from data import dataset_info
    from models import check_image_size
    from models.peers import arch_names

    ns = argparse.Namespace(**vars(args))
    _check_engine_flags(ns, method_cls)
    method_cls.check_args(ns)
    ns.views = getattr(ns, "views", None) or 1
    info = dataset_info(ns.dataset, ns.data, image_size=ns.image_size, classes=ns.classes)
    for name in arch_names(ns.arch):
        check_image_size(name, info.image_size)
    if ns.num_classes not in (None, info.num_classes):
        raise UserError(f"--num-classes {ns.num_classes} disagrees with {ns.dataset}, which has "
                        f"{info.num_classes} classes; leave --num-classes out")
    ns.num_classes = info.num_classes
    ns.loader = ns.loader or info.default_loader
    ns.eval_batch_size = ns.eval_batch_size or 2 * ns.batch_size
    return RunConfig(vars(ns))


def _check_engine_flags(a: argparse.Namespace, method_cls) -> None:
    """Engine flags that conflict with each other, with the method or with this machine (one line each)."""
    import torch
    gpu = torch.cuda.is_available() and (a.gpu is None or a.gpu >= 0)
    name = method_cls.name
    if "," in a.arch and not method_cls.mixed_archs:
        raise UserError(f"--arch {a.arch}: {name} builds its peers from one architecture (they share layers, or "
                        "exchange features of one shape); give one name")
    if a.grouped_peers and method_cls.num_peers is None:
        raise UserError(f"{name} trains a single network: --grouped-peers has nothing to group; leave it out")
    if a.grouped_peers and not method_cls.groupable_peers:
        raise UserError(f"{name} reaches into its peers' layers, so it cannot run them grouped; leave out "
                        "--grouped-peers")
    if a.grouped_peers and "," in a.arch:
        raise UserError(f"--grouped-peers with --arch {a.arch}: the peers have different architectures; grouping "
                        "needs one")
    if a.extend_epochs and not (a.resume and (a.out or a.resume != "auto")):
        raise UserError("--extend-epochs continues an existing run: name it with --resume PATH/TO/last.pt (or "
                        "--out DIR --resume auto); the default run directory depends on --epochs")
    if a.lr_schedule == "multistep" and not a.milestones:
        raise UserError("--lr-schedule multistep needs --milestones, e.g. --milestones 150 225")
    if a.sync_bn and not gpu:
        raise UserError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation); leave it out")
    if a.amp == "fp16" and not gpu:
        raise UserError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or --amp off")
    if a.cuda_graph:
        if not gpu:
            raise UserError("--cuda-graph needs a CUDA GPU; leave it out on the CPU")
        if a.amp == "fp16":
            raise UserError("--cuda-graph and --amp fp16 conflict: the fp16 loss scaler's overflow check is "
                            "not captured; use --amp bf16")
        if a.compile:
            raise UserError("--cuda-graph and --compile conflict: for compiled graphs use --compile "
                            "reduce-overhead")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--cuda-graph is single-process for now (DDP's gradient all-reduce is not captured); "
                            "leave it out under torchrun")


def from_checkpoint(method_cls, args: argparse.Namespace, argv: Sequence[str], ckpt: Mapping, path: Path,
                    evaluating: bool) -> argparse.Namespace:
    """--eval-only and --resume of a checkpoint: the parsed flags with the checkpoint's training options
    of ``ckpt`` (arch, dataset, peers, subset, method flags, schedule...) in place of the command's defaults,
    so a run is continued or evaluated without repeating its flags. A training option given on the command
    line must agree with the checkpoint (one line naming each that does not; an --image-size it left unset is
    the size it was trained at, ``ckpt["image_size"]``: :func:`as_trained`), except --epochs grown with
    --extend-epochs and, for --eval-only, how it is evaluated."""
    given = given_options(method_cls, argv)
    saved = ckpt["args"]
    options = training_options(saved)
    free = NOT_TRAINING | SPEED | BUNDLES_AND_DERIVED | (EVALUATION if evaluating else frozenset())
    if args.extend_epochs and given.get("epochs", 0) > options.get("epochs", 0):
        free |= {"epochs"}
    wrong = [(k, *as_trained(k, options[k], given[k], ckpt))
             for k in given if k in options and k not in free]
    wrong = [(k, before, now) for k, before, now in wrong if before != now]
    wrong += [(k, saved[k], given[k]) for k in ("recipe", "preset")   # bundles: their names are recorded
              if k in given and given[k] != saved.get(k, given[k])]
    processes = int(os.environ.get("WORLD_SIZE", "1"))            # (torchrun's; named with the flags, in one line)
    if not evaluating and ckpt.get("world_size", 1) != processes:
        wrong.append(("world_size", ckpt.get("world_size", 1), processes))
    if wrong and evaluating:
        raise UserError(f"--eval-only evaluates {path} as trained: " + "; ".join(
            f"it was trained with {flag(k)} {shown(s)}, not {shown(n)}" for k, s, n in wrong)
            + ". Leave these flags out (only --data and evaluation options may be given)")
    if wrong:
        values = ("the checkpoint's values (leave these flags out)" if any(k != "world_size" for k, _, _ in wrong)
                  else "its number of processes")
        raise UserError(f"{path} was trained with {describe_differences(wrong)}. Resume with {values}, or "
                        f"{new_run_hint(args.resume)}")
    # (a --classes given is the checkpoint's file as this command names it: as_trained)
    kept = {k: v for k, v in options.items() if k in vars(args) and not (k in given and (k in free or k == "classes"))}
    kept.update({k: saved[k] for k in ("recipe", "preset") if k in saved and k in vars(args) and k not in given})
    where = saved.get("data")
    if where and not os.path.isabs(where):           # (older versions: as typed) the folder the record says it read
        source = Path((ckpt.get("data") or {}).get("source") or "")
        with contextlib.suppress(ValueError):        # (source: --data itself, or a dataset's folder inside it)
            where = next((str(p) for p in [source, *source.parents] if p.is_absolute() and p.match(where)), where)
    if "data" not in given and where and Path(where).is_dir():
        kept["data"] = where     # where it was read from, if it is still there (else: the default place)
    elif "data" not in given and where and saved.get("dataset") == "folder":   # (no default place)
        raise UserError(f"{path} was trained on --data {where}, which is no longer there; give --data with "
                        "where that dataset is now")
    if evaluating:
        kept.pop("cuda_graph", None)     # nothing is trained: the step is not captured
        if kept.get("dataset", args.dataset) == "folder" and kept.get("image_size", args.image_size) is None:
            kept["image_size"] = ckpt.get("image_size")      # evaluated at the size it was trained at
    if "milestones" not in given and "sgdr_t0" not in given:   # the checkpoint's schedule, as it was shortened
        note = saved.get("schedule_note")
        if note and "epochs" in free:                          # extended (again): the length it is extended to
            note = note.split("; kept by")[0] + f"; kept by --extend-epochs to {given['epochs']} epochs"
        kept["schedule_note"] = note
    merged = argparse.Namespace(**{**vars(args), **kept})
    warn_unused_flags(merged, given, method_cls)
    return merged


# ---- identity ----------------------------------------------------------------------------------------------

def flag(key: str) -> str:
    """The command-line flag of an argument name: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


def training_options(args: Mapping) -> dict:
    """The options of ``args`` (argument values, with the ``world_size`` they ran on) that can change what is
    trained. ``--milestones`` and ``--sgdr-t0`` are left out under the schedules that do not read them, and
    a ``loader`` left unset (older records) is left out."""
    skip = NOT_TRAINING | SPEED | BUNDLES_AND_DERIVED
    options = {k: v for k, v in args.items() if k not in skip}
    if options.get("lr_schedule") != "multistep":
        options.pop("milestones", None)
    if options.get("lr_schedule") != "sgdr":
        options.pop("sgdr_t0", None)
    if options.get("loader", "") is None:
        options.pop("loader")
    return options


def _canonical(value):
    return list(value) if isinstance(value, tuple) else value


def default_options(method_cls, args) -> dict:
    """The method's default training options for ``args``' arch and dataset, resolved as a run resolves
    them (MCL-OKD's K and tau depend on them), for one process."""
    defaults = parse_args(method_cls, ["--arch", args.arch, "--dataset", args.dataset]
                          + (["--data", args.data] if args.data else []))
    from data import DatasetError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            defaults = resolve(method_cls, defaults).as_dict()
    except (UserError, DatasetError):
        defaults = vars(defaults)
    return training_options({**defaults, "world_size": 1})


def run_name(method_cls, config: RunConfig, world_size: int = 1) -> str:
    """``<method>-<arch>-<dataset>[-n<peers>]-s<seed>[-<hash>]``: the hash (8 hex digits of sha256) covers
    every training option other than the named ones whose value differs from the method's defaults for this
    arch and dataset, so adding an option with a default keeps existing names."""
    from models.peers import arch_tag      # resnet20,resnet20,wrn_16_2 -> resnet20x2+wrn_16_2
    options = training_options({**config.as_dict(), "world_size": world_size})
    defaults = default_options(method_cls, config)
    peers = f"-n{options['num_peers']}" if "num_peers" in options else ""
    data = config.dataset
    if data == "folder":                 # the folder's name, and a hash of where it is (two data/ folders differ)
        from data.common import default_dir
        where = default_dir("folder", config.data).resolve()
        name = os.fsencode(where.name).decode("utf-8", "replace")      # (a name not valid UTF-8: shown with U+FFFD)
        data = f"folder-{name}-{hashlib.sha256(os.fsencode(where)).hexdigest()[:6]}"
    name = f"{method_cls.name}-{arch_tag(options['arch'])}-{data}{peers}-s{options['seed']}"
    changed = {k: _canonical(v) for k, v in options.items()
               if k not in NAMED and (k not in defaults or _canonical(defaults[k]) != _canonical(v))}
    if changed:
        text = json.dumps(changed, sort_keys=True, default=str)
        name += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return name


_HASH = r"-[0-9a-f]{8}"          # the tail run_name adds for options that differ from the defaults


def without_hash(name: str) -> str:
    """A :func:`run_name` without its options' hash: what runs of one method, backbone, data and seed share."""
    return re.sub(_HASH + "$", "", name)


def without_seed(name: str) -> str:
    """A :func:`run_name` without its ``-s<seed>`` (the options' hash kept): what the seeds of one run share."""
    return re.sub(rf"-s\d+({_HASH})?$", r"\1", name)


def run_directory(method_cls, config: RunConfig, world_size: int) -> Path:
    """--out; else the directory of the checkpoint given to --resume or --eval-only; else runs/<name>, under
    ``$OKD_RUNS`` if set, else under the current directory (the same rule as the datasets' ``$OKD_DATASETS``)."""
    if config.out:
        return Path(config.out)
    checkpoint = config.eval_only or (config.resume if config.resume != "auto" else None)
    if checkpoint:
        return Path(checkpoint).parent
    return Path(os.environ.get("OKD_RUNS") or "runs") / run_name(method_cls, config, world_size)


def as_trained(key: str, before, now, trained: Mapping) -> tuple:
    """An option's values for a run (``before``) and for a command (``now``), compared as trained (``trained``: the
    run's checkpoint or results.json): an --image-size the run left unset (None) is the size of its data, which it
    recorded (``image_size``; None if unknown), and so is the command's if it leaves it unset too. A size given to
    the run stays as given: the command's unset one is then its data's, not known here (tuples: lists). A --classes
    file that lists the classes the run recorded (``classes``) is the run's, wherever it lies now and however its
    name was recorded (older versions: as typed, relative to a folder not known)."""
    if key == "image_size" and before is None and trained.get("image_size") is not None:
        before, now = trained["image_size"], trained["image_size"] if now is None else now
    if key == "classes" and None not in (before, now, trained.get("classes")) and before != now:
        from data.common import DatasetError, read_class_list
        with contextlib.suppress(DatasetError):
            before = now if sorted(read_class_list(now)) == sorted(trained["classes"]) else before
    return _canonical(before), _canonical(now)


def differences(saved: Mapping, now: Mapping, defaults: Mapping, extend_epochs: bool = False,
                trained: Mapping = {}) -> list[tuple[str, object, object]]:
    """Training options that differ between a checkpoint's arguments ``saved`` and this run's ``now`` (each
    with its ``world_size``), as (key, saved value, new value). An option the checkpoint predates counts as
    its default; an --image-size left unset and a --classes file, as ``trained`` (the checkpoint or results.json)
    says (:func:`as_trained`). ``--epochs`` may grow when ``extend_epochs``."""
    saved_opts, now_opts = training_options(saved), training_options(now)
    diffs = []
    for key in list(now_opts) + [k for k in saved_opts if k not in now_opts]:
        before, after = as_trained(key, saved_opts.get(key, defaults.get(key)), now_opts.get(key, defaults.get(key)),
                                   trained)
        if key == "epochs" and extend_epochs and after is not None and before is not None and after > before:
            continue
        if before != after:
            diffs.append((key, before, after))
    return diffs


def describe_differences(diffs: Sequence[tuple[str, object, object]], against: str = "this command",
                         hint: bool = True) -> str:
    """``--subset 64 (this command: 512), --epochs 1 (this command: 2)``, and with ``hint`` the flag that
    trains a run longer after a grown --epochs."""
    parts = []
    for key, before, after in diffs:
        name = {"world_size": "world size", "method": "method"}.get(key) or flag(key)     # (no flags of their own)
        part = f"{name} {shown(before)} ({against}: {shown(after)})"
        if hint and key == "epochs" and isinstance(before, int) and isinstance(after, int) and after > before:
            part += " [to train longer, add --extend-epochs]"
        if hint and key == "world_size":
            part += f" [run it with torchrun --nproc_per_node={before}]" if before > 1 else " [without torchrun]"
        parts.append(part)
    return ", ".join(parts)


def new_run_hint(resume: Optional[str]) -> str:
    """How to start a new run instead of resuming one (``resume``: the --resume given): another --out, and
    without --resume PATH, which compares its checkpoint's options whatever the --out."""
    return ("start a new run with another --out" if resume == "auto" else
            "start a new run: leave out --resume and give another --out")


def recorded_differences(method_cls, config: RunConfig, recorded: Mapping,
                         world_size: int = 1) -> list[tuple[str, object, object]]:
    """How a run's recorded arguments (a checkpoint's or results.json's ``args``, and ``world_size``) differ
    from ``config`` on ``world_size`` processes (its ``image_size``: the size trained): the comparison a resume
    makes."""
    saved = dict(recorded.get("args") or {}, world_size=recorded.get("world_size", 1))
    return differences(saved, {**config.as_dict(), "world_size": world_size}, default_options(method_cls, config),
                       extend_epochs=config.extend_epochs, trained=recorded)
