"""The fusion teacher's shared flags and optimizers: one module that FFL, DCCL and CMFF all import.

The three methods train FFL's fusion module (``models/fusion.py``; Kim et al., ICPR 2020,
``Jangho-Kim/FFL-pytorch`` ``our_network.py``) as a teacher distilled into the peers with the FFL code's
``KLLoss`` (``utils.py``: T = 3, target softmax + 1e-7), under the sigmoid ramp-up of ``--consistency_rampup``,
and give it an SGD of its own (``optimizer_FM``, weight decay 1e-5) whose lr is decayed by FFL
(``scheduler_FM.step()``) and left constant by the DCCL and CMFF codes (``nanxiaotong/DCCL`` and
``Coralmss/CMFF`` ``train_*.py``: the step is commented out). These are the flags and the two optimizer
groups that say so; each method script chooses only its default for ``--fusion-decay``.

It lives beside the method scripts rather than in ``models/`` or ``losses/`` because it uses the engine's
value types and ``OptimGroup`` (and those packages never import the engine).
"""
from __future__ import annotations

import argparse

from torch import nn

from engine import OptimGroup, number, ramp_up, temperature, weight_decay


def add_fusion_teacher_arguments(parser, fusion_decay: bool) -> None:
    """``--kd-T``, ``--rampup``, ``--kd-eps`` (the official KL form), ``--fusion-weight-decay`` and
    ``--fusion-decay/--no-fusion-decay``, whose default the method gives: FFL True (the FFL code decays
    the fusion lr), DCCL False (its code does not), CMFF True (its ``official`` preset: False)."""
    parser.add_argument("--kd-T", type=temperature, default=3.0, help="temperature T of every KD term")
    parser.add_argument("--rampup", type=ramp_up, default=80.0, metavar="EPOCHS",
                        help="sigmoid ramp-up length of the KD weight w(e), in epochs (0: weight 1 throughout)")
    parser.add_argument("--kd-eps", type=number(at_least=0, at_most=1e-3, why="added to probabilities, not "
                                                "renormalised; the official value is 1e-7"), default=0.0, metavar="EPS",
                        help="added to the KD target probabilities, not renormalised: 1e-7 is the official "
                             "KLLoss exactly; 0 is the exact KL divergence")
    parser.add_argument("--fusion-weight-decay", type=weight_decay, default=1e-5,
                        help="weight decay of the fusion module's own SGD")
    parser.add_argument("--fusion-decay", action=argparse.BooleanOptionalAction, default=fusion_decay,
                        help="decay the fusion module's lr with the run's schedule (--no-fusion-decay: constant)")


def fusion_optim_groups(model: nn.Module, args) -> list[OptimGroup]:
    """Two SGDs, as the official codes: ``model`` (everything but ``model.fusion``, the run's weight decay)
    and ``fusion`` (weight decay ``--fusion-weight-decay``, lr decayed only with ``--fusion-decay``)."""
    fusion = list(model.fusion.parameters())
    ids = {id(p) for p in fusion}
    return [OptimGroup("model", [p for p in model.parameters() if id(p) not in ids]),
            OptimGroup("fusion", fusion, weight_decay=args.fusion_weight_decay, scheduled=args.fusion_decay)]
