"""The shared engine: CLI, device, AMP, DDP, schedules, evaluation, checkpoints, logging, results."""
from .cli import RECIPES, build_parser, parse_args
from .errors import UserError
from .method import Method, OptimGroup, StepContext, peer_heads
from .trainer import Trainer, lr_factor, main, train

__all__ = ["RECIPES", "build_parser", "parse_args", "UserError", "Method", "OptimGroup", "StepContext", "peer_heads",
           "Trainer", "lr_factor", "main", "train"]
