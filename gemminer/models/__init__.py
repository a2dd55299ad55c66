"""Model registry: name -> factory(input_shape, num_classes, options) -> nn.Module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gemminer.errors import GemminerError
from gemminer.models.mnist1d import cnn1d, mlp

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {"mlp": mlp, "cnn1d": cnn1d}

DEFAULT_MODEL_FOR_DATA = {"mnist1d": "cnn1d"}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False,
                bias: bool = False, width: int | None = None) -> nn.Module:
    """Build a registered model. Paper defaults: non-affine BatchNorm, no biases."""
    if name not in MODELS:
        raise GemminerError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name](input_shape, num_classes, affine_bn=affine_bn, bias=bias, width=width)
