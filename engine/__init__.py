"""The shared engine: CLI, device, AMP, DDP, schedules, evaluation, checkpoints, logging, results."""
import sys as _sys

from . import fast_help

fast_help.install()  # `--help`: stand-ins for torch & co. before anything imports them (engine/fast_help.py)


def _one_line_interrupt(kind, value, traceback, _previous=_sys.excepthook):
    """Ctrl-C outside engine.main (a method script still importing): one line, no traceback."""
    if issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted (SIGINT)", file=_sys.stderr)
    else:
        _previous(kind, value, traceback)


_sys.excepthook = _one_line_interrupt
from .cli import RECIPES, build_parser, parse_args  # noqa: E402
from .errors import UserError  # noqa: E402
from .method import Method, OptimGroup, StepContext, peer_heads  # noqa: E402
from .trainer import Trainer, lr_factor, main, train  # noqa: E402

__all__ = ["RECIPES", "build_parser", "parse_args", "UserError", "Method", "OptimGroup", "StepContext", "peer_heads",
           "Trainer", "lr_factor", "main", "train"]
