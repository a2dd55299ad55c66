"""Models for MNIST-1D (inputs of shape (1, 40))."""

from __future__ import annotations

from torch import nn


def mlp(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
        width: int | None = None) -> nn.Module:
    """Two hidden ReLU layers without BatchNorm (`affine_bn` has nothing to act on)."""
    from gemminer.models.mnist import fully_connected

    width = width or 512
    return fully_connected(input_shape, [width, width], num_classes, bias)


def _conv_block(c_in: int, c_out: int, kernel: int, stride: int, affine_bn: bool, bias: bool) -> list[nn.Module]:
    return [nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias),
            nn.BatchNorm1d(c_out, affine=affine_bn), nn.ReLU()]


def cnn1d(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
          width: int | None = None) -> nn.Module:
    """Four conv layers with BatchNorm, halving the length three times, then one linear layer."""
    width = width or 64
    channels, length = input_shape
    layers: list[nn.Module] = []
    layers += _conv_block(channels, width, 5, 1, affine_bn, bias)
    layers += _conv_block(width, width, 3, 2, affine_bn, bias)
    layers += _conv_block(width, 2 * width, 3, 2, affine_bn, bias)
    layers += _conv_block(2 * width, 2 * width, 3, 2, affine_bn, bias)
    for _ in range(3):
        length = (length + 1) // 2
    layers += [nn.Flatten(), nn.Linear(2 * width * length, num_classes, bias=bias)]
    return nn.Sequential(*layers)
