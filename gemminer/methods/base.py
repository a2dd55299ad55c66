"""The interface every pruning method shares: ``find(model, data) -> Ticket``."""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.init import init_hash
from gemminer.masking import prunable_names
from gemminer.ticket import Ticket
from gemminer.train import Batch, resolve_device

MetricsLog = Callable[[dict[str, Any]], None]


@dataclass
class SearchResult:
    """What a search produced.

    ticket: the mask used for fine-tuning. gem: the method's own mask at the end of
    the search where it differs (Gem-Miner's rare gem, before unflagging); else the
    ticket. epochs: training epochs spent finding the ticket (the cost claim).
    network: the searched copy of the model where the method trains one (for Gem-Miner,
    with its score parametrizations still attached), else None.
    """

    ticket: Ticket
    gem: Ticket
    epochs: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    network: nn.Module | None = None


@dataclass
class NoOptions:
    """Config of a method without options."""

    def validate(self) -> None:
        pass


class PruningMethod(ABC):
    """A method finds a Ticket for a model from training data.

    Subclasses set `name` and `Config` (a dataclass of their options) and implement
    `search`. `find` never changes the model it is given.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions

    def __init__(self, density: float, config: Any = None, *, seed: int = 0, device: str | torch.device = "auto",
                 prune_first: bool = True, prune_last: bool = True, progress: bool = False,
                 bn_recalibration_batches: int = 20, **options: Any) -> None:
        if not 0 < density <= 1:
            raise GemminerError(f"density must be in (0, 1], got {density}")
        config = copy.deepcopy(config) if config is not None else self.Config()
        if options:
            config = dataclasses.replace(config, **options)
        config.validate()
        self.density, self.config, self.seed = density, config, seed
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.prune_first, self.prune_last, self.progress = prune_first, prune_last, progress
        self.bn_recalibration_batches = bn_recalibration_batches

    def find(self, model: nn.Module, train: Iterable[Batch]) -> Ticket:
        """The ticket for `model` (whose current weights are the initial weights)."""
        return self.search(model, train).ticket

    @abstractmethod
    def search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
               log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
               checkpoint: Checkpointer | None = None) -> SearchResult:
        """Find a ticket; per-epoch metrics go to `log` as dicts.

        With `test`, methods that train report a test accuracy per epoch; with
        `recalibration` (training batches in an order of their own, so the training
        order does not depend on it) BatchNorm statistics are recomputed first.
        With `checkpoint`, a method that trains saves and resumes its state through it.
        """

    # helpers for subclasses ---------------------------------------------------------
    def prunable(self, model: nn.Module) -> list[str]:
        return prunable_names(model, self.prune_first, self.prune_last)

    def make_ticket(self, model: nn.Module, masks: dict[str, Tensor], **extra: Any) -> Ticket:
        """A ticket with the standard metadata: method, target, seed, init hash."""
        metadata = {"method": self.name, "density_target": self.density, "seed": self.seed,
                    "init_hash": init_hash(model), **extra}
        return Ticket({name: mask.detach().to("cpu").bool() for name, mask in masks.items()}, metadata)


def stateful_streams(**streams: object) -> dict[str, object]:
    """The data streams whose position can be checkpointed (the toolkit's Batches; a
    plain DataLoader has no state_dict and restarts its epoch on resume)."""
    return {name: stream for name, stream in streams.items()
            if stream is not None and hasattr(stream, "state_dict") and hasattr(stream, "load_state_dict")}
