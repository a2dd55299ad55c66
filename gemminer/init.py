"""Initial weights: the schemes the paper uses, and a hash that identifies them."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from gemminer.errors import GemminerError
from gemminer.masking import owner

WEIGHT_INITS = ("signed_constant", "kaiming_normal", "keep")


@torch.no_grad()
def initialize_weights(model: nn.Module, names: list[str], scheme: str, generator: torch.Generator) -> None:
    """Re-draw the named weights in place.

    signed_constant: sign(w) * sqrt(2 / fan_in) for a Kaiming-normal draw w (the paper's default).
    kaiming_normal: N(0, 2 / fan_in). keep: leave the model's own weights.
    """
    if scheme not in WEIGHT_INITS:
        raise GemminerError(f"unknown weight init {scheme!r}; allowed: {', '.join(WEIGHT_INITS)}")
    if scheme == "keep":
        return
    for name in names:
        weight = owner(model, name).weight
        fan_in = weight[0].numel()  # in_features, or in_channels/groups * kernel size
        std = math.sqrt(2.0 / fan_in)
        draw = torch.randn(weight.shape, generator=generator, dtype=weight.dtype, device=generator.device)
        if scheme == "signed_constant":
            draw = torch.sign(draw) * std
        else:
            draw = draw * std
        weight.copy_(draw.to(weight.device))


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").clone(memory_format=torch.contiguous_format)  # channels_last too
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def parameters_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unmasked parameters by their plain names (``layer.weight``), masked (parametrize or
    torch.nn.utils.prune) or not."""
    state = {}
    for name, tensor in model.named_parameters():
        if ".parametrizations.weight." in name:
            if not name.endswith(".parametrizations.weight.original"):
                continue  # a mask's own parameters (scores) are not weights
            name = name.replace(".parametrizations.weight.original", ".weight")
        elif name.endswith("weight_orig"):  # torch.nn.utils.prune keeps the unpruned weight here
            name = name.removesuffix("_orig")
        state[name] = tensor.detach()
    return state


def init_hash(model: nn.Module) -> str:
    """Hash of a model's parameters (buffers excluded): what a ticket was found on."""
    return state_hash(parameters_state(model))
