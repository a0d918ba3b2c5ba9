"""The shared engine: CLI, device, AMP, DDP, schedules, evaluation, checkpoints, logging, results.

``from engine import Method, main`` imports the submodule that defines a name on first use, so importing
``engine`` itself is instant and installs the ``--help`` stand-ins before torch is imported
(engine/fast_help.py): a script imports ``engine`` first.
"""
from importlib import import_module

from . import fast_help

fast_help.install()

_WHERE = {"RECIPES": "cli", "build_parser": "cli", "parse_args": "cli", "UserError": "errors",
          "Method": "method", "OptimGroup": "method", "peer_heads": "method",
          "Trainer": "trainer", "lr_factor": "trainer", "main": "trainer", "train": "trainer"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:                                    # a submodule: engine.trainer after a bare `import engine`
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            pass
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
