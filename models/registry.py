"""Name -> constructor. ``create_model('resnet32', num_classes=100)``; :func:`check_image_size` says whether a
backbone takes an input size."""
from __future__ import annotations

import functools
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


class ImageSizeError(UnknownModelError):
    """A backbone that cannot take the input size (its maps shrink to nothing before the head). A subclass
    of UnknownModelError, which the training scripts print as one line: no such model for that size."""


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


@functools.lru_cache(maxsize=None)
def _takes(name: str, image_size: int) -> Optional[str]:
    """None if ``name`` runs on a 2 x 3 x S x S input, else the reason (a shape check on the meta device:
    no weights are allocated, nothing is computed)."""
    import torch
    try:
        with torch.device("meta"):
            net = create_model(name, num_classes=2, image_size=image_size).eval()
            net(torch.empty(2, 3, image_size, image_size))
    except RuntimeError as e:
        return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return None


def check_image_size(name: str, image_size: int) -> None:
    """Raise :class:`ImageSizeError` (one line, with the smallest size it takes) if backbone ``name`` cannot
    take ``image_size`` x ``image_size`` inputs; an unknown name raises UnknownModelError. Backbones end
    in a global average pool, so a size they take, any larger size takes too; the check is a forward pass
    of shapes only, cached per (name, size)."""
    model_entry(name)
    reason = _takes(name, int(image_size))
    if reason is None:
        return
    low, high = int(image_size), max(2 * int(image_size), 8)
    while _takes(name, high) is not None:
        low, high = high, 2 * high
    while high - low > 1:                                 # the smallest size that works: low fails, high works
        mid = (low + high) // 2
        low, high = (low, mid) if _takes(name, mid) is None else (mid, high)
    raise ImageSizeError(f"--arch {name} cannot take {image_size}x{image_size} images (its feature maps shrink to "
                         f"nothing: {reason}); it needs at least {high}x{high}. Fix: pass --image-size {high} or "
                         "more, or choose another --arch")
