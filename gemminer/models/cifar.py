"""The paper's image models: ResNet-20/32/56, VGG-16 (BatchNorm), WRN-28-2, MobileNet-V2, ResNet-18/50.

Every factory takes ``(input_shape, num_classes, *, affine_bn, bias, width)``. `width` is the
channel count of the first stage (the others keep the architecture's ratios to it); None
gives the published width. Paper defaults: BatchNorm without affine parameters, no biases.
Input channels come from `input_shape`; a global average pool before the classifier lets
the models take other input sizes too (VGG needs at least 32x32: it pools 2x2 five times).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int, affine_bn: bool, bias: bool,
            groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias, groups=groups),
            nn.BatchNorm2d(c_out, affine=affine_bn)]


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A shortcut: subsample by `stride`, pad the new channels with zeros
    (no weights; the official Gem-Miner ResNet-20 uses it)."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers and an identity / shortcut connection."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, affine_bn: bool, bias: bool,
                 shortcut: str = "conv") -> None:
        super().__init__()
        self.residual = nn.Sequential(*conv_bn(c_in, planes, 3, stride, affine_bn, bias), nn.ReLU(),
                                      *conv_bn(planes, planes, 3, 1, affine_bn, bias))
        self.shortcut = _shortcut(c_in, planes, stride, affine_bn, bias, shortcut)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, affine_bn: bool, bias: bool,
                 shortcut: str = "conv") -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.residual = nn.Sequential(*conv_bn(c_in, planes, 1, 1, affine_bn, bias), nn.ReLU(),
                                      *conv_bn(planes, planes, 3, stride, affine_bn, bias), nn.ReLU(),
                                      *conv_bn(planes, c_out, 1, 1, affine_bn, bias))
        self.shortcut = _shortcut(c_in, c_out, stride, affine_bn, bias, shortcut)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int, affine_bn: bool, bias: bool, kind: str) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    if kind == "zero_pad":
        return ZeroPadShortcut(c_out - c_in, stride)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), nn.BatchNorm2d(c_out, affine=affine_bn))


class ResNet(nn.Module):
    """stem -> stages of blocks (the first block of each later stage halves the size) -> pool -> linear."""

    def __init__(self, stem: nn.Sequential, stem_channels: int, block: type[nn.Module], stages: Sequence[int],
                 blocks: Sequence[int], num_classes: int, affine_bn: bool, bias: bool, shortcut: str) -> None:
        super().__init__()
        self.stem = stem
        layers, c_in = [], stem_channels
        for index, (planes, count) in enumerate(zip(stages, blocks, strict=True)):
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                layers.append(block(c_in, planes, stride, affine_bn, bias, shortcut))
                c_in = planes * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cifar_resnet(depth: int, input_shape: tuple[int, ...], num_classes: int, affine_bn: bool, bias: bool,
                  width: int | None) -> nn.Module:
    """He et al.'s CIFAR ResNet-(6n+2): 3 stages of n basic blocks, 16/32/64 channels, option A shortcuts."""
    width = width or 16
    n = (depth - 2) // 6
    stem = nn.Sequential(*conv_bn(input_shape[0], width, 3, 1, affine_bn, bias), nn.ReLU())
    return ResNet(stem, width, BasicBlock, [width, 2 * width, 4 * width], [n] * 3, num_classes, affine_bn, bias,
                  shortcut="zero_pad")


def resnet20(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
             width: int | None = None) -> nn.Module:
    return _cifar_resnet(20, input_shape, num_classes, affine_bn, bias, width)


def resnet32(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
             width: int | None = None) -> nn.Module:
    return _cifar_resnet(32, input_shape, num_classes, affine_bn, bias, width)


def resnet56(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
             width: int | None = None) -> nn.Module:
    return _cifar_resnet(56, input_shape, num_classes, affine_bn, bias, width)


def _imagenet_style_resnet(block: type[nn.Module], blocks: list[int], input_shape: tuple[int, ...], num_classes: int,
                           affine_bn: bool, bias: bool, width: int | None) -> nn.Module:
    """ResNet-18/50 with 1x1-conv shortcuts. Stem by input size: up to 32x32 a 3x3 stride-1
    conv (the CIFAR stem); larger (Tiny ImageNet's 64x64) the ImageNet stem, 7x7 stride 2 and
    a 3x3 stride-2 max pool, as the official Gem-Miner Tiny-ImageNet ResNets do."""
    width = width or 64
    if max(input_shape[1:]) <= 32:
        stem = nn.Sequential(*conv_bn(input_shape[0], width, 3, 1, affine_bn, bias), nn.ReLU())
    else:
        stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 7, stride=2, padding=3, bias=bias),
                             nn.BatchNorm2d(width, affine=affine_bn), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
    return ResNet(stem, width, block, [width, 2 * width, 4 * width, 8 * width], blocks, num_classes, affine_bn, bias,
                  shortcut="conv")


