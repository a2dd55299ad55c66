"""Magnitude pruning at initialization: keep the weights of largest |w|, one global ranking,
one shot (the baseline of Frankle et al., "Pruning Neural Networks at Initialization: Why
are We Missing the Mark?", ICLR 2021, and of the SNIP / GraSP / SynFlow papers).

With signed-constant weights every weight of a layer has the same |w|: the ranking only
orders layers, the tie rule decides the rest, and whole layers are kept or removed. Such
weights are refused rather than turned into a meaningless ticket.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from torch import Tensor, nn

from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.masking import weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.methods.scoring import exact_count, keep_top
from gemminer.train import Batch


def constant_magnitude_layers(scores: dict[str, Tensor]) -> list[str]:
    """The layers with more than one weight whose |w| are all equal (nothing to rank within)."""
    return [name for name, s in scores.items() if s.numel() > 1 and bool((s == s.flatten()[0]).all())]


class Magnitude(PruningMethod):
    """Global |w| at initialization, one shot; refuses weights whose |w| tie within a layer."""

    name = "magnitude"
    needs_data = False  # data-free: the ticket depends on the weights alone
    ranked = True

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        start = time.perf_counter()
        # |w| needs no forward pass and no copy on the device: read the caller's weights, change nothing
        scores = {name: w.detach().abs().to("cpu", copy=True)
                  for name, w in weights(model, self.prunable(model)).items()}
        tied = constant_magnitude_layers(scores)
        if tied:
            shown = ", ".join(tied[:3]) + (f" and {len(tied) - 3} more" if len(tied) > 3 else "")
            raise GemminerError(f"magnitude pruning needs weights of varying magnitude; all |w| are equal in {shown} "
                                f"(signed-constant weights tie within every layer): "
                                f"use --model-weight-init kaiming_normal")
        masks = keep_top(scores, exact_count({name: s.numel() for name, s in scores.items()}, self.density))
        seconds = time.perf_counter() - start
        ticket = self.make_ticket(model, masks)
        return SearchResult(ticket=ticket, gem=ticket, epochs=0, seconds=seconds, scores=scores)
