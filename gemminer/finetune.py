"""Fine-tuning: weights trainable from their initial values, mask fixed."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gemminer import distributed
from gemminer.checkpoint import Checkpointer
from gemminer.config import FinetuneConfig, check_integer, check_ranges
from gemminer.errors import GemminerError
from gemminer.methods.base import MetricsLog
from gemminer.train import Batch, evaluate, fit, known_length, stateful_streams


def paper_milestones(epochs: int) -> list[int]:
    """The official code's multistep milestones for E epochs."""
    known = {100: [50, 80], 150: [80, 120], 200: [100, 150], 300: [150, 250]}
    milestones = known.get(epochs, [epochs // 2, (2 * epochs) // 3])
    return sorted({m for m in milestones if 0 < m < epochs})  # short runs: no drop at 0, none twice


def finetune(model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None, epochs: int = 30,
             config: FinetuneConfig | None = None, log: MetricsLog | None = None, progress: bool = False,
             phase: str = "finetune", checkpoint: Checkpointer | None = None, start_step: int = 0,
             after_step: Callable[[], None] | None = None, extra_state: dict[str, Any] | None = None,
             eval_every: int = 1, compile: bool = False) -> list[dict[str, Any]]:
    """Train every parameter of `model` (masked through parametrize, or dense) with SGD.

    Masked weights stay exactly zero: the mask multiplies the trained original weight.
    Returns the per-epoch rows (also sent to `log`). `start_step` > 0 joins the schedule
    at that optimizer step (IMP after rewinding to iteration k): the learning-rate
    schedule stands where it stood then, and only the rest of the epochs train.
    `after_step` runs after each step; `extra_state` is checkpointed with the loop. The test
    accuracy is measured every `eval_every` epochs and after the last. `compile` runs the
    training steps and evaluation under torch.compile (`train.compiled`).
    """
    config = config or FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise GemminerError(f"finetune's config is a FinetuneConfig, not a {type(config).__name__}")
    check_ranges(config, "finetune.")
    for name, value, least in (("epochs", epochs, 0), ("start_step", start_step, 0), ("eval_every", eval_every, 1)):
        check_integer(f"finetune {name}", value, least)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))
    else:
        milestones = config.milestones if config.milestones is not None else paper_milestones(epochs)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)

    first_epoch = 0
    if start_step:
        steps = known_length(train)
        if steps is None:
            raise GemminerError("starting the schedule mid-way needs batches with a length")
        first_epoch, skip = divmod(start_step, steps)
        if first_epoch >= epochs:
            raise GemminerError(f"the schedule starts at step {start_step}, past its end ({epochs} epochs of "
                                f"{steps} steps): nothing would train")
        with warnings.catch_warnings():  # stepping the schedule forward before any optimizer step is the point
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(first_epoch):
                scheduler.step()
        if skip:
            if not hasattr(train, "load_state_dict"):
                raise GemminerError("starting mid-epoch needs gemminer Batches (a DataLoader cannot skip batches)")
            train.load_state_dict({"position": skip})  # the first pass starts at batch `skip`

    def evaluation() -> dict[str, Any]:
        return {"test_acc": evaluate(model, test).accuracy} if test is not None else {}

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **stateful_streams(train=train),
             **(extra_state or {})}
    return fit(distributed.wrap(model), train, optimizer, scheduler, epochs, phase=phase, evaluation=evaluation,
               eval_every=eval_every, after_step=after_step, log=log, checkpoint=checkpoint, state=state,
               progress=progress, first_epoch=first_epoch, compile=compile)
