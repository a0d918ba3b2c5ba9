"""``--cuda-graph``: the whole training step (forward, loss, backward, optimizer steps) as one CUDA graph.

At batch 64-128 the thin CIFAR peers launch hundreds of small kernels per step, and launching them costs
more than running them (docs/benchmarks.md, *Floors*). A captured graph is replayed with one launch. This is
the pattern of the PyTorch CUDA-graph notes ("whole-network capture"):

* a few eager warm-up steps on a side stream (cuDNN autotuning, optimizer state, lazy buffers);
* gradients set to None before capture, so backward allocates them in the graph's memory pool;
* every batch is copied into static input tensors, then the graph is replayed.

The captured step is the engine's ``Trainer._captured_step``: the method's ``train_step`` (its own or the default
one), the loss scaler's update and the method's ``after_step``. The temporal means (``models/temporal_mean.py``)
are updated after each replay, eagerly. Python numbers read during the step (the lr, the ramp-up
weights computed from the epoch) are frozen into the capture, so the step is captured again at the start
of every epoch; a capture costs about one step. Everything inside the step must stay on the device: no
``.item()``, no host-side randomness, no shapes or Python branches that depend on the data (the rules
for method authors are in docs/engine.md, "The rules of a training step"). A graph has one batch shape: the
training loader drops the last incomplete batch under ``--cuda-graph``. A step that cannot be captured stops
the run with a clear error (the last epoch's checkpoint is intact): continuing eagerly in a process whose
capture failed is not safe.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils._pytree import tree_leaves, tree_map


def shapes(obj) -> list[tuple]:
    """Shape, dtype and strides of every tensor of a (named) tuple / list / dict tree: what a capture fixes."""
    return [(t.shape, t.dtype, t.stride()) for t in tree_leaves(obj)]


class CaptureError(RuntimeError):
    pass


class GraphedStep:
    """Runs ``step(batch, epoch)`` (which zeroes, back-propagates and steps the optimizers and returns
    tensors) eagerly for ``warmup`` steps, then from a CUDA graph captured once per epoch. A step that
    cannot be captured raises :class:`CaptureError`: after a failed capture CUDA's stream state is not
    trustworthy enough to go on eagerly in the same process."""

    def __init__(self, step: Callable, optimizers: list, device: torch.device, warmup: int = 3):
        self.step, self.optimizers, self.device = step, optimizers, device
        self.warmup = warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.epoch: Optional[int] = None
        self.static_in = self.static_out = None
        self.captures = self.replays = 0

    def _eager_on_side_stream(self, batch, epoch):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.step(batch, epoch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, batch, epoch) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)   # frees the old graph's gradients; backward allocates new ones
        # The previous epoch's graph and everything in its memory pool go first. Each capture gets a pool of
        # its own: re-capturing into the pool of a destroyed graph trips an allocator assertion.
        self.graph = self.static_in = self.static_out = None
        torch.cuda.synchronize(self.device)
        self.static_in = tree_map(lambda t: t.clone(), batch)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
            self.static_out = self.step(self.static_in, epoch)
        self.graph, self.epoch = graph, epoch
        self.captures += 1

    def __call__(self, batch, epoch):
        if self.warmup > 0:
            self.warmup -= 1
            return self._eager_on_side_stream(batch, epoch)
        if self.graph is None or self.epoch != epoch:
            try:
                self._capture(batch, epoch)                    # records the step; nothing has run yet
            except RuntimeError as e:                          # a host sync or CPU work inside the step
                raise CaptureError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
        elif shapes(batch) != shapes(self.static_in):
            raise CaptureError("a batch of another shape than the captured one (the loader must drop the last "
                               "incomplete batch)")
        else:
            for static, new in zip(tree_leaves(self.static_in), tree_leaves(batch)):
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.static_out
