"""Iterative Magnitude Pruning (Frankle & Carbin 2019), with rewinding.

A round trains the weights with the ticket's own recipe (the data set's dense recipe by
default), then prunes the globally smallest-magnitude survivors. Each round removes at
most `prune_fraction` of the survivors: the densities are (1 - f)^k with every requested
stop inserted, and each stop keeps exactly round(N * density) weights. Between rounds the
survivors are rewound:

- ``init``: to their step-0 values (Frankle & Carbin 2019);
- ``epoch:E``: to their values after E epochs of the first round, E possibly fractional
  ("IMP with warmup", Frankle et al. 2020; the official ResNet-20 comparison rewinds to
  iteration 1000, about 2.6 epochs of 150). Later rounds train from step E to the end;
- ``lr``: not at all; they keep their trained values and the next round replays the whole
  learning-rate schedule (learning-rate rewinding, Renda et al. 2020).

The ticket's training is IMP's own last round: `SearchResult.start_state` and
`start_step` say where it starts. Every stop's mask is kept (`SearchResult.tickets`), so one
run serves a whole density curve.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.init import init_hash, state_hash
from gemminer.masking import attach_fixed_masks, weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.methods.scoring import keep_top
from gemminer.train import Batch, evaluate, known_length


@dataclass
class IMPConfig:
    epochs: int = field(default=150, metadata={"help": "training epochs per round"})
    prune_fraction: float = field(default=0.2, metadata={"help": "largest fraction of the survivors a round prunes",
                                                         "tune": {"low": 0.1, "high": 0.5}})
    keep_densities: list[float] | None = field(
        default=None, metadata={"help": "further densities the rounds stop at exactly (their tickets are kept)"})
    rewind: str = field(default="init", metadata={
        "help": "init (step 0) | epoch:E (weights after E epochs of round 1, 'IMP with warmup') | lr (keep the "
                "trained weights, replay the lr schedule)"})

    def validate(self) -> None:
        for density in self.keep_densities or []:
            if not (math.isfinite(density) and 0 < density <= 1):
                raise GemminerError(f"search.keep_densities must lie in (0, 1], got {density}")
        rewind_epoch(self.rewind, self.epochs)


def rewind_epoch(rewind: str, epochs: int) -> float | None:
    """E of ``epoch:E`` (None for init and lr), checked to lie inside the first round."""
    if rewind in ("init", "lr"):
        return None
    prefix, _, value = rewind.partition(":")
    try:
        epoch = float(value) if prefix == "epoch" else math.nan
    except ValueError:
        epoch = math.nan
    if not math.isfinite(epoch):
        raise GemminerError(f"unknown search.rewind {rewind!r}; allowed: init, lr, epoch:E (e.g. epoch:2.6)")
    if not 0 < epoch < epochs:
        raise GemminerError(f"search.rewind epoch:{value} must lie inside the first round (0 < E < {epochs})")
    return epoch


NEAR_GRID = 0.01  # a requested density this little (relatively) below a grid point takes that point's round


def density_stops(target: float, prune_fraction: float = 0.2, keep: Iterable[float] = ()) -> list[float]:
    """The densities the rounds prune to: (1 - f)^k while above the target, with every requested density
    (and the target) inserted, in decreasing order. A requested density within `NEAR_GRID` below a grid
    point replaces it, as the paper's densities are (1.44% is 0.8^19 = 1.4412%: 19 rounds, not a 20th
    round of 150 epochs that prunes 3 weights); that round prunes up to 1% more than f."""
    requested = sorted({d for d in (*keep, target) if target <= d < 1}, reverse=True)
    stops, k = [], 1
    while True:
        grid = (1 - prune_fraction) ** k
        while requested and requested[0] >= grid * (1 - NEAR_GRID) - 1e-12:  # a stop at or near the next grid point
            stops.append(requested.pop(0))
        if not requested:
            return stops
        if not stops or grid < stops[-1] - 1e-12:  # a stop at or just below it took its round
            stops.append(float(f"{grid:.12g}"))  # 0.512, not 0.5120000000000001: it names files and keys
        k += 1


def plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict under plain names (``layer.weight``), masks left out: the
    unmasked weights and every buffer, cloned to the CPU."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".parametrizations.weight." in name:
            if not name.endswith(".parametrizations.weight.original"):
                continue  # the mask itself
            name = name.replace(".parametrizations.weight.original", ".weight")
        state[name] = tensor.detach().to("cpu").clone()
    return state


class _StepCounter:
    """Optimizer steps of the first round, checkpointed with the loop (for the rewind point)."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])


