"""Hand-made results.json files in the engine's format (engine/run.py ``Run.results``), for the
summary tests: no training needed, every number known in advance."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def results(tag: Optional[str], seed: int, curves: dict[str, list[float]], best_epoch: Optional[int] = None,
            epochs: Optional[int] = None, method: str = "dml", arch: str = "resnet32", selection: str = "ensemble",
            terms: Optional[dict[str, list[float]]] = None, args: Optional[dict] = None) -> dict:
    """``curves``: head -> test top-1 per finished epoch. ``epochs``: the planned epochs (default: as many as
    finished, i.e. a finished run). ``best_epoch`` (1-based) defaults to the epoch of the highest ``selection``.
    ``args``: more recorded arguments (an option left out counts as the method's default, as in the engine)."""
    done = len(next(iter(curves.values())))
    epochs = epochs or done
    terms = terms or {"ce": [2.0 / (e + 1) for e in range(done)], "kd": [0.5 / (e + 1) for e in range(done)]}
    history = []
    for e in range(done):
        test = {}
        for head, values in curves.items():
            test[f"{head}/top1"] = values[e]
            test[f"{head}/top5"] = min(100.0, values[e] + 20)
        train = {k: v[e] for k, v in terms.items()}
        train.update(loss=sum(train.values()))
        speed = {"images": 1000, "epoch_s": 1.0, "images_per_s": 1000.0}
        history.append({"epoch": e + 1, "lr": {"model": 0.1}, "train": train, "speed": speed, "test": test})
    if best_epoch is None and history:
        best_epoch = max(range(done), key=lambda e: curves[selection][e]) + 1
    best = {"epoch": best_epoch, "test": history[best_epoch - 1]["test"]} if history else None
    return {
        "status": "finished" if done == epochs else "running", "method": method, "arch": arch, "dataset": "cifar100",
        "epochs_done": done, "epochs": epochs, "recipe": {"name": "okd"},
        "selection": {"split": "test", "metric": f"{selection}/top1"},
        "best": best, "last": history[-1] if history else None, "max_over_epochs_test": {},
        "args": {"arch": arch, "seed": seed, "tag": tag, "epochs": epochs, **(args or {})}, "history": history,
    }


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path
