"""Checkpoints in the plain (ungrouped) layout, whatever ``--grouped-peers`` says.

``--grouped-peers`` runs a method's N peer branches as one grouped network (``models/grouped.py``), whose
weights, BN statistics and SGD momentum buffers are the N branches' concatenated along dim 0. A
checkpoint always holds them per peer, as a run without the flag has them, so it resumes and evaluates
with or without the flag. The conversion is exact (slices and concatenations, no arithmetic).

Optimizer state dicts index parameters by position; a position is mapped through the parameter's name
in the model (``plain_names`` gives the plain run's order: the branches one after the other).
"""
from __future__ import annotations

from torch import nn

from models.grouped import GroupedLinear, _join, _piece, _split_key, peer_blocks, plain_names


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