class IMP(PruningMethod):
    name = "imp"
    Config = IMPConfig

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        from gemminer.finetune import finetune  # finetune imports the method base: import late

        config = self.config
        if self.density >= 1:
            raise GemminerError("imp prunes: its density must be below 1")
        names = self.prunable(model)
        sizes = {name: w.numel() for name, w in weights(model, names).items()}
        total = sum(sizes.values())
        stops = density_stops(self.density, config.prune_fraction, config.keep_densities or ())
        requested = {f"{d:.12g}" for d in (*(config.keep_densities or ()), self.density)}
        rewind_at = rewind_epoch(config.rewind, config.epochs)
        rewind_step = 0
        if rewind_at is not None:
            steps = known_length(train)
            if steps is None:
                raise GemminerError("search.rewind epoch:E needs training batches with a length")
            rewind_step = round(rewind_at * steps)
            if not 0 < rewind_step < config.epochs * steps:
                raise GemminerError(f"search.rewind {config.rewind} is step {rewind_step}, not inside the first round")
        initial = plain_state(model)
        # progress survives a kill: it lives in the checkpoint's pipeline, saved with every checkpoint
        progress = checkpoint.pipeline.setdefault("method_state", {}) if checkpoint is not None else {}
        progress.setdefault("round", 0)
        progress.setdefault("masks", {name: torch.ones(w.shape, dtype=torch.bool)
                                      for name, w in weights(model, names).items()})
        for key in ("history", "rounds", "tickets", "starts"):
            progress.setdefault(key, [] if key in ("history", "rounds") else {})
        progress.setdefault("epochs", 0.0)
        progress.setdefault("seconds", 0.0)

        while progress["round"] < len(stops):
            index = progress["round"]
            round_start = time.perf_counter()
            if index == 0 or config.rewind == "init":
                weights_from, start_step = initial, 0
            elif config.rewind == "lr":
                weights_from, start_step = progress["trained"], 0
            else:
                weights_from, start_step = progress["rewind"], rewind_step
            phase = f"imp-round-{index + 1}"
            if "stream" in progress and (checkpoint is None or checkpoint.phase_state(phase) is None) \
                    and hasattr(train, "load_state_dict"):
                train.load_state_dict(progress["stream"])  # a resume between rounds continues the same stream
            net = copy.deepcopy(model).to(self.device)
            net.load_state_dict(weights_from)
            attach_fixed_masks(net, {name: mask.to(self.device) for name, mask in progress["masks"].items()})
            counter = _StepCounter()

            def capture(net: nn.Module = net, counter: _StepCounter = counter, first: bool = index == 0) -> None:
                counter.steps += 1
                if first and counter.steps == rewind_step:
                    progress["rewind"] = plain_state(net)

            rows = finetune(net, train, test, epochs=config.epochs, config=self.training, log=log,
                            progress=self.progress, phase=phase, checkpoint=checkpoint,
                            start_step=start_step, after_step=capture if rewind_step else None,
                            extra_state={"imp_steps": counter}, eval_every=self.eval_every, compile=self.compile)
            trained = plain_state(net)
            magnitudes = {name: trained[name].abs() for name in names}
            keep = round(total * stops[index])
            masks = keep_top(magnitudes, keep, eligible=progress["masks"])
            accuracy = rows[-1].get("test_acc") if rows else (evaluate(net, test).accuracy if test else None)
            progress["epochs"] += config.epochs - start_step / len(train) if start_step else config.epochs
            progress["seconds"] += rows[-1]["seconds"] if rows else time.perf_counter() - round_start
            progress["history"] += rows
            progress["rounds"].append({"round": index + 1, "density": sum(int(m.sum()) for m in
                                                                          progress["masks"].values()) / total,
                                       "pruned_to": keep / total, "kept": keep, "test_acc": accuracy,
                                       "epochs": progress["epochs"], "seconds": progress["seconds"]})
            progress["masks"] = masks
            progress["tickets"][f"{stops[index]:.12g}"] = masks
            if config.rewind == "lr":
                progress["trained"] = trained
                if f"{stops[index]:.12g}" in requested:  # every stop's own start would be a copy of the model each
                    progress["starts"][f"{stops[index]:.12g}"] = trained
            if hasattr(train, "state_dict"):
                progress["stream"] = train.state_dict()
            progress["round"] = index + 1
            if checkpoint is not None:
                checkpoint.pipeline["rows"] = list(progress["history"])  # a resume keeps earlier rounds' rows
                checkpoint.save(None)  # the round is done: a resume starts the next one

        # the rounds' own seconds (a resumed run's too) and this process's set-up
        return self._result(model, progress, stops, rewind_step, progress["seconds"])

    def _result(self, model: nn.Module, progress: dict[str, Any], stops: list[float],
                rewind_step: int, seconds: float) -> SearchResult:
        config = self.config
        if config.rewind == "init":
            start_state, start_step, start_point = None, 0, "init"
        elif config.rewind == "lr":
            start_state, start_step, start_point = progress["trained"], 0, "trained"
        else:
            start_state, start_step, start_point = progress["rewind"], rewind_step, config.rewind
        extra = {"rewind": config.rewind, "start_point": start_point, "start_step": start_step,
                 "rounds": len(stops), "search_epochs": config.epochs, "init_hash": init_hash(model)}

        parameters = {name for name, _ in model.named_parameters()}  # init_hash covers parameters only

        def ticket_of(masks: dict[str, Tensor], density: float, start: dict[str, Tensor] | None) -> Any:
            ticket = self.make_ticket(model, masks, **extra)
            ticket.metadata["density_target"] = density
            if config.rewind == "lr" and start is None:  # a stop that was not asked for: its weights were not kept
                ticket.metadata["start_point"] = "trained (not kept: list the density in keep_densities)"
            if start is not None:  # the weights its training starts from: a fingerprint that eval checks
                ticket.metadata["start_hash"] = state_hash({k: v for k, v in start.items() if k in parameters})
            return ticket

        tickets, starts = {}, {}
        for density in stops:
            key = f"{density:.12g}"
            start = progress["starts"].get(key) if config.rewind == "lr" else start_state
            tickets[density] = ticket_of(progress["tickets"][key], density, start)
            if config.rewind == "lr" and key in progress["starts"]:
                starts[density] = start
        final = copy.deepcopy(tickets[stops[-1]])
        final.metadata["density_target"] = self.density
        return SearchResult(ticket=final, gem=final, epochs=_whole(progress["epochs"]), seconds=seconds,
                            history=list(progress["history"]), start_state=start_state, start_step=start_step,
                            start_point=start_point,
                            tickets=tickets, start_states=starts,
                            tables={"rounds.csv": list(progress["rounds"])})


def _whole(epochs: float) -> float | int:
    """Epoch counts as integers where they are whole (fractional only after a fractional rewind)."""
    return int(epochs) if float(epochs).is_integer() else round(epochs, 6)
