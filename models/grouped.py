"""N same-architecture networks run as one grouped ("wide") network: the same maths, one network's kernels.

Network i owns block i of the channels of every wide tensor:

* ``Conv2d(Cin, Cout, groups=g)`` of the N networks becomes ``Conv2d(N*Cin, N*Cout, groups=N*g)``: group
  block i sees only network i's input channels and holds exactly network i's weights;
* ``BatchNorm2d(C)`` becomes ``BatchNorm2d(N*C)``: batch statistics and running statistics are per channel,
  hence per network, and it stays one native BN kernel;
* the classifier ``Linear(F, C)`` becomes :class:`GroupedLinear`, one batched matmul;
* ReLU, dropout, pooling and residual additions act per channel and are unchanged.

Every wide parameter and buffer is the N networks' concatenated along dim 0, and the gradient of a
concatenation is the concatenation of the gradients, so SGD (elementwise: momentum, Nesterov, weight
decay) takes exactly the steps it takes on the N networks. Kernel launches per step are those of one
network, whatever N (docs/benchmarks.md); ``tests/test_grouped.py`` checks outputs, gradients,
running statistics and SGD steps against the separate networks.

A module qualifies when it is a container (``nn.Sequential``, ``Backbone``, ...), one of the layers above,
or a block class that declares ``channel_local = True``: its ``forward`` mixes channels only through its
own Conv2d / BatchNorm2d children. Blocks that concatenate or pad along channels (DenseNet, HCGNet) do
not, and are refused with :class:`NotGroupableError`.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import nn

from .base import Backbone, BackboneOutput, Head

_CONTAINERS = (nn.Sequential, nn.ModuleList, Backbone, Head)
_ELEMENTWISE = (nn.ReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


class NotGroupableError(ValueError):
    pass


class GroupedLinear(nn.Module):
    """N ``Linear(in_features, out_features)`` on the channel blocks of a ``B x N*in_features`` input;
    returns ``B x N*out_features``. ``weight`` is N x out x in, ``bias`` N x out."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(groups, out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = x.reshape(b, self.groups, self.in_features).transpose(0, 1)          # N x B x in
        w = self.weight.transpose(1, 2)                                          # N x in x out
        y = torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias[:, None], x, w)
        return y.transpose(0, 1).reshape(b, self.groups * self.out_features)


def _map_tree(mods: list[nn.Module], leaf: Callable[[list[nn.Module]], Optional[nn.Module]]) -> nn.Module:
    """A copy of ``mods[0]``'s module tree in which ``leaf(corresponding modules)`` replaces the layers it
    handles; elementwise layers are copied and containers rebuilt around their mapped children."""
    first = mods[0]
    if any(type(m) is not type(first) or list(m._modules) != list(first._modules) for m in mods):
        raise NotGroupableError("the networks differ in structure: " + ", ".join(type(m).__name__ for m in mods))
    new = leaf(mods)
    if new is not None:
        return new.train(first.training)
    if isinstance(first, _ELEMENTWISE):
        return copy.deepcopy(first)
    if not (isinstance(first, _CONTAINERS) or getattr(first, "channel_local", False)):
        raise NotGroupableError(
            f"{type(first).__name__} is not known to act per channel, so its networks cannot run as one grouped "
            "network (grouping supports the ResNet, WRN and VGG families; leave out --grouped-peers)")
    if first._parameters or first._buffers:
        raise NotGroupableError(f"{type(first).__name__} holds its own parameters; it cannot be grouped")
    new = copy.copy(first)
    new._parameters, new._buffers, new._modules = OrderedDict(), OrderedDict(), OrderedDict()
    for name, child in first._modules.items():
        new._modules[name] = None if child is None else _map_tree([m._modules[name] for m in mods], leaf)
    return new


def _like(m: nn.Module) -> dict:
    """Factory keywords that put a new layer on ``m``'s device, in its floating dtype."""
    t = next(t for t in m.state_dict().values() if t.is_floating_point())
    return {"device": t.device, "dtype": t.dtype}


def _load(new: nn.Module, state: dict) -> nn.Module:
    new.load_state_dict(state)
    return new


