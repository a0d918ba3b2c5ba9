"""The optimizers of a run and their learning-rate schedules: one optimizer per ``OptimGroup`` of the method
(the run's SGD unless the group names its own), each with a per-epoch schedule (cosine, multistep, SGDR)."""
from __future__ import annotations

import math
from inspect import signature

import torch


def lr_factor(epoch: int, args) -> float:
    """Multiplier of the peak lr during 0-based ``epoch``: per-epoch cosine to 0, x0.1 per milestone, or SGDR
    (Loshchilov & Hutter, ICLR 2017) with cycles of T0, 2 T0, 4 T0, ... epochs (``--sgdr-t0``), each a cosine
    from the peak to 0, as the MCL-OKD repository's ``adjust_lr`` computes it once per epoch."""
    if args.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    if args.lr_schedule == "sgdr":
        start, length = 0, args.sgdr_t0 or args.epochs
        while epoch >= start + length:          # the cycle holding this epoch
            start, length = start + length, 2 * length
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / length))
    return 0.1 ** sum(epoch >= m for m in args.milestones)


def sgd_implementation(choice: str, device: torch.device) -> dict:
    """SGD keywords for ``--sgd-impl``: 'fused' (one fused kernel over all parameters, where this torch has
    it for the device; otherwise foreach), 'foreach' (multi-tensor kernels) or 'for-loop' (one parameter at
    a time, as the official codes' torch did). All three apply the same update."""
    if choice == "fused":
        try:  # torch checks the device at the first step, not at construction: take one
            probe = torch.zeros(1, device=device, requires_grad=True)
            probe.grad = torch.zeros_like(probe)
            torch.optim.SGD([probe], lr=0.1, momentum=0.9, fused=True).step()
            return {"fused": True}
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            choice = "foreach"
    return {"foreach": choice == "foreach"}


class Optimization:
    """One optimizer per :class:`~engine.method.OptimGroup`, the run's SGD unless the group names its own. The
    lr is not optimizer state: :meth:`set_epoch` sets it for each epoch from the current flags' schedule, so a
    resumed run (an extended one included) needs no scheduler state."""

    def __init__(self, groups, args, world_size: int, device: torch.device):
        self.groups, self.args = groups, args
        self.scale = world_size if args.lr_scale == "linear" else 1
        self.kernels = sgd_implementation(args.sgd_impl, device)   # probed once, used by every SGD
        self.optimizers = {g.name: self.optimizer(g) for g in groups}
        self.set_epoch(0)

    def optimizer(self, group) -> torch.optim.Optimizer:
        """The group's own optimizer class (``OptimGroup.optimizer``; with ``capturable=True`` under --cuda-graph
        where it takes it, as Adam does), or the run's SGD (momentum, Nesterov, --sgd-impl kernels)."""
        a = self.args
        weight_decay = group.weight_decay if group.weight_decay is not None else a.weight_decay
        if group.optimizer is not None:   # (--cuda-graph: a step count kept on the CPU cannot be captured)
            capture = a.cuda_graph and "capturable" in signature(group.optimizer).parameters
            return group.optimizer(group.params, lr=self.peak_lr(group), weight_decay=weight_decay,
                                   **{**group.extra, **({"capturable": True} if capture else {})})
        return torch.optim.SGD(group.params, lr=self.peak_lr(group), momentum=a.momentum,
                               nesterov=a.nesterov and a.momentum > 0, weight_decay=weight_decay,
                               **{**self.kernels, **group.extra})

    def peak_lr(self, group) -> float:
        return self.scale * (group.lr if group.lr is not None else self.args.lr)

    def set_epoch(self, epoch: int) -> None:
        """Every optimizer's lr for 0-based ``epoch``: the peak lr times :func:`lr_factor`, or constant for a
        group with ``scheduled=False``."""
        for group in self.groups:
            lr = self.peak_lr(group) * (lr_factor(epoch, self.args) if group.scheduled else 1.0)
            for g in self.optimizers[group.name].param_groups:
                g["lr"] = lr

    def state_dict(self, model) -> dict:
        """Every optimizer's state dict, in the plain layout of ``--grouped-peers`` (so either layout resumes)."""
        from models.grouped import is_grouped, param_names, plain_optimizer_state
        return {name: plain_optimizer_state(opt.state_dict(), param_names(opt, model), model)
                if is_grouped(model) else opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, states: dict, model) -> None:
        """Load the optimizers' state (momentum buffers, Adam moments) from a checkpoint, in ``model``'s layout;
        the hyper-parameters stay those of the current flags, which resume checks against the checkpoint's
        (they differ only in the SGD kernels of --sgd-impl; the lr is set each epoch)."""
        from models.grouped import grouped_optimizer_state, is_grouped, param_names
        for name, opt in self.optimizers.items():
            state = states[name]
            current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(grouped_optimizer_state(state, param_names(opt, model), model)
                                if is_grouped(model) else state)
            for g, hyper in zip(opt.param_groups, current):
                g.update(hyper)
