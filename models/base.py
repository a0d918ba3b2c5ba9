"""The one shape every backbone has: stem -> ordered stages -> head (pool + classifier).

Nothing outside ``models/`` needs to know which family a backbone is. Peer topologies
(``models/peers.py``) cut a backbone between two stages, so a family only has to build
its stem, its list of stages and its head.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn


class BackboneOutput(NamedTuple):
    logits: torch.Tensor
    features: Optional[torch.Tensor]          # pooled feature fed to the classifier (B x feature_dim)
    stages: Optional[list[torch.Tensor]]      # output map of every stage, in order


def run_stages(x: torch.Tensor, stages, keep: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Apply ``stages`` in order; the list holds every stage's output when ``keep``, else nothing."""
    maps = []
    for stage in stages:
        x = stage(x)
        if keep:
            maps.append(x)
    return x, maps


class Head(nn.Module):
    """``norm`` (identity, or BN+ReLU for pre-activation nets) -> global average pool -> [dropout] -> linear."""

    def __init__(self, in_features: int, num_classes: int, norm: Optional[nn.Module] = None, dropout: float = 0.0):
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, pooled feature before dropout)."""
        feature = torch.flatten(self.pool(self.norm(x)), 1)
        return self.fc(self.dropout(feature)), feature

    def classify(self, normed: torch.Tensor) -> torch.Tensor:
        """The logits of a map already through ``norm`` (the map a fusion teacher reads too): pool, dropout,
        linear, as :meth:`forward` computes them."""
        return self.fc(self.dropout(torch.flatten(self.pool(normed), 1)))


class Backbone(nn.Module):
    """A classification network as ``stem``, ``stages`` (an ``nn.ModuleList``) and ``head``.

    ``stage_widths[i]`` is the channel count after ``stages[i]``; ``feature_dim`` the width of
    the pooled feature the classifier sees. ``forward(x)`` returns logits; with
    ``return_features`` / ``return_stages`` it returns a :class:`BackboneOutput` from the same
    single pass.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], head: Head,
                 stage_widths: Sequence[int]):
        super().__init__()
        if len(stages) != len(stage_widths):
            raise ValueError("one width per stage")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.stage_widths = list(stage_widths)

    @property
    def feature_dim(self) -> int:
        return self.head.fc.in_features

    @property
    def num_classes(self) -> int:
        return self.head.fc.out_features

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor, return_features: bool = False, return_stages: bool = False):
        x, maps = run_stages(self.stem(x), self.stages, return_stages)
        logits, feature = self.head(x)
        if not (return_features or return_stages):
            return logits
        return BackboneOutput(logits, feature if return_features else None, maps if return_stages else None)


def init_weights(model: nn.Module, conv_mode: str = "fan_out", conv_bias_zero: bool = False,
                 linear_std: Optional[float] = None, linear_bias_zero: bool = False) -> nn.Module:
    """The families' initialisation in one place: conv ``kaiming_normal_`` (``conv_mode`` fan_out with the
    ReLU gain, or fan_in as torch's default), BatchNorm weight 1 / bias 0; optionally conv biases 0, Linear
    weights N(0, ``linear_std``) and Linear biases 0 (otherwise Linear keeps the PyTorch default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if conv_mode == "fan_out":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.kaiming_normal_(m.weight)
            if conv_bias_zero and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            if linear_bias_zero:
                nn.init.zeros_(m.bias)
    return model


def count_parameters(module: nn.Module) -> int:
    """All parameters, trainable or not (buffers such as memory banks excluded), as the official counter."""
    return sum(p.numel() for p in module.parameters())