def _merge_leaf(mods: list[nn.Module]) -> Optional[nn.Module]:
    m, n = mods[0], len(mods)
    if isinstance(m, nn.Conv2d):
        wide = nn.Conv2d(n * m.in_channels, n * m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                         n * m.groups, m.bias is not None, m.padding_mode, **_like(m))
    elif isinstance(m, nn.BatchNorm2d):
        if len({int(x.num_batches_tracked) for x in mods if x.num_batches_tracked is not None}) > 1:
            raise NotGroupableError("the networks' BatchNorm layers have seen different numbers of batches")
        wide = nn.BatchNorm2d(n * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **_like(m))
    elif isinstance(m, nn.Linear):
        wide = GroupedLinear(n, m.in_features, m.out_features, m.bias is not None, **_like(m))
        return _load(wide, {name: torch.stack([x.state_dict()[name] for x in mods]) for name in m.state_dict()})
    else:
        return None
    # dim-0 concatenation; num_batches_tracked (a scalar, equal in all networks) is taken once
    return _load(wide, {name: torch.cat([x.state_dict()[name] for x in mods]) if t.dim() else t
                        for name, t in m.state_dict().items()})


def _split_leaf(n: int, i: int) -> Callable[[list[nn.Module]], Optional[nn.Module]]:
    def leaf(mods: list[nn.Module]) -> Optional[nn.Module]:
        w = mods[0]
        if isinstance(w, nn.Conv2d):
            net = nn.Conv2d(w.in_channels // n, w.out_channels // n, w.kernel_size, w.stride, w.padding,
                            w.dilation, w.groups // n, w.bias is not None, w.padding_mode, **_like(w))
        elif isinstance(w, nn.BatchNorm2d):
            net = nn.BatchNorm2d(w.num_features // n, w.eps, w.momentum, w.affine, w.track_running_stats, **_like(w))
        elif isinstance(w, GroupedLinear):
            net = nn.Linear(w.in_features, w.out_features, w.bias is not None, **_like(w))
            return _load(net, {name: t[i] for name, t in w.state_dict().items()})
        else:
            return None
        return _load(net, {name: t.chunk(n)[i] if t.dim() else t for name, t in w.state_dict().items()})
    return leaf


def merge(nets: list[nn.Module]) -> nn.Module:
    """One grouped network computing what the N same-architecture ``nets`` compute, from copies of their
    weights and statistics. Its input is the N networks' inputs concatenated along channels."""
    return _map_tree(list(nets), _merge_leaf)


def split(wide: nn.Module, n: int, i: int) -> nn.Module:
    """Network ``i`` of a grouped network of ``n``, as a plain network with a copy of its weights."""
    return _map_tree([wide], _split_leaf(n, i))


class GroupedBackbones(nn.Module):
    """N same-architecture :class:`Backbone` s (or Peers branches) held and run as one grouped network.

    ``forward(inputs)`` takes one input per network (the same tensor N times where they share it) and
    returns one :class:`BackboneOutput` per network, with logits, pooled features and stage maps that are
    channel slices of the wide tensors. ``network(i)`` gives network i back as a plain copy."""

    def __init__(self, nets: list[Backbone]):
        super().__init__()
        self.num_networks = len(nets)
        self.wide = merge(nets)

    def forward(self, inputs: list[torch.Tensor], return_stages: bool = False) -> list[BackboneOutput]:
        n = self.num_networks
        out = self.wide(torch.cat(inputs, 1), return_features=True, return_stages=return_stages)
        logits, features = out.logits.chunk(n, 1), out.features.chunk(n, 1)
        stages = [m.chunk(n, 1) for m in out.stages] if return_stages else None
        return [BackboneOutput(logits[i], features[i], [m[i] for m in stages] if return_stages else None)
                for i in range(n)]

    def network(self, i: int) -> Backbone:
        return split(self.wide, self.num_networks, i)

    def __len__(self) -> int:
        return self.num_networks


# ---- the plain (ungrouped) layout of state dicts ------------------------------------------------------
# Checkpoints hold the plain layout whatever the run's --grouped-peers: peer i's tensors under
# ``<...>branches.<i>.<rest>``. A grouped run holds them under ``<...>branches.wide.<rest>``, the N peers'
# tensors concatenated along dim 0 (stacked for GroupedLinear, a shared scalar for num_batches_tracked).

def peer_blocks(model: nn.Module) -> list[tuple[str, int]]:
    """(``"<path>.branches."``, N) for every Peers-like module of ``model`` (a ``branches`` ModuleList of
    N networks or a GroupedBackbones)."""
    out = []
    for name, m in model.named_modules():
        branches = getattr(m, "branches", None)
        if getattr(m, "num_peers", None) and isinstance(branches, (nn.ModuleList, GroupedBackbones)):
            out.append((f"{name}.branches." if name else "branches.", m.num_peers))
    return out


def _split_key(key: str, blocks) -> Optional[tuple[str, int, Optional[int], str]]:
    """(prefix, N, peer index or None for the wide tensor, rest) when ``key`` lies in a peers block."""
    for prefix, n in blocks:
        if key.startswith(prefix):
            head, _, rest = key[len(prefix):].partition(".")
            if head == "wide":
                return prefix, n, None, rest
            if head.isdigit():
                return prefix, n, int(head), rest
    return None


def _piece(wide: torch.Tensor, n: int, i: int, stacked: bool) -> torch.Tensor:
    if stacked:
        return wide[i].clone()
    return wide.chunk(n)[i].clone() if wide.dim() else wide.clone()


def _join(parts: list[torch.Tensor], stacked: bool) -> torch.Tensor:
    if stacked:
        return torch.stack(parts)
    return torch.cat(parts) if parts[0].dim() else parts[0].clone()


def convert_state(state: dict, target: dict, blocks) -> dict:
    """``state`` (a module state dict in either layout) in the layout of ``target`` (a state dict, or a
    dict of parameter name -> tensor, of the module to load into: its keys and shapes decide). A wide
    tensor with one more dimension than the peer's is stacked (GroupedLinear), otherwise concatenated."""
    out, wide_parts = {}, {}
    for key, t in state.items():
        where = _split_key(key, blocks)
        if where is None or key in target:
            out[key] = t
            continue
        prefix, n, peer, rest = where
        if peer is None:                          # wide tensor, the target is plain: split it
            like = target.get(f"{prefix}0.{rest}")
            if like is None:
                out[key] = t
                continue
            for i in range(n):
                out[f"{prefix}{i}.{rest}"] = _piece(t, n, i, t.dim() == like.dim() + 1)
        else:                                     # a peer's tensor, the target is grouped: gather them
            wide_parts.setdefault(f"{prefix}wide.{rest}", {})[peer] = t
    for key, parts in wide_parts.items():
        like = target.get(key)
        n = len(parts)
        if like is None or sorted(parts) != list(range(n)):
            out.update({key.replace("wide.", f"{i}.", 1): t for i, t in parts.items()})
            continue
        out[key] = _join([parts[i] for i in range(n)], like.dim() == parts[0].dim() + 1)
    return out


def plain_state(model: nn.Module, state: dict) -> dict:
    """``model``'s state dict ``state`` in the plain layout (unchanged where no peers are grouped)."""
    blocks = peer_blocks(model)
    out = {}
    for key, t in state.items():
        where = _split_key(key, blocks)
        if where is None or where[2] is not None:
            out[key] = t
            continue
        prefix, n, _, rest = where
        owner = model.get_submodule(f"{prefix}wide.{rest}".rsplit(".", 1)[0])
        for i in range(n):
            out[f"{prefix}{i}.{rest}"] = _piece(t, n, i, isinstance(owner, GroupedLinear))
    return out


def plain_names(names: list[str], blocks) -> list[str]:
    """Parameter names in a grouped model's order -> the names, in order, of the same parameters in the
    plain model: each contiguous run of one block's wide parameters becomes N runs, peer by peer (the
    order of ``parameters()`` in the plain model, which holds the branches one after the other)."""
    out, i = [], 0
    while i < len(names):
        where = _split_key(names[i], blocks)
        if where is None or where[2] is not None:
            out.append(names[i])
            i += 1
            continue
        prefix, n = where[0], where[1]
        run = []
        while i < len(names) and names[i].startswith(f"{prefix}wide."):
            run.append(names[i][len(prefix) + 5:])
            i += 1
        out += [f"{prefix}{p}.{rest}" for p in range(n) for rest in run]
    return out


# ---- the plain layout of optimizer state dicts --------------------------------------------------------
# Optimizer state dicts index parameters by position; a position is mapped through the parameter's name in
# the model (``plain_names`` gives the plain run's order: the branches one after the other).

def is_grouped(model: nn.Module) -> bool:
    """True when some Peers of ``model`` runs its branches grouped (``--grouped-peers``)."""
    return any(isinstance(m, GroupedBackbones) for m in model.modules())


def param_names(optimizer, model: nn.Module) -> list[str]:
    """The model's name of every parameter of ``optimizer``, in the optimizer's order (flattened over its
    param groups); parameters outside the model get a placeholder that never matches a peer block."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), f"<outside the model {k}>")
            for k, p in enumerate(p for g in optimizer.param_groups for p in g["params"])]


def _stacked(model: nn.Module, prefix: str, rest: str) -> bool:
    return isinstance(model.get_submodule(f"{prefix}wide.{rest}".rsplit(".", 1)[0]), GroupedLinear)


def _per_element(value) -> bool:
    return hasattr(value, "dim") and value.dim() > 0


def plain_optimizer_state(state: dict, names: list[str], model: nn.Module) -> dict:
    """The state dict of a grouped model's optimizer (``names``: :func:`param_names`) as the same
    optimizer of the plain model would hold it: wide momentum buffers split per peer."""
    blocks = peer_blocks(model)
    plain = plain_names(names, blocks)
    index = {name: j for j, name in enumerate(plain)}
    out = {}
    for k, per_param in state["state"].items():
        where = _split_key(names[k], blocks)
        if where is None or where[2] is not None:
            out[index[names[k]]] = per_param
            continue
        prefix, n, _, rest = where
        stacked = _stacked(model, prefix, rest)
        for i in range(n):
            out[index[f"{prefix}{i}.{rest}"]] = {key: _piece(v, n, i, stacked) if _per_element(v) else v
                                                 for key, v in per_param.items()}
    groups = [{**g, "params": [index[name] for name in plain_names([names[k] for k in g["params"]], blocks)]}
              for g in state["param_groups"]]
    return {"state": dict(sorted(out.items())), "param_groups": groups}   # in the plain optimizer's order


def grouped_optimizer_state(state: dict, names: list[str], model: nn.Module) -> dict:
    """The inverse of :func:`plain_optimizer_state`: a plain-layout optimizer state dict for the optimizer
    of the grouped ``model`` whose parameters are ``names``."""
    blocks = peer_blocks(model)
    plain = plain_names(names, blocks)
    plain_state = {plain[j]: s for j, s in state["state"].items()}
    out = {}
    for k, name in enumerate(names):
        where = _split_key(name, blocks)
        if where is None or where[2] is not None:
            if name in plain_state:
                out[k] = plain_state[name]
            continue
        prefix, n, _, rest = where
        parts = [plain_state.get(f"{prefix}{i}.{rest}") for i in range(n)]
        if all(p is None for p in parts):
            continue
        if any(p is None for p in parts):
            raise KeyError(f"optimizer state of {prefix}<peer>.{rest} exists for some peers only")
        stacked = _stacked(model, prefix, rest)
        out[k] = {key: _join([p[key] for p in parts], stacked) if _per_element(v) else v
                  for key, v in parts[0].items()}
    position = {name: k for k, name in enumerate(names)}
    groups = []
    for g in state["param_groups"]:
        seen = []
        for j in g["params"]:
            where = _split_key(plain[j], blocks)
            name = plain[j] if where is None else f"{where[0]}wide.{where[3]}"
            if name not in seen:
                seen.append(name)
        groups.append({**g, "params": [position[name] for name in seen]})
    return {"state": out, "param_groups": groups}
