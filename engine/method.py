"""The contract between a method script and the engine.

A method says how to build its modules, the loss of one batch as named terms, and which logits to
evaluate. Everything else (data, loop, precision, devices, checkpoints, logging) is the engine's.

    class DML(Method):
        name = "dml"
        def build(self, args, num_classes):
            return Peers(args.arch, num_classes, args.num_peers)
        def loss(self, model, batch, epoch):
            out = model(batch.images)
            return {"ce": ..., "kd": ...}

``model`` is ``self.model``, possibly wrapped (DDP), so a method always calls it rather than
``self.model`` in ``loss`` and ``eval_logits``.

**``name`` is the method's identity**: the default run directory ``runs/<name>-<arch>-...``, the ``method``
of its checkpoints and results, and the script a checkpoint must be resumed or evaluated with
(``train_<name>.py``). Left unset, it is the file name of the script that defines the class, without
``train_`` (``train_dml.py`` -> ``dml``; a class defined in the script being run, ``python my_idea.py``,
-> ``my_idea``); a subclass defined elsewhere (a test, a helper module) keeps its parent's. So a copy of
``train_dml.py`` saved as ``train_dml_mykd.py`` is a new method, ``dml_mykd``: its runs and checkpoints
never mix with DML's. Set ``name`` in the class only to say that a script trains the same method as
another one (its checkpoints are interchangeable with that method's); leave it unset when you copy a
script to try an idea.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn


@dataclass
class OptimGroup:
    """Parameters trained by one SGD optimizer. ``lr``/``weight_decay`` of None take the run's values;
    ``scheduled=False`` keeps the lr constant instead of following the run's schedule."""
    name: str
    params: list
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    scheduled: bool = True
    extra: dict = field(default_factory=dict)


def peer_heads(logits: list[torch.Tensor], ensemble: bool = True) -> dict[str, torch.Tensor]:
    """``{"peer1": z_1, ..., "peerN": z_N, "ensemble": mean_i z_i}``: the usual heads to evaluate."""
    heads = {f"peer{i + 1}": z for i, z in enumerate(logits)}
    if ensemble and len(logits) > 1:
        heads["ensemble"] = torch.stack(logits).mean(0)
    return heads


def script_method_name(module_name: str) -> Optional[str]:
    """The method name a class defined in module ``module_name`` gets from its file: ``train_<x>.py`` -> x,
    the script being run (``__main__``) -> its file name; None for any other module (a test, a library)."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path:
        return None
    stem = Path(path).stem
    if stem.startswith("train_"):
        return stem[len("train_"):]
    return stem if module_name == "__main__" else None


class Method:
    """Base class of every method. Subclasses set the class attributes and implement ``build`` and ``loss``."""

    name: str = "method"                # the method's identity; unset in a subclass: see the module docstring
    script: Optional[str] = None        # the file of the train_*.py script (or __main__) that defines the method
    recipe: str = "okd"                 # default protocol (engine.cli.RECIPES)
    num_peers: Optional[int] = 2        # default --num-peers; None: a single network, no such flag
    min_peers: int = 1
    best_metric: str = "ensemble"       # head whose top-1 selects best.pt
    views: int = 1                      # augmented views per sample the loader should deliver
    find_unused_parameters: bool = False
    presets: dict = {}                  # name -> defaults of the method's flags (a published variant); first = default
    state_keys: tuple = ()             # attributes (nn.Modules outside the model, e.g. memory banks) checkpointed too
    groupable_peers: bool = True        # False when the method reaches into the peers' layers (--grouped-peers)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        derived = script_method_name(cls.__module__)
        if derived is not None:
            cls.script = sys.modules[cls.__module__].__file__
            if "name" not in cls.__dict__:
                cls.name = derived

    def __init__(self, args: argparse.Namespace, num_classes: int, n_train: int, image_size: int = 32,
                 train_labels: Optional[torch.Tensor] = None):
        self.args = args
        self.num_classes = num_classes
        self.n_train = n_train          # training-set size (memory banks are indexed by sample)
        self.image_size = image_size    # input resolution (picks e.g. the ResNet-18 stem)
        # CPU int64 label of every training sample, in sample-index (Batch.index) order; None when the
        # method is built outside the Trainer. Class-aware negative sampling (MCL-OKD) needs it from step 1.
        self.train_labels = train_labels
        self.model: nn.Module = self.build(args, num_classes)

    # ---- to implement -------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        """Add the method's own flags."""

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or cls.name).strip()

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Raise engine.UserError for flags that conflict (beyond what argparse checks)."""

    def build(self, args: argparse.Namespace, num_classes: int) -> nn.Module:
        """Return one nn.Module holding every trainable part (peers, gates, heads, fusion modules)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, epoch: int) -> dict[str, torch.Tensor]:
        """Named loss terms of one training batch; the engine back-propagates their sum."""
        raise NotImplementedError

    def eval_logits(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head to evaluate, by name. Default: each peer and the mean-logit ensemble."""
        out = model(images)
        if isinstance(out, torch.Tensor):
            return {"net": out}
        return peer_heads(out.logits)

    # ---- optional -----------------------------------------------------------------------------
    def optim_groups(self) -> list[OptimGroup]:
        """The optimizers. Default: one SGD over every trainable parameter of the model."""
        return [OptimGroup("model", [p for p in self.model.parameters() if p.requires_grad])]

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (ramp-ups and the like)."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Stateful modules outside the model (not trained by back-propagation, e.g. memory banks)."""
        return {key: getattr(self, key) for key in self.state_keys}

    def to(self, device: torch.device, memory_format=None) -> "Method":
        self.model.to(device)
        if memory_format is not None:
            self.model.to(memory_format=memory_format)
        for module in self.extra_modules().values():
            module.to(device)
        return self

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict()}
        state.update({key: module.state_dict() for key, module in self.extra_modules().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for key, module in self.extra_modules().items():
            module.load_state_dict(state[key])

