"""The papers' training protocols ("recipes"): the epochs, batch, learning-rate schedule, weight decay and
momentum each paper's official code trains with (docs/official_code.md). A method script names its default
(``recipe = "okd"``); ``--recipe NAME`` picks another, and each value is the default of its flag, which an
explicit flag overrides. results.json records the recipe and whether the run kept every value of it.
"""
from __future__ import annotations

RECIPES: dict[str, dict] = {
    # winycg/MCL-OKD main_cifar_*.py (docs/official_code.md): per-epoch cosine from 0.1 over 300 epochs.
    "okd": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="cosine", milestones=[150, 225],
                weight_decay=5e-4, momentum=0.9, nesterov=True),
    # MCL-OKD's own method: the same protocol at lr 0.05 and batch 64.
    "mcl-okd": dict(epochs=300, batch_size=64, lr=0.05, lr_schedule="cosine", milestones=[150, 200, 250],
                    weight_decay=5e-4, momentum=0.9, nesterov=True),
    # OKDDip / PCL papers: step decay x0.1 at 150 and 225.
    "okddip": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[150, 225],
                   weight_decay=5e-4, momentum=0.9, nesterov=True),
    # FFL code (Jangho-Kim/FFL-pytorch train_FFL.py): step decay at 150 and 225, weight decay 1e-4.
    "ffl": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[150, 225],
                weight_decay=1e-4, momentum=0.9, nesterov=True),
    # DCCL code (nanxiaotong/DCCL train_rn32.py), which CMFF's code keeps: as FFL's with weight decay 2e-4.
    "dccl": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[150, 225],
                 weight_decay=2e-4, momentum=0.9, nesterov=True),
    # DCCL's WRN script (train_wrn.py): 400 epochs, step decay at 50, 150, 225 and 300, weight decay 2e-4.
    "dccl-wrn": dict(epochs=400, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[50, 150, 225, 300],
                     weight_decay=2e-4, momentum=0.9, nesterov=True),
    # ONE's own run scripts: plain momentum (no Nesterov), weight decay 1e-4, step decay at 150 and 225.
    "one": dict(epochs=300, batch_size=128, lr=0.1, lr_schedule="multistep", milestones=[150, 225],
                weight_decay=1e-4, momentum=0.9, nesterov=False),
    # ImageNet baseline (MCL-OKD repository, main_imagenet_baseline.py defaults): 300 epochs of SGDR with
    # T0 = 100 (a cosine over epochs 0-99, a warm restart at 100, then one 200-epoch cosine), wd 1e-4.
    "imagenet": dict(epochs=300, batch_size=256, lr=0.1, lr_schedule="sgdr", sgdr_t0=100, milestones=[30, 60, 90],
                     weight_decay=1e-4, momentum=0.9, nesterov=True),
    # The same protocol as one 100-epoch cosine (no restart): the run length of MCL-OKD's own ImageNet script.
    "imagenet-100": dict(epochs=100, batch_size=256, lr=0.1, lr_schedule="cosine", milestones=[30, 60, 90],
                         weight_decay=1e-4, momentum=0.9, nesterov=True),
    "mcl-okd-imagenet": dict(epochs=100, batch_size=128, lr=0.05, lr_schedule="cosine", milestones=[30, 60, 90],
                             weight_decay=1e-4, momentum=0.9, nesterov=True),
}
RECIPE_KEYS = tuple(dict.fromkeys(key for recipe in RECIPES.values() for key in recipe))
