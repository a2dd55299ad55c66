"""Edge-popup (Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?", CVPR 2020).

Weights stay at their initial values (signed constant, as in the paper's best configs);
every prunable weight gets a score, Kaiming-uniform initialised as in the reference code.
The forward pass uses the weights whose |score| is among the top k of their layer (k from
the same largest-remainder split as uniform random tickets, so N * density is exact), or of
all layers together with ``scope="global"``; the gradient passes straight through the
selection to every score (the reference ``GetSubnet``). Only the scores train, with the
paper's CIFAR recipe: SGD lr 0.1, momentum 0.9, weight decay 5e-4 on the scores, cosine,
batch 256 (`config.PUBLISHED_DATA`). The ticket is the final top-k mask; it trains with the same
official recipe (`config.RECIPES["edge-popup"]`).

``scope="global"`` is an extension (the paper ranks per layer): Kaiming-uniform scores are
about 1/sqrt(fan_in) in size, so a global ranking starts by favouring layers of small
fan-in and can leave a wide classifier almost empty at low density.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.masking import GlobalTopK, TopKScoreMask, attach, like_weight, weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.methods.random import uniform_counts
from gemminer.methods.scoring import exact_count, keep_top, keep_top_per_layer
from gemminer.seeding import make_generator
from gemminer.train import Batch

SCOPES = ("layer", "global")


@dataclass
class EdgePopupConfig:
    """Search settings; defaults are the paper's CIFAR-10 configs."""

    epochs: int = field(default=100, metadata={"help": "score training epochs"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adam"})
    lr: float = field(default=0.1, metadata={"help": "score learning rate",
                                             "tune": {"low": 1e-2, "high": 3.0, "log": True}})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay on the scores",
                                                        "tune": {"low": 1e-6, "high": 1e-2, "log": True}})
    lr_schedule: str = field(default="cosine", metadata={"help": "cosine | constant"})
    scope: str = field(default="layer", metadata={"help": "top-k per layer (paper) | global (over all layers)"})
    scale_weights: bool = field(default=False, metadata={
        "help": "scale the fixed weights by 1/sqrt(density) during the search (the paper's 'scaled' configs)"})

    def validate(self) -> None:  # numbers: `check_ranges`
        for key, value, allowed in (("optimizer", self.optimizer, ("sgd", "adam")),
                                    ("lr_schedule", self.lr_schedule, ("cosine", "constant")),
                                    ("scope", self.scope, SCOPES)):
            if value not in allowed:
                raise GemminerError(f"unknown search.{key} {value!r}; allowed: {', '.join(allowed)}")


class EdgePopup(PruningMethod):
    """Edge-popup: train a score per weight, keep the top-k scored weights of the untrained network.

    With ``scale_weights`` the searched copy's fixed weights are multiplied by
    1/sqrt(density), so the kept weights have about the variance of the dense layer. The
    ticket is the mask alone: the scale is not part of it, so fine-tuning and the accuracy
    before fine-tuning use the initial weights (with BatchNorm after a layer, the scale
    changes nothing there anyway).
    """

    name = "edge-popup"
    Config = EdgePopupConfig
    weight_init = "signed_constant"
    recipe = "edge-popup"  # the official config's training (RECIPES), not the Gem-Miner paper's fine-tuning
    ranked = False  # the inverted-ticket check is not defined for a trained top-k selection

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        config = self.config
        start = time.perf_counter()
        net = self.frozen_copy(model)
        names = self.prunable(net)
        fixed = weights(net, names)
        sizes = {name: weight.numel() for name, weight in fixed.items()}
        total, counts = exact_count(sizes, self.density), uniform_counts(sizes, self.density)
        if config.scale_weights:
            with torch.no_grad():
                for weight in fixed.values():
                    weight.mul_(1.0 / math.sqrt(self.density))
        generator = make_generator(self.seed, "scores")
        shared = GlobalTopK(total) if config.scope == "global" else None
        masks: dict[str, TopKScoreMask] = {}
        for name in names:  # every member exists before the first is attached (global ranking)
            scores = torch.empty(fixed[name].shape, dtype=fixed[name].dtype)
            nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)
            masks[name] = TopKScoreMask(like_weight(scores, fixed[name]), None if shared else counts[name], shared)
        attach(net, names, lambda name, weight: masks[name])

        def end_of_epoch(epoch: int) -> dict[str, Any]:
            return {"density": total / sum(sizes.values())}

        setup_seconds = time.perf_counter() - start
        history = self.fit_scores(net, [mask.scores for mask in masks.values()], train, epochs=config.epochs,
                                  optimizer=config.optimizer, lr=config.lr, momentum=config.momentum,
                                  weight_decay=config.weight_decay, lr_schedule=config.lr_schedule,
                                  end_of_epoch=end_of_epoch, log=log, recalibration=recalibration,
                                  checkpoint=checkpoint, test=test)
        seconds = setup_seconds + (history[-1]["seconds"] if history else 0.0)
        ranking = {name: mask.scores.detach().abs().to("cpu") for name, mask in masks.items()}
        # the same selection the forward pass makes (ties by index), decided on rank 0 and broadcast
        final = keep_top(ranking, total) if shared else keep_top_per_layer(ranking, counts)
        ticket = self.make_ticket(model, final, scope=config.scope, search_epochs=config.epochs)
        return SearchResult(ticket=ticket, gem=ticket, epochs=config.epochs, seconds=seconds, history=history,
                            network=net, scores=ranking)
