"""Model complexity: parameters and multiply-adds (MACs).

``count_parameters`` (re-exported from :mod:`models.base`) counts every parameter, trainable or not,
buffers excluded, as the official ``cal_param_size`` (winycg/MCL-OKD ``utils.py``; docs/backbones.md).

``count_macs`` runs one forward pass under :class:`torch.utils.flop_counter.FlopCounterMode` and
returns its FLOP total / 2. What that counts (torch 2.x):

* ``aten.convolution`` : 2 x Cout x (Cin / groups) x kh x kw x Hout x Wout per sample, with the
  **real** output size (dilation included), conv bias not counted;
* ``aten.addmm`` / ``mm`` / ``bmm`` / ``baddbmm`` / ``matmul`` (``nn.Linear`` and explicit matrix products):
  2 x M x N x K, the Linear bias not counted;
* batch norm, activations, pooling, softmax, element-wise products and sums, concatenation: **not**
  counted.

For the backbones of this repository (whose only matrix products are ``nn.Linear``) that is exactly the
official ``cal_multi_adds`` rule (Conv2d + Linear weight multiply-adds, winycg/MCL-OKD ``utils.py``), except that
the official counter ignores dilation: for ``hcgnet_a1`` it reports 154,671,444 where ``count_macs``
gives the true 154,269,036 (0.26% less). A model that multiplies matrices explicitly (attention, ``bmm``)
would have those products counted here and not by the official counter.

The count is per sample and does not depend on the weights, so a model built on the ``meta`` device
(``with torch.device('meta'): model = create_model(...)``) is counted without allocating or
computing anything; ``scripts/model_table.py`` does that.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .base import count_parameters

__all__ = ["count_parameters", "count_macs", "count_flops"]

InputSize = Union[int, Sequence[int]]


def _input_shape(input_size: InputSize) -> tuple[int, ...]:
    """``int`` -> (1, 3, s, s); (H, W) -> (1, 3, H, W); (C, H, W) -> (1, C, H, W); (B, C, H, W) as is."""
    if isinstance(input_size, int):
        return (1, 3, input_size, input_size)
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 2:
        return (1, 3) + shape
    if len(shape) == 3:
        return (1,) + shape
    if len(shape) == 4:
        return shape
    raise ValueError(f"input_size must be an int, (H, W), (C, H, W) or (B, C, H, W); got {input_size!r}")


def count_flops(model: nn.Module, input_size: InputSize) -> int:
    """FLOPs of one forward pass **per sample** as FlopCounterMode counts them (2 per multiply-add).

    The model runs in eval mode under ``no_grad`` (its training flags are restored afterwards) on the
    device and dtype of its first parameter (``meta`` works), with a zero input of ``input_size``.
    """
    shape = _input_shape(input_size)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for m, training in modes.items():
            m.training = training
    total = counter.get_total_flops()
    return total // shape[0]


def count_macs(model: nn.Module, input_size: InputSize) -> int:
    """Multiply-adds of one forward pass per sample: FlopCounterMode's FLOPs / 2 (see the module doc)."""
    return count_flops(model, input_size) // 2
