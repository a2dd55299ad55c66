"""Random tickets: uniform per-layer density, or the per-layer counts of another ticket.

With `like_ticket` it is the layerwise-shuffle control: same number of weights kept in
every layer as the given ticket, positions drawn at random.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.masking import weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.seeding import make_generator
from gemminer.train import Batch


@dataclass
class RandomConfig:
    like_ticket: str | None = field(
        default=None, metadata={"help": "keep as many weights per layer as this ticket file (default: uniform)"})

    def validate(self) -> None:
        pass


def uniform_counts(sizes: dict[str, int], density: float) -> dict[str, int]:
    """Per-layer counts at one density, summing to exactly round(N * density)
    (largest remainders get the leftover weights, ties by layer order)."""
    exact = {name: size * density for name, size in sizes.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    leftover = round(sum(sizes.values()) * density) - sum(counts.values())
    by_remainder = sorted(exact, key=lambda name: -(exact[name] - counts[name]))
    for name in by_remainder[:leftover]:
        counts[name] += 1
    return counts


def random_masks(shapes: dict[str, torch.Size], counts: dict[str, int], generator: torch.Generator
                 ) -> dict[str, torch.Tensor]:
    """Exactly counts[name] ones per layer, at uniformly random positions."""
    masks = {}
    for name, shape in shapes.items():
        flat = torch.zeros(math.prod(shape), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=generator)[:counts[name]]] = True
        masks[name] = flat.view(shape)
    return masks


class RandomTicket(PruningMethod):
    name = "random"
    Config = RandomConfig

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        shapes = {name: w.shape for name, w in weights(model, self.prunable(model)).items()}
        if self.config.like_ticket:
            from gemminer.ticket import Ticket

            reference = Ticket.load(self.config.like_ticket)
            if set(reference.masks) != set(shapes):
                raise GemminerError(f"{self.config.like_ticket} masks other layers than this model's prunable ones")
            counts = {name: int(reference.masks[name].sum()) for name in shapes}
        else:
            counts = uniform_counts({name: math.prod(shape) for name, shape in shapes.items()}, self.density)
        masks = random_masks(shapes, counts, make_generator(self.seed, "random-ticket"))
        ticket = self.make_ticket(model, masks)
        return SearchResult(ticket=ticket, gem=ticket)
