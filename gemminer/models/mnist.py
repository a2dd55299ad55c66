"""Small models of the lottery-ticket literature: LeNet-300-100 and Conv-2/4/6 (Frankle & Carbin, 2019).

As published they have no BatchNorm, so `affine_bn` has nothing to act on; `bias` switches
the layers' biases (paper: off). They take any input shape (flattened, or HxW images).
"""

from __future__ import annotations

import math

from torch import nn


def fully_connected(input_shape: tuple[int, ...], hidden: list[int], num_classes: int, bias: bool) -> nn.Sequential:
    """Flatten, then Linear + ReLU per hidden width, then the linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for width in hidden:
        layers += [nn.Linear(features, width, bias=bias), nn.ReLU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, num_classes, bias=bias))


def lenet300100(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
                width: int | None = None) -> nn.Module:
    """input -> 300 -> 100 -> classes, ReLU; `width` is the first hidden layer (the second is a third of it)."""
    width = width or 300
    return fully_connected(input_shape, [width, max(width // 3, 1)], num_classes, bias)


def _conv_net(stages: int, input_shape: tuple[int, ...], num_classes: int, bias: bool, width: int | None) -> nn.Module:
    """`stages` blocks of two 3x3 convs and a 2x2 max pool (64, 128, 256 channels), then 256-256-classes."""
    width = width or 64
    channels, height, columns = input_shape
    layers: list[nn.Module] = []
    c_in = channels
    for stage in range(stages):
        c_out = width * 2 ** stage
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), nn.ReLU(),
                   nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, height, columns = c_out, height // 2, columns // 2
    hidden = 4 * width
    layers += [nn.Flatten(), nn.Linear(c_in * height * columns, hidden, bias=bias), nn.ReLU(),
               nn.Linear(hidden, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, num_classes, bias=bias)]
    return nn.Sequential(*layers)


def conv2(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
          width: int | None = None) -> nn.Module:
    return _conv_net(1, input_shape, num_classes, bias, width)


def conv4(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
          width: int | None = None) -> nn.Module:
    return _conv_net(2, input_shape, num_classes, bias, width)


def conv6(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
          width: int | None = None) -> nn.Module:
    return _conv_net(3, input_shape, num_classes, bias, width)
