"""Thresholding shared by every score-then-keep method: exact counts, deterministic ties.

A method scores weights (higher = more worth keeping); these helpers turn scores into
masks of exactly the requested size. Ties go by the global index (layer order, then
position in the layer): the earlier weight is kept. Under torchrun rank 0 decides and
the masks are broadcast, so every rank holds the same ticket.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gemminer import distributed
from gemminer.errors import GemminerError


def _flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.detach().flatten().to("cpu", torch.float64) for t in tensors.values()])


def _unflatten(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    masks, offset = {}, 0
    for name, tensor in like.items():
        masks[name] = flat[offset:offset + tensor.numel()].view(tensor.shape).clone()
        offset += tensor.numel()
    return masks


def _top_indices(scores: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` highest scores; NaN ranks lowest; ties by index."""
    key = torch.nan_to_num(scores, nan=-math.inf)
    order = torch.sort(-key, stable=True).indices  # stable: equal scores keep index order
    return order[:keep]


def keep_top(scores: dict[str, Tensor], keep: int, eligible: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Bool masks keeping exactly `keep` weights with the highest scores over all layers
    together; with `eligible`, only among those (IMP's survivors)."""
    flat = _flat(scores)
    if eligible is not None:
        allowed = torch.cat([m.detach().flatten().to("cpu", torch.bool) for m in eligible.values()])
        if keep > int(allowed.sum()):
            raise GemminerError(f"cannot keep {keep} weights among {int(allowed.sum())} eligible ones")
        flat = flat.masked_fill(~allowed, -math.inf)
        flat = torch.where(allowed, torch.nan_to_num(flat, nan=torch.finfo(torch.float64).min), flat)
    if not 0 <= keep <= flat.numel():
        raise GemminerError(f"cannot keep {keep} of {flat.numel()} weights")
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[_top_indices(flat, keep)] = True
    distributed.broadcast(chosen, source=0)
    return _unflatten(chosen, scores)


def keep_top_per_layer(scores: dict[str, Tensor], counts: dict[str, int]) -> dict[str, Tensor]:
    """Bool masks keeping exactly counts[name] highest-scored weights in each layer."""
    masks = {}
    for name, tensor in scores.items():
        flat = tensor.detach().flatten().to("cpu", torch.float64)
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[_top_indices(flat, counts[name])] = True
        distributed.broadcast(chosen, source=0)
        masks[name] = chosen.view(tensor.shape)
    return masks


def keep_bottom(scores: dict[str, Tensor], keep: int) -> dict[str, Tensor]:
    """The inverted ticket: exactly `keep` weights with the LOWEST scores (ties by index)."""
    return keep_top({name: -tensor.to(torch.float64) for name, tensor in scores.items()}, keep)


def exact_count(sizes: dict[str, int] | int, density: float) -> int:
    """round(N * density), the number of weights every ticket of `density` keeps."""
    total = sizes if isinstance(sizes, int) else sum(sizes.values())
    return round(total * density)
