"""The backbone zoo and the peer topologies built from it."""
from .base import Backbone, BackboneOutput, Head, count_parameters
from .registry import (ImageSizeError, UnknownModelError, check_image_size, create_model, list_models, model_entry,
                       register)

# Importing a family registers its names.
from . import resnet, resnet_imagenet, wrn, vgg, densenet, hcgnet, mobilenetv2, torchvision_nets  # noqa: E402,F401

__all__ = ["Backbone", "BackboneOutput", "Head", "count_parameters", "ImageSizeError", "UnknownModelError",
           "check_image_size", "create_model", "list_models", "model_entry", "register"]
