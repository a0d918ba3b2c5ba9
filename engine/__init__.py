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
from .trainer import Trainer, lr_factor, main, one_line_warning, train  # noqa: E402


def _run_as_a_command() -> bool:
    """True when the process runs one of this repository's scripts (train_*.py or scripts/*.py)."""
    from pathlib import Path
    path = getattr(_sys.modules.get("__main__"), "__file__", None)
    repo = Path(__file__).resolve().parent.parent
    return bool(path) and Path(path).resolve().parent in (repo, repo / "scripts")


if _run_as_a_command():   # warnings as one line `warning: ...` in every script, not only in main()
    import warnings as _warnings
    _warnings.formatwarning = one_line_warning

__all__ = ["RECIPES", "build_parser", "parse_args", "UserError", "Method", "OptimGroup", "StepContext", "peer_heads",
           "Trainer", "lr_factor", "main", "train"]
