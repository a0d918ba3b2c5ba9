"""Name -> constructor. ``create_model('resnet32', num_classes=100)``."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable, Optional

from .base import Backbone


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., Backbone]
    image_size: int          # native input size (32 for CIFAR nets, 224 for ImageNet ResNets)
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, image_size: int = 32, description: str = ""):
    """Decorator: ``@register('resnet32')`` on a function ``(num_classes, **kwargs) -> Backbone``."""
    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, image_size, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return wrap


class UnknownModelError(ValueError):
    pass


def natural_key(name: str) -> list:
    """Sort key that orders the numbers in a name by value: resnet20 < resnet32 < resnet110."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models() -> list[str]:
    """Every registered name, in natural order (resnet20, resnet32, ..., resnet110)."""
    return sorted(_REGISTRY, key=natural_key)


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown architecture {name!r}. Valid names: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int = 100, image_size: Optional[int] = None, **kwargs) -> Backbone:
    """Build a registered backbone. ``image_size`` reaches the constructors that use it (the ResNet-18/34
    stem choice) and is ignored by the others; other keyword arguments go to the family's constructor
    (for example ``stem='small'`` for ``resnet18``)."""
    constructor = model_entry(name).constructor
    if image_size is not None and "image_size" in inspect.signature(constructor).parameters:
        kwargs["image_size"] = image_size
    return constructor(num_classes=num_classes, **kwargs)
