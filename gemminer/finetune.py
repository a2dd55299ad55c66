"""Fine-tuning: weights trainable from their initial values, mask fixed."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gemminer.config import FinetuneConfig
from gemminer.methods.base import MetricsLog
from gemminer.train import Batch, evaluate, train_epoch


def paper_milestones(epochs: int) -> list[int]:
    """The official code's multistep milestones for E epochs."""
    known = {100: [50, 80], 150: [80, 120], 200: [100, 150], 300: [150, 250]}
    return known.get(epochs, [epochs // 2, (2 * epochs) // 3])


def finetune(model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None, epochs: int = 30,
             config: FinetuneConfig | None = None, log: MetricsLog | None = None, progress: bool = False,
             phase: str = "finetune") -> list[dict[str, Any]]:
    """Train every parameter of `model` (masked through parametrize, or dense) with SGD.

    Masked weights stay exactly zero: the mask multiplies the trained original weight.
    Returns the per-epoch rows (also sent to `log`).
    """
    config = config or FinetuneConfig()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))
    else:
        milestones = config.milestones if config.milestones is not None else paper_milestones(epochs)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    start = time.perf_counter()
    history = []
    for epoch in range(epochs):
        lr = optimizer.param_groups[0]["lr"]
        stats = train_epoch(model, train, optimizer, progress=progress, description=f"{phase} {epoch + 1}/{epochs}")
        scheduler.step()
        row = {"phase": phase, "epoch": epoch + 1, "lr": lr, "train_loss": stats.loss, "train_acc": stats.accuracy}
        if test is not None:
            row["test_acc"] = evaluate(model, test).accuracy
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        if log is not None:
            log(row)
    return history
