#!/usr/bin/env python
"""Parameters and multiply-adds of every registered backbone, of its N-peer topologies, and of a method's model.

Usage::

    python scripts/model_table.py                                  # every backbone, N = 2 and 4
    python scripts/model_table.py --arch resnet32 vgg16 --peers 4
    python scripts/model_table.py --arch wrn_16_2 --method cmff    # with CMFF's fusion teacher and SSL heads
    python scripts/model_table.py --arch resnet32,wrn_16_2         # a heterogeneous pair (independent peers)

Each backbone is counted at the input size of the runs that use it: 32x32 with 100 classes (CIFAR) for
every net, ResNet-18/34 with the small-image stem that the CIFAR, Fashion-MNIST and TinyImageNet runs use,
and ResNet-18/34 also at 224x224 with 1000 classes and the ImageNet stem. MACs come from
``models.complexity.count_macs`` (``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2) on models built
on the ``meta`` device, so nothing is allocated or computed.

Each backbone is built and counted once, part by part (stem, each stage, head); the peer topologies are
sums of those parts, as ``models.peers.Peers`` assembles them: ``independent`` (N full networks),
``shared`` at the ``dml`` split (DML / MCL-OKD) and at the ``one`` split (ONE / OKDDip), and the CL-ILR
``tree`` (trunk at the ``dml`` split, ceil(N/2) one-stage groups, N branches). ``--method NAME`` builds
``train_NAME.py``'s whole model with its default flags (gates, attention, fusion teacher, SSL and
embedding heads) and counts its parameters and the multiply-adds of one evaluation forward (every head).
A comma list (``resnet32,wrn_16_2``) is one heterogeneous set of independent peers: one row, the sum of
its members, each of which gets its backbone row.
"""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

if __name__ == "__main__":     # run as a file: the repository's packages are one folder up (imported: already found)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.cli import MAX_PEERS, HelpFormatter, Parser, number, run_tool  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models import UnknownModelError, create_model, list_models, model_entry  # noqa: E402
from models.complexity import count_macs, count_parameters  # noqa: E402
from models.peers import arch_names, resolve_split  # noqa: E402

HEADER = """\
Parameters: every parameter (trainable or not; BN affine included, buffers such as BN running stats and
memory banks excluded), as the official cal_param_size (winycg/MCL-OKD, utils.py).
MACs: multiply-adds of one forward pass per sample = torch.utils.flop_counter.FlopCounterMode FLOPs / 2.
FlopCounterMode counts convolutions and matrix products (Linear/addmm, mm, bmm) at 2 FLOPs per
multiply-add; BatchNorm, activations, pooling, softmax, element-wise gates, additions and biases are NOT
counted. That equals the official cal_multi_adds rule (Conv2d + Linear weights; winycg/MCL-OKD, utils.py)
except for dilated convs, which are counted at their true output size here (hcgnet_a1: 154,269,036 here,
154,671,444 by the official counter), and for explicit matrix products (attention), which it skips.
Input: 32x32 with 100 classes (CIFAR; ResNet-18/34 with the small-image stem) and 224x224 with 1000
classes (ImageNet ResNet-18/34), in the columns "input" and "classes"."""

# (label, topology, split) for the peer table; the tree's trunk is the 'dml' split.
TOPOLOGY_ROWS = (("independent", "independent", None), ("shared dml", "shared", "dml"),
                 ("shared one", "shared", "one"), ("tree (CL-ILR)", "tree", None))
CIFAR = (32, 100)
IMAGENET = (224, 1000)


def setups(name: str) -> list[tuple[int, int]]:
    """(input size, classes) a backbone is tabulated at: 32x32/100 for every net; the nets registered at
    224 (ResNet-18/34) also at 224x224/1000."""
    return [CIFAR, IMAGENET] if model_entry(name).image_size >= 128 else [CIFAR]


