"""Run under torchrun by tests/test_distributed.py: train (or evaluate) a method, then save this rank's
view of the weights so the test can compare ranks. Usage: ddp_worker.py METHOD_SCRIPT[:CLASS] [train args...]."""
import importlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import Trainer, parse_args  # noqa: E402
from engine.distributed import shutdown_distributed  # noqa: E402


def main():
    name, _, class_name = sys.argv[1].partition(":")   # "train_dml" or "toy_methods:MeanTeacherToy"
    module = importlib.import_module(name)
    method_cls = getattr(module, class_name) if class_name else next(
        v for v in vars(module).values()
        if isinstance(v, type) and getattr(v, "__module__", None) == module.__name__ and hasattr(v, "loss"))
    args = parse_args(method_cls, sys.argv[2:])
    trainer = Trainer(method_cls, args)
    try:
        if args.eval_only:
            trainer.evaluate_only()
        else:
            trainer.fit()
        state = {"model": {k: m.state_dict() for k, m in trainer.modules.items()},
                 "world_size": trainer.dist.world_size}
        Path(args.out).mkdir(parents=True, exist_ok=True)  # rank 0 may not have created it yet
        torch.save(state, Path(args.out) / f"rank{os.environ.get('RANK', '0')}.pt")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
