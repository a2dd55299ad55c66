"""Batched image transforms on tensors: uint8 -> normalized float, padded random crop, flip.

They run on whole batches on the data's device (no per-image Python work), and draw
their randomness from an explicit generator, so augmentation is a function of the seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class ImageTransform:
    """uint8 NCHW batch -> float32 ``(x / 255 - mean) / std``, optionally augmented first.

    `crop_padding` > 0: pad each image by that many zero (black) pixels per side and crop
    back to the original size at a random offset; `flip`: mirror half the images left-right.
    Both happen in one gather on the uint8 batch. `channels_last` returns 4-D batches in
    that memory format (what 2-D convolutions run fastest on).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, crop_padding: int = 0, flip: bool = False,
                 generator: torch.Generator | None = None, channels_last: bool = False) -> None:
        if (crop_padding > 0 or flip) and generator is None:
            raise ValueError("random augmentation needs an explicit generator")
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_padding, self.flip, self.generator = crop_padding, flip, generator
        self.channels_last = channels_last
        self._affine: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def _scale_shift(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """x * scale + shift == (x / 255 - mean) / std, per channel; made once per device."""
        if device not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self._affine[device] = (1.0 / (255.0 * std), -mean / std)
        return self._affine[device]

    def __call__(self, images: Tensor) -> Tensor:
        channels_last = self.channels_last and images.dim() == 4
        if self.augments:
            images = crop_and_flip(images, self.crop_padding, self.flip, self.generator, channels_last=channels_last)
        elif channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # on uint8: 4x less to move than float
        scale, shift = self._scale_shift(images.device)
        return images.to(torch.float32).mul_(scale).add_(shift)  # in place: keeps the memory format

    def __repr__(self) -> str:
        return (f"ImageTransform(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, "
                f"flip={self.flip})")


def crop_and_flip(images: Tensor, padding: int, flip: bool, generator: torch.Generator,
                  channels_last: bool = False) -> Tensor:
    """Padded random crop + random horizontal flip of an NCHW batch, as one `take` of precomputed
    flat indices (with `channels_last`, the result is laid out NHWC, at no extra copy).

    Offsets and flips are drawn on the generator's device; with the generator on the
    data's device nothing crosses between host and device.
    """
    batch, channels, height, width = images.shape
    device = images.device
    if padding > 0:
        images = F.pad(images, (padding, padding, padding, padding))
        top = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator, device=generator.device)
        left = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator, device=generator.device)
        top, left = top.to(device), left.to(device)
    else:
        top = left = torch.zeros((batch, 1), dtype=torch.long, device=device)
    padded_height, padded_width = height + 2 * padding, width + 2 * padding
    rows = top + torch.arange(height, device=device)  # (B, H)
    columns = torch.arange(width, device=device).expand(batch, width)
    if flip:
        mirrored = torch.rand((batch, 1), generator=generator, device=generator.device).to(device) < 0.5
        columns = torch.where(mirrored, columns.flip(1), columns)
    columns = left + columns  # (B, W)
    image_size = channels * padded_height * padded_width
    spatial = (torch.arange(batch, device=device).view(batch, 1, 1) * image_size
               + rows.view(batch, height, 1) * padded_width + columns.view(batch, 1, width))  # (B, H, W)
    channel_offset = torch.arange(channels, device=device) * (padded_height * padded_width)
    flat = images.contiguous().view(-1)
    if channels_last:
        return flat.take(spatial.unsqueeze(3) + channel_offset).permute(0, 3, 1, 2)  # NHWC memory, NCHW shape
    return flat.take(spatial.unsqueeze(1) + channel_offset.view(1, channels, 1, 1))