class Parts(NamedTuple):
    """Parameters and MACs of one backbone's parts, in order: stem, stage 1 .. stage S, head."""
    name: str
    size: int
    classes: int
    params: tuple[int, ...]
    macs: tuple[int, ...]

    def total(self, field: str, start: int = 0, stop: Optional[int] = None) -> int:
        return sum(getattr(self, field)[start:stop])


@functools.lru_cache(maxsize=None)
def backbone_parts(name: str, size: int, classes: int) -> Parts:
    """Build ``name`` once on the meta device and count each part at the shape it receives."""
    with torch.device("meta"):
        net = create_model(name, num_classes=classes, image_size=size)
    x = torch.zeros(1, 3, size, size, device="meta")
    params, macs = [], []
    with torch.no_grad():
        net.eval()
        for part in (net.stem, *net.stages, net.head):
            params.append(count_parameters(part))
            macs.append(count_macs(part, tuple(x.shape)))
            x = part(x)
    return Parts(name, size, classes, tuple(params), tuple(macs))


def topology_counts(p: Parts, num_peers: int, topology: str, split: Optional[str]) -> Optional[dict]:
    """Parameters and MACs of ``Peers(name, classes, num_peers, topology, split)`` from the parts; None where
    Peers refuses the combination (a tree needs two stages after its trunk)."""
    stages = len(p.params) - 2
    if topology == "independent":
        return {"trunk": "-", **{f: num_peers * p.total(f) for f in ("params", "macs")}}
    k = resolve_split(_Stages(stages), "dml" if topology == "tree" else split)
    if topology == "tree" and (num_peers < 2 or k >= stages - 1):
        return None
    # part indices: 0 = stem, 1..S = stages, S+1 = head; the trunk is the stem and the first k stages
    if topology == "shared":
        return {"trunk": str(k),
                **{f: p.total(f, 0, k + 1) + num_peers * p.total(f, k + 1) for f in ("params", "macs")}}
    groups = math.ceil(num_peers / 2)
    return {"trunk": str(k), **{f: p.total(f, 0, k + 1) + groups * p.total(f, k + 1, k + 2)
                                   + num_peers * p.total(f, k + 2) for f in ("params", "macs")}}


class _Stages:
    """What resolve_split reads of a backbone: its number of stages."""

    def __init__(self, num_stages: int):
        self.num_stages = num_stages


class _EvalForward(nn.Module):
    """A method's evaluation forward (every head) as one module, for count_macs."""

    def __init__(self, method):
        super().__init__()
        self.model, self.method = method.model, method

    def forward(self, x):
        return self.method.eval_logits(self.model, x)