def resnet18(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
             width: int | None = None) -> nn.Module:
    return _imagenet_style_resnet(BasicBlock, [2, 2, 2, 2], input_shape, num_classes, affine_bn, bias, width)


def resnet50(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
             width: int | None = None) -> nn.Module:
    return _imagenet_style_resnet(Bottleneck, [3, 4, 6, 3], input_shape, num_classes, affine_bn, bias, width)


class PreActivationBlock(nn.Module):
    """Wide ResNet block: BN-ReLU-conv3x3 twice; a 1x1-conv shortcut from the activated
    input where the shape changes, else identity (Zagoruyko & Komodakis; the official Gem-Miner WRN)."""

    def __init__(self, c_in: int, c_out: int, stride: int, affine_bn: bool, bias: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, affine=affine_bn)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(c_out, affine=affine_bn)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """3x3 stem conv, 3 stages of pre-activation blocks, BN-ReLU, global pool, linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, blocks_per_stage: int, width: int,
                 affine_bn: bool, bias: bool) -> None:
        super().__init__()
        stem_channels = max(width // 2, 1)
        self.stem = nn.Conv2d(input_shape[0], stem_channels, 3, padding=1, bias=bias)
        layers, c_in = [], stem_channels
        for index, channels in enumerate((width, 2 * width, 4 * width)):
            for position in range(blocks_per_stage):
                stride = 2 if index > 0 and position == 0 else 1
                layers.append(PreActivationBlock(c_in, channels, stride, affine_bn, bias))
                c_in = channels
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in, affine=affine_bn)
        self.fc = nn.Linear(c_in, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def wrn28_2(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
            width: int | None = None) -> nn.Module:
    """Wide ResNet-28-2: a 16-channel stem, then 3 stages of 4 pre-activation blocks with
    32/64/128 channels (`width` = the first stage's, default 32; the stem has width / 2)."""
    return WideResNet(input_shape, num_classes, 4, width or 32, affine_bn, bias)


class PooledClassifier(nn.Module):
    """`features`, then a global average pool and the linear classifier `fc`."""

    features: nn.Module
    fc: nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


VGG16_STAGES = ((1, 2), (2, 2), (4, 3), (8, 3), (8, 3))  # (channels / width, convs) before each 2x2 max pool


class VGG(PooledClassifier):
    """VGG-16 for CIFAR: 13 3x3 conv + BN layers in 5 pooled stages, global average pool, one linear layer."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, affine_bn: bool, bias: bool,
                 width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for ratio, convs in VGG16_STAGES:
            for _ in range(convs):
                layers += [*conv_bn(c_in, ratio * width, 3, 1, affine_bn, bias), nn.ReLU()]
                c_in = ratio * width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes, bias=bias)


def vgg16(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
          width: int | None = None) -> nn.Module:
    return VGG(input_shape, num_classes, affine_bn, bias, width or 64)


class InvertedResidual(nn.Module):
    """MobileNet-V2 block: 1x1 expand, 3x3 depthwise (strided), 1x1 project; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int, affine_bn: bool, bias: bool) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_bn(c_in, hidden, 1, 1, affine_bn, bias), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, affine_bn, bias, groups=hidden), nn.ReLU6(),
                   *conv_bn(hidden, c_out, 1, 1, affine_bn, bias)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


# (expansion, channels, blocks, stride); the CIFAR variant keeps stride 1 in the stem and the second stage.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(PooledClassifier):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, affine_bn: bool, bias: bool,
                 width: int) -> None:
        super().__init__()
        scale = width / 32

        def scaled(channels: int) -> int:
            return max(1, round(channels * scale))

        layers: list[nn.Module] = [*conv_bn(input_shape[0], width, 3, 1, affine_bn, bias), nn.ReLU6()]
        c_in = width
        for expansion, channels, blocks, stride in MOBILENET_V2_STAGES:
            for index in range(blocks):
                layers.append(InvertedResidual(c_in, scaled(channels), expansion, stride if index == 0 else 1,
                                               affine_bn, bias))
                c_in = scaled(channels)
        last = max(1280, scaled(1280))  # as in the original, the last layer never narrows
        layers += [*conv_bn(c_in, last, 1, 1, affine_bn, bias), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes, bias=bias)


def mobilenet_v2(input_shape: tuple[int, ...], num_classes: int, *, affine_bn: bool = False, bias: bool = False,
                 width: int | None = None) -> nn.Module:
    """MobileNet-V2 for CIFAR (Sandler et al., stride 1 in the stem and second stage).
    `width` is the stem's channels (default 32); every layer scales with width / 32."""
    return MobileNetV2(input_shape, num_classes, affine_bn, bias, width or 32)
