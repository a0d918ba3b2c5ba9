"""The shared engine: CLI, device, AMP, DDP, schedules, evaluation, checkpoints, logging, results."""
from . import fast_help

fast_help.install()  # `--help`: stand-ins for torch & co. before anything imports them (engine/fast_help.py)

from .cli import RECIPES, build_parser, parse_args  # noqa: E402
from .errors import UserError  # noqa: E402
from .method import Method, OptimGroup, StepContext, peer_heads  # noqa: E402
from .trainer import Trainer, lr_factor, main, train  # noqa: E402

__all__ = ["RECIPES", "build_parser", "parse_args", "UserError", "Method", "OptimGroup", "StepContext", "peer_heads",
           "Trainer", "lr_factor", "main", "train"]
