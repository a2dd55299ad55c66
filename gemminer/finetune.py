"""Fine-tuning: weights trainable from their initial values, mask fixed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gemminer import distributed
from gemminer.checkpoint import Checkpointer
from gemminer.config import FinetuneConfig
from gemminer.methods.base import MetricsLog
from gemminer.train import Batch, evaluate, fit, stateful_streams


def paper_milestones(epochs: int) -> list[int]:
    """The official code's multistep milestones for E epochs."""
    known = {100: [50, 80], 150: [80, 120], 200: [100, 150], 300: [150, 250]}
    milestones = known.get(epochs, [epochs // 2, (2 * epochs) // 3])
    return sorted({m for m in milestones if 0 < m < epochs})  # short runs: no drop at 0, none twice


def finetune(model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None, epochs: int = 30,
             config: FinetuneConfig | None = None, log: MetricsLog | None = None, progress: bool = False,
             phase: str = "finetune", checkpoint: Checkpointer | None = None) -> list[dict[str, Any]]:
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

    def end_of_epoch(epoch: int) -> dict[str, Any]:
        return {"test_acc": evaluate(model, test).accuracy} if test is not None else {}

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **stateful_streams(train=train)}
    return fit(distributed.wrap(model), train, optimizer, scheduler, epochs, phase=phase, end_of_epoch=end_of_epoch,
               log=log, checkpoint=checkpoint, state=state, progress=progress)
