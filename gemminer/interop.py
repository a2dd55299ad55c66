"""Tickets as `torch.nn.utils.prune` masks, both ways.

Code written for PyTorch's pruning utilities (``weight_orig`` / ``weight_mask`` plus a
forward pre-hook) can take a gemminer ticket, and masks made with those utilities can
become a ticket, to be saved, reported on, exported or compared like any other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from gemminer.errors import GemminerError
from gemminer.init import init_hash
from gemminer.masking import owner, parameter_users
from gemminer.ticket import Ticket


def to_prune_masks(ticket: Ticket, model: nn.Module, strict_init: bool = False) -> nn.Module:
    """Prune `model` in place with `prune.custom_from_mask`, one call per ticket weight.

    Each masked module gets ``weight_orig`` (parameter) and ``weight_mask`` (buffer);
    `torch.nn.utils.prune.remove(module, "weight")` makes the pruning permanent.
    """
    ticket.check(model, strict_init)
    for name, mask in ticket.masks.items():
        module = owner(model, name)
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            raise GemminerError(f"{name} is already pruned by torch.nn.utils.prune; remove it first")
        for user, attribute in parameter_users(model, module.weight):  # tied: every use of it
            prune.custom_from_mask(user, attribute, mask.to(module.weight.device))
    return model


def from_prune_masks(model: nn.Module, **metadata: Any) -> Ticket:
    """A ticket from the ``weight_mask`` buffers `torch.nn.utils.prune` left on `model`,
    in `named_modules()` order. `metadata` is added to the ticket's; the init hash is
    that of the unpruned weights (``weight_orig``), so the ticket applies to them."""
    masks, seen = {}, set()
    for module_name, module in model.named_modules():
        mask = getattr(module, "weight_mask", None)
        if isinstance(mask, torch.Tensor) and hasattr(module, "weight_orig") and id(module.weight_orig) not in seen:
            seen.add(id(module.weight_orig))  # a tied weight is one mask, named by its first layer
            masks[f"{module_name}.weight" if module_name else "weight"] = mask != 0
    if not masks:
        raise GemminerError("the model carries no torch.nn.utils.prune weight masks (no weight_mask buffer)")
    return Ticket(masks, {"method": "torch.nn.utils.prune", "init_hash": init_hash(model), **metadata})
