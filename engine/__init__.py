"""The shared engine: CLI, device, AMP, DDP, schedules, evaluation, checkpoints, logging, results."""
import sys as _sys


def _one_line_interrupt(kind, value, traceback, _previous=_sys.excepthook):
    """Ctrl-C outside engine.main (a method script still importing): one line, no traceback."""
    if issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted (SIGINT)", file=_sys.stderr)
    else:
        _previous(kind, value, traceback)


_sys.excepthook = _one_line_interrupt
from .cli import RECIPES, build_parser, parse_args
from .errors import UserError
from .method import Method, OptimGroup, StepContext, peer_heads
from .trainer import Trainer, lr_factor, main, train

__all__ = ["RECIPES", "build_parser", "parse_args", "UserError", "Method", "OptimGroup", "StepContext", "peer_heads",
           "Trainer", "lr_factor", "main", "train"]
