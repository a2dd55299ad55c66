"""Model registry: name -> factory(input_shape, num_classes, *, affine_bn, bias, width) -> nn.Module.

Besides the registered names: ``module.path:factory`` (a user's model), ``timm:<name>`` and
``torchvision:<name>`` (when those packages import).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gemminer.errors import GemminerError
from gemminer.models.cifar import mobilenet_v2, resnet18, resnet20, resnet32, resnet50, resnet56, vgg16, wrn28_2
from gemminer.models.mnist import conv2, conv4, conv6, lenet300100
from gemminer.models.mnist1d import cnn1d, mlp

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "mlp": mlp, "cnn1d": cnn1d,
    "lenet300100": lenet300100, "conv2": conv2, "conv4": conv4, "conv6": conv6,
    "resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "vgg16": vgg16, "wrn28_2": wrn28_2,
    "mobilenet_v2": mobilenet_v2, "resnet18": resnet18, "resnet50": resnet50,
}

IMAGE_MODELS = frozenset(MODELS) - {"mlp", "cnn1d", "lenet300100"}  # need (channels, height, width) inputs

DEFAULT_MODEL_FOR_DATA = {
    "mnist1d": "cnn1d", "mnist": "lenet300100", "fashion-mnist": "lenet300100", "cifar10": "resnet20",
    "cifar100": "resnet32", "svhn": "resnet20", "tiny-imagenet": "resnet18", "imagefolder": "resnet18",
}


def default_model(data_name: str) -> str:
    """The bundled model a data set gets when none is named (``imagefolder:PATH`` -> resnet18)."""
    return DEFAULT_MODEL_FOR_DATA.get(data_name.split(":", 1)[0], "mlp")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False,
                bias: bool = False, width: int | None = None) -> nn.Module:
    """Build a registered model (paper defaults: non-affine BatchNorm, no biases), or an
    external one (``module.path:factory``, ``timm:<name>``, ``torchvision:<name>``; they
    ignore `affine_bn`, `bias` and `width`)."""
    from gemminer.models.external import library_model, user_model

    library, _, library_name = name.partition(":")
    if library in ("timm", "torchvision") and library_name:
        return library_model(library, library_name, input_shape, num_classes)
    if ":" in name:
        return user_model(name, input_shape, num_classes)
    if name not in MODELS:
        raise GemminerError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}, module.path:factory")
    if name in IMAGE_MODELS and len(input_shape) != 3:
        raise GemminerError(f"model {name} needs image inputs (channels, height, width); the data has shape "
                            f"{tuple(input_shape)}")
    return MODELS[name](input_shape, num_classes, affine_bn=affine_bn, bias=bias, width=width)
