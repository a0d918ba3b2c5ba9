"""The contract between a method script and the engine: docs/engine.md has every attribute and hook with the
methods that use it, one training step in order, and the rules a step follows.

A method says how to build its modules, the loss of one batch as named terms, and which logits to
evaluate. Everything else (data, loop, precision, devices, checkpoints, logging) is the engine's.

    class DML(Method):
        def build(self):
            return Peers(self.args.arch, self.num_classes, self.args.num_peers)
        def loss(self, model, batch, epoch):
            out = model(batch.images)
            return {"ce": ..., "kd": ...}

In ``loss`` and ``train_step``, ``model`` is ``self.model`` possibly wrapped (DDP, ``--compile``), so a method
calls the ``model`` it is given rather than ``self.model``; ``eval_logits`` is given ``self.model`` itself.

**A method's identity is its file name**: ``train_dml.py`` is the method ``dml``, the name of its default
run directory, the ``method`` of its checkpoints and results, and the script they are resumed and evaluated
with. A class defined in the script being run (``python my_idea.py``) is named after that file; a subclass
defined elsewhere (a test, a helper module) keeps its parent's. So a copy of ``train_dml.py`` saved as
``train_dml_mykd.py`` is a new method, ``dml_mykd``. A class cannot set ``name`` itself.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from recipes import RECIPES

from .errors import UserError


@dataclass
class OptimGroup:
    """Parameters trained by one optimizer: the run's SGD (``--momentum``, ``--nesterov``, ``--sgd-impl``), or
    ``optimizer(params, lr=, weight_decay=, **extra)`` when given (e.g. ``torch.optim.Adam`` for GAN
    discriminators). ``lr``/``weight_decay`` of None take the run's values; ``scheduled=False`` keeps the lr
    constant instead of following the run's schedule; ``extra``: further keywords of the optimizer."""
    name: str
    params: list
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    scheduled: bool = True
    extra: dict = field(default_factory=dict)
    optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None


def peer_heads(logits: list[torch.Tensor], ensemble: bool = True) -> dict[str, torch.Tensor]:
    """``{"peer1": z_1, ..., "peerN": z_N, "ensemble": mean_i z_i}``: the usual heads to evaluate."""
    heads = {f"peer{i + 1}": z for i, z in enumerate(logits)}
    if ensemble and len(logits) > 1:
        heads["ensemble"] = torch.stack(logits).mean(0)
    return heads


def checked_terms(terms, source: str) -> dict[str, torch.Tensor]:
    """``terms`` when it is what ``loss`` and ``train_step`` return, a non-empty dict of scalar (0-dim) float
    tensors named by strings, none named ``loss`` (their sum's name); else the UserError naming ``source`` (e.g.
    ``DML.loss``) and what is wrong: a term of another shape or type would fail later inside autograd or the
    epoch's averages, far from the method's code."""
    if not (isinstance(terms, dict) and terms):
        raise UserError(f"{source} returned {'an empty dict' if terms == {} else type(terms).__name__}; it returns "
                        "the named loss terms, a dict such as {'ce': ..., 'kd': ...} of scalar tensors")
    if "loss" in terms:
        raise UserError(f"{source}: a term is named 'loss', the name of their sum in the record; name it otherwise")
    for name, value in terms.items():
        if not isinstance(name, str):
            raise UserError(f"{source}: a term is named {name!r} ({type(name).__name__}); name every term by a string")
        if not (isinstance(value, torch.Tensor) and value.dim() == 0):
            what = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                    else f"a {type(value).__name__}")
            raise UserError(f"{source}: its term {name!r} is {what}; every term is a scalar tensor (reduce it, "
                            "e.g. with .mean())")
        if not value.is_floating_point():
            raise UserError(f"{source}: its term {name!r} has dtype {str(value.dtype).replace('torch.', '')}, "
                            "not a loss; every term is a float tensor computed from the model's outputs")
    return terms


def hook_name(method_cls, hook: str) -> str:
    """``DML.loss in train_dml_x.py``: a method's ``hook`` (or attribute) as a message names it for the user, with
    the script that defines the class (a copied script keeps its class's name); ``DML.loss`` for a class defined
    outside a script (a test, a notebook), which may inherit its parent's script."""
    defined_in = getattr(sys.modules.get(method_cls.__module__), "__file__", None)
    script = method_cls.script if method_cls.script and defined_in == method_cls.script else None
    return f"{method_cls.__name__}.{hook}" + (f" in {Path(script).name}" if script else "")


