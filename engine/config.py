"""The run's configuration, read-only once resolved.

``parse_args`` gives an argparse namespace; the Trainer resolves every default that depends on other
flags, on the method or on the dataset (the method's ``check_args`` fills in its own, e.g. MCL-OKD's
``--nce-k`` from ``--arch``), then freezes it into a :class:`RunConfig`. Method code reads it as before
(``self.args.kd_T``); assigning to it raises, and so does reading a field that does not exist, so a
misspelt name fails at once instead of silently falling back to a default.
"""
from __future__ import annotations

import argparse
import difflib
from typing import Any, Iterator


class RunConfig:
    """Frozen attribute access to the resolved flags of one run (``config.lr``, ``config.kd_T``)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict):
        object.__setattr__(self, "_fields", dict(fields))

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        try:
            return fields[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AttributeError(f"the run's configuration has no field {name!r}{hint}") from None

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"the run's configuration is read-only once resolved (setting {name!r}); resolve "
                             "defaults in the method's check_args, which runs before it is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("the run's configuration is read-only once resolved")

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunConfig) and self._fields == other._fields

    def __repr__(self) -> str:
        return "RunConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._fields.items()) + ")"

    def __reduce__(self):
        # copy, deepcopy and pickle rebuild through __init__ (the default path assigns the slot and is refused)
        return (RunConfig, (self._fields,))

    def as_dict(self) -> dict:
        """A copy of every field (for checkpoints and results.json)."""
        return dict(self._fields)

    def replace(self, **changes) -> "RunConfig":
        """A new configuration with ``changes`` (existing fields only)."""
        unknown = [k for k in changes if k not in self._fields]
        if unknown:
            getattr(self, unknown[0])   # the AttributeError with its suggestion
        return RunConfig({**self._fields, **changes})


def resolve(method_cls, args) -> RunConfig:
    """Resolve and freeze a parsed namespace (not modified; a RunConfig is accepted too): the method's
    ``check_args`` (validation and its own defaults), then ``views`` (from the method), ``num_classes``
    (from the dataset; a given value must agree), ``loader`` ('torch' for ImageNet, else 'device') and
    ``eval_batch_size`` (2 x ``batch_size``). Raises ``UserError`` for flags that conflict."""
    from data import dataset_info
    from .errors import UserError

    ns = argparse.Namespace(**(args.as_dict() if isinstance(args, RunConfig) else vars(args)))
    method_cls.check_args(ns)
    ns.views = getattr(ns, "views", None) or method_cls.views   # check_args may set it (KDCL, PCL: one per peer)
    info = dataset_info(ns.dataset, ns.data, image_size=ns.image_size, classes=ns.classes)   # folder data
    num_classes = info.num_classes
    if ns.num_classes is not None and ns.num_classes != num_classes:
        raise UserError(f"--num-classes {ns.num_classes} disagrees with {ns.dataset}, which has "
                        f"{num_classes} classes; leave --num-classes out")
    ns.num_classes = num_classes
    ns.loader = ns.loader or info.default_loader   # folder data: 'torch' for streamed folders
    ns.eval_batch_size = ns.eval_batch_size or 2 * ns.batch_size
    return RunConfig(vars(ns))
