"""The interface every pruning method shares: ``find(model, data) -> Ticket``."""

from __future__ import annotations

import copy
import dataclasses
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gemminer import distributed
from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.init import WEIGHT_INITS, init_hash, initialize_weights
from gemminer.masking import prunable_names, tied_names
from gemminer.seeding import make_generator
from gemminer.ticket import Ticket
from gemminer.train import Batch, evaluate, fit, known_length, recalibrate_batchnorm, resolve_device, stateful_streams

MetricsLog = Callable[[dict[str, Any]], None]


def _recipe(name: str) -> dict[str, Any]:
    from gemminer.config import RECIPES

    return RECIPES[name]


@dataclass
class SearchResult:
    """What a search produced.

    ticket: the mask used for fine-tuning. gem: the method's own mask at the end of
    the search where it differs (Gem-Miner's rare gem, before unflagging); else the
    ticket. epochs: training epochs spent finding the ticket (the cost claim).
    network: the searched copy of the model where the method trains one (for Gem-Miner,
    with its score parametrizations still attached), else None.
    init_state: the state dict the ticket was found on when the method re-drew the
    weights (``init`` other than "keep"); None when they were the model's own.
    scores: the ranking a score-then-threshold method kept the highest of (higher =
    kept first), so the inverted ticket can be formed the same way; None otherwise.
    start_state: the weights the ticket's training starts from, where they are not
    the initial ones (IMP's rewind point, or its trained weights under lr rewinding),
    with `start_step` the optimizer step of the training schedule it resumes at and
    `start_point` what those weights are ("init", "epoch:E", "trained").
    tickets: further tickets of the same search by density (IMP's stops), and
    start_states their own start weights where they differ from `start_state`.
    tables: extra CSV files for the run folder by name (IMP's ``rounds.csv``).
    summary: extra keys for the run's summary.json (Gem-Miner's λ and where its search ended).
    """

    ticket: Ticket
    gem: Ticket
    epochs: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    network: nn.Module | None = None
    init_state: dict[str, Tensor] | None = None
    scores: dict[str, Tensor] | None = None
    start_state: dict[str, Tensor] | None = None
    start_step: int = 0
    start_point: str = "init"
    tickets: dict[float, Ticket] = field(default_factory=dict)
    start_states: dict[float, dict[str, Tensor]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoOptions:
    """Config of a method without options."""

    def validate(self) -> None:
        pass


class PruningMethod(ABC):
    """A method finds a Ticket for a model from training data.

    Subclasses set `name` and `Config` (a dataclass of their options) and implement
    `_search` on the model they are handed. `find` and `search` never change the
    caller's model: with ``init="keep"`` (default) its own weights are the initial
    weights; with ``"signed_constant"`` or ``"kaiming_normal"`` `search` re-draws a copy
    from `seed` first (the same draw as `initialize`) and `SearchResult.init_state`
    holds it, so no method repeats this.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    # how the method was published: the weights it draws by default and the recipe its
    # ticket trains with ("gemminer": the paper's fine-tuning, lr 0.01; "dense": the data
    # set's standard dense training). The CLI config resolves its defaults from these.
    weight_init: ClassVar[str] = "kaiming_normal"
    recipe: ClassVar[str] = "dense"
    # whether the method ranks weights by a score and keeps the highest (invert sanity check)
    ranked: ClassVar[bool] = False
    # whether the method learns from the training data (an empty data set is then an error)
    needs_data: ClassVar[bool] = True

    def __init__(self, density: float, config: Any = None, *, seed: int = 0, device: str | torch.device = "auto",
                 prune_first: bool = True, prune_last: bool = True, progress: bool = False,
                 bn_recalibration_batches: int = 20, init: str = "keep", training: Any = None,
                 eval_every: int = 1, compile: bool = False, **options: Any) -> None:
        from gemminer.config import FinetuneConfig, check_integer, check_ranges  # (config imports the registry)

        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise GemminerError(f"density must be a number in (0, 1], got {density!r}")
        check_integer("seed", seed)
        check_integer("bn_recalibration_batches", bn_recalibration_batches, 0)
        check_integer("eval_every", eval_every, 1)
        if config is not None and not isinstance(config, self.Config):
            raise GemminerError(f"{self.name}'s config is a {self.Config.__name__}, not a {type(config).__name__}")
        if training is not None and not isinstance(training, FinetuneConfig):
            raise GemminerError(f"training is a FinetuneConfig, not a {type(training).__name__}")
        if init not in WEIGHT_INITS:
            raise GemminerError(f"unknown init {init!r}; allowed: {', '.join(WEIGHT_INITS)}")
        config = copy.deepcopy(config) if config is not None else self.Config()
        if options:
            known = {item.name for item in dataclasses.fields(config)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise GemminerError(f"{self.name} has no option {unknown[0]!r}; its options: "
                                    f"{', '.join(sorted(known))}")
            config = dataclasses.replace(config, **options)
        check_ranges(config, "search.")  # every number of every method, before the method's own checks
        config.validate()
        self.density, self.config, self.seed = float(density), config, int(seed)  # numpy scalars as plain ones
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.prune_first, self.prune_last, self.progress = prune_first, prune_last, progress
        self.bn_recalibration_batches = bn_recalibration_batches
        self.eval_every = eval_every  # test accuracy every this many epochs (and after the last)
        self.compile = compile  # training steps and evaluation under torch.compile (train.compiled)
        self.init = init
        # the recipe the ticket trains with (a FinetuneConfig); methods that train weights
        # themselves (IMP's rounds) train with it too
        self.training = copy.deepcopy(training) if training is not None else FinetuneConfig(
            **{key: value for key, value in _recipe(self.recipe).items()})

    @classmethod
    def check_model(cls, config: Any, model: nn.Module, prunable: list[str]) -> None:
        """Refuse options that do not fit `model` (a file they name), before a run folder is written;
        the default has none to check."""
        return None

    def find(self, model: nn.Module, train: Iterable[Batch]) -> Ticket:
        """The ticket for `model` (its own weights, or re-drawn ones per `init`)."""
        return self.search(model, train).ticket

    @torch.no_grad()
    def initialize(self, model: nn.Module) -> nn.Module:
        """Re-draw `model`'s prunable weights in place as this method's `init` and `seed`
        say: the weights a ticket found with ``init != "keep"`` belongs to."""
        initialize_weights(model, self.prunable(model), self.init, make_generator(self.seed, "weights"))
        return model

    def search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
               log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
               checkpoint: Checkpointer | None = None) -> SearchResult:
        """Find a ticket; per-epoch metrics go to `log` as dicts.

        With `test`, methods that train report a test accuracy per epoch; with
        `recalibration` (training batches in an order of their own, so the training
        order does not depend on it) BatchNorm statistics are recomputed first.
        With `checkpoint`, a method that trains saves and resumes its state through it
        (state that spans several training loops goes in ``checkpoint.pipeline["method_state"]``,
        which the pipeline drops once the search's files are written).
        """
        # (iterables without a length are found out by the training loop, which refuses an empty epoch)
        if self.needs_data and known_length(train) == 0:
            raise GemminerError(f"{self.name} learns from training data, and the training data is empty")
        self.prunable(model)  # a layer it cannot mask (a prune or weight_norm hook) refused by name, before any copy
        if self.init == "keep":
            return self._search(model, train, test, log, recalibration, checkpoint)
        initial = self.initialize(copy.deepcopy(model))
        result = self._search(initial, train, test, log, recalibration, checkpoint)
        result.init_state = {name: tensor.detach().clone() for name, tensor in initial.state_dict().items()}
        return result

    @abstractmethod
    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None,
                log: MetricsLog | None, recalibration: Iterable[Batch] | None,
                checkpoint: Checkpointer | None) -> SearchResult:
        """The method itself, on `model`'s current weights (see `search`); it must not change `model`."""

    # helpers for subclasses ---------------------------------------------------------
    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """A copy of `model` on this method's device whose own parameters never train (score searches)."""
        net = copy.deepcopy(model).to(self.device)
        for parameter in net.parameters():
            parameter.requires_grad_(False)  # weights, biases and BN affine stay at their initial values
        return net

    def fit_scores(self, net: nn.Module, scores: list[Tensor], train: Iterable[Batch], *, epochs: int,
                   optimizer: str, lr: float, momentum: float, weight_decay: float | Callable[[int], float],
                   lr_schedule: str,
                   end_of_epoch: Callable[[int], dict[str, Any]], after_step: Callable[[], None] | None = None,
                   log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                   checkpoint: Checkpointer | None = None, test: Iterable[Batch] | None = None,
                   extra_state: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Train `scores` (SGD with momentum, or Adam; cosine or constant lr) through the shared loop,
        checkpointed and resumable as the "search" phase; returns the per-epoch rows. The searched
        network's accuracy on `test` is measured every `eval_every` epochs (`searched_accuracy`).
        `weight_decay` may be a function of the 0-based epoch, read again after each `end_of_epoch` (a
        penalty that changes between epochs); `extra_state` adds objects with state_dict/load_state_dict to
        the checkpoint."""
        decay = weight_decay if callable(weight_decay) else lambda epoch: weight_decay
        if optimizer == "sgd":
            score_optimizer = torch.optim.SGD(scores, lr=lr, momentum=momentum, weight_decay=decay(0))
        else:
            score_optimizer = torch.optim.Adam(scores, lr=lr, weight_decay=decay(0))

        def end_of_epoch_then_decay(epoch: int) -> dict[str, Any]:
            row = end_of_epoch(epoch)
            for group in score_optimizer.param_groups:
                group["weight_decay"] = decay(epoch + 1)
            return row

        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(score_optimizer, epochs)
                     if lr_schedule == "cosine" else None)
        state = {"net": net, "optimizer": score_optimizer, **({"scheduler": scheduler} if scheduler else {}),
                 **stateful_streams(train=train, recalibration=recalibration), **(extra_state or {})}
        return fit(distributed.wrap(net), train, score_optimizer, scheduler, epochs, phase="search",
                   end_of_epoch=end_of_epoch_then_decay if callable(weight_decay) else end_of_epoch,
                   after_step=after_step, log=log, checkpoint=checkpoint, state=state,
                   progress=self.progress, evaluation=lambda: self.searched_accuracy(net, test, recalibration),
                   eval_every=self.eval_every, compile=self.compile)

    def searched_accuracy(self, net: nn.Module, test: Iterable[Batch] | None,
                          recalibration: Iterable[Batch] | None) -> dict[str, float]:
        """``{"test_acc": ...}`` of a searched network at init (empty without `test`); BatchNorm is
        recalibrated first, which changes no search step (training uses batch statistics)."""
        if test is None:
            return {}
        if recalibration is not None:
            # every measurement recalibrates on the same batches (the stream is put back where it was), so
            # a measurement does not depend on how many came before it: --eval-every changes no number
            position = recalibration.state_dict() if hasattr(recalibration, "state_dict") else None
            recalibrate_batchnorm(net, recalibration, self.bn_recalibration_batches)
            if position is not None:
                recalibration.load_state_dict(position)
        return {"test_acc": evaluate(net, test).accuracy}

    def prunable(self, model: nn.Module) -> list[str]:
        return prunable_names(model, self.prune_first, self.prune_last)

    def make_ticket(self, model: nn.Module, masks: dict[str, Tensor], **extra: Any) -> Ticket:
        """A ticket with the standard metadata: method, target, seed, init hash."""
        metadata = {"method": self.name, "density_target": self.density, "seed": self.seed,
                    "init_hash": init_hash(model), **extra}
        tied = tied_names(model, list(masks))
        if tied:  # a weights file holds tied copies apart: export masks them too
            metadata["tied"] = tied
        return Ticket({name: mask.detach().to("cpu").bool() for name, mask in masks.items()}, metadata)