def _name_from_file(module_name: str) -> Optional[str]:
    """The method name a class defined in module ``module_name`` gets from its file: ``train_<x>.py`` -> x,
    the script being run (``__main__``) -> its file name; None for any other module (a test, a library)."""
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return None
    stem = Path(path).stem
    if stem.startswith("train_"):
        return stem[len("train_"):] or stem          # (train_.py: the method "train_", never an empty name)
    return stem if module_name == "__main__" else None


REPOSITORY = Path(__file__).resolve().parent.parent    # the repository's root: the 12 scripts and the packages


def script_path(method_cls) -> str:
    """The script that defines ``method_cls`` as a command run from the current directory names it, and as a
    run's record holds it: relative to that directory when the script lies under it (``train_dml.py`` in the
    repository's root), else absolute."""
    if not method_cls.script:
        return f"train_{method_cls.name}.py"
    path = Path(method_cls.script).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


class StepContext:
    """What the engine hands to :meth:`Method.train_step`: the optimizers and the run's precision.

    ``optimizers``: name -> optimizer, the names of :meth:`Method.optim_groups`. Nothing here
    synchronises with the host but the fp16 scaler's step of an optimizer that is not fused (``--cuda-graph``
    refuses ``--amp fp16``), so a step written with it can be captured as a CUDA graph."""

    def __init__(self, optimizers: dict, scaler: torch.amp.GradScaler, device_type: str,
                 autocast_dtype: Optional[torch.dtype] = None):
        self.optimizers = optimizers
        self.scaler = scaler
        self.device_type = device_type
        self.autocast_dtype = autocast_dtype

    def autocast(self):
        """Context manager: autocast to the ``--amp`` dtype (bf16/fp16), or nothing with ``--amp off``."""
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _named(self, names) -> list:
        names = names or self.optimizers
        unknown = [n for n in names if n not in self.optimizers]
        if unknown:
            raise KeyError(f"no optimizer named {unknown[0]!r}; the method's optim_groups define "
                           f"{', '.join(self.optimizers)}")
        return [self.optimizers[n] for n in names]

    def zero_grad(self, *names: str) -> None:
        """Set the gradients of the named optimizers' parameters to None (no names: every optimizer)."""
        for opt in self._named(names):
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward(**kwargs)`` (e.g. ``retain_graph``, ``inputs``), through the fp16 loss scaler
        when ``--amp fp16``."""
        self.scaler.scale(loss).backward(**kwargs)

    def step(self, *names: str) -> None:
        """Step the named optimizers (no names: every optimizer); with fp16 a step whose gradients
        overflowed is skipped. The engine calls ``scaler.update()`` once after ``train_step``."""
        for opt in self._named(names):
            self.scaler.step(opt)


class Method:
    """Base class of every method. Subclasses set the class attributes they need and implement ``build``
    and ``loss``."""

    name: str = "method"                # the method's identity: its file name, set by __init_subclass__
    script: Optional[str] = None        # the train_*.py script (or __main__) that defines the method
    recipe: str = "okd"                 # default protocol (recipes.py)
    num_peers: Optional[int] = 2        # default --num-peers; None: a single network, no such flag
    min_peers: int = 1                  # the smallest --num-peers the method can train
    max_peers: Optional[int] = None     # the largest (None: any)
    best_metric: str = "ensemble"       # head whose top-1 selects best.pt
    presets: dict = {}                  # name -> defaults of the method's flags (a published variant); first = default
    state_keys: tuple = ()              # attributes holding modules outside the model (memory banks, discriminators,
                                        # temporal means): moved to the device and checkpointed with the model
    groupable_peers: bool = True        # False when the method reaches into the peers' layers (--grouped-peers)
    mixed_archs: bool = False           # True: independent peers that may differ in architecture (--arch a,b)
    needs_every_class: bool = False     # True: the loss needs training samples of every class (a --subset leaving
                                        # one out is refused)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            raise TypeError(f"{cls.__qualname__} sets `name`: a method's identity is its file name "
                            "(train_<name>.py); remove the line")
        if cls.recipe not in RECIPES:
            raise TypeError(f"{cls.__qualname__}.recipe is {cls.recipe!r}, which recipes.py does not define; one of: "
                            f"{', '.join(sorted(RECIPES))}")
        derived = _name_from_file(cls.__module__)
        if derived is not None:
            cls.name, cls.script = derived, sys.modules[cls.__module__].__file__

    def __init__(self, args: argparse.Namespace, num_classes: int, n_train: int, image_size: int = 32,
                 train_labels: Optional[torch.Tensor] = None):
        self.args = args
        self.num_classes = num_classes
        self.n_train = n_train          # training-set size (memory banks are indexed by sample)
        self.image_size = image_size    # input resolution (picks e.g. the ResNet-18 stem)
        # CPU int64 label of every training sample, in sample-index (Batch.index) order; None when the
        # method is built outside the Trainer. Class-aware negative sampling (MCL-OKD) needs it from step 1.
        self.train_labels = train_labels
        self.model: nn.Module = self.build()

    # ---- to implement -------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        """Add the method's own flags, each with its valid range as its ``type`` (``engine.cli.number``)."""

    @classmethod
    def preset_values(cls, preset: str, arch: str) -> dict:
        """The defaults preset ``preset`` sets for backbone ``arch`` (override where a published variant
        differs per backbone). Default: ``cls.presets[preset]``."""
        return cls.presets[preset]

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Raise engine.UserError for flags that conflict with each other (a single flag's range is its
        ``type``), and fill in the defaults of the method's flags that depend on others (``args.nce_k =
        ...``; ``args.views``: augmented views per sample, default 1). It runs on the parsed namespace
        before the run's configuration is frozen (engine/config.py); ``self.args`` is read-only."""

    @classmethod
    def unused_flags(cls, args: argparse.Namespace) -> dict[str, str]:
        """The method's flags that do nothing under ``args`` (an ablation switch turned their term off), by
        argument name, each with why (``{"lambda_rot": "--no-rot turns the rotation CE off"}``): the engine warns
        for those the command gives. Default: none."""
        return {}

    def build(self) -> nn.Module:
        """Return one nn.Module holding every trainable part (peers, gates, heads, fusion modules), from
        ``self.args``, ``self.num_classes`` and ``self.image_size``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build(), which returns its model")

    def loss(self, model: nn.Module, batch, epoch: int) -> dict[str, torch.Tensor]:
        """Named loss terms of one training batch; the default ``train_step`` back-propagates their sum."""
        raise NotImplementedError(f"{type(self).__name__} does not implement loss() (nor its own train_step)")

    def eval_logits(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head to evaluate, by name. Default: each peer and the mean-logit ensemble (a model
        that returns one tensor, a single network: ``net``)."""
        out = model(images)
        if isinstance(out, torch.Tensor):
            return {"net": out}
        return peer_heads(out.logits)

    # ---- optional -----------------------------------------------------------------------------
    def optim_groups(self) -> list[OptimGroup]:
        """The optimizers. Default: one SGD over every trainable parameter of the model."""
        return [OptimGroup("model", [p for p in self.model.parameters() if p.requires_grad])]

    def train_step(self, model: nn.Module, batch, epoch: int, step: StepContext) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the named terms to log (their sum is logged as ``loss``).
        Default: the terms of ``loss`` under autocast, one backward of their sum, every optimizer.

        ``loss``, ``train_step`` and ``after_step`` may be captured as one CUDA graph (``--cuda-graph``), so
        they never synchronise with the host (no ``.item()``, ``bool(tensor)``, ``.cpu()``), never draw from
        CPU generators, have no data-dependent Python branches or shapes, step optimizers through
        ``step.step`` and back-propagate through ``step.backward`` (the fp16 scaler), and keep state in
        tensors updated in place (docs/engine.md)."""
        with step.autocast():
            terms = checked_terms(self.loss(model, batch, epoch), hook_name(type(self), "loss"))
        if not any(t.requires_grad for t in terms.values()):
            raise UserError(f"{hook_name(type(self), 'loss')}: none of its terms ({', '.join(terms)}) has a gradient "
                            "(each is detached or computed under no_grad), so nothing would train")
        step.zero_grad()
        step.backward(sum(terms.values()))
        step.step()
        return terms

    def after_step(self, model: nn.Module, batch, epoch: int) -> None:
        """Called after the optimizers of every step, under ``torch.no_grad()`` (memory-bank updates and
        the like). Default: nothing."""

    def on_epoch_end(self, epoch: int, evaluator) -> None:
        """Called on every rank after each training epoch, before the epoch's evaluation and checkpoint.
        ``evaluator.predict(split)`` (split "val" or "test") returns ``(logits, labels)``: head name ->
        float32 logits N x C of ``eval_logits`` on the whole split in eval mode, and the N labels, in the
        split's order, gathered over every rank; ``UserError`` if the run has no such split (``--val-split
        0``). Default: nothing."""


def load_method(name: str) -> type[Method]:
    """The Method class of ``train_<name>.py`` (the repository root must be on ``sys.path``)."""
    import importlib
    module = None
    if name.isidentifier():                 # (a path such as ../train_dml names no module)
        try:
            module = importlib.import_module(f"train_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"train_{name}":
                raise
    if module is None:
        raise UserError(f"no train_{name}.py: the methods are the train_<method>.py scripts")
    classes = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, Method) and c is not Method and c.__module__ == module.__name__]
    if len(classes) != 1:
        raise UserError(f"train_{name}.py does not define exactly one Method")
    return classes[0]
