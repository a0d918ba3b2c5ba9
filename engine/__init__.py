"""The shared engine: the command line (cli), the run's configuration (config), the method contract
(method), the loop (trainer), the run directory and its record (run), checkpoint files (checkpoint),
optimizers (optim), and the pieces the loop uses (distributed, cuda_graph, reporting, signals, errors).
docs/engine.md."""
from .cli import (build_parser, fraction, non_negative, non_negative_int, number, parse_args, positive,
                  positive_int, ramp_up, temperature, unit_interval, weight_decay)
from .errors import UserError
from .method import Method, OptimGroup, StepContext, peer_heads
from .trainer import Trainer, main, train

__all__ = ["build_parser", "parse_args", "number", "non_negative", "positive", "temperature", "fraction",
           "unit_interval", "weight_decay", "ramp_up", "positive_int", "non_negative_int", "UserError",
           "Method", "OptimGroup", "StepContext", "peer_heads",
           "Trainer", "main", "train"]
