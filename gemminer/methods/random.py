"""Random tickets: a per-layer density rule, or the per-layer counts of another ticket.

Positions are always uniformly random inside a layer; what the rules decide is how many
weights each layer keeps:

- ``uniform``: every layer keeps the same fraction (the default).
- ``erk``: Erdős–Rényi-Kernel (Evci et al., "Rigging the Lottery", ICML 2020): density
  proportional to sum(shape) / prod(shape) of the weight, so small layers stay denser.
- ``smart``: Smart-Ratio (Su et al., "Sanity-Checking Pruning Methods: Random Tickets can
  Win the Jackpot", NeurIPS 2020; also the random baseline of the Gem-Miner code): the
  last layer keeps 30%, layer l of L keeps a share proportional to (L-l+1)^2 + (L-l+1)
  (divided by l^2 in the VGG variant), so density falls with depth.

Every rule ends in the same largest-remainder split, so the ticket keeps exactly
round(N * density) weights. With `like_ticket` it is the layerwise-shuffle control:
the same number of weights in every layer as the given ticket, positions drawn at random.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.masking import prunable_names, weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.seeding import make_generator
from gemminer.train import Batch

RATIOS = ("uniform", "erk", "smart")
SMART_VARIANTS = ("resnet", "vgg")
SMART_LAST_KEEP = 0.3  # the fraction of the last layer Smart-Ratio keeps (the official code's default)


@dataclass
class RandomConfig:
    ratio: str = field(default="uniform", metadata={
        "help": "per-layer density: uniform | erk (Erdős–Rényi-Kernel) | smart (Smart-Ratio)"})
    smart_variant: str = field(default="resnet", metadata={
        "help": "Smart-Ratio share: resnet ((L-l+1)^2 + (L-l+1)) | vgg (the same over l^2)"})
    like_ticket: str | None = field(default=None, metadata={
        "help": "keep as many weights per layer as this ticket file (overrides ratio)"})

    def validate(self) -> None:
        if self.ratio not in RATIOS:
            raise GemminerError(f"unknown search.ratio {self.ratio!r}; allowed: {', '.join(RATIOS)}")
        if self.smart_variant not in SMART_VARIANTS:
            raise GemminerError(f"unknown search.smart_variant {self.smart_variant!r}; "
                                f"allowed: {', '.join(SMART_VARIANTS)}")


def largest_remainder_counts(sizes: dict[str, int], densities: dict[str, float], total: int) -> dict[str, int]:
    """Per-layer counts near sizes[name] * densities[name] that sum to exactly `total`.

    Each layer gets the floor of its target; the leftover weights go one each to the
    largest remainders (ties by layer order), never past a layer's size, so rounding
    moves no layer by more than one weight from its target when the targets sum to `total`.
    """
    if not 0 <= total <= sum(sizes.values()):
        raise GemminerError(f"cannot keep {total} of {sum(sizes.values())} weights")
    exact = {name: min(max(size * densities[name], 0.0), float(size)) for name, size in sizes.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    leftover = total - sum(counts.values())
    # largest remainders first; after them (float slack only) any layer with room, in layer order
    order = sorted(exact, key=lambda name: -(exact[name] - counts[name]))
    while leftover > 0:
        for name in order:
            if leftover and counts[name] < sizes[name]:
                counts[name] += 1
                leftover -= 1
    while leftover < 0:  # targets summing above `total` (float slack): take from the smallest remainders
        for name in reversed(order):
            if leftover and counts[name] > 0:
                counts[name] -= 1
                leftover += 1
    return counts


def uniform_counts(sizes: dict[str, int], density: float) -> dict[str, int]:
    """Per-layer counts at one density, summing to exactly round(N * density)
    (largest remainders get the leftover weights, ties by layer order)."""
    return largest_remainder_counts(sizes, dict.fromkeys(sizes, density), round(sum(sizes.values()) * density))


def capped_proportional(sizes: dict[str, int], raw: dict[str, float], budget: float) -> dict[str, float]:
    """Densities eps * raw[name], capped at 1, with sum(size * density) = `budget`.

    RigL's iteration: a layer whose density would exceed 1 becomes dense, leaves the
    budget, and eps is solved again over the rest until no layer exceeds 1. (RigL caps
    only the largest per round; capping raises eps, so capping every exceeding layer at
    once reaches the same fixed point in fewer rounds.)
    """
    dense: set[str] = set()
    while True:
        free = [name for name in sizes if name not in dense]
        weight = sum(raw[name] * sizes[name] for name in free)
        remaining = budget - sum(sizes[name] for name in dense)
        if not free or weight <= 0:
            return {name: 1.0 if name in dense else 0.0 for name in sizes}
        eps = max(remaining, 0.0) / weight
        over = [name for name in free if eps * raw[name] > 1]
        if not over:
            return {name: 1.0 if name in dense else eps * raw[name] for name in sizes}
        dense.update(over)


def carried_forward(sizes: dict[str, int], raw: dict[str, float], budget: float) -> dict[str, float]:
    """Densities scale * raw[name] with sum(size * density) = `budget`, where a layer over 1 keeps all its
    weights and hands its surplus to the following layers in turn, each filled up to dense: Smart-Ratio's
    capping in its authors' code and in the official Gem-Miner code (not RigL's re-solved scale, which
    spreads the surplus over every layer)."""
    weight = sum(raw[name] * sizes[name] for name in sizes)
    scale = budget / weight if weight > 0 else 0.0
    densities, surplus = {}, 0.0
    for name in sizes:
        density = scale * raw[name]
        if density >= 1:
            surplus += (density - 1) * sizes[name]
            density = 1.0
        else:
            taken = min(surplus, (1 - density) * sizes[name])
            density += taken / sizes[name]
            surplus -= taken
        densities[name] = density
    return densities


def erk_densities(shapes: dict[str, Sequence[int]], total: int) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities keeping `total` weights: proportional to
    sum(shape) / prod(shape), i.e. (n_in + n_out + k_h + k_w) / (n_in n_out k_h k_w)
    for a 2-d convolution and (n_in + n_out) / (n_in n_out) for a linear layer."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    return capped_proportional(sizes, raw, total)


def smart_densities(sizes: dict[str, int], total: int, variant: str = "resnet", *, first_position: int = 1,
                    depth: int | None = None, last_keep: float | None = SMART_LAST_KEEP) -> dict[str, float]:
    """Smart-Ratio densities keeping `total` weights.

    Layer l (1-based position among the network's `depth` prunable-type layers; the
    given layers sit at `first_position`, `first_position` + 1, ...) keeps a fraction
    proportional to (L-l+1)^2 + (L-l+1), over l^2 for ``variant="vgg"``; the last layer
    keeps `last_keep` of its weights (None: it follows the share rule too, for a network
    whose classifier is not pruned). A layer over density 1 is capped and its surplus goes to the next
    layers in order (`carried_forward`, as the authors' code does).
    When `last_keep` alone would leave fewer than one weight per other layer (cnn1d at
    density 0.02), every other layer keeps exactly one weight and the last layer the rest
    of the budget, with a warning: the rule cannot hold, and no layer may be cut off.
    """
    if variant not in SMART_VARIANTS:
        raise GemminerError(f"unknown smart_variant {variant!r}; allowed: {', '.join(SMART_VARIANTS)}")
    names = list(sizes)
    depth = depth if depth is not None else first_position + len(names) - 1
    special = last_keep is not None and len(names) > 1
    shared = names[:-1] if special else names
    share = {}
    for index, name in enumerate(shared):
        position = first_position + index
        rank = depth - position + 1
        share[name] = (rank * rank + rank) / (position * position if variant == "vgg" else 1)
    if not special:
        return carried_forward(sizes, share, total)
    last = names[-1]
    fixed = last_keep * sizes[last]
    others = {name: sizes[name] for name in shared}
    if fixed > total - len(others):
        if total < len(names):
            raise GemminerError(f"Smart-Ratio keeps at least one weight per layer, but {total} weights "
                                f"are fewer than the {len(names)} layers; raise the density")
        rest = total - len(others)
        warnings.warn(f"Smart-Ratio: {last_keep:.0%} of the last layer ({fixed:.0f} weights) would leave fewer "
                      f"than one weight per other layer of the {total} kept; the other layers keep one weight "
                      f"each and the last layer {rest}", UserWarning, stacklevel=2)
        return {**{name: 1.0 / size for name, size in others.items()}, last: rest / sizes[last]}
    if total - fixed >= sum(others.values()):  # a high density: everything else dense, the last takes the rest
        return {**dict.fromkeys(others, 1.0), last: (total - sum(others.values())) / sizes[last]}
    return {**carried_forward(others, share, total - fixed), last: last_keep}


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
    needs_data = False  # data-free: the ticket depends on the weights alone
    Config = RandomConfig

    def layer_counts(self, model: nn.Module) -> dict[str, int]:
        """How many weights each prunable layer keeps under this config's ratio rule."""
        shapes = {name: tuple(w.shape) for name, w in weights(model, self.prunable(model)).items()}
        sizes = {name: math.prod(shape) for name, shape in shapes.items()}
        total = round(sum(sizes.values()) * self.density)
        if self.config.ratio == "erk":
            return largest_remainder_counts(sizes, erk_densities(shapes, total), total)
        if self.config.ratio == "smart":
            # positions and depth over all of the network's layers, so the shares do not depend on
            # whether the first or last layer is pruned; the 30% rule only for a pruned classifier
            densities = smart_densities(sizes, total, self.config.smart_variant,
                                        first_position=1 if self.prune_first else 2,
                                        depth=len(prunable_names(model)),
                                        last_keep=SMART_LAST_KEEP if self.prune_last else None)
            return largest_remainder_counts(sizes, densities, total)
        return uniform_counts(sizes, self.density)

    @classmethod
    def check_model(cls, config: Any, model: nn.Module, prunable: list[str]) -> None:
        if config is not None and config.like_ticket:
            _like_ticket(config.like_ticket, {name: w.shape for name, w in weights(model, prunable).items()})

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        shapes = {name: w.shape for name, w in weights(model, self.prunable(model)).items()}
        if self.config.like_ticket:
            reference = _like_ticket(self.config.like_ticket, shapes)
            counts = {name: int(reference.masks[name].sum()) for name in shapes}
            extra = {}
        else:
            counts = self.layer_counts(model)
            extra = {"ratio": self.config.ratio}
        masks = random_masks(shapes, counts, make_generator(self.seed, "random-ticket"))
        ticket = self.make_ticket(model, masks, **extra)
        return SearchResult(ticket=ticket, gem=ticket)


def _like_ticket(path: str, shapes: dict[str, Any]) -> Any:
    """The ticket `like_ticket` names, refused unless it masks exactly these layers in these shapes (a ticket
    of another width would carry its counts over to layers of other sizes, and another density)."""
    from gemminer.ticket import Ticket

    reference = Ticket.load(path)
    if set(reference.masks) != set(shapes):
        raise GemminerError(f"{path} masks other layers than this model's prunable ones (a ticket of another model?)")
    for name, shape in shapes.items():
        if tuple(reference.masks[name].shape) != tuple(shape):
            raise GemminerError(f"ticket {path} does not fit the model: {name} has shape {tuple(shape)}, the "
                                f"ticket's mask {tuple(reference.masks[name].shape)} (a ticket of another width?)")
    return reference
