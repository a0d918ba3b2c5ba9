"""Temporal means (exponential moving averages) of a module's weights, on ``torch.optim.swa_utils.AveragedModel``.

A method that keeps "a temporal mean of module X with decay d(step)" (the peer mean teacher of PCL:
Wu & Gong, "Peer Collaborative Learning for Online Knowledge Distillation", AAAI 2021, Sec. 3; the
re-implementation shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation,
src/utils/ema.py and src/trainer.py) stores one as an attribute named in ``state_keys``:

    class PCL(Method):
        state_keys = ("mean_teacher",)
        def build(self):
            model = Peers(...)
            self.mean_teacher = TemporalMean(model, lambda n: min(1 - 1 / (n + 1), 0.999))
            return model

The engine then updates it after every training step (after ``after_step``, under ``no_grad``),
checkpoints it with the method's other state (the weights and the update counter, so a resumed run
continues the schedule exactly), moves it to the device, and gives every rank rank 0's buffers before
each evaluation. ``self.mean_teacher(images)`` runs the averaged copy; return its logits from
``eval_logits`` to evaluate it as a head.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

BUFFER_MODES = ("own", "copy", "average")


class _OwnBuffers:
    """The source module as AveragedModel sees it in "own" mode: the live parameters, and the mean's own
    buffers in place of the live ones (AveragedModel then copies each of them onto itself: nothing)."""

    def __init__(self, source: nn.Module, mean: nn.Module):
        self.source, self.mean = source, mean

    def parameters(self):
        return self.source.parameters()

    def buffers(self):
        return self.mean.buffers()


class TemporalMean(AveragedModel):
    """An averaged copy of ``module`` (a deep copy taken now; its parameters get no gradients).

    **Step counter.** ``steps`` (AveragedModel's ``n_averaged`` buffer, so it is checkpointed) is the number
    of updates done so far. Update number ``n`` (0-based, ``n = steps`` before it) sets, for every
    parameter, ``mean <- d(n) * mean + (1 - d(n)) * live``, as ``torch.lerp(mean, live, 1 - d(n))``,
    except that update 0 copies the live weights (AveragedModel's rule, i.e. d(0) is taken as 0; the
    mean-teacher schedule ``min(1 - 1/(n + 1), 0.999)`` of PCL has d(0) = 0 anyway). ``decay`` is called
    on the host with the Python int ``n`` and must return a float in [0, 1].

    **Buffers** (BatchNorm running statistics), ``buffers=``:

    * ``"own"`` (default): the mean keeps its own buffers, changed only when the method runs it in train
      mode (what PCL's re-implementation does: its mean model runs in train mode on every batch). Before
      each evaluation (and so each checkpoint) every rank takes rank 0's, as for the live model's.
    * ``"copy"``: after each update the buffers are copied from the live module (AveragedModel with
      ``use_buffers=False``).
    * ``"average"``: floating buffers are averaged with the same decay as the parameters, integer ones
      (``num_batches_tracked``) copied (AveragedModel with ``use_buffers=True``).

    Updates run eagerly, outside ``--cuda-graph``'s captured step, because AveragedModel reads its counter
    on the host (one small synchronisation per update). Under DDP the live parameters are identical on
    every rank after each step, so the means are too.
    """

    def __init__(self, module: nn.Module, decay: Callable[[int], float], buffers: str = "own"):
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}; got {buffers!r}")
        super().__init__(module, multi_avg_fn=self._average, use_buffers=buffers == "average")
        self.module.requires_grad_(False)
        self.decay = decay
        self.buffer_mode = buffers
        self._source = (module,)   # a tuple: not registered as a submodule (not saved twice)
        self._steps = 0            # host copy of n_averaged: the decay is evaluated without a device read

    @property
    def steps(self) -> int:
        """Number of updates done so far."""
        return self._steps

    def _average(self, averaged: list, live: list, _n_averaged) -> None:
        d = float(self.decay(self._steps))
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"the decay of a TemporalMean must be in [0, 1]; d({self._steps}) = {d}")
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, live, 1.0 - d)
        else:   # integer buffers ("average" mode): the live count
            for a, b in zip(averaged, live):
                a.copy_(b)

    @torch.no_grad()
    def update(self) -> None:
        """One update from the live module (the engine calls this after every training step)."""
        source = self._source[0]
        self.update_parameters(_OwnBuffers(source, self.module) if self.buffer_mode == "own" else source)
        self._steps += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._steps = int(self.n_averaged)
        return result
