"""N peers built from one backbone, in one of three topologies.

* ``independent``: N full networks (DML paper, KDCL, DCCL, CMFF). ``arch`` may name one architecture
  per peer (``"resnet32,wrn_16_2"`` or a list): heterogeneous peers, as in the DML paper's CIFAR-100
  table (ResNet-32 with MobileNet / WRN-28-10) and KDCL's ResNet-50 + MobileNetV2 pair.
* ``shared``: the stem and ``stages[:split]`` are one shared trunk; each of the N branches runs
  ``stages[split:]`` and its own head (ONE, OKDDip, FFL, PCL, and the MCL-OKD repository's DML
  and MCL-OKD). Trunk + one branch is exactly the single backbone.
* ``tree``: the CL-ILR hierarchy. A trunk (``stages[:split]``) feeds ceil(N/2) groups (one stage
  each); each group feeds up to two branches (the remaining stages and the head). Where a tensor
  feeds several consumers its gradient is divided by their number (ILR, Song & Chai, NeurIPS 2018).

Split points (as winycg/MCL-OKD; docs/backbones.md) are the same rule for every family, counted in stages:
``"dml"`` (DML / MCL-OKD) shares all but the last two stages, ``"one"`` (ONE / OKDDip) all but the
last stage; the CL-ILR tree uses the ``"dml"`` trunk, one group stage, then the last stage.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .base import Backbone, run_stages
from .grouped import GroupedBackbones, NotGroupableError
from .registry import create_model

TOPOLOGIES = ("independent", "shared", "tree")


def arch_names(arch: Union[str, Sequence[str]]) -> list[str]:
    """The names in an ``--arch`` value: ``"resnet32"`` -> ``["resnet32"]``, ``"resnet32,wrn_16_2"`` (or a
    list) -> one name per peer. Blanks around the commas are ignored; an empty entry is a ``ValueError``."""
    names = [n.strip() for n in arch.split(",")] if isinstance(arch, str) else [str(n).strip() for n in arch]
    if not names or not all(names):
        raise ValueError(f"--arch {arch!r} has an empty name; give one name, or one name per peer separated "
                         "by commas (e.g. resnet32,wrn_16_2)")
    return names


def normalize_arch(arch: Union[str, Sequence[str]]) -> str:
    """The canonical ``--arch`` string: one name when every entry is the same (``"resnet32,resnet32"`` is two
    copies of ``resnet32``), else the names joined by commas."""
    names = arch_names(arch)
    return names[0] if len(set(names)) == 1 else ",".join(names)


def peer_archs(arch: Union[str, Sequence[str]], num_peers: int) -> list[str]:
    """One architecture name per peer: a single name is repeated ``num_peers`` times; a list must have
    ``num_peers`` entries (``ValueError`` otherwise)."""
    names = arch_names(arch)
    if len(names) == 1:
        return names * num_peers
    if len(names) != num_peers:
        raise ValueError(f"--arch lists {len(names)} architectures for {num_peers} peers; give one name per peer")
    return names


def arch_tag(arch: Union[str, Sequence[str]]) -> str:
    """A short file-name form of an ``--arch`` value: runs of one name as ``NAMExK``, joined by ``+``
    (``"resnet32,resnet32,wrn_16_2"`` -> ``"resnet32x2+wrn_16_2"``). Distinct lists give distinct tags."""
    names, parts = arch_names(arch), []
    for name in names:
        if parts and parts[-1][0] == name:
            parts[-1][1] += 1
        else:
            parts.append([name, 1])
    return "+".join(name if k == 1 else f"{name}x{k}" for name, k in parts)


class PeerOutput(NamedTuple):
    logits: list[torch.Tensor]                        # one B x C tensor per peer
    features: Optional[list[torch.Tensor]]            # pooled feature of each peer (B x feature_dim)
    stages: Optional[list[list[torch.Tensor]]]        # per peer, the map after every stage (shared ones repeated)
    trunk: Optional[torch.Tensor]                     # output of the shared trunk (None for independent peers;
                                                      # a list, one per view, when the input was views)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient by ``divisor`` (CL-ILR backprop rescaling)."""

    @staticmethod
    def forward(ctx, x, divisor):
        ctx.divisor = divisor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.divisor, None


