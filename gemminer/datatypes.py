"""The data types every data module shares: `TensorData` and `Dataset`, the cache folder, `.npz` reading.

They live below both `gemminer.data` (batches, splits) and `gemminer.datasets` (file formats), which
import them from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gemminer.errors import GemminerError, reading


@dataclass
class TensorData:
    """Inputs and integer labels, already on their device."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise GemminerError(f"TensorData has {len(self.x)} inputs and {len(self.y)} labels: one label per input")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(self.x.to(device), self.y.to(device))


@dataclass
class Dataset:
    """Splits as tensors. Image sets hold uint8 NCHW images plus the per-channel `mean` and
    `std` (of the training images, in [0, 1]) that `transform` normalizes with, per batch;
    `augmentation` names the data set's standard training augmentation."""

    name: str
    train: TensorData
    test: TensorData
    num_classes: int
    val: TensorData | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augmentation: str = "none"  # "crop_flip": padded random crop (H // 8 pixels) + horizontal flip

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def transform(self, train: bool = False, generator: torch.Generator | None = None,
                  augment: bool = True, channels_last: bool = False) -> Callable[[Tensor], Tensor] | None:
        """The per-batch transform: normalization, plus augmentation for training batches
        (`train` and `augment`, drawn from `generator`). None for data stored as floats.
        `channels_last` lays image batches out NHWC (for CUDA: on some CPUs oneDNN's NHWC
        backward of strided 1x1 convolutions corrupts memory in torch 2.13)."""
        from gemminer.transforms import ImageTransform

        if self.mean is None or self.std is None:
            return None
        channels_last = channels_last and len(self.input_shape) == 3
        if train and augment and self.augmentation == "crop_flip":
            return ImageTransform(self.mean, self.std, crop_padding=self.input_shape[-1] // 8, flip=True,
                                  generator=generator, channels_last=channels_last)
        return ImageTransform(self.mean, self.std, channels_last=channels_last)


def default_cache_dir() -> Path:
    """``$GEMMINER_CACHE`` or ``~/.cache/gemminer``."""
    return Path(os.environ.get("GEMMINER_CACHE", Path.home() / ".cache" / "gemminer"))


def read_npz(path: Path, what: str, remedy: str) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file (no pickle), read at once; a zero-byte, truncated or foreign
    file is one error line, and the file is closed on every path."""
    with reading(path, what, remedy), open(path, "rb") as handle, np.load(handle, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}
