"""Dense reference: the all-ones ticket (plain training of the same model)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gemminer.checkpoint import Checkpointer
from gemminer.masking import weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.train import Batch


class Dense(PruningMethod):
    name = "dense"
    needs_data = False  # data-free: the ticket depends on the weights alone

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights(model, self.prunable(model)).items()}
        ticket = self.make_ticket(model, masks)
        ticket.metadata["density_target"] = 1.0
        return SearchResult(ticket=ticket, gem=ticket)
