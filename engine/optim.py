"""The optimizers of a run and their learning-rate schedules: one optimizer per ``OptimGroup`` of the method
(the run's SGD unless the group names its own), each with a per-epoch schedule (cosine, multistep, SGDR)."""
from __future__ import annotations

import math

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
    """One SGD optimizer and one per-epoch lr schedule per :class:`~engine.method.OptimGroup`."""

    def __init__(self, groups, args, world_size: int, device: torch.device):
        self.groups, self.args, self.world_size = groups, args, world_size
        self.kernels = sgd_implementation(args.sgd_impl, device)   # probed once, used by every sgd()
        self.optimizers = {g.name: self.optimizer(g) for g in groups}
        self.schedulers = {
            g.name: torch.optim.lr_scheduler.LambdaLR(
                self.optimizers[g.name], (lambda e: lr_factor(e, args)) if g.scheduled else (lambda e: 1.0))
            for g in groups}

    def optimizer(self, group) -> torch.optim.Optimizer:
        """The group's own optimizer class (``OptimGroup.optimizer``), or the run's SGD (momentum, Nesterov,
        --sgd-impl kernels)."""
        a = self.args
        scale = self.world_size if a.lr_scale == "linear" else 1
        lr = scale * (group.lr if group.lr is not None else a.lr)
        weight_decay = group.weight_decay if group.weight_decay is not None else a.weight_decay
        if group.optimizer is not None:
            return group.optimizer(group.params, lr=lr, weight_decay=weight_decay, **group.extra)
        return torch.optim.SGD(group.params, lr=lr, momentum=a.momentum, nesterov=a.nesterov and a.momentum > 0,
                               weight_decay=weight_decay, **{**self.kernels, **group.extra})

    def apply_current_hyperparameters(self) -> None:
        """The optimizer state (momentum buffers) comes from the checkpoint, the hyper-parameters from the
        current flags. They are the checkpoint's (resume checks it) except two: --epochs grown with
        --extend-epochs (from the resumed epoch on, the lr follows the schedule of the new --epochs; without
        this the first resumed epoch would keep the old schedule's lr) and the SGD kernels (--sgd-impl)."""
        for group in self.groups:
            fresh = self.optimizer(group).param_groups[0]
            sched = self.schedulers[group.name]
            for g in self.optimizers[group.name].param_groups:
                for key, value in fresh.items():   # weight decay, momentum / betas, kernels, ...
                    if key not in ("params", "lr", "initial_lr"):
                        g[key] = value
                g["initial_lr"] = fresh["lr"]
                g["lr"] = fresh["lr"] * sched.lr_lambdas[0](sched.last_epoch)
            sched.base_lrs = [fresh["lr"]] * len(sched.base_lrs)

    def state_dict(self, model) -> dict:
        """The optimizers (in the plain layout of ``--grouped-peers``, so either layout resumes) and the
        schedules, for a checkpoint."""
        from models.grouped import is_grouped, param_names, plain_optimizer_state
        return {"optimizers": {name: plain_optimizer_state(opt.state_dict(), param_names(opt, model), model)
                               if is_grouped(model) else opt.state_dict() for name, opt in self.optimizers.items()},
                "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()}}

    def load_state_dict(self, ckpt: dict, model) -> None:
        """Load a checkpoint's optimizers and schedules (:meth:`state_dict`) into ``model``'s layout, then
        the hyper-parameters of the current flags (:meth:`apply_current_hyperparameters`)."""
        from models.grouped import grouped_optimizer_state, is_grouped, param_names
        for name, opt in self.optimizers.items():
            state = ckpt["optimizers"][name]
            opt.load_state_dict(grouped_optimizer_state(state, param_names(opt, model), model)
                                if is_grouped(model) else state)
        for name, s in self.schedulers.items():
            s.load_state_dict(ckpt["schedulers"][name])
        self.apply_current_hyperparameters()
