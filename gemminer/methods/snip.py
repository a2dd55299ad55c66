"""SNIP (Lee, Ajanthan and Torr, "SNIP: Single-shot Network Pruning based on Connection
Sensitivity", ICLR 2019).

Connection sensitivity of weight j is |dL/dc_j| at c = 1 for the masked weight c * w,
i.e. |g_j * w_j| with g = dL/dw of the cross-entropy on a training batch. One shot, one
global ranking; the highest saliencies are kept (the paper's normalisation by the sum
does not change the order). With `batches` > 1 the gradients of that many batches are
summed before taking the absolute value.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemminer import distributed
from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.masking import weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.methods.scoring import exact_count, keep_top
from gemminer.train import Batch, class_scores

BN_MODES = ("eval", "train")


@dataclass
class SnipConfig:
    """SNIP's options; the defaults are the reference's: one batch, BatchNorm in inference mode."""

    batches: int = field(default=1, metadata={"help": "training batches whose loss gradients are summed (paper: 1)"})
    bn_mode: str = field(default="eval", metadata={
        "help": "eval: BatchNorm on its running statistics while scoring, as the SNIP and Synaptic-Flow code score "
                "| train: on batch statistics (gemminer before 2026-11-26)"})

    def validate(self) -> None:  # its number: `check_ranges` (batches >= 1)
        if self.bn_mode not in BN_MODES:
            raise GemminerError(f"unknown search.bn_mode {self.bn_mode!r}; allowed: {', '.join(BN_MODES)}")


def first_batches(train: Iterable[Batch], count: int) -> list[Batch]:
    """Up to `count` batches from a fresh pass over `train` (fewer if it has fewer); the
    pass is closed afterwards so a resumable loader is not left mid-pass."""
    iterator = iter(train)
    taken: list[Batch] = []
    try:
        for batch in iterator:
            taken.append(batch)
            if len(taken) >= count:
                break
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            close()
    return taken


def snip_scores(net: nn.Module, names: list[str], batches: Iterable[Batch], device: torch.device
                ) -> dict[str, Tensor]:
    """|w * sum_b dL_b/dw| per prunable weight (L_b: mean cross-entropy of batch b), on
    `net` as it is (mode included). Sets requires_grad on the weights of `net`."""
    params = weights(net, names)
    for parameter in params.values():
        parameter.requires_grad_(True)
    total = {name: torch.zeros_like(parameter) for name, parameter in params.items()}
    with torch.enable_grad():
        for inputs, targets in batches:
            loss = F.cross_entropy(class_scores(net(inputs.to(device))), targets.to(device))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads, strict=True):
                if grad is not None:  # a weight the loss does not reach has gradient 0
                    total[name] += grad
    if distributed.active():  # each rank saw its share of every global batch: the mean is the global gradient
        for gradient in total.values():
            distributed.all_reduce_sum(gradient).div_(distributed.world_size())
    return {name: (params[name].detach() * total[name]).abs() for name in params}


class Snip(PruningMethod):
    """One-shot connection sensitivity |w * dL/dw| on training batches, BatchNorm in inference mode."""

    name = "snip"
    Config = SnipConfig
    ranked = True

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        start = time.perf_counter()
        net = copy.deepcopy(model).to(self.device)
        # the SNIP code (is_train False) and Synaptic-Flow's (model.eval()) score with BatchNorm in inference mode:
        # at init its running statistics are 0 and 1; in train mode the masks of a ResNet-20 at density 0.05
        # shared 21% of their weights with these
        net.train(self.config.bn_mode == "train")
        names = self.prunable(net)
        batches = first_batches(train, self.config.batches)
        if len(batches) < self.config.batches:
            raise GemminerError(f"snip sums the gradients of {self.config.batches} training batches; the training "
                                f"data has {len(batches)}")
        scores = {name: s.to("cpu") for name, s in snip_scores(net, names, batches, self.device).items()}
        masks = keep_top(scores, exact_count({name: s.numel() for name, s in scores.items()}, self.density))
        seconds = time.perf_counter() - start
        ticket = self.make_ticket(model, masks, snip_batches=len(batches))
        return SearchResult(ticket=ticket, gem=ticket, epochs=0, seconds=seconds, scores=scores)
