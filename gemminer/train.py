"""The training loop, evaluation and BatchNorm recalibration, shared by every method."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from gemminer.errors import GemminerError
from gemminer.masking import attach_fixed_masks

Batch = tuple[Tensor, Tensor]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise GemminerError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GemminerError(f"device {name!r} asked for, but CUDA is not available")
    return device


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


AUTOCAST_ATTRIBUTE = "_gemminer_autocast_dtype"


def enable_autocast(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Opt-in: gemminer's loops run `model`'s forward passes under ``torch.autocast(dtype)``.
    Kept as an attribute of the model, so copies (the search's, fine-tuning's) keep it."""
    setattr(model, AUTOCAST_ATTRIBUTE, dtype)
    return model


def forward(model: nn.Module, inputs: Tensor) -> Tensor:
    """model(inputs), under autocast where `enable_autocast` asked for it; logits in fp32."""
    dtype = getattr(model, AUTOCAST_ATTRIBUTE, None)
    if dtype is None:
        return model(inputs)
    with torch.autocast(inputs.device.type, dtype=dtype):
        logits = model(inputs)
    return logits.float()


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int


def train_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                after_step: Callable[[], None] | None = None, progress: bool = False,
                description: str = "") -> EpochStats:
    """One pass of cross-entropy training; `after_step` runs after every optimizer step."""
    device = model_device(model)
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    samples = 0
    for inputs, targets in tqdm(batches, desc=description, leave=False, disable=not progress):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = forward(model, inputs)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        # accumulate on the device: no host sync per step
        loss_sum += loss.detach() * len(targets)
        correct += (logits.detach().argmax(1) == targets).sum()
        samples += len(targets)
    mean_loss = (loss_sum / max(samples, 1)).item()
    if not math.isfinite(mean_loss):
        raise GemminerError(f"training diverged (loss {mean_loss}); lower the learning rate")
    return EpochStats(mean_loss, correct.item() / max(samples, 1), samples)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch]) -> EpochStats:
    """Loss and top-1 accuracy in eval mode."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    loss_sum, correct, samples = 0.0, 0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = forward(model, inputs)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(1) == targets).sum())
        samples += len(targets)
    model.train(was_training)
    return EpochStats(loss_sum / max(samples, 1), correct / max(samples, 1), samples)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch], num_batches: int) -> None:
    """Recompute BatchNorm running statistics as an exact average over `num_batches`
    training batches (train mode, no gradients). A changed mask makes the old
    statistics wrong, and a fresh model has none."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if num_batches <= 0 or not norms:
        return
    device = model_device(model)
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches seen
    was_training = model.training
    model.train()
    for index, (inputs, _) in enumerate(batches):
        if index >= num_batches:
            break
        forward(model, inputs.to(device, non_blocking=True))
    for norm, momentum in zip(norms, momenta, strict=False):
        norm.momentum = momentum
    model.train(was_training)


def masked_accuracy(init_model: nn.Module, masks: dict[str, Tensor], test: Iterable[Batch],
                    recalibration: Iterable[Batch], recalibration_batches: int) -> float:
    """Accuracy of `init_model`'s weights under `masks`, untrained, with recalibrated BN.
    `init_model` is not changed."""
    model = copy.deepcopy(init_model)
    attach_fixed_masks(model, masks)
    recalibrate_batchnorm(model, recalibration, recalibration_batches)
    return evaluate(model, test).accuracy
