"""Datasets (CIFAR-10/100, TinyImageNet, ImageNet, Fashion-MNIST, synthetic, any class-folder tree) and their loaders.

The engine calls :func:`dataset_info` (before building the model: classes, image size) and
:func:`build_loaders`; see :mod:`data.loaders` for the loader contract and each family module (``cifar``,
``tinyimagenet``, ``imagenet``, ``fashion_mnist``, ``synthetic``, ``folder``) for its on-disk layout,
augmentation and normalisation. Files live under ``--data``, else ``$OKD_DATASETS/<name>``,
else ``./datasets/<name>``.
"""
from .common import (DATASET_NAMES, ArraySplit, BadDatasetError, DataFlagError, DatasetError, DatasetInfo,
                     DatasetNotFoundError, class_difference, datasets_root)
from .loaders import (Batch, DeviceLoader, Loaders, TorchLoader, build_loaders, dataset_info, load_dataset,
                      stratified_split)

__all__ = ["DATASET_NAMES", "ArraySplit", "BadDatasetError", "Batch", "DataFlagError", "DatasetError", "DatasetInfo",
           "DatasetNotFoundError", "DeviceLoader", "Loaders", "TorchLoader", "build_loaders", "class_difference",
           "dataset_info", "datasets_root", "load_dataset", "stratified_split"]