def ilr(x: torch.Tensor, consumers: int) -> torch.Tensor:
    """Share ``x`` among ``consumers`` sub-networks with the gradient rescaled by 1/consumers."""
    return _ScaleGrad.apply(x, float(consumers)) if consumers > 1 else x


class Trunk(nn.Module):
    """The stem and the first stages of a backbone, without a head."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module]):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)

    def forward(self, x, return_stages: bool = False):
        return run_stages(self.stem(x), self.stages, return_stages)


def resolve_split(backbone: Backbone, split: Union[int, str]) -> int:
    """Number of stages in the shared trunk: an int, ``"dml"`` (all but two) or ``"one"`` (all but one)."""
    n = backbone.num_stages
    if split == "dml":
        return n - 2
    if split == "one":
        return n - 1
    if isinstance(split, int) and 0 <= split <= n:
        return split
    raise ValueError(f"split must be 'dml', 'one' or a stage index 0..{n}; got {split!r}")


def _branch(backbone: Backbone, start: int) -> Backbone:
    """``stages[start:]`` and the head of ``backbone`` as a Backbone with an identity stem."""
    return Backbone(nn.Identity(), list(backbone.stages)[start:], backbone.head, backbone.stage_widths[start:])


class Peers(nn.Module):
    """N peers from backbone ``arch`` (one name, or one per peer for ``independent`` peers).
    ``forward(x)`` returns a :class:`PeerOutput`; ``archs[i]`` is the architecture of peer i + 1."""

    def __init__(self, arch: Union[str, Sequence[str]], num_classes: int, num_peers: int,
                 topology: str = "independent", split: Union[int, str, None] = None, **model_kwargs):
        super().__init__()
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}; got {topology!r}")
        if num_peers < 1 or (topology == "tree" and num_peers < 2):
            raise ValueError(f"{topology} topology needs at least {2 if topology == 'tree' else 1} peers")
        self.archs = peer_archs(arch, num_peers)
        if topology != "independent" and len(set(self.archs)) > 1:
            raise ValueError(f"the {topology} topology shares a trunk, so its peers have one architecture; "
                             f"got {','.join(self.archs)}")
        # One freshly initialised backbone per peer, so every part keeps its family's own init.
        nets = [create_model(name, num_classes=num_classes, **model_kwargs) for name in self.archs]
        self.arch, self.topology, self.num_peers = normalize_arch(self.archs), topology, num_peers
        self.stage_widths = list(nets[0].stage_widths)     # of peer 1 (every peer's with one architecture)
        self.feature_dim = nets[0].feature_dim
        self.feature_dims = [net.feature_dim for net in nets]
        self.trunk: Optional[Trunk] = None
        self.groups = nn.ModuleList()
        self.group_of: list[int] = []
        if topology == "independent":
            self.split = 0
            self.branches = nn.ModuleList(nets)
            return
        k = resolve_split(nets[0], "dml" if split is None and topology == "tree"
                          else "one" if split is None else split)
        if topology == "tree" and k >= nets[0].num_stages - 1:
            raise ValueError("the CL-ILR tree needs at least two stages after the trunk (one group, one branch)")
        self.split = k
        self.trunk = Trunk(nets[0].stem, list(nets[0].stages)[:k])
        if topology == "shared":
            self.branches = nn.ModuleList(_branch(net, k) for net in nets)
            return
        # tree: branches 2g and 2g+1 hang from group g; group g takes stage k from its first branch's net.
        self.group_of = [i // 2 for i in range(num_peers)]
        self.groups = nn.ModuleList(nets[2 * g].stages[k] for g in range((num_peers + 1) // 2))
        self.branches = nn.ModuleList(_branch(net, k + 1) for net in nets)

    @property
    def trunk_width(self) -> int:
        """Channels of the trunk output (the input of the branches, or of the groups)."""
        if self.split < 1:
            raise ValueError("this topology has no trunk stage")
        return self.stage_widths[self.split - 1]

    def branch_consumers(self, group: int) -> int:
        return self.group_of.count(group)

    @property
    def mixed(self) -> bool:
        """True when the peers have different architectures."""
        return len(set(self.archs)) > 1

    @property
    def grouped(self) -> bool:
        return isinstance(self.branches, GroupedBackbones)

    def group_branches(self) -> "Peers":
        """Hold and run the N branches as one grouped network (``models/grouped.py``): the same outputs,
        gradients and SGD steps, with the kernel launches of one branch. Raises ``NotGroupableError`` for
        families whose blocks are not channel-local (DenseNet, HCGNet). Call before building optimizers:
        the branches' parameters are replaced by the grouped ones."""
        if self.mixed:
            raise NotGroupableError(f"the peers have different architectures ({', '.join(self.archs)}); "
                                    "grouping needs one")
        if not self.grouped:
            self.branches = GroupedBackbones(list(self.branches))
        return self

    def forward(self, x: Union[torch.Tensor, Sequence[torch.Tensor]], return_features: bool = False,
                return_stages: bool = False) -> PeerOutput:
        """``x``: one batch for every peer, or a list of ``num_peers`` batches (augmented views), one per peer.
        With views a shared trunk runs once per view and branch i takes view i's trunk output (then
        ``PeerOutput.trunk`` is the list of those); the CL-ILR tree takes one batch only."""
        n = self.num_peers
        views = isinstance(x, (list, tuple))
        if views and len(x) != n:
            raise ValueError(f"{len(x)} views for {n} peers: give one batch, or one view per peer")
        if views and self.topology == "tree":
            raise ValueError("the CL-ILR tree's groups are shared by two branches: give one batch, not views")
        inputs = list(x) if views else [x] * n
        trunk_out, trunk_maps = None, [[] for _ in range(n)]
        group_maps: list[list[torch.Tensor]] = [[] for _ in range(n)]
        if self.trunk is not None:
            if views:
                runs = [self.trunk(v, return_stages) for v in x]
                trunk_out, trunk_maps = [r[0] for r in runs], [r[1] for r in runs]
                inputs = list(trunk_out)
            else:
                trunk_out, maps = self.trunk(x, return_stages)
                trunk_maps = [maps] * n
            if self.topology == "shared" and not views:
                inputs = [trunk_out] * n
            elif self.topology == "tree":
                shared = ilr(trunk_out, len(self.groups))
                group_out = [ilr(group(shared), self.branch_consumers(g)) for g, group in enumerate(self.groups)]
                inputs = [group_out[g] for g in self.group_of]
                if return_stages:
                    group_maps = [[group_out[g]] for g in self.group_of]
        if self.grouped:
            outs = self.branches(inputs, return_stages)
        else:
            outs = [branch(inputs[i], return_features=True, return_stages=return_stages)
                    for i, branch in enumerate(self.branches)]
        logits, features, stages = [], [], []
        for i, out in enumerate(outs):
            logits.append(out.logits)
            features.append(out.features)
            if return_stages:
                stages.append(trunk_maps[i] + group_maps[i] + out.stages)
        return PeerOutput(logits, features if return_features else None,
                          stages if return_stages else None, trunk_out)

    def single_network(self, peer: int = 0) -> Backbone:
        """Peer ``peer`` as a stand-alone :class:`Backbone` sharing these weights (trunk + group + branch);
        with grouped branches the branch part is a copy."""
        branch = self.branches.network(peer) if self.grouped else self.branches[peer]
        if self.trunk is None:
            return branch
        stages = list(self.trunk.stages)
        if self.topology == "tree":
            stages.append(self.groups[self.group_of[peer]])
        stages += list(branch.stages)
        return Backbone(self.trunk.stem, stages, branch.head, self.stage_widths)

