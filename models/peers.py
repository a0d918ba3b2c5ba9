"""N peers built from one backbone, in one of three topologies.

* ``independent``: N full copies of the backbone (DML paper, KDCL, DCCL, CMFF).
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

from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from .base import Backbone, run_stages
from .grouped import GroupedBackbones
from .registry import create_model

TOPOLOGIES = ("independent", "shared", "tree")


class PeerOutput(NamedTuple):
    logits: list[torch.Tensor]                        # one B x C tensor per peer
    features: Optional[list[torch.Tensor]]            # pooled feature of each peer (B x feature_dim)
    stages: Optional[list[list[torch.Tensor]]]        # per peer, the map after every stage (shared ones repeated)
    trunk: Optional[torch.Tensor]                     # output of the shared trunk (None for independent peers)


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
    """N peers from backbone ``arch``. ``forward(x)`` returns a :class:`PeerOutput`."""

    def __init__(self, arch: str, num_classes: int, num_peers: int, topology: str = "independent",
                 split: Union[int, str, None] = None, **model_kwargs):
        super().__init__()
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}; got {topology!r}")
        if num_peers < 1 or (topology == "tree" and num_peers < 2):
            raise ValueError(f"{topology} topology needs at least {2 if topology == 'tree' else 1} peers")
        # One freshly initialised backbone per peer, so every part keeps its family's own init.
        nets = [create_model(arch, num_classes=num_classes, **model_kwargs) for _ in range(num_peers)]
        self.arch, self.topology, self.num_peers = arch, topology, num_peers
        self.stage_widths = list(nets[0].stage_widths)
        self.feature_dim = nets[0].feature_dim
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
    def grouped(self) -> bool:
        return isinstance(self.branches, GroupedBackbones)

    def group_branches(self) -> "Peers":
        """Hold and run the N branches as one grouped network (``models/grouped.py``): the same outputs,
        gradients and SGD steps, with the kernel launches of one branch. Raises ``NotGroupableError`` for
        families whose blocks are not channel-local (DenseNet, HCGNet). Call before building optimizers:
        the branches' parameters are replaced by the grouped ones."""
        if not self.grouped:
            self.branches = GroupedBackbones(list(self.branches))
        return self

    def forward(self, x: torch.Tensor, return_features: bool = False, return_stages: bool = False) -> PeerOutput:
        trunk_out, trunk_maps = (None, [])
        inputs = [x] * self.num_peers
        group_maps: list[list[torch.Tensor]] = [[] for _ in range(self.num_peers)]
        if self.trunk is not None:
            trunk_out, trunk_maps = self.trunk(x, return_stages)
            if self.topology == "shared":
                inputs = [trunk_out] * self.num_peers
            else:
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
                stages.append(trunk_maps + group_maps[i] + out.stages)
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