def method_counts(method_cls, name: str, size: int, classes: int) -> dict:
    """The whole model of ``method_cls`` with its default flags for backbone ``name`` (on the meta device), for a
    training set of 50,000 images in ``classes`` equal classes (MCL-OKD samples its negatives by class)."""
    from engine import parse_args
    args = parse_args(method_cls, ["--arch", name, "--gpu", "-1"])
    method_cls.check_args(args)
    labels = torch.arange(50_000) % classes
    with torch.device("meta"):
        method = method_cls(args, classes, n_train=len(labels), image_size=size, train_labels=labels)
    return {"params": count_parameters(method.model), "macs": count_macs(_EvalForward(method), size)}


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = Parser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--arch", nargs="+", default=None, metavar="NAME",
                        help="backbones to tabulate (default: every registered one)")
    parser.add_argument("--peers", nargs="+", default=[2, 4], metavar="N",
                        type=number(int, at_least=1, at_most=MAX_PEERS, why="the training scripts' --num-peers range"),
                        help="peer counts for the topology table")
    parser.add_argument("--method", default=None, metavar="NAME",
                        help="also count train_NAME.py's whole model (default flags) on each backbone (NAME: dml, or "
                             "the script, train_dml.py)")
    args = parser.parse_args(argv)
    entries = list(dict.fromkeys(args.arch or list_models()))     # (a name given twice is one row)
    args.peers = list(dict.fromkeys(args.peers))
    mixed = [e for e in entries if len(arch_names(e)) > 1]
    names = list(dict.fromkeys(n for e in entries for n in arch_names(e)))
    for name in names:
        try:
            model_entry(name)
        except UnknownModelError as err:
            parser.error(str(err))
    method_cls, pairs = None, {}
    if args.method:         # the script's name as the method's: train_dml, train_dml.py, ./train_dml.py -> dml
        args.method = Path(args.method).name.removesuffix(".py").removeprefix("train_")
        from engine import UserError
        from engine.method import load_method
        try:
            method_cls = load_method(args.method)
            for entry in mixed if method_cls.mixed_archs else []:   # (before any output: a pair it refuses, one line)
                pairs[entry] = method_counts(method_cls, entry, *CIFAR)
        except UserError as err:
            parser.error(str(err))

    print(HEADER)
    print()
    print("## Backbones")
    print()
    singles = [backbone_parts(name, *setup) for name in names for setup in setups(name)]
    print(markdown(["backbone", "input", "classes", "params", "MACs"],
                   [[s.name, f"{s.size}x{s.size}", str(s.classes), f"{s.total('params'):,}", f"{s.total('macs'):,}"]
                    for s in singles]))
    print()
    print("## Peer topologies (whole N-peer model)")
    print()
    print("trunk = stages in the shared trunk (the stem is always in it); the tree adds one group stage per")
    print("pair of branches after its trunk. 'x single' = total / the single backbone of the row above.")
    print()
    rows = []
    for s in singles:
        for n in args.peers:
            for label, topology, split in TOPOLOGY_ROWS:
                c = topology_counts(s, n, topology, split)
                if c is not None:
                    rows.append([s.name, f"{s.size}x{s.size}", str(s.classes), str(n), label, c["trunk"],
                                 f"{c['params']:,}", f"{c['macs']:,}", f"{c['params'] / s.total('params'):.2f}",
                                 f"{c['macs'] / s.total('macs'):.2f}"])
    for entry in mixed:   # heterogeneous independent peers: the sum of the members at their common CIFAR size
        members = [backbone_parts(n, *CIFAR) for n in arch_names(entry)]
        rows.append([entry, f"{CIFAR[0]}x{CIFAR[0]}", str(CIFAR[1]), str(len(members)), "independent", "-",
                     f"{sum(m.total('params') for m in members):,}", f"{sum(m.total('macs') for m in members):,}",
                     "-", "-"])      # (no single backbone to divide by)
    print(markdown(["backbone", "input", "classes", "N", "topology", "trunk stages", "params", "MACs",
                    "params x single", "MACs x single"], rows))
    if method_cls is not None:
        print()
        print(f"## train_{args.method}.py with its default flags (every trained module; MACs of one evaluation "
              "forward, every head)")
        print()
        rows = []
        for s in singles:
            c = method_counts(method_cls, s.name, s.size, s.classes)
            rows.append([s.name, f"{s.size}x{s.size}", str(s.classes), f"{c['params']:,}", f"{c['macs']:,}",
                         f"{c['params'] / s.total('params'):.2f}", f"{c['macs'] / s.total('macs'):.2f}"])
        for entry, c in pairs.items():     # the pair itself, where the method takes one
            rows.append([entry, f"{CIFAR[0]}x{CIFAR[0]}", str(CIFAR[1]), f"{c['params']:,}", f"{c['macs']:,}",
                         "-", "-"])
        if mixed and not method_cls.mixed_archs:
            print(f"(train_{args.method}.py trains peers of one backbone: {', '.join(mixed)} counted per member)")
            print()
        print(markdown(["backbone", "input", "classes", "params", "MACs", "params x single", "MACs x single"],
                       rows))
    return 0


if __name__ == "__main__":
    run_tool(main)
